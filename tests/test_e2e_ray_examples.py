"""`splitserve up` with each shipped example config (the tiny model in place
of the built-in one, float32 so greedy output can be compared exactly): KV
through the object store (ray-laptop.yaml) and over gRPC between replicas
(laptop.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.test_e2e_ray import RayUp, assert_greedy_equals_offline

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "examples"


@pytest.mark.parametrize("example", ["ray-laptop.yaml", "laptop.yaml"])
def test_up_with_the_example_config(tmp_path, tiny_llama, example):
    config = yaml.safe_load((EXAMPLES / example).read_text())
    config["model"] = str(tiny_llama)
    for pool in config["pools"].values():
        pool.setdefault("engine", {})["dtype"] = "float32"
    cluster = RayUp(tmp_path, tiny_llama, config)
    try:
        timings = assert_greedy_equals_offline(cluster)
        # The answer names the prefill worker that computed the prompt.
        prefill = [w["address"] for w in cluster.pools()["prefill"]]
        assert timings["prefill_worker"] in prefill, (timings, prefill)
        assert cluster.down() == 0
        assert cluster.proc.wait(timeout=60) == 0
    finally:
        cluster.stop()
