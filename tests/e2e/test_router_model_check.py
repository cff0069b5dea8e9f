"""The router never uses a worker serving another model than its own: a real
decode worker process, a router app in process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from fastapi.testclient import TestClient

from engine.config import EngineConfig, ModelConfig
from modelmaker import make_model
from router import RouterConfig, build_app


def test_a_worker_serving_another_model_is_never_used(tiny_llama, tmp_path):
    """A real decode worker on a model with another vocabulary: the router
    marks it unhealthy (its token ids would decode to garbage) and answers 503.
    Its /cluster row still shows what it runs: the dtype `auto` chose on
    this machine, and why, as the worker logged at startup."""
    other = make_model(tmp_path / "other", preset="tiny", arch="llama", vocab_size=1024)
    want = EngineConfig(model=str(other)).dtype_choice(ModelConfig.from_pretrained(other))
    ready = tmp_path / "worker.ready"
    log = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "decode_worker", "--model", str(other), "--kv-cache-mib", "4"]
    cmd += ["--metrics-port", "-1", "--ready-file", str(ready)]  # --dtype auto
    with log.open("wb") as stderr:  # the child keeps its own copy of the descriptor
        worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert worker.poll() is None and time.monotonic() < deadline, "worker did not start"
            time.sleep(0.1)
        address = json.loads(ready.read_text())["address"]
        app = build_app(RouterConfig(model=str(tiny_llama), decode_addresses=(address,)))
        with TestClient(app) as c:
            (w,) = c.get("/cluster").json()["workers"]
            assert w["healthy"] is False and "vocab_size 1024" in w["last_error"]
            assert (w["dtype"], w["dtype_reason"]) == (want.name, want.reason)
            assert f"dtype: {want.describe()}" in log.read_text()
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503
    finally:
        worker.terminate()
        worker.wait(timeout=30)
