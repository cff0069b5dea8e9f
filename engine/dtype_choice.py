"""Which dtype the engine runs in, and why.

`--dtype auto` (the default everywhere) asks for the fastest dtype this
hardware runs natively:

- CPU: bfloat16 only where the CPU has bfloat16 instructions (AMX or
  AVX512-BF16); elsewhere PyTorch emulates bfloat16 through float32
  conversions, which made it about 1.8x slower than float32 on an AVX2-only
  AMD EPYC. So: float32 there.
- GPU: the checkpoint's dtype (bfloat16 when the checkpoint names none), except
  that bfloat16 becomes float16 on a GPU without native bfloat16 (pre-Ampere).

An explicit dtype always wins. The choice carries its reason, which every
worker logs at startup and reports in its Status (shown on /cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from engine.config import DTYPE_NAMES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert sorted(DTYPES) == list(DTYPE_NAMES)
# /proc/cpuinfo flags that mean the CPU computes bfloat16 natively.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    dtype: torch.dtype
    name: str  # the key of DTYPES: "float32", "bfloat16", "float16"
    reason: str  # "requested", or why `auto` chose it
    requested: str = "auto"  # what was asked for: "auto" or a dtype name

    def describe(self) -> str:
        """One line for logs: 'float32 (auto: CPU has no native bfloat16 ...)'."""
        why = f"auto: {self.reason}" if self.requested == "auto" else self.reason
        return f"{self.name} ({why})"


def choose_dtype(
    requested: str,
    device: torch.device,
    model_dtype: str | None,
    cpu_flags: frozenset[str] | None = None,
    cuda_bf16: bool | None = None,
) -> DtypeChoice:
    """The dtype to run in. `requested`: "auto" or a name in DTYPES;
    `model_dtype`: the checkpoint's `torch_dtype` (None when it names none).
    `cpu_flags` (default: this machine's) and `cuda_bf16` (default: asks
    the GPU) are there for tests."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {requested!r}")
        return _choice(requested, "requested", requested)
    if device.type == "cpu":
        flags = host_cpu_flags() if cpu_flags is None else cpu_flags
        if any(f in flags for f in NATIVE_BF16_CPU_FLAGS):
            return _choice("bfloat16", "CPU has AMX/AVX512-BF16: bfloat16 runs natively")
        return _choice(
            "float32",
            f"CPU has no native bfloat16 (no {'/'.join(NATIVE_BF16_CPU_FLAGS)}): float32 is faster",
        )
    # A GPU (or another accelerator): the checkpoint's own dtype.
    if model_dtype in DTYPES:
        name, reason = model_dtype, f"the checkpoint's dtype ({model_dtype})"
    else:
        name, reason = "bfloat16", "the checkpoint names no dtype: bfloat16"
    if name == "bfloat16" and device.type == "cuda":
        native = _cuda_bf16_native(device) if cuda_bf16 is None else cuda_bf16
        if not native:
            return _choice("float16", f"{reason}, but this GPU has no native bfloat16: float16")
    return _choice(name, reason)


def _choice(name: str, reason: str, requested: str = "auto") -> DtypeChoice:
    return DtypeChoice(DTYPES[name], name, reason, requested)


@cache
def host_cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the `flags` line of /proc/cpuinfo), read
    once; empty where there is no such file (not Linux): no native bfloat16
    is assumed then."""
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@cache  # asked on every Status poll: the answer never changes
def _cuda_bf16_native(device: torch.device) -> bool:
    # Not torch.cuda.is_bf16_supported(): by default it also says yes where
    # bfloat16 is only emulated, which is what `auto` avoids.
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
