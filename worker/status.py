"""A worker's answer to Status, from its engine's latest snapshot."""

from __future__ import annotations

import os

from engine.async_engine import AsyncEngine
from protos import splitserve_pb2 as pb


def worker_status(
    aengine: AsyncEngine,
    role: str,
    address: str,
    metrics_port: int,
    cost_dollars: float = 0.0,
    tokens_produced: int = 0,
) -> pb.WorkerStatus:
    """A worker's Status answer from its engine's latest snapshot."""
    snap = aengine.snapshot
    config, model_config = aengine.config, aengine.model_config
    dtype = config.dtype_choice(model_config)
    return pb.WorkerStatus(
        role=role,
        address=address,
        pid=os.getpid(),
        model=config.model,
        max_model_len=aengine.max_model_len,
        block_size=config.block_size,
        kv_blocks_total=snap.kv_blocks_total,
        kv_blocks_free=snap.kv_blocks_free,
        running=snap.running,
        waiting=snap.waiting,
        waiting_prompt_tokens=snap.waiting_prompt_tokens,
        awaiting_kv=snap.awaiting_kv,
        held=snap.held,
        metrics_port=metrics_port,
        num_steps=snap.num_steps,
        mean_batch_size=snap.mean_batch_size,
        num_preemptions=snap.num_preemptions,
        vocab_size=model_config.vocab_size,
        max_num_seqs=config.max_num_seqs,
        cost_dollars=cost_dollars,
        tokens_produced=tokens_produced,
        dtype=dtype.name,
        dtype_reason=dtype.reason,
        prefix_cache_queries=snap.prefix_queries,
        prefix_cache_hits=snap.prefix_hits,
    )
