"""Overload is refused early: decode selection skips a worker whose queue,
by its last Status plus what the router sent it since, is at its bound.

Colocated workers bound their queue always; decode workers only while they
prefill themselves, which the router expects when it knows no healthy
prefill worker. The pool is the real WorkerPool, fed real pb.WorkerStatus
messages as a poll would record them.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import Any

import grpc
import pytest

from engine.sampling_params import SamplingParams
from protos import splitserve_pb2 as pb
from router.dispatch import DecodeCall
from router.errors import APIError
from router.metrics import RouterMetrics
from router.pool import Worker, WorkerPool

NOBODY = "127.0.0.1:1"


def record(w: Worker, **fields: Any) -> None:
    """`w` answered a poll sent now with a Status of these fields (as _poll records it)."""
    sent = time.monotonic()
    w.status = pb.WorkerStatus(block_size=16, kv_blocks_total=1000, kv_blocks_free=1000, **fields)
    w.status_time = w.last_seen = sent
    while w.dispatched and w.dispatched[0][0] < sent:
        w.dispatched.popleft()
    w.healthy = True


def colocated(*statuses: dict[str, Any]) -> WorkerPool:
    pool = WorkerPool([f"c{i}:1" for i in range(len(statuses))], [])
    for w, fields in zip(pool.decode, statuses, strict=True):
        record(w, role="colocated", **fields)
    return pool


def test_a_worker_at_its_request_bound_is_skipped():
    pool = colocated({"waiting": 4, "max_waiting_requests": 4})
    assert pool.pick_decode(16, set()) is None
    record(pool.decode[0], role="colocated", waiting=3, max_waiting_requests=4)
    assert pool.pick_decode(16, set()) is pool.decode[0]


def test_requests_sent_since_the_last_poll_count():
    pool = colocated({"waiting": 1, "max_waiting_requests": 3})
    w = pool.decode[0]
    for _ in range(2):
        assert pool.pick_decode(16, set()) is w
        pool.dispatched(w, [], 16)
    assert pool.pick_decode(16, set()) is None  # 1 reported + 2 sent since = 3
    # The next poll sees them (now running, say): room again.
    record(w, role="colocated", waiting=0, running=3, max_waiting_requests=3)
    assert pool.pick_decode(16, set()) is w


def test_prompt_tokens_sent_since_count_against_the_token_bound():
    pool = colocated(
        {"waiting": 1, "waiting_prompt_tokens": 900, "max_waiting_prompt_tokens": 1000}
    )
    w = pool.decode[0]
    assert pool.pick_decode(50, set()) is w
    pool.dispatched(w, [], 50)  # 950: still under
    assert pool.pick_decode(50, set()) is w
    pool.dispatched(w, [], 50)  # 1000: at the bound
    assert pool.pick_decode(1, set()) is None


def test_zero_means_unbounded():
    pool = colocated({"waiting": 10_000, "waiting_prompt_tokens": 10**9})
    assert pool.pick_decode(16, set()) is pool.decode[0]


def test_the_worker_under_its_bound_wins_over_one_with_more_room():
    pool = colocated(
        {"waiting": 8, "max_waiting_requests": 8},  # most free blocks, but its queue is full
        {"waiting": 0, "max_waiting_requests": 8},
    )
    record(pool.decode[1], role="colocated", waiting=0, max_waiting_requests=8)
    assert pool.decode[1].status is not None
    pool.decode[1].status.kv_blocks_free = 10
    assert pool.pick_decode(16, set()) is pool.decode[1]
    pool.policy = "round_robin"
    assert [pool.pick_decode(16, set()) for _ in range(4)] == [pool.decode[1]] * 4


def test_a_decode_worker_is_bounded_only_without_a_healthy_prefill_worker():
    pool = WorkerPool(["d0:1"], ["p0:1"])
    d, p = pool.decode[0], pool.prefill[0]
    record(d, role="decode", waiting=5, max_waiting_requests=5)
    record(p, role="prefill")
    # With a prefill worker, the decode worker's queue waits on it: not bounded.
    assert pool.pick_decode(16, set()) is d
    pool.mark_unhealthy(p, "gone")
    assert pool.pick_decode(16, set()) is None  # it would prefill itself: bounded


@pytest.mark.parametrize("bound, called", [(2, False), (3, True)])
def test_all_over_bound_is_503_retry_after_without_a_call(bound, called):
    """Every decode worker at its bound: 503 with Retry-After, and no
    Generate call reached any worker. The worker's channel leads nowhere
    (127.0.0.1:1): a call would fail UNAVAILABLE and mark it unhealthy,
    which is how the control case (under its bound) shows that it was called."""

    async def run() -> tuple[APIError, Worker]:
        pool = WorkerPool([NOBODY], [])
        w = pool.decode[0]
        record(w, role="colocated", waiting=2, max_waiting_requests=bound)
        w.channel = grpc.aio.insecure_channel(NOBODY)
        try:
            call = DecodeCall(pool, RouterMetrics(), "r", [1] * 16, SamplingParams(max_tokens=2))
            with pytest.raises(APIError) as info:
                async with aclosing(call.messages()) as messages:
                    async for _ in messages:
                        pass
            return info.value, w
        finally:
            await w.channel.close()

    err, w = asyncio.run(run())
    assert err.status == 503 and err.headers == {"Retry-After": "1"}
    if not called:
        assert "queue is full" in err.message
    assert (not w.healthy) is called
    assert w.in_flight == 0
