"""Load a cluster past what its KV cache holds: it must get slower, never die.

A 1 prefill + 1 decode cluster whose KV pool holds 16 blocks of 128 tokens:
eight 256-token prompts' reservations alone would fill it, after which the
first request whose KV arrived could not take its first decode step (the
state that once killed the decode worker's engine thread). Then a colocated
worker with a tiny queue bound, flooded: the excess is refused at once with
503 and Retry-After, the rest served. And a duplicate request id on a decode
worker: refused without touching the first request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc
import httpx
import pytest

from engine import SamplingParams
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from tests.cluster import ServeCluster, assert_all_blocks_free
from worker.wire import params_to_pb


def _complete(url: str, model: str, prompt: list[int], max_tokens: int) -> httpx.Response:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def _model(cluster: ServeCluster) -> str:
    return httpx.get(f"{cluster.url}/v1/models", timeout=5).json()["data"][0]["id"]


def test_reservations_past_the_kv_pool_queue_instead_of_killing_the_worker(tiny_llama, tmp_path):
    cluster = ServeCluster(
        tiny_llama,
        tmp_path / "serve.log",
        "--prefill", "1", "--decode", "1", "--dtype", "float32", "--threads", "1",
        "--kv-cache-mib", "1", "--block-size", "128",
    )  # fmt: skip
    try:
        decode = cluster.workers("decode")[0]
        assert decode["kv_blocks_total"] == 16  # the premise: 8 prompts fill it
        model = _model(cluster)
        prompts = [[(7 * i + j) % 2000 + 10 for j in range(256)] for i in range(12)]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda p: _complete(cluster.url, model, p, 8), prompts))
        assert [r.status_code for r in answers] == [200] * len(prompts), [
            r.text for r in answers if r.status_code != 200
        ]
        assert all(r.json()["usage"]["completion_tokens"] == 8 for r in answers)
        # The worker is alive and healthy, and everything was given back.
        assert httpx.get(f"{cluster.url}/health", timeout=5).status_code == 200
        state = cluster.wait_idle(timeout=30)
        assert all(w["healthy"] for w in state["workers"])
        assert_all_blocks_free(state)
        # The same burst again: a worker that survived the first is not degraded.
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            again = list(pool.map(lambda p: _complete(cluster.url, model, p, 8), prompts))
        assert [r.json()["choices"][0]["text"] for r in again] == [
            r.json()["choices"][0]["text"] for r in answers
        ]
    finally:
        assert cluster.stop() == [], "workers outlived their cluster"


@pytest.fixture(scope="module")
def colocated(tiny_llama, tmp_path_factory):
    """One colocated worker running one request at a time, queueing two more."""
    log = tmp_path_factory.mktemp("logs") / "colocated.log"
    c = ServeCluster(
        tiny_llama,
        log,
        "--colocated", "1", "--dtype", "float32", "--threads", "1",
        "--max-num-seqs", "1", "--max-waiting-requests", "2",
    )  # fmt: skip
    yield c
    assert c.stop() == [], "workers outlived their cluster"


def test_a_full_queue_is_refused_at_once_with_retry_after(colocated):
    model = _model(colocated)
    prompts = [[(3 * i + j) % 2000 + 10 for j in range(32)] for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: _complete(colocated.url, model, p, 64), prompts))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503}, [r.text for r in answers]
    # At most one running and two queued at a time: the rest are turned away.
    assert codes.count(200) >= 2 and codes.count(503) >= 1, codes
    for r in answers:
        if r.status_code == 503:
            assert r.headers.get("retry-after"), r.headers
            assert "queue" in r.json()["error"]["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 64
    assert_all_blocks_free(colocated.wait_idle(timeout=30))


def test_a_duplicate_request_id_leaves_the_first_request_alone(colocated):
    worker = colocated.workers("colocated")[0]
    params = params_to_pb(SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    request = pb.GenerateRequest(
        request_id="same-id", prompt_token_ids=list(range(10, 40)), sampling_params=params
    )

    async def run() -> tuple[list[int], grpc.StatusCode | None]:
        async with colocated.channel(worker["address"]) as ch:
            stub = pb_grpc.DecodeWorkerStub(ch)
            first = stub.Generate(request, timeout=60)
            tokens = list((await first.read()).token_ids)  # the first is running
            code = None
            try:
                async for _ in stub.Generate(request, timeout=60):
                    pass
            except grpc.aio.AioRpcError as e:
                code = e.code()
            while (msg := await first.read()) is not grpc.aio.EOF:
                tokens.extend(msg.token_ids)
            return tokens, code

    tokens, code = asyncio.run(run())
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert len(tokens) == 200  # the first one streamed to its end
    assert_all_blocks_free(colocated.wait_idle(timeout=15))
