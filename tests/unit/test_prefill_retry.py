"""The decode worker's one retry loop (kvtransfer/fetch.py
fill_in_turn), in process: scripted attempts (the Attempt interface both
transports implement) write real KV chunks into a real KvReceiver."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvtransfer.base import KvChunk, KvReceiver
from kvtransfer.fetch import (
    Fill,
    FirstToken,
    PrefillEvent,
    PrefillFailed,
    PrefillResult,
    fill_in_turn,
)
from protos import splitserve_pb2 as pb

BLOCK = (4, 1, 2)  # block_size, kv_heads, head_dim
LAYERS = 2
TABLE = [3, 1]


class Pool:
    def __init__(self) -> None:
        self.k = [torch.zeros(8, *BLOCK) for _ in range(LAYERS)]
        self.v = [torch.zeros(8, *BLOCK) for _ in range(LAYERS)]

    def write(self, layer, block_ids, k, v):
        idx = torch.tensor(list(block_ids))
        self.k[layer].index_copy_(0, idx, k)
        self.v[layer].index_copy_(0, idx, v)


class Scripted:
    """An attempt that sends the first token, then `layers` of the KV, then
    fails with `error` (or completes when it is None)."""

    errors = (PrefillFailed, TimeoutError)

    def __init__(
        self,
        name: str,
        *,
        layers: int = LAYERS,
        error: str | None = None,
        again: bool = True,
        hang: bool = False,
    ) -> None:
        self.name, self.layers, self.error, self.again, self.hang = name, layers, error, again, hang
        self.generations: list[int] = []

    async def run(self, prefill: pb.PrefillRequest, fill: Fill) -> None:
        self.generations.append(prefill.reservation)
        if self.hang:
            await asyncio.sleep(3600)  # ended by the reservation's deadline
        fill.first_token(FirstToken(7, None, pb.Timings(), self.name))
        for layer in range(self.layers):
            k = torch.full((len(TABLE), *BLOCK), float(layer + 1))
            fill.receiver.accept(
                KvChunk(
                    prefill.request_id,
                    layer,
                    tuple(prefill.dest_block_ids),
                    k,
                    -k,
                    prefill.reservation,
                )
            )
            fill.clock.renew()
        if self.error:
            raise PrefillFailed(self.error)
        if not fill.receiver.is_complete(prefill.request_id):
            raise PrefillFailed("incomplete")

    def failed(self, e: BaseException) -> tuple[str, bool]:
        return f"{self.name}: {e}", self.again


def run_fill(attempts, ttl_s: float = 5.0):
    pool = Pool()
    receiver = KvReceiver(pool.write, LAYERS, BLOCK, torch.float32)
    prefill = pb.PrefillRequest(
        request_id="r1", prompt_token_ids=[1, 2, 3, 4, 5], dest_block_ids=TABLE, block_size=BLOCK[0]
    )
    events: asyncio.Queue[PrefillEvent] = asyncio.Queue()
    result = PrefillResult()

    async def go() -> list[PrefillEvent]:
        await fill_in_turn(attempts, receiver, prefill, ttl_s, events, result)
        return [events.get_nowait() for _ in range(events.qsize())]

    got = asyncio.run(go())
    return got, result, pool, receiver


def test_the_first_worker_that_completes_fills_the_reservation():
    a, b = Scripted("a", layers=1, error="connection lost"), Scripted("b")
    events, result, pool, receiver = run_fill([a, b])
    assert [e.kind for e in events] == ["first_token", "kv_ready"]  # the token once
    assert result.failures == ["a: connection lost"]
    assert result.first is not None and result.first.prefill_address == "a"
    # Each attempt wrote under its own generation; b's KV is what is in the pool.
    assert len(a.generations) == len(b.generations) == 1
    assert b.generations[0] > a.generations[0]
    for layer in range(LAYERS):
        assert torch.equal(pool.k[layer][TABLE], torch.full((2, *BLOCK), float(layer + 1)))
    assert receiver.deadline("r1") is None  # closed: nothing left reserved


def test_every_failure_is_reported_and_a_final_one_stops_the_turns():
    a = Scripted("a", error="refused", again=False)
    b = Scripted("b")
    events, _, _, _ = run_fill([a, b])
    assert [e.kind for e in events] == ["first_token", "failed"]
    assert events[-1].error == "a: refused" and b.generations == []


def test_a_stalled_worker_is_given_up_when_the_reservation_expires():
    stalled, spare = Scripted("stalled", hang=True), Scripted("spare")
    events, result, _, _ = run_fill([stalled, spare], ttl_s=0.3)
    assert [e.kind for e in events] == ["failed"]
    # The stall used the whole reservation: the spare was never tried.
    assert spare.generations == []
    assert any("stalled" in f for f in result.failures)
    assert "the KV reservation expired" in result.failures


def test_no_attempt_at_all_fails_cleanly():
    events, _, _, _ = run_fill([])
    assert [(e.kind, e.error) for e in events] == [("failed", "no prefill worker")]


@pytest.mark.parametrize("n_failing", [0, 1, 2])
def test_the_kv_is_whole_whoever_delivers_it(n_failing):
    attempts = [Scripted(f"f{i}", layers=i % LAYERS, error="cut") for i in range(n_failing)]
    events, result, pool, _ = run_fill([*attempts, Scripted("ok")])
    assert events[-1].kind == "kv_ready" and len(result.failures) == n_failing
    assert all(torch.equal(pool.v[layer][TABLE], -pool.k[layer][TABLE]) for layer in range(LAYERS))
