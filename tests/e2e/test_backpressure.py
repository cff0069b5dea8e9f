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
    # Three prompts at once: two fit (57 blocks each, growing to 64), the third
    # finds the cache full. Sent together, not the third after the others'
    # first tokens: 120 tokens of the tiny model take ~0.3 s, about what a
    # request takes to reach the worker on a loaded 2-core machine, so the
    # first two could be done before a late third arrived.
    statuses: dict[int, int] = {}
    refusals: dict[int, httpx.Response] = {}
    finished: list[int] = []

    def send(i: int) -> None:
        mine = {**body, "prompt": prompt(i)}
        with httpx.stream("POST", f"{c.url}/v1/completions", json=mine, timeout=60) as r:
            statuses[i] = r.status_code
            if r.status_code != 200:
                r.read()
                refusals[i] = r
                return
            if any(line == "data: [DONE]" for line in r.iter_lines()):
                finished.append(i)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses.values()) == [200, 200, 503], statuses
    [(refused, r)] = refusals.items()
    assert r.headers.get("retry-after")
    assert r.json()["error"]["message"]
    assert sorted(finished) == sorted(set(range(3)) - {refused})
    third = {**body, "prompt": prompt(refused), "stream": False}
    r = httpx.post(f"{c.url}/v1/completions", json=third, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    assert_all_blocks_free(c.wait_idle())
    assert all(w["healthy"] for w in c.cluster()["workers"])
