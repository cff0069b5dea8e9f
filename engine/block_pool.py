"""The block pool: the only owner of KV block allocation, and of the prefix cache.

The KV cache is split into fixed-size blocks of `block_size` token slots.
Each request holds a block table, the ordered list of block ids holding its
tokens: token at position p lives in slot (table[p // block_size],
p % block_size). This module alone changes free lists, reference counts,
block tables and the cache's index; the scheduler asks it, the model runner
only reads tables.

Prefix caching (when enabled): a full, computed block is registered under
its hash, chained over its tokens and its parent block's hash (so a hash
names the whole prefix up to and including the block). A request whose
prompt starts with registered blocks shares them (their reference count
goes up) instead of computing them. A block whose count drops to zero keeps
its KV and its hash, and stays findable, until it is handed out again:
free blocks are handed out least recently freed first, and one that was
registered leaves the index then (eviction, LRU). A shared block is always
full, and full blocks are never written again, so sharing needs no copy.

Without caching, the most recently freed block is handed out first (its
memory is the most likely to still be in the CPU's cache).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

# The parent of a prompt's first block. Everything in one pool shares one
# model and one KV layout, so nothing else needs to enter the hash.
ROOT_HASH = b""


def chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The hash of a full block: its tokens, and its parent's hash (128 bits,
    so two different prefixes never meet in practice)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(
    hashes: list[bytes], token_ids: Sequence[int], block_size: int, num_blocks: int
) -> list[bytes]:
    """Grow `hashes` (those of the first len(hashes) blocks of `token_ids`)
    to the first `num_blocks` full blocks; returns it."""
    for i in range(len(hashes), num_blocks):
        parent = hashes[i - 1] if i else ROOT_HASH
        hashes.append(chain_hash(parent, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes


class BlockPoolError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # Unreferenced blocks, least recently freed first. Ordered, with O(1)
        # removal: a cached block leaves it when a request shares it again.
        order = range(num_blocks) if enable_caching else range(num_blocks - 1, -1, -1)
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in order)
        self._ref_counts: list[int] = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # block hash -> block id

    # -- queries -------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones included: they are evictable)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, held or free."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1 (the KV-cache pressure signal)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> Sequence[int]:
        """The request's block table (read-only view; empty if it holds none)."""
        return self._tables.get(request_id, ())

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest registered run of `hashes` (the
        chained hashes of a prompt's full blocks, in order)."""
        if not self.enable_caching:
            return []
        blocks = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_new_blocks_needed(
        self, request_id: str, num_tokens: int, prefix: Sequence[int] = ()
    ) -> int:
        """Free blocks it takes for the request's table to cover `num_tokens`
        tokens, starting with the shared `prefix` when it holds nothing yet
        (a prefix block nobody holds is taken off the free list too)."""
        held = len(self._tables.get(request_id, ()))
        if held or not prefix:
            return max(0, self.blocks_for_tokens(num_tokens) - held)
        revived = sum(1 for b in prefix if self._ref_counts[b] == 0)
        return max(0, self.blocks_for_tokens(num_tokens) - len(prefix)) + revived

    def can_allocate(self, request_id: str, num_tokens: int, prefix: Sequence[int] = ()) -> bool:
        return self.num_new_blocks_needed(request_id, num_tokens, prefix) <= len(self._free)

    # -- changes -------------------------------------------------------------

    def allocate(
        self, request_id: str, num_tokens: int, prefix: Sequence[int] = ()
    ) -> Sequence[int]:
        """Grow the request's table to cover `num_tokens` tokens; returns the
        table. A request that holds nothing yet starts its table with the
        shared `prefix` blocks (from cached_prefix)."""
        need = self.num_new_blocks_needed(request_id, num_tokens, prefix)
        if need > len(self._free):
            raise BlockPoolError(
                f"request {request_id!r} needs {need} blocks, {len(self._free)} free"
            )
        table = self._tables.setdefault(request_id, [])
        if prefix and not table:
            for block in prefix:
                if self._ref_counts[block] == 0:
                    del self._free[block]  # revived: its KV is still there
                self._ref_counts[block] += 1
                table.append(block)
        for _ in range(self.blocks_for_tokens(num_tokens) - len(table)):
            block = self._take_free()
            self._ref_counts[block] += 1
            table.append(block)
        return table

    def free(self, request_id: str) -> int:
        """Release every block the request holds; returns how many became free."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return 0
        freed = 0
        # Last block first: a request's later blocks are the least likely to
        # be shared again, so they are the first evicted (and, without
        # caching, the request's first block is the next handed out).
        for block in reversed(table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
                freed += 1
        return freed

    def cache_blocks(self, request_id: str, hashes: Sequence[bytes], start: int) -> None:
        """Register the request's blocks start..len(hashes)-1 (full and
        computed) under those hashes. A hash already registered keeps its
        block (the same KV, computed twice): this one stays private."""
        if not self.enable_caching:
            return
        table = self._tables[request_id]
        for i in range(start, len(hashes)):
            block, h = table[i], hashes[i]
            if self._hash_of[block] is None and h not in self._cached:
                self._hash_of[block] = h
                self._cached[h] = block

    def _take_free(self) -> int:
        # Least recently freed first with caching (LRU eviction); most
        # recently freed first without.
        block, _ = self._free.popitem(last=not self.enable_caching)
        h = self._hash_of[block]
        if h is not None:  # evicted: its KV is about to be overwritten
            del self._cached[h]
            self._hash_of[block] = None
        return block

    # -- invariants ----------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise BlockPoolError if the pool's bookkeeping is inconsistent.

        Every block is either free (ref count 0, on the free list once) or
        held (ref count equal to the number of tables listing it); the hash
        index and the blocks' hashes name each other.
        """
        holders = [0] * self.num_blocks
        for rid, table in self._tables.items():
            if not table:
                raise BlockPoolError(f"request {rid!r} has an empty table")
            if len(set(table)) != len(table):
                raise BlockPoolError(f"request {rid!r} lists a block twice")
            for b in table:
                if not 0 <= b < self.num_blocks:
                    raise BlockPoolError(f"request {rid!r} holds invalid block {b}")
                holders[b] += 1
        for b in range(self.num_blocks):
            if holders[b] != self._ref_counts[b]:
                raise BlockPoolError(
                    f"block {b}: ref count {self._ref_counts[b]}, held by {holders[b]} tables"
                )
            if (b in self._free) != (holders[b] == 0):
                raise BlockPoolError(f"block {b}: free-list membership disagrees with holders")
            h = self._hash_of[b]
            if h is not None and self._cached.get(h) != b:
                raise BlockPoolError(f"block {b}: its hash is not indexed to it")
        for h, b in self._cached.items():
            if self._hash_of[b] != h:
                raise BlockPoolError(f"hash {h.hex()[:8]} indexed to block {b}, which has another")
        if not self.enable_caching and self._cached:
            raise BlockPoolError("blocks are cached with caching off")

    def __repr__(self) -> str:
        return (
            f"BlockPool(blocks={self.num_blocks}, block_size={self.block_size}, "
            f"free={self.num_free_blocks}, cached={self.num_cached_blocks}, "
            f"requests={len(self._tables)})"
        )
