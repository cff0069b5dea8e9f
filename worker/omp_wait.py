"""How long a worker's OpenMP threads spin between parallel regions before
they sleep. Imported and applied first thing in a worker process
(`python -m decode_worker`, `python -m prefill_worker`, Ray replicas get the
same variable from their runtime_env): libgomp reads its environment once,
when torch loads it.

Why: torch splits each operator across its OpenMP threads, and a thread that
went to sleep must be woken, and scheduled, at the next operator. Offline,
operators follow each other within microseconds and libgomp's default spin
covers the gaps. In a worker the engine thread also waits for the GIL behind
the event loop, and the router and clients run on the same cores: the
helper thread slept between operators and every wake-up waited for a core.
Spinning up to 1,000,000 rounds (~20 ms on a Sapphire Rapids) made a
colocated worker's decode step 20-30% shorter under 16 streams (21-24 ms
against 17 ms, side by side; docs/performance.md); an idle worker stops
spinning that long after its last step. An operator's own GOMP_SPINCOUNT or
OMP_WAIT_POLICY wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

SPIN_ENV = "GOMP_SPINCOUNT"
WORKER_SPIN_COUNT = "1000000"
_USER_CHOICES = (SPIN_ENV, "OMP_WAIT_POLICY")


def worker_omp_env(environ: MutableMapping[str, str]) -> dict[str, str]:
    """The variables a worker process should start with, on top of
    `environ` (empty where the operator chose a wait policy)."""
    if any(name in environ for name in _USER_CHOICES):
        return {}
    return {SPIN_ENV: WORKER_SPIN_COUNT}


def spin_between_regions() -> bool:
    """Set the worker's spin count in this process's environment, unless the
    operator set one; False if torch is already loaded (too late: libgomp has
    read its environment) or nothing was set."""
    if "torch" in sys.modules:
        return False
    extra = worker_omp_env(os.environ)
    os.environ.update(extra)
    return bool(extra)
