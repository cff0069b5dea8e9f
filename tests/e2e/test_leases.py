"""Nothing waits forever, over real worker processes on 127.0.0.1:

- a prefill worker whose decode worker takes the KV but never acknowledges
  it (and never hangs up) frees the held blocks when the lease runs out;
- a decode worker whose prefill worker freezes (SIGSTOP) while a Prefill call
  waits on it notices within the channels' keepalive, long before the
  reservation's TTL, and prefills the prompt itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine import LLM, SamplingParams
from kvtransfer.channels import CHANNEL_OPTIONS, KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from tests.workers import Worker, wait_until_idle
from worker.wire import params_to_pb

LEASE_S = 3.0
TTL_S = 120.0  # far longer than keepalive: a wait that ends before it was ended by keepalive


@pytest.fixture
def prefill(tiny_llama: Path, tmp_path: Path) -> Iterator[Worker]:
    w = Worker("prefill_worker", tiny_llama, tmp_path, "--kv-lease", str(LEASE_S))
    yield w
    w.stop()


def test_held_kv_is_freed_when_the_decode_worker_never_acknowledges(prefill, tiny_llama):
    """The test is the decode worker: it asks for a prompt, takes the first
    token and every chunk, then neither acks nor closes the stream."""
    st = prefill.status()
    prompt = list(range(5, 5 + 3 * st.block_size + 1))  # 4 blocks
    params = params_to_pb(SamplingParams(temperature=0, max_tokens=8))

    async def take_kv_and_go_silent() -> tuple[int, set[int], grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(prefill.address, options=CHANNEL_OPTIONS) as ch:
            call = pb_grpc.PrefillWorkerStub(ch).Prefill()
            request = pb.PrefillRequest(
                request_id="silent-1",
                prompt_token_ids=prompt,
                sampling_params=params,
                dest_block_ids=[40, 41, 42, 43],
                block_size=st.block_size,
                reservation=77,
            )
            await call.write(pb.PrefillClientMessage(request=request))
            first = await call.read()
            assert first.WhichOneof("kind") == "first_token", first
            generations, chunks = set(), 0
            while (msg := await call.read()).WhichOneof("kind") == "kv":
                generations.add(msg.kv.reservation)
                chunks += 1
            assert msg.WhichOneof("kind") == "done" and msg.done.num_chunks == chunks
            # No ack, no hang-up: only the lease can end this call (the
            # outer timeout only keeps a broken build from hanging the suite).
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async with asyncio.timeout(LEASE_S + 60):
                    await call.read()
            return chunks, generations, e.value

    chunks, generations, error = asyncio.run(take_kv_and_go_silent())
    assert chunks > 0
    assert generations == {77}, "every chunk echoes the reservation generation"
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert "lease" in (error.details() or "")
    s = wait_until_idle(prefill)
    assert s.held == 0 and s.kv_blocks_free == s.kv_blocks_total, s
    assert prefill.metric("splitserve_kv_lease_expired_total") == 1

    # The worker goes on serving: a caller that acks in time costs no lease.
    async def take_and_ack() -> None:
        async with grpc.aio.insecure_channel(prefill.address, options=CHANNEL_OPTIONS) as ch:
            call = pb_grpc.PrefillWorkerStub(ch).Prefill()
            request = pb.PrefillRequest(
                request_id="polite-1",
                prompt_token_ids=prompt,
                sampling_params=params,
                dest_block_ids=[0, 1, 2, 3],
                block_size=st.block_size,
                reservation=78,
            )
            await call.write(pb.PrefillClientMessage(request=request))
            async for msg in call:
                if msg.WhichOneof("kind") == "done":
                    ack = pb.KvAck(request_id="polite-1", ok=True)
                    await call.write(pb.PrefillClientMessage(ack=ack))
                    await call.done_writing()

    asyncio.run(take_and_ack())
    s = wait_until_idle(prefill)
    assert s.held == 0 and s.kv_blocks_free == s.kv_blocks_total, s
    assert prefill.metric("splitserve_kv_lease_expired_total") == 1


def test_a_frozen_prefill_worker_is_noticed_by_keepalive_not_the_ttl(prefill, tiny_llama, tmp_path):
    decode = Worker(
        "decode_worker",
        tiny_llama,
        tmp_path,
        "--kv-reservation-ttl",
        str(TTL_S),
        "--prefill-addresses",  # the only prefill worker it may dial
        prefill.address,
    )
    try:
        offline = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=16 << 20)
        sampling = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        tok = offline.engine.tokenizer

        async def generate(rid: str, prompt: str) -> list[int]:
            async with grpc.aio.insecure_channel(decode.address, options=CHANNEL_OPTIONS) as ch:
                req = pb.GenerateRequest(
                    request_id=rid,
                    prompt_token_ids=tok.encode(prompt),
                    sampling_params=params_to_pb(sampling),
                    prefill_addresses=[prefill.address],
                )
                out: list[int] = []
                # Bounded only so that a broken build fails instead of hanging.
                async for msg in pb_grpc.DecodeWorkerStub(ch).Generate(req, timeout=TTL_S - 10):
                    out.extend(msg.token_ids)
                return out

        def expected(prompt: str) -> list[int]:
            out = offline.generate([tok.encode(prompt)], sampling, use_tqdm=False)[0]
            return list(out.token_ids)

        # Connect D to P over a working call first: the freeze then hits an
        # established connection, with the next Prefill call open on it.
        assert asyncio.run(generate("warm-1", "In a hole")) == expected("In a hole")
        fallbacks = decode.metric("splitserve_decode_local_prefills_total")
        assert fallbacks == 0, "the warm-up request should have been prefilled remotely"

        os.kill(prefill.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            tokens = asyncio.run(generate("frozen-1", "Once upon a time"))
            waited = time.monotonic() - start
        finally:
            os.kill(prefill.proc.pid, signal.SIGCONT)
        assert tokens == expected("Once upon a time")
        # Noticed by keepalive (seconds), not by the reservation's TTL.
        keepalive_s = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000
        assert waited < TTL_S / 2, f"waited {waited:.1f}s (keepalive: {keepalive_s:g}s)"
        assert decode.metric("splitserve_decode_local_prefills_total") == 1
        assert "UNAVAILABLE" in decode.log(), decode.log()
        # P, thawed, ends the call its caller gave up on and frees its blocks.
        s = wait_until_idle(prefill)
        assert s.held == 0 and s.kv_blocks_free == s.kv_blocks_total, s
        d = wait_until_idle(decode, pb_grpc.DecodeWorkerStub)
        assert d.kv_blocks_free == d.kv_blocks_total and d.awaiting_kv == 0, d
    finally:
        decode.stop()
