"""KV transfer over gRPC: chunks travel on the Prefill stream
(protos/splitserve.proto), from the prefill worker's answer straight into
the decode worker's reserved blocks. Both ends live here: the prefill
worker's GrpcKvSender and the decode worker's GrpcPrefill, which asks the
prefill workers the router named, in its order.

Keys and values go as raw bytes. On the way out one copy into a protobuf
`bytes` field is unavoidable (it takes no memoryview); on the way in the
tensors are read-only views of the message's bytes, copied once, into the
KV pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import torch

from kvtransfer.base import (
    WIRE_DTYPES,
    KvChunk,
    KvReceiver,
    KvRejected,
    KvSender,
    TransferStats,
    dtype_name,
)
from kvtransfer.channels import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, SERVER_OPTIONS
from kvtransfer.fetch import (
    Fill,
    FirstToken,
    PrefillEvent,
    PrefillFailed,
    PrefillResult,
    fill_in_turn,
)
from kvtransfer.peers import KnownPeers
from kvtransfer.security import ClusterSecurity, secure_channel
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc

log = logging.getLogger("splitserve.decode")

__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "SERVER_OPTIONS",
    "GrpcKvSender",
    "GrpcPrefill",
    "chunk_from_proto",
    "chunk_to_proto",
]


def chunk_to_proto(chunk: KvChunk) -> pb.KvChunk:
    return pb.KvChunk(
        request_id=chunk.request_id,
        layer=chunk.layer,
        block_ids=chunk.block_ids,
        dtype=dtype_name(chunk.key.dtype),
        shape=list(chunk.key.shape),
        key=_tensor_bytes(chunk.key),
        value=_tensor_bytes(chunk.value),
        reservation=chunk.reservation,
    )


def chunk_from_proto(msg: pb.KvChunk) -> KvChunk:
    """Zero-copy: the tensors view the message's bytes (read-only; the
    receiver copies them into its pool)."""
    dtype = WIRE_DTYPES.get(msg.dtype)
    if dtype is None:
        raise KvRejected(f"unsupported KV dtype {msg.dtype!r}")
    shape = tuple(msg.shape)
    numel = 1
    for d in shape:
        numel *= d
    expected_bytes = numel * dtype.itemsize
    if len(shape) != 4 or len(msg.key) != expected_bytes or len(msg.value) != expected_bytes:
        raise KvRejected(
            f"KV chunk of shape {shape} {msg.dtype}: {len(msg.key)}/{len(msg.value)} bytes, "
            f"expected {expected_bytes} each"
        )
    return KvChunk(
        request_id=msg.request_id,
        layer=msg.layer,
        block_ids=tuple(msg.block_ids),
        key=_tensor_view(msg.key, dtype, shape),
        value=_tensor_view(msg.value, dtype, shape),
        reservation=msg.reservation,
    )


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    # numpy has no bfloat16: reinterpret as raw bytes first.
    return t.view(torch.uint8).numpy().tobytes()


def _tensor_view(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    import warnings

    with warnings.catch_warnings():
        # frombuffer warns that bytes are not writable; the view is only read.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype).view(shape)


class GrpcKvSender(KvSender):
    """The prefill worker's side of one Prefill stream: chunks go out as
    PrefillServerMessage(kv=...), then done; the decode worker's KvAck comes
    back on the same stream."""

    def __init__(
        self,
        request_id: str,
        write: Callable[[pb.PrefillServerMessage], Awaitable[None]],
        read_ack: Callable[[], Awaitable[pb.PrefillClientMessage | None]],
    ) -> None:
        self.request_id = request_id
        self._write = write
        self._read_ack = read_ack
        self.error: str | None = None

    async def send(self, chunk: KvChunk) -> None:
        await self._write(pb.PrefillServerMessage(kv=chunk_to_proto(chunk)))

    async def finish(self, stats: TransferStats) -> bool:
        await self._write(
            pb.PrefillServerMessage(
                done=pb.KvDone(
                    request_id=self.request_id,
                    num_chunks=stats.num_chunks,
                    num_bytes=stats.num_bytes,
                )
            )
        )
        msg = await self._read_ack()
        # grpc.aio's read() says "stream closed" with its EOF sentinel, not None.
        if not isinstance(msg, pb.PrefillClientMessage) or msg.WhichOneof("kind") != "ack":
            self.error = "the decode worker closed the stream without acknowledging"
            return False
        if not msg.ack.ok:
            self.error = msg.ack.error or "the decode worker rejected the KV"
        return msg.ack.ok


# Remembered so that each unknown address is logged once (bounded: a request
# can name any string).
MAX_LOGGED_UNKNOWN = 1000


class GrpcPrefill:
    """The decode worker's side: the prefill workers the router named, tried
    in its order; one channel per address, opened on first use.

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
        prefill: pb.PrefillRequest,
        addresses: list[str],
        ttl_s: float,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        known = await self.known_addresses(addresses)
        if not known:
            result.failures.append("no prefill worker the request named is known here")
        attempts = [_GrpcAttempt(self.stub(address), address, ttl_s) for address in known]
        await fill_in_turn(attempts, receiver, prefill, ttl_s, events, result)


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

    async def run(self, prefill: pb.PrefillRequest, fill: Fill) -> None:
        # The call's own deadline, a backstop that P sees too: the rest of
        # the reservation for the first token, and one TTL more for the KV
        # (renewals count within it).
        call = self.stub.Prefill(timeout=fill.clock.remaining() + self.ttl_s)
        try:
            await self._exchange(call, prefill, fill)
        except BaseException:
            # Failed, or cancelled (the client went away): end the call so the
            # prefill worker stops sending and frees its blocks now.
            call.cancel()
            raise

    def failed(self, e: BaseException) -> tuple[str, bool]:
        if isinstance(e, grpc.aio.AioRpcError):
            return f"prefill worker {self.address} failed: {e.code().name}: {e.details()}", True
        if isinstance(e, TimeoutError):
            return (
                f"prefill worker {self.address} did not deliver the KV "
                "before the reservation expired",
                True,
            )
        return f"prefill worker {self.address}: {e}", True

    async def _exchange(
        self, call: grpc.aio.StreamStreamCall, prefill: pb.PrefillRequest, fill: Fill
    ) -> None:
        rid, address, receiver = prefill.request_id, self.address, fill.receiver
        await call.write(pb.PrefillClientMessage(request=prefill))
        msg = await call.read()
        if msg is grpc.aio.EOF or msg.WhichOneof("kind") != "first_token":
            raise PrefillFailed(f"{address} ended the stream before the first token")
        fill.clock.renew()  # every message from the prefill worker is progress
        fill.first_token(FirstToken.from_pb(msg.first_token, address))
        start = time.monotonic()
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise PrefillFailed(f"{address} ended the stream before the KV was complete")
            fill.clock.renew()
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
        fill.result.kv_bytes = receiver.num_bytes(rid)
        await call.write(pb.PrefillClientMessage(ack=pb.KvAck(request_id=rid, ok=True)))
        await call.done_writing()
        fill.result.kv_seconds = time.monotonic() - start


def _nack(rid: str, error: str) -> pb.PrefillClientMessage:
    return pb.PrefillClientMessage(ack=pb.KvAck(request_id=rid, ok=False, error=error))
