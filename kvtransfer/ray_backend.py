"""KV transfer through the Ray object store: both ends, and the decode
side's retry, in this one file (deploy/ray_app.py only wires the handles).

On Ray the decode side (ObjectStorePrefill) calls the prefill side's handle,
and the prefill side answers the first token, then the prompt's KV as one
RayKvPayload of numpy arrays (`pack`). Ray stores the arrays once, in shared memory; the caller owns
the objects, so they outlive the prefill replica, and `ray.get` on the same
node maps them without a copy (read-only). `receive_payload` then copies
each layer once, into the reserved blocks, through the same KvReceiver
checks as the gRPC path.

Torch tensors are not sent as such: without RAY_ENABLE_ZERO_COPY_TORCH_TENSORS
they are copied on both sides (measured: docs/ray.md); numpy views of their bits
are not. numpy has no bfloat16, so 16-bit dtypes travel as int16 bits with
the torch dtype named beside them.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvtransfer.base import WIRE_DTYPES, KvChunk, KvReceiver, KvRejected, dtype_name
from kvtransfer.fetch import (
    Fill,
    FirstToken,
    PrefillEvent,
    PrefillFailed,
    PrefillResult,
    fill_in_turn,
)
from protos import splitserve_pb2 as pb

# Views that carry each wire dtype through numpy, which has no bfloat16.
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.float32}
assert set(_BITS) == set(WIRE_DTYPES.values())


@dataclass(frozen=True)
class RayKvPayload:
    """One request's KV, as the prefill side returns it."""

    request_id: str
    dtype: str  # torch dtype name of the KV
    block_ids: tuple[int, ...]  # destination blocks on the decode side
    keys: tuple[np.ndarray, ...]  # per layer: [n_blocks, block_size, kv_heads, head_dim] bits
    values: tuple[np.ndarray, ...]
    reservation: int = 0  # the decode side's reservation generation, echoed

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)


def pack(
    request_id: str,
    block_ids: Sequence[int],
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    reservation: int = 0,
) -> RayKvPayload:
    """Every layer's K and V (fresh tensors, e.g. from read_blocks) as numpy
    views of their bits: no copy here; Ray copies once into the store.
    `reservation` is the generation that came with the request."""
    dtype = layers[0][0].dtype
    if dtype not in _BITS:
        raise ValueError(f"unsupported KV dtype {dtype}")

    def bits(t: torch.Tensor) -> np.ndarray:
        return t.detach().contiguous().cpu().view(_BITS[dtype]).numpy()

    return RayKvPayload(
        request_id=request_id,
        dtype=dtype_name(dtype),
        block_ids=tuple(block_ids),
        keys=tuple(bits(k) for k, _ in layers),
        values=tuple(bits(v) for _, v in layers),
        reservation=reservation,
    )


def receive_payload(receiver: KvReceiver, payload: RayKvPayload) -> int:
    """Write every layer into the reservation (KvReceiver checks each);
    returns the bytes written. Raises KvRejected for a payload that does not
    fit the reservation or the pool."""
    dtype = WIRE_DTYPES.get(payload.dtype)
    if dtype is None:
        raise KvRejected(f"unsupported KV dtype {payload.dtype!r}")
    if len(payload.keys) != len(payload.values):
        raise KvRejected("keys and values have different numbers of layers")
    for layer, (k, v) in enumerate(zip(payload.keys, payload.values, strict=True)):
        key, value = _view(k, dtype), _view(v, dtype)
        receiver.accept(
            KvChunk(payload.request_id, layer, payload.block_ids, key, value, payload.reservation)
        )
    return payload.nbytes


def _view(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():
        # Arrays from the object store are read-only; the view is only read.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr).view(dtype)


# Sends a serialized PrefillRequest to some prefill worker and yields what it
# answers: the serialized FirstToken, then the KV as a RayKvPayload.
ObjectStoreCall = Callable[[bytes], AsyncIterator[Any]]


class ObjectStorePrefill:
    """The decode side: `call` reaches a prefill worker of the runtime's
    choosing, which answers the first token and then the whole KV as one
    payload the decode worker owns. A failed attempt is retried (the runtime
    picks again) while the reservation lasts, up to `attempts` times."""

    def __init__(self, call: ObjectStoreCall, attempts: int = 3) -> None:
        self.call = call
        self.attempts = attempts

    @classmethod
    def through(cls, handle: Any) -> ObjectStorePrefill:
        """Over a Ray Serve handle to the prefill deployment (its `prefill`
        method streams the answer)."""
        handle = handle.options(stream=True, _by_reference=True)
        return cls(lambda wire: _read_to_end(handle.prefill.remote(wire)))

    async def close(self) -> None:
        pass

    async def fill(
        self,
        receiver: KvReceiver,
        prefill: pb.PrefillRequest,
        addresses: list[str],
        ttl_s: float,
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        attempts = [self] * self.attempts  # the runtime picks a worker each time
        await fill_in_turn(attempts, receiver, prefill, ttl_s, events, result)

    errors: tuple[type[BaseException], ...] = (Exception,)  # the runtime's own types

    async def run(self, prefill: pb.PrefillRequest, fill: Fill) -> None:
        try:
            await self._exchange(prefill.SerializeToString(), prefill.request_id, fill)
        except BaseException:  # a timeout arrives here as a cancellation
            fill.receiver.close(prefill.request_id)
            raise

    def failed(self, e: BaseException) -> tuple[str, bool]:
        if isinstance(e, TimeoutError):
            return "no prefill worker delivered the KV before the reservation expired", True
        # An argument the worker refused: no other worker will take it either.
        return (
            f"object-store prefill failed: {type(e).__name__}: {e}",
            "INVALID_ARGUMENT" not in str(e),
        )

    async def _exchange(self, wire: bytes, rid: str, fill: Fill) -> None:
        stream = self.call(wire)
        try:
            first = pb.FirstToken.FromString(await anext(stream))
            fill.clock.renew()  # the prompt is computed: the KV is on its way
            fill.first_token(
                FirstToken.from_pb(first, first.timings.prefill_address or "object-store")
            )
            start = time.monotonic()
            payload = await anext(stream)
            fill.clock.renew()
            fill.result.kv_bytes = receive_payload(fill.receiver, payload)
            if not fill.receiver.is_complete(rid):
                raise PrefillFailed("KV incomplete: some layers or blocks never arrived")
            fill.result.kv_seconds = time.monotonic() - start
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


_pumps: set[asyncio.Task[None]] = set()


async def _read_to_end(answer: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A Ray stream's items, read to its end by a task of its own whatever
    the caller does: a caller that gives up (timeout, client gone) only
    stops reading the queue. Cancelling the call, or an await on it, while
    a result is being fetched from the object store crashes the process in
    Ray 2.60 (ObjectUnknownOwner); the price is that an abandoned prompt is
    still computed, and its KV dropped."""
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in answer:
                items.put_nowait(("item", item))
        except Exception as e:  # the prefill replica's error, for the caller
            items.put_nowait(("error", e))
        items.put_nowait(("end", None))

    task = asyncio.ensure_future(pump())
    _pumps.add(task)
    task.add_done_callback(_pumps.discard)
    while True:
        kind, value = await items.get()
        if kind == "item":
            yield value
        elif kind == "error":
            raise value
        else:
            return
