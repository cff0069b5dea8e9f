"""The worker processes' OpenMP wait policy (worker/omp_wait.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from worker.omp_wait import DECODE_SPIN_COUNT, worker_omp_env


def test_decode_workers_spin_prefill_workers_sleep_unless_the_operator_chose():
    assert worker_omp_env("decode", {}) == {"GOMP_SPINCOUNT": DECODE_SPIN_COUNT}
    assert worker_omp_env("colocated", {}) == {"GOMP_SPINCOUNT": DECODE_SPIN_COUNT}
    assert worker_omp_env("prefill", {}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    for role in ("decode", "prefill"):
        assert worker_omp_env(role, {"GOMP_SPINCOUNT": "10"}) == {}
        assert worker_omp_env(role, {"OMP_WAIT_POLICY": "ACTIVE"}) == {}


PROBE = (
    "import os, sys, {module}; e = os.environ; "
    "print(e.get('GOMP_SPINCOUNT'), e.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
)


def _probe(module: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


@pytest.mark.parametrize(
    ("module", "spin", "policy"),
    [
        ("decode_worker.__main__", DECODE_SPIN_COUNT, "None"),
        ("prefill_worker.__main__", "None", "PASSIVE"),
    ],
)
def test_the_worker_entry_points_set_it_before_torch_loads(module, spin, policy):
    # torch is loaded by the end of the import, and set_omp_wait sets nothing
    # once it is: so the variable was there before libgomp read its environment.
    assert _probe(module) == [spin, policy, "True"]
    assert _probe(module, OMP_WAIT_POLICY="ACTIVE") == ["None", "ACTIVE", "True"]
