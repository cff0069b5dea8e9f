"""Failures over real processes: a 2 prefill + 2 decode cluster whose workers
are frozen (SIGSTOP) or killed (SIGKILL) under load. Nothing may hang and no
block may stay reserved, and no request is lost to a killed worker (a killed
decode worker's streams migrate). The tests run in file order: freezing
first, then killing a prefill worker, then a decode worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

from engine import LLM, SamplingParams
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from tests.cluster import ServeCluster, assert_all_blocks_free, role_metric, wait_for
from worker.wire import params_to_pb

TTL_S = 3.0


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "failures.log"
    c = ServeCluster(
        tiny_llama,
        log,
        "--prefill", "2", "--decode", "2",
        "--dtype", "float32", "--kv-cache-mib", "16", "--threads", "1",
        "--kv-reservation-ttl", str(TTL_S),
    )  # fmt: skip
    yield c
    assert c.stop() == [], "workers outlived their cluster"


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=16 << 20)


def greedy(offline: LLM, prompt: str, max_tokens: int) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return offline.generate([prompt], params, use_tqdm=False)[0].text


def stream(
    cluster: ServeCluster, prompt: str, max_tokens: int, events: list, model: str | None = None
) -> None:
    """Read one streaming completion's SSE events into `events` (JSON
    objects, "[DONE]", or ("exception", str) if the connection broke)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    body["model"] = (
        model or httpx.get(f"{cluster.url}/v1/models", timeout=5).json()["data"][0]["id"]
    )
    try:
        with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as r:
            if r.status_code != 200:
                events.append(("status", r.status_code, r.read().decode()))
                return
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line.removeprefix("data: ")
                    events.append(data if data == "[DONE]" else json.loads(data))
    except httpx.HTTPError as e:
        events.append(("exception", repr(e)))


def text_of(events: list) -> str:
    return "".join(c["text"] for e in events if isinstance(e, dict) for c in e.get("choices", []))


def errored(events: list) -> bool:
    return any(isinstance(e, dict) and "error" in e for e in events) or any(
        isinstance(e, tuple) for e in events
    )


def test_an_unfilled_reservation_expires_and_the_prompt_is_prefilled_locally(cluster, offline):
    """Both prefill workers frozen: the decode worker's reservation expires
    after its TTL, it frees the blocks and prefills the prompt itself."""
    prefill = cluster.workers("prefill")
    decode = cluster.workers("decode")[0]
    for w in prefill:
        os.kill(w["pid"], signal.SIGSTOP)
    try:
        params = params_to_pb(SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        tok = offline.engine.tokenizer
        prompt = "Once upon a time"

        async def generate() -> list[int]:
            async with cluster.channel(decode["address"]) as ch:
                req = pb.GenerateRequest(
                    request_id="expiry-1",
                    prompt_token_ids=tok.encode(prompt),
                    sampling_params=params,
                    prefill_addresses=[w["address"] for w in prefill],
                )
                out = []
                async for msg in pb_grpc.DecodeWorkerStub(ch).Generate(req, timeout=30):
                    out.extend(msg.token_ids)
                return out

        start = time.monotonic()
        tokens = asyncio.run(generate())
        waited = time.monotonic() - start
    finally:
        for w in prefill:
            os.kill(w["pid"], signal.SIGCONT)
    assert TTL_S * 0.9 <= waited < TTL_S + 15
    assert tok.decode(tokens, skip_special_tokens=True) == greedy(offline, prompt, 8)
    assert role_metric(cluster, "decode", "splitserve_decode_local_prefills_total") >= 1
    assert_all_blocks_free(cluster.wait_idle(timeout=15))


def test_a_client_gone_during_prefill_frees_blocks_on_both_sides(cluster):
    """The client leaves while its prompt sits on a (frozen) prefill worker:
    the router cancels the decode worker's call, which cancels its call to
    the prefill worker; once that one runs again, nothing is left held."""
    prefill = cluster.workers("prefill")
    model = httpx.get(f"{cluster.url}/v1/models", timeout=5).json()["data"][0]["id"]
    for w in prefill:
        os.kill(w["pid"], signal.SIGSTOP)
    try:
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 50, "stream": True}
        url = f"{cluster.url}/v1/completions"
        # Nothing can come back while prefill is frozen; hang up after 1 s.
        with (
            pytest.raises(httpx.ReadTimeout),
            httpx.stream("POST", url, json=body, timeout=1.0) as r,
        ):
            r.read()
        wait_for(
            lambda: not any(w["awaiting_kv"] for w in cluster.workers("decode")),
            15,
            "a reservation outlived its cancelled request",
        )
    finally:
        for w in prefill:
            os.kill(w["pid"], signal.SIGCONT)
    assert_all_blocks_free(cluster.wait_idle(timeout=15))


