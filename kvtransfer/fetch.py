"""The decode side of KV transfer: getting a reserved prompt's KV from the
prefill pool, whatever carries it.

One task per request: it asks the prefill workers in turn, reports the
first token as soon as one arrives, writes the KV into the reservation
through the KvReceiver, and acknowledges. It reports through an event
queue, so the Generate stream (which forwards the first token to the router
at once) never waits on the transfer.

A prefill worker that fails (connection lost, stream cut, bad chunk) before
the KV is complete is replaced by the next one; the first token is reported
only once, since the prompt's KV and first token are the same whoever
computes them (greedy, or seeded: the seed travels with the request). When
every worker failed, or the reservation's time ran out, the task reports
failure and the caller decides (prefill locally, or end the request).

The reservation's time (its TTL) starts when fill() is called, right after
the blocks were reserved, and every message from the prefill worker (the
first token, each chunk) renews it: a prefill that makes progress is never
cut off, one that stalls is given up one TTL after its last sign of life.
Each attempt writes under a fresh reservation generation that the prefill
worker echoes in its chunks, so a late chunk of an abandoned attempt is
rejected rather than written.

The transports (`grpc_backend.GrpcPrefill`, `ray_backend.ObjectStorePrefill`)
each supply their Attempts; `fill_in_turn` is the one retry loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from kvtransfer.base import KvReceiver
from protos import splitserve_pb2 as pb

log = logging.getLogger("splitserve.decode")


class PrefillFailed(Exception):
    pass


@dataclass(slots=True)
class FirstToken:
    token_id: int
    logprob: float | None
    timings: pb.Timings
    prefill_address: str
    top_logprobs: pb.TopLogprobs | None = None  # when logprobs > 0 was asked for
    prompt_logprobs: pb.PromptLogprobs | None = None  # when prompt_logprobs was asked for

    @classmethod
    def from_pb(cls, first: pb.FirstToken, address: str) -> FirstToken:
        logprob = first.logprob if first.HasField("logprob") else None
        top = first.top_logprobs if first.HasField("top_logprobs") else None
        prompt = first.prompt_logprobs if first.HasField("prompt_logprobs") else None
        return cls(first.token_id, logprob, first.timings, address, top, prompt)


@dataclass(slots=True)
class PrefillEvent:
    kind: str  # "first_token" | "kv_ready" | "failed"
    first: FirstToken | None = None
    error: str = ""


@dataclass(slots=True)
class PrefillResult:
    """Filled in by the task as it goes; read by the caller after kv_ready."""

    first: FirstToken | None = None
    kv_seconds: float = 0.0
    kv_bytes: int = 0
    failures: list[str] = field(default_factory=list)


class PrefillTransport(Protocol):
    """How a decode worker gets a reserved prompt's KV from the prefill pool."""

    async def fill(
        self,
        receiver: KvReceiver,
        prefill: pb.PrefillRequest,
        addresses: list[str],
        ttl_s: float,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        """Fill the reservation `prefill.dest_block_ids` (those after its
        `num_cached_blocks`: D holds the rest already); end with a kv_ready
        or failed event (after a first_token event, at most one). The
        reservation is closed either way. It expires ttl_s after the call,
        or after the prefill worker's last message, whichever is later.
        `prefill.reservation` is set by each attempt."""

    async def close(self) -> None: ...


class ReservationClock:
    """When a reservation expires: ttl_s after it was made, pushed back to
    ttl_s from now by renew() (the prefill worker sent something). A failed
    attempt renews nothing: the next attempt gets the time left.

    attempt() opens the reservation in the receiver under a fresh generation
    (chunks of an earlier attempt are rejected from then on) and bounds the
    attempt by an asyncio timeout that follows the renewed deadline; the
    receiver, which guards the writes, holds the same deadline."""

    def __init__(
        self, receiver: KvReceiver, request_id: str, block_table: list[int], ttl_s: float
    ) -> None:
        self.receiver = receiver
        self.request_id = request_id
        self.block_table = block_table
        self.ttl_s = ttl_s
        self.deadline = receiver.clock() + ttl_s  # on the receiver's clock
        self.generation = 0
        self._timeout: asyncio.Timeout | None = None

    def remaining(self) -> float:
        return self.deadline - self.receiver.clock()

    @contextlib.asynccontextmanager
    async def attempt(self) -> AsyncIterator[int]:
        """One attempt, bounded by the deadline as renewed: yields the
        reservation generation to send; raises TimeoutError when it expires."""
        self.generation = self.receiver.expect(
            self.request_id, self.block_table, self.ttl_s, deadline=self.deadline
        )
        async with asyncio.timeout_at(self._loop_time(self.deadline)) as timeout:
            self._timeout = timeout
            try:
                yield self.generation
            finally:
                self._timeout = None

    def renew(self) -> None:
        """The current attempt's prefill worker made progress. Raises
        KvRejected when the reservation is no longer open."""
        self.deadline = self.receiver.renew(self.request_id, self.generation)
        if self._timeout is not None:
            self._timeout.reschedule(self._loop_time(self.deadline))

    def _loop_time(self, deadline: float) -> float:
        return asyncio.get_running_loop().time() + (deadline - self.receiver.clock())


@dataclass(slots=True)
class Fill:
    """One request's fill, as its attempts see it: where the KV goes, the
    reservation's clock, and where to report."""

    receiver: KvReceiver
    clock: ReservationClock
    events: asyncio.Queue[PrefillEvent]
    result: PrefillResult

    def first_token(self, first: FirstToken) -> None:
        """Report the first token, once: a later attempt computes the same one."""
        if self.result.first is None:
            self.result.first = first
            self.events.put_nowait(PrefillEvent("first_token", first=first))


class Attempt(Protocol):
    """One try at one prefill worker (or one pick of the runtime's): `run`
    gets the KV into the reservation or raises one of `errors`, cancelling
    whatever call it opened on any exception."""

    @property
    def errors(self) -> tuple[type[BaseException], ...]: ...

    async def run(self, prefill: pb.PrefillRequest, fill: Fill) -> None: ...

    def failed(self, e: BaseException) -> tuple[str, bool]:
        """Why it failed, and whether another attempt may succeed."""
        ...


async def fill_in_turn(
    attempts: Iterable[Attempt],
    receiver: KvReceiver,
    prefill: pb.PrefillRequest,
    ttl_s: float,
    events: asyncio.Queue[PrefillEvent],
    result: PrefillResult,
) -> None:
    """The retry loop every transport shares: each attempt in turn, under a
    fresh reservation generation, while the reservation lasts; reports
    kv_ready after the first that completes, or failed with every reason."""
    rid = prefill.request_id
    to_fill = list(prefill.dest_block_ids)[prefill.num_cached_blocks :]
    clock = ReservationClock(receiver, rid, to_fill, ttl_s)
    fill = Fill(receiver, clock, events, result)
    try:
        for attempt in attempts:
            if clock.remaining() <= 0:
                result.failures.append("the KV reservation expired")
                break
            try:
                async with clock.attempt() as generation:
                    prefill.reservation = generation
                    await attempt.run(prefill, fill)
                events.put_nowait(PrefillEvent("kv_ready"))
                return
            except attempt.errors as e:
                # The next attempt opens a new generation: whatever this one
                # still sends is rejected; chunks it wrote are overwritten.
                reason, again = attempt.failed(e)
                result.failures.append(reason)
                log.warning("request %s: %s", rid, reason)
                if not again:
                    break
        error = "; ".join(result.failures) or "no prefill worker"
        events.put_nowait(PrefillEvent("failed", error=error))
    finally:
        receiver.close(rid)
