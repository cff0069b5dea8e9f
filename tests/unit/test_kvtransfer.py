"""KV transfer: chunking, the wire codec, sending between two real engines,
the decode side's reservation clock, and the object-store transport."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import LLM, SamplingParams
from kvtransfer.base import (
    KvChunk,
    KvReceiver,
    KvRejected,
    KvSender,
    TransferStats,
    send_kv,
    split_layer,
)
from kvtransfer.fetch import PrefillEvent, PrefillResult, ReservationClock
from kvtransfer.grpc_backend import GrpcKvSender, chunk_from_proto, chunk_to_proto
from tests.kv_kit import BLOCK, Clock, PoolWrites, layer_kv


def test_split_layer_respects_the_chunk_cap_and_keeps_whole_blocks():
    k, v = layer_kv(10, 0)
    per_block = 2 * k[0].nbytes
    chunks = split_layer("r", 3, list(range(100, 110)), k, v, max_chunk_bytes=3 * per_block + 1)
    assert [len(c.block_ids) for c in chunks] == [3, 3, 3, 1]
    assert all(c.nbytes <= 3 * per_block + 1 for c in chunks)
    assert torch.equal(torch.cat([c.key for c in chunks]), k)
    assert [b for c in chunks for b in c.block_ids] == list(range(100, 110))
    # A cap below one block still moves one block per chunk.
    assert len(split_layer("r", 0, list(range(10)), k, v, max_chunk_bytes=1)) == 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_codec_round_trip_is_exact(dtype):
    k, v = layer_kv(3, 1, dtype)
    chunk = KvChunk("req-1", 2, (7, 3, 9), k, v, reservation=41)
    msg = chunk_to_proto(chunk)
    assert msg.dtype == str(dtype).removeprefix("torch.") and list(msg.shape) == [3, *BLOCK]
    back = chunk_from_proto(type(msg).FromString(msg.SerializeToString()))
    assert back.request_id == "req-1" and back.layer == 2 and back.block_ids == (7, 3, 9)
    assert back.reservation == 41
    assert back.key.dtype == dtype and torch.equal(back.key, k) and torch.equal(back.value, v)


def test_codec_rejects_a_payload_that_does_not_match_its_shape():
    k, v = layer_kv(2, 2)
    msg = chunk_to_proto(KvChunk("r", 0, (0, 1), k, v))
    msg.key = msg.key[:-2]
    with pytest.raises(KvRejected, match="bytes"):
        chunk_from_proto(msg)
    msg = chunk_to_proto(KvChunk("r", 0, (0, 1), k, v))
    msg.dtype = "int8"
    with pytest.raises(KvRejected, match="dtype"):
        chunk_from_proto(msg)


class LoopbackSender(KvSender):
    """The sender interface driven straight into a receiver (no transport):
    checks send_kv's protocol, chunk by chunk, then the acknowledgement."""

    def __init__(self, rx: KvReceiver, request_id: str):
        self.rx, self.request_id, self.sent = rx, request_id, 0

    async def send(self, chunk: KvChunk) -> None:
        self.sent += 1
        self.rx.accept(chunk)

    async def finish(self, stats: TransferStats) -> bool:
        assert stats.num_chunks == self.sent
        return self.rx.is_complete(self.request_id)


