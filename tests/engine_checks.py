"""Checks on an offline engine after a test."""

from __future__ import annotations


def assert_engine_clean(llm) -> None:
    """No request left and every block back on the free list."""
    eng = llm.engine
    eng.block_pool.check_integrity()
    assert not eng.has_unfinished_requests()
    assert eng.block_pool.num_free_blocks == eng.block_pool.num_blocks


def held_kv(eng, request_id: str) -> list:
    """Copies of the KV blocks a finished request holds for its transfer,
    per layer: (K, V), each [n_blocks, block_size, kv_heads, head_dim]."""
    table = eng.block_pool.block_table(request_id)
    assert table, f"request {request_id!r} holds no blocks"
    return [eng.runner.read_blocks(layer, table) for layer in range(len(eng.runner.kv_caches))]
