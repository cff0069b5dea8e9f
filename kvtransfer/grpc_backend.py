"""KV transfer over gRPC: chunks travel on the Prefill stream
(protos/splitserve.proto), from the prefill worker's answer straight into
the decode worker's reserved blocks.

Keys and values go as raw bytes. On the way out one copy into a protobuf
`bytes` field is unavoidable (it takes no memoryview); on the way in the
tensors are read-only views of the message's bytes, copied once, into the
KV pool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import torch

from kvtransfer.base import WIRE_DTYPES, KvChunk, KvRejected, KvSender, TransferStats, dtype_name
from kvtransfer.channels import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, SERVER_OPTIONS
from protos import splitserve_pb2 as pb

__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "SERVER_OPTIONS",
    "GrpcKvSender",
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