def test_send_kv_moves_a_real_prompts_kv_between_two_engines(tiny_llama):
    """Prefill on one engine, ship every layer through send_kv into the other
    engine's reservation; the decode engine then continues exactly as one
    engine would have."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = list(range(3, 60))
    prefill = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=8 << 20)
    decode = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=8 << 20)
    expected = prefill.generate([prompt], params, use_tqdm=False)[0].token_ids

    p_eng, d_eng = prefill.engine, decode.engine
    req = p_eng.make_request(prompt, SamplingParams(temperature=0, max_tokens=1), "r")
    req.hold_blocks_on_finish = True
    p_eng.add_request(req)
    (out,) = [o for _ in range(8) for o in p_eng.step()]
    table = list(d_eng.reserve_remote(d_eng.make_request(prompt, params, "r")).block_ids)
    runner = d_eng.runner
    k_cache = runner.kv_caches[0][0]
    rx = KvReceiver(runner.write_blocks, len(runner.kv_caches), k_cache.shape[1:], k_cache.dtype)
    gen = rx.expect("r", table, ttl_s=60)
    src = list(p_eng.block_pool.block_table("r"))
    ok, stats = asyncio.run(
        send_kv(
            LoopbackSender(rx, "r"),
            "r",
            table,
            lambda layer: p_eng.runner.read_blocks(layer, src),
            num_layers=len(p_eng.runner.kv_caches),
            max_chunk_bytes=3000,  # several chunks per layer
            reservation=gen,
        )
    )
    assert ok and stats.num_chunks > len(p_eng.runner.kv_caches)
    p_eng.release_blocks("r")
    d_eng.remote_kv_done("r", out.token_ids[0])
    outs = {}
    while d_eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in d_eng.step()})
    assert outs["r"].token_ids == expected
    for eng in (p_eng, d_eng):
        assert eng.block_pool.num_free_blocks == eng.block_pool.num_blocks


def test_reservation_clock_follows_renewals_and_keeps_the_time_left_across_attempts():
    """The decode side's clock for one request: the asyncio timeout around an
    attempt moves with every renewal; a new attempt gets only the time left
    and a new generation."""
    pool = PoolWrites(num_layers=1, num_blocks=4)
    clock = Clock()
    rx = KvReceiver(pool.write, 1, BLOCK, torch.bfloat16, clock=clock)
    rc = ReservationClock(rx, "r", [1, 2], ttl_s=10)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        async with rc.attempt() as first:
            assert rx.deadline("r") == rc.deadline == clock.now + 10
            clock.now += 8  # eight seconds of silence, then a message
            rc.renew()
            assert rc.deadline == clock.now + 10 == rx.deadline("r")
            timeout = rc._timeout
            assert timeout is not None and timeout.when() == pytest.approx(loop.time() + 10, abs=1)
        clock.now += 4  # the attempt failed; four more seconds pass
        async with rc.attempt() as second:
            assert second != first and rc.remaining() == pytest.approx(6)
            assert rx.deadline("r") == rc.deadline  # not a fresh TTL
            timeout = rc._timeout
            assert timeout is not None and timeout.when() == pytest.approx(loop.time() + 6, abs=1)
            k, v = layer_kv(2, 9)
            with pytest.raises(KvRejected, match="not the open one"):
                rx.accept(KvChunk("r", 0, (1, 2), k, v, first))

    asyncio.run(run())
    assert not pool.k[0].any()


def test_object_store_prefill_renews_the_reservation_while_the_prefill_progresses(tiny_llama):
    """A real prefill servicer answers through the object-store transport,
    slowly: its first token and then its KV each come TTL*0.6 after the
    previous message. The whole prefill takes longer than one TTL, but no gap
    does: the renewed reservation takes the KV and decoding continues exactly
    as one engine would. (Before renewal, the reservation expired at TTL
    after it was made, whatever the progress.)"""
    from engine.async_engine import AsyncEngine
    from kvtransfer.ray_backend import ObjectStorePrefill
    from prefill_worker.metrics import PrefillMetrics
    from prefill_worker.server import PrefillServicer
    from protos import splitserve_pb2 as pb
    from worker.wire import params_to_pb

    ttl_s, gap_s = 4.0, 2.4
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompt = list(range(7, 50))
    decode = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=8 << 20)
    expected = decode.generate([prompt], params, use_tqdm=False)[0].token_ids
    p_eng = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=8 << 20).engine
    d_eng = decode.engine
    runner = d_eng.runner
    k_cache = runner.kv_caches[0][0]
    rx = KvReceiver(runner.write_blocks, len(runner.kv_caches), k_cache.shape[1:], k_cache.dtype)

    async def run() -> tuple[list[str], PrefillResult]:
        aengine = AsyncEngine(p_eng, asyncio.get_running_loop())
        servicer = PrefillServicer(aengine, PrefillMetrics(), "in-process", 0)
        aengine.start()

        async def slow_call(wire: bytes):
            async for item in servicer.prefill_to_object_store(wire):
                await asyncio.sleep(gap_s)  # a slow queue, then a slow network
                yield item

        try:
            request = d_eng.make_request(prompt, params, "slow-1")
            reservation = d_eng.reserve_remote(request)
            assert reservation is not None
            events: asyncio.Queue[PrefillEvent] = asyncio.Queue()
            result = PrefillResult()
            transport = ObjectStorePrefill(slow_call, attempts=1)
            prefill = pb.PrefillRequest(
                request_id="slow-1",
                prompt_token_ids=prompt,
                sampling_params=params_to_pb(params),
                dest_block_ids=reservation.block_ids,
                block_size=d_eng.config.block_size,
            )
            await transport.fill(rx, prefill, [], ttl_s, events, result)
            kinds = []
            while not events.empty():
                kinds.append(events.get_nowait().kind)
            return kinds, result
        finally:
            aengine.stop()

    kinds, result = asyncio.run(run())
    assert kinds == ["first_token", "kv_ready"], result.failures
    assert result.first is not None and len(rx) == 0
    d_eng.remote_kv_done("slow-1", result.first.token_id)
    outs = {}
    while d_eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in d_eng.step()})
    assert outs["slow-1"].token_ids == expected
    for eng in (p_eng, d_eng):
        assert eng.block_pool.num_free_blocks == eng.block_pool.num_blocks


def test_a_stream_closed_before_the_ack_is_no_ack():
    """The decode side hung up while the prefill side waited for its ack:
    grpc.aio's read() returns its EOF sentinel, which must mean "no ack"
    (the blocks are freed), not an AttributeError in the servicer."""
    import grpc

    async def write(msg: object) -> None:
        pass

    async def read_ack() -> object:
        return grpc.aio.EOF

    sender = GrpcKvSender("r1", write, read_ack)  # type: ignore[arg-type]
    assert asyncio.run(sender.finish(TransferStats())) is False
    assert sender.error and "without acknowledging" in sender.error
