"""The KV pool as seen from outside the engine thread: its layout, and the
copies into and out of blocks that no engine step touches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# The model runner's block copies: read(layer, block_ids) -> (K, V);
# write(layer, block_ids, K, V).
ReadBlocks = Callable[[int, Sequence[int]], tuple[torch.Tensor, torch.Tensor]]
WriteBlocks = Callable[[int, Sequence[int], torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True, slots=True)
class KvLayout:
    """One K and one V tensor per layer, each [num_blocks, block_size,
    num_kv_heads, head_dim] of `dtype`. Two engines can exchange KV only when
    their layouts agree in everything but num_blocks."""

    num_layers: int
    num_blocks: int
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of_cache(cls, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> KvLayout:
        """The layout of a per-layer list of (K, V) pool tensors."""
        k_cache = kv_caches[0][0]  # [num_blocks, block_size, kv_heads, head_dim]
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        return cls(len(kv_caches), num_blocks, block_size, num_kv_heads, head_dim, k_cache.dtype)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of one layer's K (or V): (block_size, num_kv_heads, head_dim)."""
        return (self.block_size, self.num_kv_heads, self.head_dim)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens' KV."""
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True, slots=True)
class KvReservation:
    """Blocks a decode engine set aside for a prompt whose KV is computed
    elsewhere: `block_ids` cover the prompt, in block-table order; the first
    `num_cached_blocks` already hold its prefix (from this engine's prefix
    cache, shared with other requests, never written), so only `to_fill`
    is to be sent and written."""

    block_ids: tuple[int, ...]
    num_cached_blocks: int = 0

    @property
    def to_fill(self) -> tuple[int, ...]:
        return self.block_ids[self.num_cached_blocks :]


class DirectKv:
    """The blocks the event loop may copy KV into or out of while the engine
    thread steps, and nothing else:

    - written: the blocks a reservation awaiting remote KV is to fill (its
      prompt blocks short of those its prefix cache supplied), from
      reserve_remote's answer until the reservation is filled or aborted
      (`reserved` / `forget_reservation`, both on the loop);
    - read: the blocks a finished request holds for its transfer, from its
      last step until release or abort (`held` on the engine thread, before
      the request's last delta is posted; `forget_held` on either thread).

    Dict and set operations are atomic under the GIL; each table is set once
    and never changed, so a reader sees a whole table or none."""

    def __init__(self, read_blocks: ReadBlocks, write_blocks: WriteBlocks) -> None:
        self._read_blocks = read_blocks
        self._write_blocks = write_blocks
        self._reservations: dict[str, tuple[int, ...]] = {}  # loop thread only
        self._writable: set[int] = set()  # their union; loop thread only
        self._held: dict[str, tuple[int, ...]] = {}

    def reserved(self, request_id: str, block_ids: Sequence[int]) -> None:
        self._reservations[request_id] = tuple(block_ids)
        self._writable.update(block_ids)

    def forget_reservation(self, request_id: str) -> None:
        table = self._reservations.pop(request_id, None)
        if table is not None:
            self._writable.difference_update(table)

    def held(self, request_id: str, block_ids: Sequence[int]) -> None:
        self._held[request_id] = tuple(block_ids)

    def forget_held(self, request_id: str) -> None:
        self._held.pop(request_id, None)

    def write(
        self, layer: int, block_ids: Sequence[int], key: torch.Tensor, value: torch.Tensor
    ) -> None:
        if not self._writable.issuperset(block_ids):
            raise ValueError(
                f"blocks {list(block_ids)[:8]} are not (all) reserved for remote KV: "
                "the reservation was filled, aborted or never made"
            )
        self._write_blocks(layer, block_ids, key, value)

    def read(
        self, request_id: str, layer: int, first_block: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._held.get(request_id)
        if table is None:
            raise KeyError(f"request {request_id!r} holds no KV blocks (unknown or released)")
        return self._read_blocks(layer, table[first_block:])
