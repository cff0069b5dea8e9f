"""KV transfer: chunking, the wire codec, and the receiver's guard on
reservations, against a real engine's KV pool."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from decode_worker.remote_prefill import ReservationClock
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
from kvtransfer.grpc_backend import GrpcKvSender, chunk_from_proto, chunk_to_proto

BLOCK = (16, 2, 8)  # block_size, kv_heads, head_dim


def layer_kv(n_blocks: int, seed: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_blocks, *BLOCK, generator=g).to(dtype)
    v = torch.randn(n_blocks, *BLOCK, generator=g).to(dtype)
    return k, v


class PoolWrites:
    """A real KV pool (one tensor per layer) that the receiver writes into."""

    def __init__(self, num_layers: int, num_blocks: int, dtype=torch.bfloat16):
        self.k = [torch.zeros(num_blocks, *BLOCK, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(num_blocks, *BLOCK, dtype=dtype) for _ in range(num_layers)]

    def write(self, layer, block_ids, k, v):
        idx = torch.tensor(list(block_ids))
        self.k[layer].index_copy_(0, idx, k)
        self.v[layer].index_copy_(0, idx, v)


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


def test_receiver_writes_only_into_live_reservations():
    pool = PoolWrites(num_layers=2, num_blocks=8)
    rx = KvReceiver(pool.write, 2, BLOCK, torch.bfloat16)
    gen = rx.expect("a", [5, 2], ttl_s=60)
    k, v = layer_kv(2, 3)

    with pytest.raises(KvRejected, match="no reservation"):
        rx.accept(KvChunk("unknown", 0, (5, 2), k, v, gen))
    with pytest.raises(KvRejected, match=r"not .*in its reservation"):
        rx.accept(KvChunk("a", 0, (5, 3), k, v, gen))
    with pytest.raises(KvRejected, match="layer 2 out of range"):
        rx.accept(KvChunk("a", 2, (5, 2), k, v, gen))
    with pytest.raises(KvRejected, match="expected"):
        rx.accept(KvChunk("a", 0, (5, 2), k.float(), v.float(), gen))
    with pytest.raises(KvRejected, match="not the open one"):
        rx.accept(KvChunk("a", 0, (5, 2), k, v))  # no generation at all
    # Nothing was written by any rejected chunk.
    assert all(not t.any() for t in pool.k + pool.v)

    rx.accept(KvChunk("a", 0, (5, 2), k, v, gen))
    assert not rx.is_complete("a")  # layer 1 missing
    rx.accept(KvChunk("a", 1, (5,), k[:1], v[:1], gen))
    assert not rx.is_complete("a")  # block 2 of layer 1 missing
    rx.accept(KvChunk("a", 1, (2,), k[1:], v[1:], gen))
    assert rx.is_complete("a") and rx.num_bytes("a") == 2 * (k.nbytes + v.nbytes)
    assert torch.equal(pool.k[0][5], k[0]) and torch.equal(pool.v[1][2], v[1])

    rx.close("a")
    with pytest.raises(KvRejected, match="no reservation"):
        rx.accept(KvChunk("a", 0, (5, 2), k, v, gen))
    assert len(rx) == 0


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_reservation_expires():
    pool = PoolWrites(num_layers=1, num_blocks=4)
    clock = Clock()
    rx = KvReceiver(pool.write, 1, BLOCK, torch.bfloat16, clock=clock)
    slow = rx.expect("slow", [0], ttl_s=5)
    fine = rx.expect("fine", [1], ttl_s=60)
    clock.now += 5.5
    k, v = layer_kv(1, 4)
    with pytest.raises(KvRejected, match="expired"):
        rx.accept(KvChunk("slow", 0, (0,), k, v, slow))
    with pytest.raises(KvRejected, match="expired"):
        rx.renew("slow", slow)  # too late: progress does not revive it
    rx.accept(KvChunk("fine", 0, (1,), k, v, fine))
    assert not pool.k[0][0].any()


def test_renewal_keeps_a_progressing_reservation_alive():
    """The TTL runs from the last sign of progress, not from the start: a
    reservation renewed every 4 s of a 5 s TTL outlives many TTLs."""
    pool = PoolWrites(num_layers=3, num_blocks=4)
    clock = Clock()
    rx = KvReceiver(pool.write, 3, BLOCK, torch.bfloat16, clock=clock)
    gen = rx.expect("r", [2], ttl_s=5)
    assert rx.deadline("r") == clock.now + 5
    k, v = layer_kv(1, 5)
    for layer in range(3):
        clock.now += 4
        assert rx.renew("r", gen) == clock.now + 5 == rx.deadline("r")
        rx.accept(KvChunk("r", layer, (2,), k, v, gen))
    assert rx.is_complete("r")
    # Without renewal it expires TTL after the last one.
    clock.now += 5.01
    with pytest.raises(KvRejected, match="expired"):
        rx.accept(KvChunk("r", 0, (2,), k, v, gen))
    # A new attempt within the time left of an earlier one keeps its deadline.
    gen2 = rx.expect("r", [2], ttl_s=5, deadline=clock.now + 1)
    assert rx.deadline("r") == clock.now + 1 and gen2 != gen
    assert rx.renew("r", gen2) == clock.now + 5


def test_a_chunk_for_a_closed_reservation_is_rejected_and_writes_nothing():
    pool = PoolWrites(num_layers=1, num_blocks=6)
    rx = KvReceiver(pool.write, 1, BLOCK, torch.bfloat16)
    gen = rx.expect("r", [1, 4], ttl_s=60)
    rx.close("r")  # expired, aborted or filled: the blocks may be someone else's now
    other = rx.expect("other", [1, 4], ttl_s=60)  # ...and here they are
    k, v = layer_kv(2, 6)
    before = [t.clone() for t in pool.k + pool.v]
    with pytest.raises(KvRejected, match="no reservation"):
        rx.accept(KvChunk("r", 0, (1, 4), k, v, gen))
    with pytest.raises(KvRejected, match="no reservation"):
        rx.renew("r", gen)
    with pytest.raises(KvRejected, match="not the open one"):
        # The late chunk does not become the new owner's by naming it.
        rx.accept(KvChunk("other", 0, (1, 4), k, v, gen))
    assert all(torch.equal(a, b) for a, b in zip(before, pool.k + pool.v, strict=True))
    assert not rx.is_complete("other") and rx.num_bytes("other") == 0
    rx.accept(KvChunk("other", 0, (1, 4), k, v, other))
    assert rx.is_complete("other")


def test_a_late_chunk_of_an_earlier_generation_is_rejected_after_re_expect():
    """The same request id reserved again (a retry, or a new reservation after
    the first expired and its blocks went to another request): chunks
    carrying the old generation are rejected, even for blocks that the new
    reservation also covers, and nothing is written."""
    pool = PoolWrites(num_layers=2, num_blocks=8)
    rx = KvReceiver(pool.write, 2, BLOCK, torch.bfloat16)
    old = rx.expect("r", [3, 5], ttl_s=60)
    k, v = layer_kv(2, 7)
    rx.accept(KvChunk("r", 0, (3, 5), k, v, old))  # the first attempt got this far
    written = [t.clone() for t in pool.k + pool.v]

    new = rx.expect("r", [5, 6], ttl_s=60)  # block 3 now belongs to someone else
    assert new != old
    k2, v2 = layer_kv(2, 8)
    with pytest.raises(KvRejected, match="not the open one"):
        rx.accept(KvChunk("r", 1, (5, 6), k2, v2, old))  # inside the new blocks
    with pytest.raises(KvRejected, match="not the open one"):
        rx.accept(KvChunk("r", 1, (3, 5), k2, v2, old))  # the old blocks
    with pytest.raises(KvRejected, match="not the open one"):
        rx.renew("r", old)
    assert all(torch.equal(a, b) for a, b in zip(written, pool.k + pool.v, strict=True))
    # The old attempt's write does not count toward the new reservation.
    assert rx.num_bytes("r") == 0 and not rx.is_complete("r")
    for layer in range(2):
        rx.accept(KvChunk("r", layer, (5, 6), k2, v2, new))
    assert rx.is_complete("r") and torch.equal(pool.k[1][6], k2[1])


def test_generations_are_never_reused_across_receivers():
    a = KvReceiver(PoolWrites(1, 2).write, 1, BLOCK, torch.bfloat16)
    b = KvReceiver(PoolWrites(1, 2).write, 1, BLOCK, torch.bfloat16)
    gens = [rx.expect("r", [0], ttl_s=1) for rx in (a, b, a, b, a)]
    assert len(set(gens)) == len(gens) and all(g > 0 for g in gens)


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
    table = list(d_eng.reserve_remote(d_eng.make_request(prompt, params, "r")))
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
    from decode_worker.remote_prefill import ObjectStorePrefill, PrefillEvent, PrefillResult
    from engine.async_engine import AsyncEngine
    from prefill_worker.metrics import PrefillMetrics
    from prefill_worker.server import PrefillServicer

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
            table = d_eng.reserve_remote(request)
            assert table is not None
            events: asyncio.Queue[PrefillEvent] = asyncio.Queue()
            result = PrefillResult()
            transport = ObjectStorePrefill(slow_call, attempts=1)
            block_size = d_eng.config.block_size
            await transport.fill(rx, request, list(table), block_size, [], ttl_s, events, result)
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


class ReceiverMachine(RuleBasedStateMachine):
    """Any interleaving of reservations (made, renewed, replaced, closed,
    expired) and chunks (current, late, stray, for closed or reused request
    ids) against a model of what the receiver may write: a chunk lands iff
    its (request id, generation) is the open, unexpired reservation and its
    blocks lie inside it; nothing else ever changes the pool."""

    LAYERS, BLOCKS = 2, 8

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.pool = PoolWrites(self.LAYERS, self.BLOCKS)
        self.rx = KvReceiver(self.pool.write, self.LAYERS, BLOCK, torch.bfloat16, clock=self.clock)
        # The model: open reservations (generation, blocks, ttl, deadline), every
        # generation ever handed out, and each block's expected fill per layer.
        self.open: dict[str, tuple[int, frozenset[int], float, float]] = {}
        self.generations: list[int] = [0]
        self.expected = torch.zeros(self.LAYERS, self.BLOCKS)
        self.fill = 0

    def _free_blocks(self, rid: str) -> list[int]:
        # A real pool never gives one block to two open reservations.
        taken = set().union(*(b for r, (_, b, _, _) in self.open.items() if r != rid))
        return [b for b in range(self.BLOCKS) if b not in taken]

    @rule(rid=st.sampled_from("abc"), data=st.data(), ttl=st.sampled_from([1.0, 5.0]))
    def expect(self, rid: str, data: st.DataObject, ttl: float) -> None:
        free = self._free_blocks(rid)
        if not free:
            return
        blocks = data.draw(st.lists(st.sampled_from(free), min_size=1, unique=True))
        gen = self.rx.expect(rid, blocks, ttl)
        assert gen not in self.generations
        self.generations.append(gen)
        self.open[rid] = (gen, frozenset(blocks), ttl, self.clock.now + ttl)

    @rule(rid=st.sampled_from("abc"))
    def close(self, rid: str) -> None:
        self.rx.close(rid)
        self.open.pop(rid, None)

    @rule(dt=st.sampled_from([0.4, 2.0, 6.0]))
    def advance(self, dt: float) -> None:
        self.clock.now += dt

    @rule(rid=st.sampled_from("abc"), data=st.data())
    def renew(self, rid: str, data: st.DataObject) -> None:
        gen = data.draw(st.sampled_from(self.generations))
        live = self._live(rid, gen)
        try:
            self.rx.renew(rid, gen)
        except KvRejected:
            assert not live
            return
        assert live
        g, blocks, ttl, _ = self.open[rid]
        self.open[rid] = (g, blocks, ttl, self.clock.now + ttl)

    @rule(rid=st.sampled_from("abcd"), layer=st.integers(0, 2), data=st.data())
    def chunk(self, rid: str, layer: int, data: st.DataObject) -> None:
        gen = data.draw(st.sampled_from(self.generations))
        blocks = data.draw(
            st.lists(st.integers(0, self.BLOCKS - 1), min_size=1, max_size=3, unique=True)
        )
        self.fill += 1
        k = torch.full((len(blocks), *BLOCK), float(self.fill), dtype=torch.bfloat16)
        should = self._live(rid, gen) and layer < self.LAYERS and set(blocks) <= self.open[rid][1]
        try:
            self.rx.accept(KvChunk(rid, layer, tuple(blocks), k, -k, gen))
        except KvRejected:
            assert not should
            return
        assert should
        self.expected[layer, blocks] = float(self.fill)

    def _live(self, rid: str, gen: int) -> bool:
        res = self.open.get(rid)
        return res is not None and res[0] == gen and self.clock.now <= res[3]

    @invariant()
    def pool_holds_exactly_the_accepted_chunks(self) -> None:
        for layer in range(self.LAYERS):
            got = self.pool.k[layer].float().amax(dim=(1, 2, 3))
            assert torch.equal(got, self.expected[layer])
            assert torch.equal(self.pool.v[layer].float().amin(dim=(1, 2, 3)), -got)


ReceiverMachine.TestCase.settings = settings(max_examples=60, deadline=None)
test_receiver_writes_only_the_open_generation = ReceiverMachine.TestCase


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
