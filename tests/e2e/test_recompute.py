"""A prefill that fails after its first token went out costs the decode
worker a recomputation, not the request (--kv-failure-policy).

Real worker processes: a prefill worker running in bfloat16 answers the
first token and then sends KV that a float32 decode worker cannot take (its
receiver rejects the chunks). The first token has already reached the
client, so the decode worker recomputes the prompt and that token itself and
goes on; with the policy "fail" the request ends with an error instead.
Either way nothing stays reserved or held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine import LLM, SamplingParams
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from tests.workers import Worker, wait_until_idle
from worker.wire import params_to_pb

MAX_TOKENS = 12


async def _generate(decode: Worker, prefill: Worker, prompt: list[int]) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    request = pb.GenerateRequest(
        request_id="recompute-1",
        prompt_token_ids=prompt,
        sampling_params=params_to_pb(params),
        prefill_addresses=[prefill.address],
    )
    tokens: list[int] = []
    async with grpc.aio.insecure_channel(decode.address) as ch:
        async for msg in pb_grpc.DecodeWorkerStub(ch).Generate(request, timeout=60):
            tokens.extend(msg.token_ids)
    return tokens


@pytest.fixture(scope="module")
def prefill(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker("prefill_worker", tiny_llama, tmp_path_factory.mktemp("p"), "--dtype", "bfloat16")
    yield w
    w.stop()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_kv_lost_after_the_first_token(
    tiny_llama: Path, tmp_path: Path, prefill: Worker, policy: str
):
    decode = Worker(
        "decode_worker",
        tiny_llama,
        tmp_path,
        "--kv-failure-policy",
        policy,
        "--prefill-addresses",
        prefill.address,
    )
    try:
        prompt = list(range(20, 60))
        if policy == "fail":
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                asyncio.run(_generate(decode, prefill, prompt))
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        else:
            tokens = asyncio.run(_generate(decode, prefill, prompt))
            assert len(tokens) == MAX_TOKENS
            # The first token is the prefill worker's; the rest is what a
            # float32 engine continues from the prompt and that token.
            offline = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=4 << 20)
            params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS - 1, ignore_eos=True)
            rest = offline.generate([[*prompt, tokens[0]]], params, use_tqdm=False)[0]
            assert tokens[1:] == rest.token_ids
        outcome = "recomputed" if policy == "recompute" else "failed"
        name = f'splitserve_kv_failures_total{{outcome="{outcome}",role="decode"}}'
        assert decode.metric(name) == 1
        for worker, stub in (
            (prefill, pb_grpc.PrefillWorkerStub),
            (decode, pb_grpc.DecodeWorkerStub),
        ):
            s = wait_until_idle(worker, stub)
            assert s.kv_blocks_free == s.kv_blocks_total and not s.held and not s.awaiting_kv
    finally:
        decode.stop()
