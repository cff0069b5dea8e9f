"""`splitserve serve --config FILE`: pools, per-pool engine limits and the
router's address and API key come from the scaling config, over real
processes."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import yaml

from tests.cluster import ServeCluster, assert_all_blocks_free, free_port


def test_serve_from_a_config_file(tiny_llama, tmp_path):
    port, config_port = free_port(), free_port()
    config = {
        "model": str(tiny_llama),
        # --port (ServeCluster passes it) overrides the config's router port.
        "router": {"port": config_port, "api_key": "s3cret"},
        "pools": {
            "prefill": {
                "replicas": 1,
                "engine": {"kv_cache_mib": 2},
                "price_per_replica_hour": 3600.0,  # a dollar a second: visible at once
            },
            "decode": {
                "replicas": 1,
                "engine": {"kv_cache_mib": 3, "max_num_seqs": 8},
                "price_per_replica_hour": 7200.0,
            },
        },
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ("--config", str(path), "--dtype", "float32", "--threads", "1")
    c = ServeCluster(tiny_llama, tmp_path / "serve.log", *args, port=port)
    try:
        workers = {w["role"]: w for w in c.cluster()["workers"]}
        # The tiny model's KV block in float32 is 8 KiB: 128 blocks per MiB.
        assert workers["prefill"]["kv_blocks_total"] == 2 * 128
        assert workers["decode"]["kv_blocks_total"] == 3 * 128
        body = {"model": "llama3", "prompt": "Once upon a time", "max_tokens": 5}
        url = f"{c.url}/v1/completions"
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        r = httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        assert_all_blocks_free(c.wait_idle())
        assert_tokens_per_dollar(c)
    finally:
        assert c.stop() == []


def _gauge(text: str, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    (line,) = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    return float(line.split()[-1])


def assert_tokens_per_dollar(c: ServeCluster) -> None:
    """Each worker's cost is its price times its uptime; the router turns the
    workers' reports into tokens per dollar per pool and for the cluster."""
    workers = {w["role"]: w for w in c.cluster()["workers"]}
    router = httpx.get(f"{c.url}/metrics", timeout=10).text
    d, p = workers["decode"], workers["prefill"]
    assert d["tokens_produced"] == 5 and p["tokens_produced"] > 0
    # A dollar a second (prefill), two (decode), for the seconds each has run.
    assert 0 < p["cost_dollars"] < d["cost_dollars"]
    cluster = _gauge(router, "splitserve_cluster_tokens_per_dollar")
    expected = d["tokens_produced"] / (d["cost_dollars"] + p["cost_dollars"])
    # The router's scrape reads a Status polled a moment apart from ours.
    assert cluster == pytest.approx(expected, rel=0.3), (cluster, expected)
    pool = _gauge(router, "splitserve_pool_tokens_per_dollar", 'pool="prefill"')
    assert pool == pytest.approx(p["tokens_produced"] / p["cost_dollars"], rel=0.3)
    assert _gauge(router, "splitserve_pool_cost_dollars", 'pool="colocated"') == 0.0
    # And each worker exports its own.
    metrics = httpx.get(f"http://127.0.0.1:{d['metrics_port']}/metrics", timeout=10).text
    assert _gauge(metrics, "splitserve_cost_dollars", 'role="decode"') > 0
    assert _gauge(metrics, "splitserve_tokens_per_dollar", 'role="decode"') > 0


def test_serve_refuses_pool_flags_beside_a_config(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"pools": {"colocated": {"replicas": 1}}}))
    cmd = [
        sys.executable,
        "-m",
        "deploy.cli",
        "serve",
        "--config",
        str(path),
        "--kv-cache-mib",
        "8",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "splitserve serve: error: --kv-cache-mib cannot be given with --config: "
        "set pools.<pool>.engine.kv_cache_mib in the config"
    )
