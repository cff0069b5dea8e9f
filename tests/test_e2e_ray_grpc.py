"""`splitserve up` with `kv_transport: grpc`: the same Ray application, the
KV streamed between replicas over gRPC as between standalone workers."""

from __future__ import annotations

import copy

import pytest

from tests.test_e2e_ray import RayUp, _config, assert_greedy_equals_offline

pytestmark = pytest.mark.slow


def test_grpc_transport_on_ray(tmp_path):
    from engine.builtin_model import make_model

    model = make_model(tmp_path / "tiny", preset="tiny")
    config = copy.deepcopy(_config(model, 0))
    config["kv_transport"] = "grpc"
    for pool in config["pools"].values():
        pool.pop("autoscaling")
        pool.update(replicas=1, min_replicas=1, max_replicas=1)
    cluster = RayUp(tmp_path, model, config)
    try:
        timings = assert_greedy_equals_offline(cluster)
        # The prefill worker the decode replica dialled: a gRPC address.
        assert timings["prefill_worker"].startswith("127.0.0.1:"), timings
        prefill = cluster.pools()["prefill"]
        assert [w["address"] for w in prefill] == [timings["prefill_worker"]]
        cluster.record_pids()
        assert cluster.down() == 0
        assert cluster.proc.wait(timeout=60) == 0
    finally:
        cluster.stop()
