"""The transport-free half of KV transfer.

Lifecycle of one request's KV:

    decode side                            prefill side
    gen = receiver.expect(rid, blocks, ttl)
    ...asks the prefill side (rid, gen)  ───▶  send_kv(sender, rid, blocks, read_layer, gen)
    receiver.accept(chunk)   ◀── chunk ──    sender.send(chunk)   (layer by layer)
    receiver.renew(rid, gen)   (on every sign of progress)
    receiver.is_complete(rid)  ── ack ──▶    sender.finish() -> True: free the blocks
    receiver.close(rid)

A chunk is part of one layer's KV: keys and values of some blocks, with the
destination block ids on the decode side. The receiver writes it straight
into the decode worker's pool (which was allocated and touched at start).

Every expect() opens a reservation under a fresh generation number, never
reused in the process; the prefill side echoes it in every chunk. A chunk
is written only into the open reservation of its request id *and*
generation: a late chunk from an attempt that expired, failed or was
replaced (even one for the same request id, re-expected since, maybe on
other blocks) is rejected, never written into blocks that now belong to
someone else.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# One chunk's key+value payload stays under this: small enough to pipeline
# (the receiver writes chunk i while chunk i+1 is on the wire), big enough
# that per-message overhead is noise. Measured over loopback grpc.aio
# (bench/kv_transfer.py): 64 KiB-1 MiB chunks move 0.5-0.7 GB/s, 2-4 MiB
# chunks 0.26-0.32 GB/s.
DEFAULT_MAX_CHUNK_BYTES = 1 << 20


class KvRejected(Exception):
    """A chunk the receiver will not write: unknown or expired reservation,
    blocks outside it, or a layout that does not match the pool."""


# The dtypes KV travels in, by the name a message or payload carries: the
# one table both backends read.
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


WIRE_DTYPES = {dtype_name(d): d for d in (torch.bfloat16, torch.float16, torch.float32)}


@dataclass(frozen=True, slots=True)
class KvChunk:
    request_id: str
    layer: int
    block_ids: tuple[int, ...]  # destination blocks on the decode side
    key: torch.Tensor  # [len(block_ids), block_size, kv_heads, head_dim]
    value: torch.Tensor  # same shape and dtype as key
    reservation: int = 0  # the receiver's generation for this request (0: none, never accepted)

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.value.nbytes


@dataclass(slots=True)
class TransferStats:
    num_chunks: int = 0
    num_bytes: int = 0
    seconds: float = 0.0


def split_layer(
    request_id: str,
    layer: int,
    block_ids: Sequence[int],
    key: torch.Tensor,
    value: torch.Tensor,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    reservation: int = 0,
) -> list[KvChunk]:
    """One layer's KV ([n_blocks, block_size, kv_heads, head_dim] each) as
    chunks of whole blocks, each at most max_chunk_bytes (one block at least),
    each tagged with the receiver's reservation generation."""
    n = key.shape[0]
    if len(block_ids) != n or value.shape != key.shape:
        raise ValueError(
            f"layer {layer}: {len(block_ids)} block ids for K {tuple(key.shape)}, "
            f"V {tuple(value.shape)}"
        )
    per_block = 2 * key[0].nbytes if n else 1
    step = max(1, max_chunk_bytes // per_block)
    chunks = []
    for i in range(0, n, step):
        ids = tuple(block_ids[i : i + step])
        k, v = key[i : i + step], value[i : i + step]
        chunks.append(KvChunk(request_id, layer, ids, k, v, reservation))
    return chunks


class KvSender(ABC):
    """Prefill side: ships one request's chunks to the receiver that asked."""

    @abstractmethod
    async def send(self, chunk: KvChunk) -> None:
        """Hand one chunk to the transport (returns once it is queued)."""

    @abstractmethod
    async def finish(self, stats: TransferStats) -> bool:
        """After the last chunk: wait for the receiver's acknowledgement.
        True when it has written everything; either way the caller then
        frees its blocks."""


async def send_kv(
    sender: KvSender,
    request_id: str,
    block_ids: Sequence[int],
    read_layer: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    num_layers: int,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    reservation: int = 0,
) -> tuple[bool, TransferStats]:
    """Send every layer's KV of one request, layer by layer; (acknowledged, stats).

    read_layer(layer) returns that layer's K and V for the request's blocks,
    in block-table order (the same order as block_ids). `reservation` is the
    generation the receiver gave the request (it came with the request)."""
    stats = TransferStats()
    start = time.perf_counter()
    for layer in range(num_layers):
        key, value = read_layer(layer)
        chunks = split_layer(request_id, layer, block_ids, key, value, max_chunk_bytes, reservation)
        for chunk in chunks:
            await sender.send(chunk)
            stats.num_chunks += 1
            stats.num_bytes += chunk.nbytes
    ok = await sender.finish(stats)
    stats.seconds = time.perf_counter() - start
    return ok, stats


# Reservation generations, process-wide and never reused (not even by another
# receiver), so a chunk can only ever match the reservation it was sent for.
_generations = itertools.count(1)


@dataclass(slots=True)
class _Reservation:
    generation: int
    block_ids: tuple[int, ...]
    block_set: frozenset[int]
    ttl_s: float  # how long it lives without a sign of progress
    deadline: float  # on the receiver's clock
    # Per layer, the destination blocks written so far.
    written: list[set[int]] = field(default_factory=list)
    num_bytes: int = 0


class KvReceiver:
    """Decode side: the reservations that KV may be written into.

    write(layer, block_ids, key, value) copies one chunk into the pool; the
    receiver calls it only for chunks that carry the request id and
    generation of a live reservation, fall inside its blocks and match the
    pool's layout, so a late or stray chunk can never land in blocks that
    now belong to another request. `clock` is monotonic seconds (tests pass
    their own).
    """

    def __init__(
        self,
        write: Callable[[int, Sequence[int], torch.Tensor, torch.Tensor], None],
        num_layers: int,
        block_shape: tuple[int, ...],  # (block_size, kv_heads, head_dim)
        dtype: torch.dtype,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self.num_layers = num_layers
        self.block_shape = tuple(block_shape)
        self.dtype = dtype
        self.clock = clock
        self._reservations: dict[str, _Reservation] = {}

    def expect(
        self,
        request_id: str,
        block_ids: Sequence[int],
        ttl_s: float,
        deadline: float | None = None,
    ) -> int:
        """Open a reservation: accept chunks for these blocks, carrying the
        returned generation, until it is closed or expires. It expires ttl_s
        after the last renew() (or at `deadline` on the receiver's clock, when
        given: a new attempt within the time left of an earlier one). Any
        earlier reservation of the request id is replaced: its chunks are
        rejected from now on."""
        ids = tuple(block_ids)
        generation = next(_generations)
        self._reservations[request_id] = _Reservation(
            generation,
            ids,
            frozenset(ids),
            ttl_s,
            self.clock() + ttl_s if deadline is None else deadline,
            [set() for _ in range(self.num_layers)],
        )
        return generation

    def renew(self, request_id: str, generation: int) -> float:
        """The prefill side made progress: the reservation lives ttl_s from
        now. Returns the new deadline; raises KvRejected when that reservation
        is no longer open (closed, replaced or already expired)."""
        res = self._open(request_id, generation)
        res.deadline = self.clock() + res.ttl_s
        return res.deadline

    def deadline(self, request_id: str) -> float | None:
        """When the request's open reservation expires (receiver's clock)."""
        res = self._reservations.get(request_id)
        return res.deadline if res is not None else None

    def accept(self, chunk: KvChunk) -> None:
        """Validate the chunk and write it into its blocks, or raise KvRejected."""
        res = self._open(chunk.request_id, chunk.reservation)
        if not 0 <= chunk.layer < self.num_layers:
            raise KvRejected(f"layer {chunk.layer} out of range [0, {self.num_layers})")
        if not chunk.block_ids or not res.block_set.issuperset(chunk.block_ids):
            raise KvRejected(
                f"request {chunk.request_id!r}: blocks {list(chunk.block_ids)[:8]} are not "
                "(all) in its reservation"
            )
        expected = (len(chunk.block_ids), *self.block_shape)
        for name, t in (("key", chunk.key), ("value", chunk.value)):
            if tuple(t.shape) != expected or t.dtype != self.dtype:
                raise KvRejected(
                    f"{name} of shape {tuple(t.shape)} {t.dtype}; expected {expected} {self.dtype}"
                )
        self._write(chunk.layer, chunk.block_ids, chunk.key, chunk.value)
        res.written[chunk.layer].update(chunk.block_ids)
        res.num_bytes += chunk.nbytes

    def _open(self, request_id: str, generation: int) -> _Reservation:
        """The live reservation of this request id and generation, or KvRejected."""
        res = self._reservations.get(request_id)
        if res is None:
            raise KvRejected(f"no reservation for request {request_id!r} (unknown or closed)")
        if generation != res.generation:
            raise KvRejected(
                f"request {request_id!r}: reservation {generation} is not the open one "
                f"({res.generation}): a late chunk of an earlier attempt"
            )
        if self.clock() > res.deadline:
            raise KvRejected(f"the reservation for request {request_id!r} has expired")
        return res

    def is_complete(self, request_id: str) -> bool:
        """Every block of every layer has been written."""
        res = self._reservations.get(request_id)
        return res is not None and all(w == res.block_set for w in res.written)

    def num_bytes(self, request_id: str) -> int:
        res = self._reservations.get(request_id)
        return res.num_bytes if res is not None else 0

    def close(self, request_id: str) -> None:
        """Stop accepting chunks for the request (filled, aborted or expired)."""
        self._reservations.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._reservations)
