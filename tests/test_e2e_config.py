"""`splitserve serve --config FILE`: pools, per-pool engine limits and the
router's address and API key come from the scaling config, over real
processes."""

from __future__ import annotations

import httpx
import pytest
import yaml

from tests.cluster import ServeCluster, assert_all_blocks_free, free_port

pytestmark = pytest.mark.slow


def test_serve_from_a_config_file(tiny_llama, tmp_path):
    port = free_port()
    config = {
        "model": str(tiny_llama),
        "router": {"port": port, "api_key": "s3cret"},
        "pools": {
            "prefill": {"replicas": 1, "engine": {"kv_cache_mib": 2}},
            "decode": {"replicas": 1, "engine": {"kv_cache_mib": 3, "max_num_seqs": 8}},
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
    finally:
        assert c.stop() == []
