"""The CPU a benchmark ran on, read from /proc/cpuinfo, so its figures are recorded beside it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

# The ISA flags worth recording beside the figures (the engine's dtype choice follows them).
RECORDED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    flags: frozenset[str]

    @classmethod
    def read(cls) -> CpuInfo:
        """The first core's; "unknown" and no flags where /proc/cpuinfo cannot be read."""
        name, flags = "unknown", frozenset[str]()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
        return cls(name, flags)

    def recorded(self) -> dict:
        return {
            "model_name": self.model_name,
            "flags": [f for f in RECORDED_FLAGS if f in self.flags],
        }
