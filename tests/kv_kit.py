"""A KV pool the receiver writes into, layer KV to send, and a clock the
test moves: shared by the KV transfer tests."""

from __future__ import annotations

import torch

BLOCK = (16, 2, 8)  # block_size, kv_heads, head_dim


def layer_kv(n_blocks: int, seed: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_blocks, *BLOCK, generator=g).to(dtype)
    v = torch.randn(n_blocks, *BLOCK, generator=g).to(dtype)
    return k, v


class PoolWrites:
    """A real KV pool (one tensor per layer) that the receiver writes into."""

    def __init__(self, num_layers: int, num_blocks: int, dtype=torch.bfloat16):
        self.k = [torch.zeros(num_blocks, *BLOCK, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(num_blocks, *BLOCK, dtype=dtype) for _ in range(num_layers)]

    def write(self, layer, block_ids, k, v):
        idx = torch.tensor(list(block_ids))
        self.k[layer].index_copy_(0, idx, k)
        self.v[layer].index_copy_(0, idx, v)


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
