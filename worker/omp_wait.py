"""What a worker's idle OpenMP threads do between operators: spin or sleep.
Applied first thing in a worker process (`python -m decode_worker`,
`python -m prefill_worker`), since libgomp reads its environment once, when
torch loads it.

torch splits each operator across its OpenMP threads; a helper thread that
went to sleep must be woken, and given a core, at the next operator.

- **Decode (and colocated) workers spin** up to 1,000,000 rounds (~20 ms on
  a Sapphire Rapids). They step without pause while they hold requests, and
  between operators the engine thread also waits for the GIL behind the
  event loop, while the router and clients take turns on the same cores.
  Sleeping helpers (`OMP_WAIT_POLICY=PASSIVE`, what every worker had before)
  made a colocated worker's mean step 21.5 ms under 16 streams, against
  18.3 ms spinning (2 cores, runs interleaved; docs/performance.md). An idle
  worker stops spinning ~20 ms after its last step.
- **Prefill workers sleep** (PASSIVE): their work comes in bursts, and on a
  machine they share with a decode worker, a helper spinning after each
  burst would take the core the decode worker's step needs.

An operator's own `GOMP_SPINCOUNT` or `OMP_WAIT_POLICY` wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

SPIN_ENV = "GOMP_SPINCOUNT"
POLICY_ENV = "OMP_WAIT_POLICY"
DECODE_SPIN_COUNT = "1000000"


def worker_omp_env(role: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a `role` ("prefill", "decode" or "colocated") worker
    process adds to `environ` (none where the operator chose already)."""
    if SPIN_ENV in environ or POLICY_ENV in environ:
        return {}
    if role == "prefill":
        return {POLICY_ENV: "PASSIVE"}
    return {SPIN_ENV: DECODE_SPIN_COUNT}


def set_omp_wait(role: str) -> bool:
    """Put the role's wait policy in this process's environment; False if
    nothing was set (the operator chose) or torch is already loaded (too
    late: libgomp has read its environment)."""
    if "torch" in sys.modules:
        return False
    extra = worker_omp_env(role, os.environ)
    os.environ.update(extra)
    return bool(extra)
