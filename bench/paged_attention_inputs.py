"""Inputs for one paged decode-attention call, laid out as the engine lays them out.

Shared by the CUDA kernel tests (tests/gpu) and the kernel timing (bench/gpu_timing.py), so
the kernel is timed on the same kind of cache it is checked on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

AttentionInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class KernelCase:
    dtype: torch.dtype
    num_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    batch: int
    max_ctx: int
    window: int | None = None
    table_dtype: torch.dtype = torch.int64
    strided_q: bool = False  # q as a view into a fused qkv tensor, as the model passes it

    @property
    def name(self) -> str:
        extra = ""
        if self.window is not None:
            extra += f" win{self.window}"
        if self.table_dtype != torch.int64:
            extra += " int32-tables"
        if self.strided_q:
            extra += " strided-q"
        return (
            f"{DTYPE_NAMES[self.dtype]} h{self.num_heads}/kv{self.kv_heads} "
            f"d{self.head_dim} bs{self.block_size} B{self.batch} ctx<={self.max_ctx}{extra}"
        )


def make_kernel_inputs(
    case: KernelCase, lens: Sequence[int], device: torch.device, seed: int
) -> AttentionInputs:
    """q, k_cache, v_cache, block_tables, context_lens for one case.

    Physical blocks come from a shuffled pool, so a row's blocks are not contiguous; table
    entries past a row's context are padding that points at blocks owned by no row.
    """
    b, bs = case.batch, case.block_size
    used = [-(-n // bs) for n in lens]
    max_blocks = max(used)
    spare = 4
    num_blocks = sum(used) + spare
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, bs, case.kv_heads, case.head_dim)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device).to(case.dtype)

    if case.strided_q:
        qkv = randn(b, (case.num_heads + 2 * case.kv_heads) * case.head_dim)
        q = qkv[:, : case.num_heads * case.head_dim].view(b, case.num_heads, case.head_dim)
    else:
        q = randn(b, case.num_heads, case.head_dim)
    k_cache = randn(*shape)
    # Half-scale values keep outputs below 2-4 in magnitude, where one bf16 ulp is < 2e-2.
    v_cache = randn(*shape) * 0.5
    perm = torch.randperm(num_blocks, generator=cpu_gen)
    tables = torch.empty(b, max_blocks, dtype=torch.int64)
    pos = 0
    for i, n in enumerate(used):
        tables[i, :n] = perm[pos : pos + n]
        tables[i, n:] = perm[num_blocks - spare + i % spare]
        pos += n
    ctx = torch.tensor(list(lens), dtype=torch.int64)
    return (q, k_cache, v_cache, tables.to(device=device, dtype=case.table_dtype), ctx.to(device))
