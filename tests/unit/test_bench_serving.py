"""bench/serving.py's CPU accounting: the front-end meter reads /proc right,
and the synthetic load busies about the share of a core it is asked to."""

from __future__ import annotations

import subprocess
import sys
import time

from bench import serving

SPIN = "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < 30: pass"


def test_front_end_meter_counts_another_process_and_this_one():
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(0.3)  # started
        meter = serving.FrontEndCpu(spinner.pid, worker_pids=[])
        time.sleep(1.0)
        cores = meter.cores()
    finally:
        spinner.kill()
        spinner.wait()
    # One busy process, on a machine that may be busy with other tests too.
    assert 0.4 < cores < 1.6, cores
    # A process that is gone reads as zero, not an error.
    assert serving._process_cpu_s(spinner.pid) == 0.0


def test_cpu_load_busies_about_the_share_asked_for():
    with serving.cpu_load(0.3) as proc:
        time.sleep(0.3)
        before, t0 = serving._process_cpu_s(proc.pid), time.perf_counter()
        time.sleep(1.5)
        cores = (serving._process_cpu_s(proc.pid) - before) / (time.perf_counter() - t0)
    assert proc.poll() is not None  # stopped on leaving
    assert 0.1 < cores < 0.6, cores
