"""What the router believes each worker's prefix cache holds: the prompt
blocks it sent there recently.

An approximation, learned from the router's own routing (as Dynamo's
approximate mode and SGLang's router do), not from the workers: a worker may
have evicted a block since (the entry expires after `ttl_s`, and each index
keeps at most as many blocks as the worker's KV pool), or hold blocks other
routers sent it. Wrong guesses cost only speed: the worker itself decides
what it reuses. Block hashes are the engine's own (engine/block_pool.py),
so a guess names exactly the blocks the worker would find.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from engine.block_pool import extend_block_hashes

DEFAULT_TTL_S = 300.0
DEFAULT_CAPACITY = 4096  # blocks, until the worker's Status says how many it has


class PromptBlocks:
    """One prompt's chained block hashes, per block size, computed once."""

    def __init__(self, prompt_ids: Sequence[int]) -> None:
        self.prompt_ids = prompt_ids
        self._hashes: dict[int, list[bytes]] = {}

    def hashes(self, block_size: int) -> list[bytes]:
        """The hashes of the prompt's full blocks."""
        found = self._hashes.get(block_size)
        if found is None:
            n = len(self.prompt_ids) // block_size
            found = self._hashes[block_size] = extend_block_hashes(
                [], self.prompt_ids, block_size, n
            )
        return found

    def reusable(self, block_size: int) -> list[bytes]:
        """The blocks a worker could reuse: its last token is always computed."""
        return self.hashes(block_size)[: max(0, len(self.prompt_ids) - 1) // block_size]


class PrefixIndex:
    """One worker's recently routed blocks: hash -> when it was last sent."""

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self.clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._seen)

    def match(self, hashes: Sequence[bytes]) -> int:
        """How many of `hashes`, from the first, the worker likely holds."""
        cutoff = self.clock() - self.ttl_s
        n = 0
        for h in hashes:
            seen = self._seen.get(h)
            if seen is None or seen < cutoff:
                break
            n += 1
        return n

    def add(self, hashes: Sequence[bytes]) -> None:
        """The worker was sent these blocks now."""
        now = self.clock()
        for h in hashes:
            self._seen[h] = now
            self._seen.move_to_end(h)
        cutoff = now - self.ttl_s
        while self._seen and (len(self._seen) > self.capacity or _oldest(self._seen) < cutoff):
            self._seen.popitem(last=False)


def _oldest(seen: OrderedDict[bytes, float]) -> float:
    return next(iter(seen.values()))
