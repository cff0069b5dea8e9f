"""The soak's options (bench/soak.py), checked when made: a bad one is a SoakError, one line
for the user, before any cluster starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# Requests per second that keep 1 prefill + 2 decode workers of the default
# model (its default dtype, bfloat16 on CPU; 1 torch thread and 128 MiB of KV
# each) busy with the seed dataset on the 2-core development machine (AMD
# EPYC, AVX2, shared with other work: load average ~4): --rate auto measured
# 0.28 req/s (closed loop, soak_load.SATURATION_CONCURRENCY in flight; ~37 output
# tok/s).
DEFAULT_RATE = 0.3


class SoakError(ValueError):
    """Bad options, or a cluster the soak cannot run against: one line for the user."""


@dataclass(frozen=True)
class SoakConfig:
    model: str | None = None  # None: the built-in default model
    minutes: float = 10.0
    rate: float | None = DEFAULT_RATE  # requests/s; None: measure the saturation rate first
    seed: int = 0
    chaos_interval_s: tuple[float, float] = (30.0, 60.0)
    freeze_s: tuple[float, float] = (3.0, 10.0)
    dataset: str = "seed"  # one of loadgen.DATASETS
    input_len: int = 128  # dataset "random" only
    output_len: int = 128  # dataset "random" only
    stream_fraction: float = 0.8  # the rest are non-streaming requests
    request_timeout_s: float = 300.0  # past it, a request counts as lost
    settle_timeout_s: float = 90.0  # after the load: how long workers have to become idle
    kv_cache_mib: int = 128
    threads: int = 1  # torch threads per worker
    serve_args: tuple[str, ...] = ()  # more `splitserve serve` flags
    log_dir: Path | None = None  # None: a new temporary directory
    progress: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.chaos_interval_s
        if not 0 < lo <= hi:
            raise SoakError(f"--chaos-interval needs 0 < MIN <= MAX, got {lo:g},{hi:g}")
        flo, fhi = self.freeze_s
        if not 0 < flo <= fhi:
            raise SoakError(f"--freeze needs 0 < MIN <= MAX, got {flo:g},{fhi:g}")
        if not self.minutes > 0:
            raise SoakError(f"--minutes must be > 0, got {self.minutes:g}")
        if self.rate is not None and not 0 < self.rate < math.inf:
            raise SoakError(f"--rate must be a positive number or auto, got {self.rate:g}")
        if not 0 <= self.stream_fraction <= 1:
            raise SoakError(f"--stream-fraction must lie in [0, 1], got {self.stream_fraction:g}")
        if not self.request_timeout_s > 0 or not self.settle_timeout_s > 0:
            raise SoakError("--request-timeout and --settle-timeout must be > 0")

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0
