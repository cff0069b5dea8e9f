from __future__ import annotations

import pytest

from engine.block_pool import BlockPool, BlockPoolError


def test_allocate_grows_table_and_free_returns_every_block():
    pool = BlockPool(num_blocks=8, block_size=4)
    assert pool.blocks_for_tokens(1) == 1 and pool.blocks_for_tokens(4) == 1
    assert pool.blocks_for_tokens(5) == 2
    table = list(pool.allocate("a", 5))
    assert len(table) == 2 and pool.num_free_blocks == 6
    # Growing within the last block needs nothing new; crossing it needs one.
    assert pool.num_new_blocks_needed("a", 8) == 0
    assert list(pool.allocate("a", 9))[:2] == table and len(pool.block_table("a")) == 3
    pool.allocate("b", 16)
    assert pool.num_free_blocks == 1 and pool.usage == pytest.approx(7 / 8)
    pool.check_integrity()
    assert pool.free("a") == 3 and pool.free("b") == 4
    assert pool.free("a") == 0  # freeing twice is harmless
    assert pool.num_free_blocks == 8 and pool.block_table("a") == ()
    pool.check_integrity()


def test_cannot_allocate_beyond_free_blocks():
    pool = BlockPool(num_blocks=3, block_size=4)
    pool.allocate("a", 8)
    assert pool.can_allocate("b", 4) and not pool.can_allocate("b", 5)
    with pytest.raises(BlockPoolError, match="needs 2 blocks, 1 free"):
        pool.allocate("b", 5)
    assert pool.block_table("b") == ()  # a failed allocation changes nothing
    pool.check_integrity()


def test_freed_blocks_are_reused_first():
    pool = BlockPool(num_blocks=6, block_size=2)
    first = list(pool.allocate("a", 4))
    pool.allocate("b", 2)
    pool.free("a")
    assert list(pool.allocate("c", 4)) == first


def test_integrity_check_catches_corruption():
    pool = BlockPool(num_blocks=4, block_size=2)
    pool.allocate("a", 4)
    pool._free[pool.block_table("a")[0]] = None  # a held block also on the free list
    with pytest.raises(BlockPoolError):
        pool.check_integrity()

    pool = BlockPool(num_blocks=4, block_size=2)
    pool.allocate("a", 2)
    pool._ref_counts[pool.block_table("a")[0]] = 2
    with pytest.raises(BlockPoolError, match="ref count"):
        pool.check_integrity()


@pytest.mark.parametrize("bad", [0, 3, 12])
def test_block_size_must_be_power_of_two(bad):
    with pytest.raises(ValueError, match="power of two"):
        BlockPool(num_blocks=4, block_size=bad)
