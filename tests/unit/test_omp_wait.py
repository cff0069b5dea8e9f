"""The worker processes' OpenMP spin count (worker/omp_wait.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from worker.omp_wait import SPIN_ENV, WORKER_SPIN_COUNT, worker_omp_env


def test_a_worker_spins_unless_the_operator_chose_a_wait_policy():
    assert worker_omp_env({}) == {SPIN_ENV: WORKER_SPIN_COUNT}
    assert worker_omp_env({"GOMP_SPINCOUNT": "10"}) == {}
    assert worker_omp_env({"OMP_WAIT_POLICY": "PASSIVE"}) == {}


PROBE = "import os, sys, {module}; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"


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


@pytest.mark.parametrize("module", ["decode_worker.__main__", "prefill_worker.__main__"])
def test_the_worker_entry_points_set_it_before_torch_loads(module):
    # torch is loaded by the end of the import, so the variable was there
    # before libgomp read its environment (spin_between_regions sets nothing
    # once torch is loaded).
    assert _probe(module) == [WORKER_SPIN_COUNT, "True"]
    assert _probe(module, GOMP_SPINCOUNT="5") == ["5", "True"]
    assert _probe(module, OMP_WAIT_POLICY="PASSIVE") == ["None", "True"]
