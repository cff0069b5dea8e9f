"""The block pool: the only owner of KV block allocation.

The KV cache is split into fixed-size blocks of `block_size` token slots.
Each request holds a block table, the ordered list of block ids holding its
tokens: token at position p lives in slot (table[p // block_size],
p % block_size). This module alone changes free lists, reference counts and
block tables; the scheduler asks it, the model runner only reads tables.

Reference counts exist so a block can later be shared between requests
(prefix caching); today each block has at most one holder.
"""

from __future__ import annotations

from collections.abc import Sequence


class BlockPoolError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the most recently freed block is reused first (its memory
        # is the most likely to still be in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts: list[int] = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}

    # -- queries -------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1 (the KV-cache pressure signal)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> Sequence[int]:
        """The request's block table (read-only view; empty if it holds none)."""
        return self._tables.get(request_id, ())

    def num_new_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that the request's table covers `num_tokens` tokens."""
        held = len(self._tables.get(request_id, ()))
        return max(0, self.blocks_for_tokens(num_tokens) - held)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.num_new_blocks_needed(request_id, num_tokens) <= len(self._free)

    # -- changes -------------------------------------------------------------

    def allocate(self, request_id: str, num_tokens: int) -> Sequence[int]:
        """Grow the request's table to cover `num_tokens` tokens; returns the table."""
        need = self.num_new_blocks_needed(request_id, num_tokens)
        if need > len(self._free):
            raise BlockPoolError(
                f"request {request_id!r} needs {need} blocks, {len(self._free)} free"
            )
        table = self._tables.setdefault(request_id, [])
        for _ in range(need):
            block = self._free.pop()
            self._ref_counts[block] += 1
            table.append(block)
        return table

    def free(self, request_id: str) -> int:
        """Release every block the request holds; returns how many were freed."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return 0
        freed = 0
        # Reversed, so the request's first block ends on top of the stack.
        for block in reversed(table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)
                freed += 1
        return freed

    # -- invariants ----------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise BlockPoolError if the pool's bookkeeping is inconsistent.

        Every block is either free (ref count 0, on the free list once) or
        held (ref count equal to the number of tables listing it).
        """
        free = self._free
        if len(set(free)) != len(free):
            raise BlockPoolError("a block is on the free list twice")
        holders = [0] * self.num_blocks
        for rid, table in self._tables.items():
            if not table:
                raise BlockPoolError(f"request {rid!r} has an empty table")
            for b in table:
                if not 0 <= b < self.num_blocks:
                    raise BlockPoolError(f"request {rid!r} holds invalid block {b}")
                holders[b] += 1
        free_set = set(free)
        for b in range(self.num_blocks):
            if holders[b] != self._ref_counts[b]:
                raise BlockPoolError(
                    f"block {b}: ref count {self._ref_counts[b]}, held by {holders[b]} tables"
                )
            if (b in free_set) != (holders[b] == 0):
                raise BlockPoolError(f"block {b}: free-list membership disagrees with holders")

    def __repr__(self) -> str:
        return (
            f"BlockPool(blocks={self.num_blocks}, block_size={self.block_size}, "
            f"free={self.num_free_blocks}, requests={len(self._tables)})"
        )
