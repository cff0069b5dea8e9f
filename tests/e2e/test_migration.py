"""A decode worker killed mid-request costs latency, not the request: the
router replays the prompt and the tokens already streamed to another decode
worker, which recomputes them and goes on. Real processes: `splitserve serve`
with one prefill and three decode workers (each test kills one; a worker the
launcher restarts only adds room), and, where a request cannot move (a
migration limit of 0, or no other decode worker), other routers in front of
the same workers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from deploy.cli import main as splitserve_main
from engine import LLM, SamplingParams
from kvtransfer.security import ClusterSecurity
from router import RouterConfig, build_app
from router.__main__ import main as router_main
from tests.cluster import ServeCluster, free_port

PROMPT = "Once upon a time"
# Long enough that a stream is still running when its worker is killed
# (tokens arrive first; the kill follows within one /cluster poll).
MAX_TOKENS = 400


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "migration.log"
    c = ServeCluster(
        tiny_llama,
        log,
        "--prefill", "1", "--decode", "3",
        "--dtype", "float32", "--kv-cache-mib", "16", "--threads", "1",
    )  # fmt: skip
    yield c
    assert c.stop() == [], "workers outlived their cluster"


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=16 << 20)


def model_name(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"])


class Request(threading.Thread):
    """One completion, read in the background: SSE events (JSON objects,
    "[DONE]", or ("exception", str)) when streaming, else the JSON body."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body = {"model": model_name(url), **body}
        self.events: list[Any] = []
        self.response: httpx.Response | None = None
        self.start()

    def run(self) -> None:
        url = f"{self.url}/v1/completions"
        try:
            if not self.body.get("stream"):
                self.response = httpx.post(url, json=self.body, timeout=120)
                return
            with httpx.stream("POST", url, json=self.body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line.removeprefix("data: ")
                        self.events.append(data if data == "[DONE]" else json.loads(data))
        except httpx.HTTPError as e:
            self.events.append(("exception", repr(e)))

    def finish(self) -> None:
        self.join(timeout=120)
        assert not self.is_alive(), "the request hung after its worker died"

    def text(self) -> str:
        return "".join(
            c["text"] for e in self.events if isinstance(e, dict) for c in e.get("choices", [])
        )

    def errors(self) -> list[Any]:
        return [e for e in self.events if isinstance(e, tuple) or "error" in e]


def router_metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def kill_serving_worker(url: str, started: Callable[[], bool]) -> dict[str, Any]:
    """SIGKILL the decode worker that holds the router's one open Generate
    call, once `started()` says tokens have arrived; returns its row."""
    deadline = time.monotonic() + 30
    serving: list[dict[str, Any]] = []
    while not serving:
        assert time.monotonic() < deadline, "no decode worker took the request"
        workers = httpx.get(f"{url}/cluster", timeout=10).json()["workers"]
        serving = [w for w in workers if w["role"] == "decode" and w["router_in_flight"]]
    assert len(serving) == 1, serving
    while not started():
        assert time.monotonic() < deadline, "no token arrived"
        time.sleep(0.01)
    os.kill(serving[0]["pid"], signal.SIGKILL)
    return serving[0]


def healthy_decode(url: str) -> int:
    workers = httpx.get(f"{url}/cluster", timeout=10).json()["workers"]
    return sum(1 for w in workers if w["role"] == "decode" and w["healthy"])


def test_a_greedy_stream_survives_its_decode_worker(cluster, offline):
    assert healthy_decode(cluster.url) >= 2
    migrated_before = router_metric(cluster.url, 'splitserve_router_migrations_total{outcome="ok"}')
    body = {
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    req = Request(cluster.url, body)
    kill_serving_worker(cluster.url, lambda: len(req.events) >= 10)
    req.finish()
    assert not req.errors(), req.errors()
    assert req.events[-1] == "[DONE]"
    final = next(e for e in req.events if isinstance(e, dict) and e.get("splitserve_timings"))
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["splitserve_timings"]["migrations"] >= 1, "the stream ended before the kill"
    usage = req.events[-2]["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS
    # No token lost or repeated: exactly the undisturbed run's text.
    reference = offline.generate(
        [PROMPT],
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
        use_tqdm=False,
    )[0].text
    assert req.text() == reference
    migrated = router_metric(cluster.url, 'splitserve_router_migrations_total{outcome="ok"}')
    assert migrated - migrated_before >= 1


def test_a_seeded_request_survives_its_decode_worker_unchanged(cluster):
    """Not streaming, sampled with a seed, with logprobs: the migrated
    request's text equals an undisturbed run's, and every token has its logprob."""
    assert healthy_decode(cluster.url) >= 2
    body = {
        "prompt": "The quick brown fox",
        "max_tokens": MAX_TOKENS,
        "temperature": 0.8,
        "seed": 1234,
        "ignore_eos": True,
        "logprobs": 0,
    }
    undisturbed = Request(cluster.url, body)
    undisturbed.finish()
    assert undisturbed.response is not None and undisturbed.response.status_code == 200
    want = undisturbed.response.json()
    assert want["splitserve_timings"]["migrations"] == 0

    tokens_name = "splitserve_router_generation_tokens_total"
    tokens_before = router_metric(cluster.url, tokens_name)
    req = Request(cluster.url, body)
    kill_serving_worker(
        cluster.url, lambda: router_metric(cluster.url, tokens_name) - tokens_before >= 20
    )
    req.finish()
    assert req.response is not None, req.events
    assert req.response.status_code == 200, req.response.text
    got = req.response.json()
    assert got["splitserve_timings"]["migrations"] >= 1, "the request ended before the kill"
    assert got["choices"][0]["finish_reason"] == "length"
    assert got["usage"]["completion_tokens"] == MAX_TOKENS
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    got_lp = got["choices"][0]["logprobs"]["token_logprobs"]
    want_lp = want["choices"][0]["logprobs"]["token_logprobs"]
    assert len(got_lp) == len(want_lp) == MAX_TOKENS
    assert None not in got_lp
    assert got_lp == pytest.approx(want_lp, abs=1e-3)


@contextlib.contextmanager
def router_in_process(
    model: Path, decode: str, prefill: list[str], limit: int, security: ClusterSecurity
) -> Iterator[str]:
    """Another router in front of the cluster's workers (with the cluster's
    secret), served from this process (a router process would spend most of
    the test importing), over real HTTP; yields its URL."""
    config = RouterConfig(
        model=str(model),
        decode_addresses=(decode,),
        prefill_addresses=tuple(prefill),
        port=free_port(),
        migration_limit=limit,
        security=security,
    )
    server = uvicorn.Server(
        uvicorn.Config(build_app(config), host="127.0.0.1", port=config.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the router did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_without_migration_or_another_worker_the_stream_ends_with_an_error(cluster, tiny_llama):
    """Two routers in front of one decode worker: one with migration off, one
    with no other decode worker to move to. When the worker dies, both
    streams end with an error event and [DONE], as before migration existed."""
    workers = cluster.cluster()["workers"]
    victim = next(w for w in workers if w["role"] == "decode" and w["healthy"])
    prefill = [w["address"] for w in workers if w["role"] == "prefill"]
    body = {
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        router_in_process(tiny_llama, victim["address"], prefill, 0, cluster.security) as off,
        router_in_process(tiny_llama, victim["address"], prefill, 3, cluster.security) as alone,
    ):
        reqs = [Request(off, body), Request(alone, body)]
        deadline = time.monotonic() + 30
        while not all(len(r.events) >= 10 for r in reqs):
            assert time.monotonic() < deadline, "no token arrived"
            time.sleep(0.01)
        os.kill(victim["pid"], signal.SIGKILL)
        for r in reqs:
            r.finish()
            assert r.events[-1] == "[DONE]"
            assert not any(isinstance(e, dict) and e.get("splitserve_timings") for e in r.events)
        off_errors, alone_errors = reqs[0].errors(), reqs[1].errors()
        assert len(off_errors) == 1 and isinstance(off_errors[0], dict), reqs[0].events[-3:]
        assert victim["address"] in off_errors[0]["error"]["message"]
        assert router_metric(off, "splitserve_router_migrations_total") == 0
        assert len(alone_errors) == 1 and isinstance(alone_errors[0], dict), reqs[1].events[-3:]
        message = alone_errors[0]["error"]["message"]
        assert "no other decode worker could take the request over" in message
        assert router_metric(alone, 'splitserve_router_migrations_total{outcome="failed"}') == 1


def test_the_migration_limit_flag(tmp_path, capsys):
    """--migration-limit takes an integer >= 0 (0 turns migration off), on
    the router and on `splitserve serve`; a bad one starts nothing."""
    bad = ["--migration-limit", "-1"]
    with pytest.raises(SystemExit) as exc:
        router_main(["--model", str(tmp_path), "--decode", "127.0.0.1:1", *bad])
    assert exc.value.code == 2
    assert "--migration-limit" in capsys.readouterr().err
    assert splitserve_main(["serve", "--model", str(tmp_path), *bad]) == 2
    assert "--migration-limit must be >= 0" in capsys.readouterr().err
