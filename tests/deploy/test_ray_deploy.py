"""The Ray deployment's parts that need no running cluster: the autoscaling
policy, the Serve options each pool gets from the config, and `splitserve
up`/`down` refusing bad input before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from deploy.config import ClusterConfig
from deploy.ray_app import deployment_options
from deploy.ray_autoscale import PoolScaler, desired_replicas
from tests.configs import BAD, base, write


def _ctx(metrics: dict[str, dict[str, float]] | None, target: int = 1) -> SimpleNamespace:
    # The two fields of Serve's AutoscalingContext the policy reads.
    return SimpleNamespace(aggregated_metrics=metrics, target_num_replicas=target)


def test_pool_scaler_sizes_the_pool_to_its_signal():
    prefill = PoolScaler("queued_prompt_tokens", 4096)
    # 3 replicas queueing 10k prompt tokens in all need 3 at 4096 each.
    per_replica = {"r1": 6000.0, "r2": 3000.0, "r3": 1000.0}
    assert prefill(_ctx({"queued_prompt_tokens": per_replica}))[0] == 3
    assert prefill(_ctx({"queued_prompt_tokens": {"r1": 4096.0}}))[0] == 1
    assert prefill(_ctx({"queued_prompt_tokens": {"r1": 4097.0}}))[0] == 2
    assert prefill(_ctx({"queued_prompt_tokens": {"r1": 0.0, "r2": 0.0}}))[0] == 0  # Serve clamps
    decode = PoolScaler("kv_cache_usage", 0.7)
    assert decode(_ctx({"kv_cache_usage": {"a": 0.95, "b": 0.9}}))[0] == 3
    assert decode(_ctx({"kv_cache_usage": {"a": 0.1, "b": 0.2}}))[0] == 1
    # Another pool's signal, or none reported yet: stay at the current target.
    assert decode(_ctx({"queued_prompt_tokens": {"a": 1e6}}, target=2))[0] == 2
    assert decode(_ctx(None, target=4))[0] == 4
    assert desired_replicas([0.7, 0.7], 0.7) == 2  # exactly at target: no extra replica
    with pytest.raises(ValueError, match="target"):
        PoolScaler("kv_cache_usage", 0)


def test_each_pool_gets_its_own_serve_options():
    raw = base()
    raw["pools"]["prefill"]["resources"] = {"num_cpus": 2, "num_gpus": 0.5}
    raw["pools"]["decode"].pop("autoscaling")
    config = ClusterConfig.model_validate(raw)
    assert config.pools.prefill is not None and config.pools.decode is not None

    prefill = deployment_options(config.pools.prefill, "Prefill")
    assert prefill["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    auto = prefill["autoscaling_config"]
    p = raw["pools"]["prefill"]
    assert (auto.min_replicas, auto.max_replicas, auto.initial_replicas) == (
        p["min_replicas"],
        p["max_replicas"],
        p["replicas"],
    )
    assert auto.upscale_delay_s == p["autoscaling"]["upscale_delay_s"]
    assert auto.downscale_delay_s == p["autoscaling"]["downscale_delay_s"]
    assert auto.policy.policy_function == "deploy.ray_autoscale:PoolScaler"
    assert auto.policy.policy_kwargs == {
        "signal": "queued_prompt_tokens",
        "target": p["autoscaling"]["target"],
    }
    # Serve must not cut a draining replica before its own drain timeout.
    assert prefill["graceful_shutdown_timeout_s"] > config.pools.prefill.drain_timeout_s

    decode = deployment_options(config.pools.decode, "Decode")
    assert "autoscaling_config" not in decode
    assert decode["num_replicas"] == raw["pools"]["decode"]["replicas"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPLITSERVE_STATE_DIR": "/nonexistent-splitserve-state"}
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize(
    "case", ["misspelt field", "scale on GPU utilisation", "replicas above max", "no decode pool"]
)
def test_up_refuses_a_bad_config_before_starting_anything(tmp_path, case):
    config, words = BAD[case]
    proc = _run("up", "--config", str(write(tmp_path, config)))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("splitserve up: error:"), proc.stderr
    for word in words:
        assert word in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # nothing was started


def test_up_refuses_pools_larger_than_the_cluster(tmp_path):
    raw = base()
    raw["pools"]["decode"]["resources"] = {"num_cpus": 64}
    raw["pools"]["decode"]["max_replicas"] = 2
    proc = _run("up", "--config", str(write(tmp_path, raw)), "--num-cpus", "2", timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "need 65 CPUs" in proc.stderr and "has 2" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_down_with_nothing_running_says_so(tmp_path):
    proc = _run("down", "--state-file", str(tmp_path / "none.json"))
    assert proc.returncode == 1
    assert "nothing to stop" in proc.stderr
    assert "Traceback" not in proc.stderr
