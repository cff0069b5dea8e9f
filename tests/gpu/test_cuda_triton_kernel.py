"""On CUDA, `paged_decode_attention_triton` equals `engine.attention.paged_decode_attention`.

Llama-3-8B-like shapes (32 query heads, 8 kv heads, head_dim 128), block sizes 16 and 32,
batch 1/8/64/256, ragged contexts up to 4096 with the edge cases (1 token, a full block, one
past it, the maximum) in every batch, in float32 (TF32 off), bfloat16 and float16; q as a view
into a fused qkv tensor; a sliding window with int32 block tables. The CPU lane runs the same
kernel under Triton's interpreter at toy shapes (tests/unit/test_triton_attention.py); only a
GPU compiles it, at the sizes that exercise its tiling.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
import torch

from bench.paged_attention_inputs import KernelCase, make_kernel_inputs
from tests.cuda_checks import CUDA, needs_cuda, no_tf32, release_cuda_memory

pytestmark = needs_cuda

# Max abs error against the PyTorch path. Half-scale values keep outputs below 2-4 in
# magnitude (bench/paged_attention_inputs.py), where one bf16 ulp is < 2e-2.
KERNEL_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_cases(
    num_heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    max_ctx: int = 4096,
    batches: Sequence[int] = (1, 8, 64, 256),
    block_sizes: Sequence[int] = (16, 32),
) -> list[KernelCase]:
    cases = [
        KernelCase(
            dt, num_heads, kv_heads, head_dim, bs, b, max_ctx, strided_q=bs != block_sizes[0]
        )
        for b in sorted(batches)
        for bs in block_sizes
        for dt in DTYPES
    ]
    # A sliding window shorter than most contexts, with int32 block tables.
    mid = sorted(batches)[len(batches) // 2]
    window = max(1, max_ctx // 4) + 3
    cases += [
        KernelCase(
            dt,
            num_heads,
            kv_heads,
            head_dim,
            block_sizes[0],
            mid,
            max_ctx,
            window=window,
            table_dtype=torch.int32,
        )
        for dt in DTYPES
    ]
    return cases


def context_lengths(batch: int, max_ctx: int, block_size: int, seed: int) -> list[int]:
    """Ragged lengths in [1, max_ctx], with the edge cases (1, max, block boundaries) first."""
    if batch == 1:
        return [max_ctx]
    rng = random.Random(seed)
    special = [1, max_ctx, block_size, block_size + 1, max(1, max_ctx - 1)]
    lens = special[: min(batch, len(special))]
    lens += [rng.randint(1, max_ctx) for _ in range(batch - len(lens))]
    rng.shuffle(lens)
    return lens


def float64_reference_fits(case: KernelCase, lens: Sequence[int]) -> bool:
    """Whether a float64 reference (upcast caches plus the PyTorch path's gathered copies)
    fits comfortably in the GPU's free memory."""
    tokens_cached = sum(-(-n // case.block_size) for n in lens) * case.block_size
    tokens_gathered = case.batch * max(-(-n // case.block_size) for n in lens) * case.block_size
    need = 2 * (tokens_cached + tokens_gathered) * case.kv_heads * case.head_dim * 8
    free, _ = torch.cuda.mem_get_info(CUDA)
    return need < 0.4 * free


CASES = kernel_cases()


@pytest.fixture(scope="module")
def triton_kernel() -> Callable[..., torch.Tensor]:
    from engine import triton_attention

    # On a GPU the engine would silently fall back to the PyTorch path: that is a failure here.
    if not triton_attention.triton_available():
        pytest.fail("triton is not importable (pip install 'splitserve[triton]')")
    return triton_attention.paged_decode_attention_triton


def compare_with_pytorch_path(
    kernel: Callable[..., torch.Tensor], case: KernelCase, lens: Sequence[int], seed: int
) -> tuple[bool, float, str]:
    """Whether the kernel's output is finite, its max abs difference from the PyTorch path,
    and, when it is off, which side the error comes from (each against float64 on the same
    rounded inputs). Only these figures leave, so the inputs are freed on return."""
    from engine.attention import paged_decode_attention

    q, k, v, tables, ctx = make_kernel_inputs(case, lens, CUDA, seed)
    scale = case.head_dim**-0.5
    got = kernel(q, k, v, tables, ctx, scale, case.window)
    want = paged_decode_attention(q, k, v, tables.long(), ctx, scale, case.window)
    torch.cuda.synchronize(CUDA)
    finite = bool(torch.isfinite(got).all())
    diff = (got.float() - want.float()).abs().max().item()
    source = ""
    if not (finite and diff <= KERNEL_TOL[case.dtype]) and float64_reference_fits(case, lens):
        ref = paged_decode_attention(
            q.double(), k.double(), v.double(), tables.long(), ctx, scale, case.window
        )
        err_triton = (got.double() - ref).abs().max().item()
        err_torch = (want.double() - ref).abs().max().item()
        source = f"; vs float64: triton {err_triton:.2e}, torch {err_torch:.2e}"
    return finite, diff, source


@pytest.mark.parametrize(
    "seed, case", list(enumerate(CASES)), ids=[c.name.replace(" ", "-") for c in CASES]
)
def test_triton_kernel_matches_the_pytorch_path(seed, case, triton_kernel):
    lens = context_lengths(case.batch, case.max_ctx, case.block_size, seed)
    try:
        with no_tf32():
            finite, diff, source = compare_with_pytorch_path(triton_kernel, case, lens, seed)
    finally:
        release_cuda_memory()
    tol = KERNEL_TOL[case.dtype]
    assert finite, f"non-finite output{source}"
    assert diff <= tol, f"max abs err {diff:.2e} > {tol:.0e}{source}"
