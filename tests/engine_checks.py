"""Checks on an offline engine after a test."""

from __future__ import annotations


def assert_engine_clean(llm) -> None:
    """No request left and every block back on the free list."""
    eng = llm.engine
    eng.block_pool.check_integrity()
    assert not eng.has_unfinished_requests()
    assert eng.block_pool.num_free_blocks == eng.block_pool.num_blocks