def test_killing_a_prefill_worker_retries_its_queued_requests_elsewhere(cluster, offline):
    victim = cluster.workers("prefill")[0]
    retries_before = role_metric(cluster, "decode", "splitserve_decode_prefill_retries_total")
    model = httpx.get(f"{cluster.url}/v1/models", timeout=5).json()["data"][0]["id"]
    # Freeze it, then send at once, before the router's next poll notices:
    # requests queue on it, unanswered...
    os.kill(victim["pid"], signal.SIGSTOP)
    jobs = [("The quick brown fox jumps over", 24), ("In a hole in the ground", 16)] * 4
    results: list[list] = [[] for _ in jobs]
    threads = [
        threading.Thread(target=stream, args=(cluster, p, m, results[i], model))
        for i, (p, m) in enumerate(jobs)
    ]
    for t in threads:
        t.start()
    wait_for(
        lambda: sum(w["awaiting_kv"] for w in cluster.workers("decode")) > 0,
        30,
        "no request reached the frozen prefill worker",
    )
    os.kill(victim["pid"], signal.SIGKILL)  # ...until it dies with them
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    for (prompt, m), events in zip(jobs, results, strict=True):
        assert not errored(events), events[-3:]
        assert events[-1] == "[DONE]"
        assert text_of(events) == greedy(offline, prompt, m)
    retried = (
        role_metric(cluster, "decode", "splitserve_decode_prefill_retries_total") - retries_before
    )
    assert retried >= 1, "no request was queued on the killed prefill worker"
    state = cluster.wait_idle(timeout=15)
    assert_all_blocks_free(state)
    # The router marked the killed process unhealthy; by now the launcher may
    # have started it again on its address (a new pid), healthy.
    (same,) = [w for w in state["workers"] if w["address"] == victim["address"]]
    assert same["pid"] != victim["pid"] or same["healthy"] is False


def test_killing_a_decode_worker_mid_stream_migrates_its_streams(cluster, offline):
    """Every stream on the killed decode worker moves to the survivor with
    the tokens it had (router/dispatch.py): no stream fails, and each one's
    text is exactly the undisturbed run's."""
    migrated_before = _routerrole_metric(
        cluster, 'splitserve_router_migrations_total{outcome="ok"}'
    )
    jobs = [("Once upon a time", 600), ("a b c d e f g", 600)] * 4
    results: list[list] = [[] for _ in jobs]
    threads = [
        threading.Thread(target=stream, args=(cluster, p, m, results[i]))
        for i, (p, m) in enumerate(jobs)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(len(r) >= 3 for r in results):
        time.sleep(0.05)
    assert all(len(r) >= 3 for r in results), "streams did not start"
    victim = cluster.workers("decode")[0]
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a stream hung after its worker died"
    for (prompt, m), events in zip(jobs, results, strict=True):
        assert not errored(events), events[-3:]
        assert events[-1] == "[DONE]"
        assert text_of(events) == greedy(offline, prompt, m)
    migrations = [
        e["splitserve_timings"]["migrations"]
        for events in results
        for e in events
        if isinstance(e, dict) and "splitserve_timings" in e
    ]
    assert len(migrations) == len(jobs)
    assert sum(migrations) >= 1, "no stream was on the killed decode worker"
    migrated = _routerrole_metric(cluster, 'splitserve_router_migrations_total{outcome="ok"}')
    assert migrated - migrated_before == sum(migrations)
    # New requests go to the survivor.
    after: list = []
    stream(cluster, "Hello", 5, after)
    assert not errored(after) and after[-1] == "[DONE]"
    assert_all_blocks_free(cluster.wait_idle(timeout=15))


def _routerrole_metric(cluster: ServeCluster, name: str) -> float:
    text = httpx.get(f"{cluster.url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
