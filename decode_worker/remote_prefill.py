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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from engine.request import Request
from kvtransfer import KvReceiver, KvRejected
from kvtransfer.grpc_backend import CHANNEL_OPTIONS, chunk_from_proto
from kvtransfer.ray_backend import receive_payload
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from protos.convert import params_to_pb

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
        deadline: float,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        """Fill the reservation; end with a kv_ready or failed event (after a
        first_token event, at most one). The reservation is closed either way."""

    async def close(self) -> None: ...


def _prefill_request(
    request: Request, block_table: list[int], block_size: int
) -> pb.PrefillRequest:
    return pb.PrefillRequest(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        sampling_params=params_to_pb(request.sampling_params),
        dest_block_ids=block_table,
        block_size=block_size,
    )


class GrpcPrefill:
    """The prefill workers the router named, tried in its order over gRPC;
    one channel per address, opened on first use."""

    def __init__(self) -> None:
        self._stubs: dict[str, pb_grpc.PrefillWorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def stub(self, address: str) -> pb_grpc.PrefillWorkerStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels.append(channel)
            stub = self._stubs[address] = pb_grpc.PrefillWorkerStub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def fill(
        self,
        receiver: KvReceiver,
        request: Request,
        block_table: list[int],
        block_size: int,
        addresses: list[str],
        deadline: float,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        rid = request.request_id
        receiver.expect(rid, block_table, max(0.0, deadline - time.monotonic()))
        prefill = _prefill_request(request, block_table, block_size)
        try:
            for address in addresses:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    result.failures.append("the KV reservation expired")
                    break
                call = self.stub(address).Prefill()
                try:
                    async with asyncio.timeout(remaining):
                        await _one_attempt(call, prefill, address, receiver, events, result)
                    events.put_nowait(PrefillEvent("kv_ready"))
                    return
                except (grpc.aio.AioRpcError, PrefillFailed, KvRejected, TimeoutError) as e:
                    call.cancel()
                    reason = _describe(e, address)
                    result.failures.append(reason)
                    log.warning("request %s: %s", rid, reason)
                    # Start the next attempt on a clean slate: chunks already
                    # written are simply overwritten.
                    receiver.close(rid)
                    receiver.expect(rid, block_table, max(0.0, deadline - time.monotonic()))
                except BaseException:
                    # Cancelled (the client went away): end the call so the
                    # prefill worker stops sending and frees its blocks now.
                    call.cancel()
                    raise
            error = "; ".join(result.failures) or "no prefill worker"
            events.put_nowait(PrefillEvent("failed", error=error))
        finally:
            receiver.close(rid)


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
        deadline: float,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        rid = request.request_id
        wire = _prefill_request(request, block_table, block_size).SerializeToString()
        try:
            for _ in range(self.attempts):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    result.failures.append("the KV reservation expired")
                    break
                receiver.expect(rid, block_table, remaining)
                try:
                    async with asyncio.timeout(remaining):
                        await self._one_attempt(wire, receiver, rid, events, result)
                    events.put_nowait(PrefillEvent("kv_ready"))
                    return
                except Exception as e:  # the runtime's errors are its own types
                    reason = f"object-store prefill failed: {type(e).__name__}: {e}"
                    if isinstance(e, TimeoutError):
                        reason = "no prefill worker delivered the KV before the reservation expired"
                    result.failures.append(reason)
                    log.warning("request %s: %s", rid, reason)
                    receiver.close(rid)
                    if "INVALID_ARGUMENT" in str(e):
                        break  # no other worker will take it either
            error = "; ".join(result.failures) or "no prefill worker"
            events.put_nowait(PrefillEvent("failed", error=error))
        finally:
            receiver.close(rid)

    async def _one_attempt(
        self,
        wire: bytes,
        receiver: KvReceiver,
        rid: str,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        stream = self.call(wire)
        try:
            first_bytes = await anext(stream)
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
    events: asyncio.Queue[PrefillEvent],
    result: PrefillResult,
) -> None:
    rid = prefill.request_id
    await call.write(pb.PrefillClientMessage(request=prefill))
    msg = await call.read()
    if msg is grpc.aio.EOF or msg.WhichOneof("kind") != "first_token":
        raise PrefillFailed(f"{address} ended the stream before the first token")
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
