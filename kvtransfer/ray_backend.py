"""KV transfer through the Ray object store.

On Ray the decode side calls the prefill side's handle, and the prefill side
returns the prompt's KV as (part of) the call's value: a RayKvPayload of
numpy arrays. Ray stores the arrays once, in shared memory; the caller owns
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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvtransfer.base import WIRE_DTYPES, KvChunk, KvReceiver, KvRejected, dtype_name

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
