"""`splitserve up --address` onto a Ray cluster it did not start, with the
shipped laptop.yaml (KV over gRPC between replicas; the tiny model in place
of the built-in one, float32 so greedy output can be compared exactly).
ray-laptop.yaml (KV through the object store) is what tests/deploy/test_ray_up.py
deploys, with smaller sizes and shorter timings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.cluster import free_port
from tests.procs import alive, descendants, listening_addresses
from tests.ray_cluster import RayUp, assert_served_greedy_by_its_prefill_pool, example_config


def test_up_joins_a_running_ray_cluster_and_leaves_it_running(tmp_path, tiny_llama):
    """With --address, `up` deploys onto a cluster it did not start (the
    example whose KV goes over gRPC); `down` removes the application and
    leaves the cluster to its owner."""
    from deploy.ray_cluster import LOCAL_RAY_ENV

    port, client_port = free_port(), free_port()
    env = {**os.environ, **LOCAL_RAY_ENV}
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block"]
    cmd += ["--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2"]
    cmd += ["--include-dashboard", "false", "--disable-usage-stats"]
    cmd += ["--ray-client-server-port", str(client_port)]
    head_log = open(tmp_path / "head.log", "wb")  # noqa: SIM115 - closed below
    head = subprocess.Popen(cmd, env=env, stdout=head_log, stderr=subprocess.STDOUT)
    head_pids: set[int] = set()
    try:
        config = example_config("laptop.yaml", tiny_llama)
        deadline = time.monotonic() + 120
        cluster = None
        while cluster is None:  # the head takes a few seconds to accept drivers
            try:
                cluster = RayUp(tmp_path, tiny_llama, config, address=f"127.0.0.1:{port}")
            except RuntimeError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()
                assert time.monotonic() < deadline, "could not join the Ray head"
                time.sleep(2)
        try:
            assert_served_greedy_by_its_prefill_pool(cluster)
            head_pids = descendants(head.pid)
            addresses = listening_addresses(head_pids | descendants(cluster.proc.pid))
            assert addresses and addresses <= {"127.0.0.1", "::1"}, addresses
            assert cluster.down() == 0
            assert cluster.proc.wait(timeout=60) == 0
            assert head.poll() is None  # the cluster is its owner's, still running
        finally:
            cluster.stop()
    finally:
        head_pids |= descendants(head.pid)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        deadline = time.monotonic() + 30
        while any(alive(p) for p in head_pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in head_pids:  # only what this head started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        head_log.close()
