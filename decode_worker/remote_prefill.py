"""Getting a reserved prompt's KV from the prefill pool.

One task per request: it asks the prefill workers in the router's order,
reports the first token as soon as one arrives, writes the KV chunks into the
reservation through the KvReceiver, and acknowledges. It reports through an
event queue, so the Generate stream (which forwards the first token to the
router at once) never waits on the transfer.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from engine.request import Request
from kvtransfer.base import KvReceiver, KvRejected
from kvtransfer.grpc_backend import chunk_from_proto
from kvtransfer.peers import KnownPeers
from kvtransfer.ray_backend import receive_payload
from kvtransfer.security import ClusterSecurity, secure_channel
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from worker.wire import params_to_pb

log = logging.getLogger("splitserve.decode")


class PrefillFailed(Exception):
    pass


@dataclass(slots=True)
class FirstToken:
    token_id: int
    logprob: float | None
    timings: pb.Timings
    prefill_address: str


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
        request: Request,
        block_table: list[int],
        block_size: int,
        addresses: list[str],
        ttl_s: float,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        """Fill the reservation; end with a kv_ready or failed event (after a
        first_token event, at most one). The reservation is closed either way.
        It expires ttl_s after the call, or after the prefill worker's last
        message, whichever is later."""

    async def close(self) -> None: ...


def _prefill_request(
    request: Request, block_table: list[int], block_size: int, reservation: int
) -> pb.PrefillRequest:
    return pb.PrefillRequest(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        sampling_params=params_to_pb(request.sampling_params),
        dest_block_ids=block_table,
        block_size=block_size,
        reservation=reservation,
    )


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


# Remembered so that each unknown address is logged once (bounded: a request
# can name any string).
MAX_LOGGED_UNKNOWN = 1000


class Attempt(Protocol):
    """One try at one prefill worker (or one pick of the runtime's): `run`
    gets the KV into the reservation or raises one of `errors`, cancelling
    whatever call it opened on any exception."""

    @property
    def errors(self) -> tuple[type[BaseException], ...]: ...

    async def run(
        self,
        prefill: pb.PrefillRequest,
        receiver: KvReceiver,
        clock: ReservationClock,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None: ...

    def failed(self, e: BaseException) -> tuple[str, bool]:
        """Why it failed, and whether another attempt may succeed."""
        ...


async def fill_in_turn(
    attempts: Iterable[Attempt],
    receiver: KvReceiver,
    request: Request,
    block_table: list[int],
    block_size: int,
    ttl_s: float,
    events: asyncio.Queue[PrefillEvent],
    result: PrefillResult,
) -> None:
    """The retry loop both transports share: each attempt in turn, under a
    fresh reservation generation, while the reservation lasts; reports
    kv_ready after the first that completes, or failed with every reason."""
    rid = request.request_id
    clock = ReservationClock(receiver, rid, block_table, ttl_s)
    try:
        for attempt in attempts:
            if clock.remaining() <= 0:
                result.failures.append("the KV reservation expired")
                break
            try:
                async with clock.attempt() as generation:
                    prefill = _prefill_request(request, block_table, block_size, generation)
                    await attempt.run(prefill, receiver, clock, events, result)
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


class GrpcPrefill:
    """The prefill workers the router named, tried in its order over gRPC;
    one channel per address, opened on first use.

    Only the prefill workers in `known` are ever dialled: an address a
    request names that the cluster does not know is skipped (logged once,
    and reported to `on_unknown`), so a request cannot make this worker
    connect anywhere. With nothing known (no --prefill-addresses or
    --prefill-dns), every prompt is prefilled here."""

    def __init__(
        self,
        security: ClusterSecurity | None = None,
        known: KnownPeers | None = None,
        on_unknown: Callable[[str], None] | None = None,
    ) -> None:
        self.security = security or ClusterSecurity()
        self.known = known or KnownPeers()
        self.on_unknown = on_unknown
        self._stubs: dict[str, pb_grpc.PrefillWorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._logged_unknown: set[str] = set()

    def stub(self, address: str) -> pb_grpc.PrefillWorkerStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = secure_channel(address, self.security)
            self._channels.append(channel)
            stub = self._stubs[address] = pb_grpc.PrefillWorkerStub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def known_addresses(self, addresses: list[str]) -> list[str]:
        """The addresses this worker may dial, in the router's order."""
        out = []
        for address in addresses:
            if await self.known.allows(address):
                out.append(address)
            else:
                self._unknown(address)
        return out

    def _unknown(self, address: str) -> None:
        if self.on_unknown is not None:
            self.on_unknown(address)
        if not self.known.configured:
            if not self._logged_unknown:
                self._logged_unknown.add(address)
                log.warning(
                    "no prefill workers are configured (--prefill-addresses, --prefill-dns): "
                    "requests naming prefill workers are prefilled here instead"
                )
        elif address not in self._logged_unknown and len(self._logged_unknown) < MAX_LOGGED_UNKNOWN:
            self._logged_unknown.add(address)
            log.warning(
                "skipping prefill worker %r: not a prefill worker this cluster knows",
                address[:100],  # a request can name any string
            )

    async def fill(
        self,
        receiver: KvReceiver,
        request: Request,
        block_table: list[int],
        block_size: int,
        addresses: list[str],
        ttl_s: float,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        known = await self.known_addresses(addresses)
        if not known:
            result.failures.append("no prefill worker the request named is known here")
        attempts = [_GrpcAttempt(self.stub(address), address, ttl_s) for address in known]
        await fill_in_turn(
            attempts, receiver, request, block_table, block_size, ttl_s, events, result
        )


class _GrpcAttempt:
    """One prefill worker, over its Prefill stream."""

    errors: tuple[type[BaseException], ...] = (
        grpc.aio.AioRpcError,
        # A call the peer already ended, seen through an interceptor (the
        # cluster secret's): not an AioRpcError.
        asyncio.InvalidStateError,
        PrefillFailed,
        KvRejected,
        TimeoutError,
    )

    def __init__(self, stub: pb_grpc.PrefillWorkerStub, address: str, ttl_s: float) -> None:
        self.stub, self.address, self.ttl_s = stub, address, ttl_s

    async def run(
        self,
        prefill: pb.PrefillRequest,
        receiver: KvReceiver,
        clock: ReservationClock,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        # The call's own deadline, a backstop that P sees too: the rest of
        # the reservation for the first token, and one TTL more for the KV
        # (renewals count within it).
        call = self.stub.Prefill(timeout=clock.remaining() + self.ttl_s)
        try:
            await _one_attempt(call, prefill, self.address, receiver, clock, events, result)
        except BaseException:
            # Failed, or cancelled (the client went away): end the call so the
            # prefill worker stops sending and frees its blocks now.
            call.cancel()
            raise

    def failed(self, e: BaseException) -> tuple[str, bool]:
        return _describe(e, self.address), True


# Sends a serialized PrefillRequest to some prefill worker and yields what it
# answers: the serialized FirstToken, then the KV as a RayKvPayload.
ObjectStoreCall = Callable[[bytes], AsyncIterator[Any]]


class ObjectStorePrefill:
    """The KV through an object store (Ray's): `call` reaches a prefill
    worker of the runtime's choosing, which answers the first token and then
    the whole KV as one payload the decode worker owns. A failed attempt is
    retried (the runtime picks again) while the reservation lasts, up to
    `attempts` times."""

    def __init__(self, call: ObjectStoreCall, attempts: int = 3) -> None:
        self.call = call
        self.attempts = attempts

    async def close(self) -> None:
        pass

    async def fill(
        self,
        receiver: KvReceiver,
        request: Request,
        block_table: list[int],
        block_size: int,
        addresses: list[str],
        ttl_s: float,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        attempts = [self] * self.attempts  # the runtime picks a worker each time
        await fill_in_turn(
            attempts, receiver, request, block_table, block_size, ttl_s, events, result
        )

    errors: tuple[type[BaseException], ...] = (Exception,)  # the runtime's own types

    async def run(
        self,
        prefill: pb.PrefillRequest,
        receiver: KvReceiver,
        clock: ReservationClock,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        try:
            await self._one_attempt(
                prefill.SerializeToString(), receiver, prefill.request_id, clock, events, result
            )
        except BaseException:  # a timeout arrives here as a cancellation
            receiver.close(prefill.request_id)
            raise

    def failed(self, e: BaseException) -> tuple[str, bool]:
        if isinstance(e, TimeoutError):
            return "no prefill worker delivered the KV before the reservation expired", True
        # An argument the worker refused: no other worker will take it either.
        return (
            f"object-store prefill failed: {type(e).__name__}: {e}",
            "INVALID_ARGUMENT" not in str(e),
        )

    async def _one_attempt(
        self,
        wire: bytes,
        receiver: KvReceiver,
        rid: str,
        clock: ReservationClock,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        stream = self.call(wire)
        try:
            first_bytes = await anext(stream)
            clock.renew()  # the prompt is computed: the KV is on its way
            first = pb.FirstToken.FromString(first_bytes)
            if result.first is None:
                result.first = FirstToken(
                    first.token_id,
                    first.logprob if first.HasField("logprob") else None,
                    first.timings,
                    first.timings.prefill_address or "object-store",
                )
                events.put_nowait(PrefillEvent("first_token", first=result.first))
            start = time.monotonic()
            payload = await anext(stream)
            clock.renew()
            result.kv_bytes = receive_payload(receiver, payload)
            if not receiver.is_complete(rid):
                raise PrefillFailed("KV incomplete: some layers or blocks never arrived")
            result.kv_seconds = time.monotonic() - start
            del payload  # the objects are released here, not when the stream is collected
            # Read the answer to its end, so the call completes rather than
            # being cancelled after its last item.
            async for extra in stream:
                raise PrefillFailed(f"unexpected {type(extra).__name__} after the KV")
        except StopAsyncIteration:
            raise PrefillFailed("the prefill worker ended its answer early") from None
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


async def _one_attempt(
    call: grpc.aio.StreamStreamCall,
    prefill: pb.PrefillRequest,
    address: str,
    receiver: KvReceiver,
    clock: ReservationClock,
    events: asyncio.Queue[PrefillEvent],
    result: PrefillResult,
) -> None:
    rid = prefill.request_id
    await call.write(pb.PrefillClientMessage(request=prefill))
    msg = await call.read()
    if msg is grpc.aio.EOF or msg.WhichOneof("kind") != "first_token":
        raise PrefillFailed(f"{address} ended the stream before the first token")
    clock.renew()  # every message from the prefill worker is progress
    first = msg.first_token
    if result.first is None:
        result.first = FirstToken(
            first.token_id,
            first.logprob if first.HasField("logprob") else None,
            first.timings,
            address,
        )
        events.put_nowait(PrefillEvent("first_token", first=result.first))
    start = time.monotonic()
    while True:
        msg = await call.read()
        if msg is grpc.aio.EOF:
            raise PrefillFailed(f"{address} ended the stream before the KV was complete")
        clock.renew()
        kind = msg.WhichOneof("kind")
        if kind == "kv":
            try:
                receiver.accept(chunk_from_proto(msg.kv))
            except KvRejected as e:
                await call.write(_nack(rid, str(e)))
                raise
        elif kind == "done":
            break
        else:
            raise PrefillFailed(f"{address} sent {kind!r} in the middle of the KV")
    if not receiver.is_complete(rid):
        error = "KV incomplete: some layers or blocks never arrived"
        await call.write(_nack(rid, error))
        raise PrefillFailed(f"{address}: {error}")
    result.kv_bytes = receiver.num_bytes(rid)
    await call.write(pb.PrefillClientMessage(ack=pb.KvAck(request_id=rid, ok=True)))
    await call.done_writing()
    result.kv_seconds = time.monotonic() - start


def _nack(rid: str, error: str) -> pb.PrefillClientMessage:
    return pb.PrefillClientMessage(ack=pb.KvAck(request_id=rid, ok=False, error=error))


def _describe(e: BaseException, address: str) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"prefill worker {address} failed: {e.code().name}: {e.details()}"
    if isinstance(e, TimeoutError):
        return f"prefill worker {address} did not deliver the KV before the reservation expired"
    return f"prefill worker {address}: {e}"
