"""Backpressure over real processes: a decode worker whose KV cache holds two
long requests turns a third away (nothing reserved, no prefill spent), the
router answers 503 with Retry-After, and the same request succeeds once the
others finish. (With the default --kv-reservation-wait the third would wait
for room instead: tests/e2e/test_overload.py; here the wait is 0.)"""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.cluster import ServeCluster, assert_all_blocks_free

PROMPT = list(range(16, 916))  # 900 tokens: 57 blocks of 16


def prompt(i: int) -> list[int]:
    """Request i's prompt: its first token differs, so no block is shared with
    another request's through the prefix cache (each needs its own 57)."""
    return [1000 + i, *PROMPT[1:]]


MAX_TOKENS = 120  # 1020 tokens in all (64 blocks); the tiny model's context is 1024


@pytest.fixture(scope="module")
def small_cache(tiny_llama, tmp_path_factory):
    # 1 MiB of KV on the tiny model is 128 blocks: two such requests, not three.
    log = tmp_path_factory.mktemp("logs") / "backpressure.log"
    c = ServeCluster(
        tiny_llama,
        log,
        "--dtype", "float32", "--kv-cache-mib", "1", "--threads", "1",
        "--kv-reservation-wait", "0",
    )  # fmt: skip
    yield c
    assert c.stop() == [], "workers outlived their cluster"


def test_a_full_decode_worker_means_503_then_success(small_cache):
    c = small_cache
    assert c.workers("decode")[0]["kv_blocks_total"] == 128
    model = httpx.get(f"{c.url}/v1/models", timeout=5).json()["data"][0]["id"]
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    started = [threading.Event(), threading.Event()]
    finished: list[str] = []

    def long_stream(i: int) -> None:
        mine = {**body, "prompt": prompt(i)}
        with httpx.stream("POST", f"{c.url}/v1/completions", json=mine, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                started[i].set()
                if line == "data: [DONE]":
                    finished.append("done")

    threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(30)
    # Both hold their blocks until they finish: a third prompt does not fit.
    third = {**body, "prompt": prompt(2), "stream": False}
    r = httpx.post(f"{c.url}/v1/completions", json=third, timeout=60)
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after")
    assert r.json()["error"]["message"]
    for t in threads:
        t.join(60)
    assert finished == ["done", "done"]
    r = httpx.post(f"{c.url}/v1/completions", json=third, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    assert_all_blocks_free(c.wait_idle())
    assert all(w["healthy"] for w in c.cluster()["workers"])
