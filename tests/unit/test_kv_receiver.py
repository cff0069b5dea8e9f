"""The receiver's guard on reservations: a chunk is written only into the
open, unexpired reservation of its request id and generation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvtransfer.base import KvChunk, KvReceiver, KvRejected
from tests.kv_kit import BLOCK, Clock, PoolWrites, layer_kv


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
