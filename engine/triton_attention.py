"""Paged decode attention as a Triton kernel (same contract as engine.attention).

`paged_decode_attention_triton` is a drop-in for `engine.attention.paged_decode_attention`:
one query token per row attends to its cached context through the block table.

Triton is imported only on first use, never at module import, for two reasons:
  * machines without triton must still be able to import this module;
  * Triton's CPU interpreter (TRITON_INTERPRET=1, used by the tests) is picked when a
    kernel is decorated with `triton.jit`, so deferring that decoration lets a caller
    set the variable any time before the first call. This module never sets it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

# Filled in by `_load_triton`. The kernel body below looks `tl` up in this module's
# globals when it is compiled (or interpreted), so it has to be a module global.
triton: Any = None
tl: Any = None

_LOG2E = 1.4426950408889634


@functools.cache
def triton_available() -> bool:
    """True when triton can be imported here (says nothing about a usable GPU)."""
    try:
        import triton as _triton  # noqa: F401
        import triton.language as _tl  # noqa: F401
    except Exception:
        return False
    return True


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    scale_log2,  # softmax scale * log2(e): scores live in base 2 so exp2 can be used
    sliding_window,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kn,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vn,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_btb,
    stride_btn,
    stride_ob,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    # Grid: (batch row, kv head). One program serves all GROUP query heads that share
    # this kv head, so each K/V block is read from memory once per group instead of
    # once per query head. GROUP is padded to a power of two (tl.arange needs one);
    # the padding rows are masked out of the loads and the store.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_t = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g

    # Row/head offsets can exceed int32 on big caches and batches: do address math in int64.
    seq64 = seq.to(tl.int64)
    q_ptrs = (
        q_ptr
        + seq64 * stride_qb
        + heads[:, None].to(tl.int64) * stride_qh
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0).to(tl.float32)

    ctx = tl.load(context_lens_ptr + seq64).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - sliding_window, 0)
    # Only blocks overlapping [lo, ctx) are visited; every one of them holds at least one
    # valid key, so the running max is finite after the first iteration. Block-table
    # entries past the context (padding) are never read.
    first_block = lo // BLOCK_SIZE
    num_blocks = (ctx + BLOCK_SIZE - 1) // BLOCK_SIZE

    # Online softmax: m is the running max of the (base-2) scores per query head, l the
    # running sum of exp2(score - m), acc the running exp2-weighted sum of V. When a
    # new block raises the max, the old l and acc are rescaled by exp2(m_old - m_new),
    # which yields exactly softmax(scores) @ V after the final division by l.
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)

    k_base = k_cache_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_cache_ptr + kv_head.to(tl.int64) * stride_vh
    bt_row = block_tables_ptr + seq64 * stride_btb
    for blk in range(first_block, num_blocks):
        phys = tl.load(bt_row + blk * stride_btn).to(tl.int64)
        pos = blk * BLOCK_SIZE + offs_t
        valid = (pos < ctx) & (pos >= lo)
        # Masked loads, not just masked scores: unused slots may hold stale NaN/inf and
        # 0 * NaN in the P @ V sum would poison the row.
        k = tl.load(
            k_base + phys * stride_kn + offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd,
            mask=valid[:, None],
            other=0.0,
        ).to(tl.float32)
        v = tl.load(
            v_base + phys * stride_vn + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd,
            mask=valid[:, None],
            other=0.0,
        ).to(tl.float32)

        # Broadcast-and-reduce rather than tl.dot: tl.dot needs every dim >= 16 on GPU
        # (GROUP_PAD and BLOCK_SIZE are often smaller) and would drop fp32 to TF32.
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale_log2  # [GROUP_PAD, BLOCK]
        s = tl.where(valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    # A row with nothing to attend to (context length 0) ends with l == 0: write zeros
    # rather than NaN.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = (
        out_ptr
        + seq64 * stride_ob
        + heads[:, None].to(tl.int64) * stride_oh
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


@functools.cache
def _load_triton() -> Any:
    """Import triton and jit the kernel once; the env var is read at this moment."""
    global triton, tl
    try:
        import triton as _triton
        import triton.language as _tl
    except ImportError as e:
        raise RuntimeError(
            "paged_decode_attention_triton needs triton (pip install 'splitserve[triton]')"
        ) from e
    triton, tl = _triton, _tl
    return triton.jit(_paged_decode_kernel)


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def paged_decode_attention_triton(
    q: torch.Tensor,  # [B, num_heads, head_dim], one query token per row
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32 or int64
    context_lens: torch.Tensor,  # [B] int, tokens to attend to (the query's own included)
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Triton version of `engine.attention.paged_decode_attention`: [B, num_heads, head_dim].

    Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before the
    first call. Accumulates in fp32 and returns q's dtype.
    """
    assert q.dim() == 3, f"q must be [B, num_heads, head_dim], got {tuple(q.shape)}"
    assert k_cache.dim() == 4, (
        f"k_cache must be [num_blocks, block_size, kv_heads, head_dim], got {tuple(k_cache.shape)}"
    )
    assert v_cache.shape == k_cache.shape, (
        f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}"
    )
    b, num_heads, head_dim = q.shape
    _, block_size, kv_heads, cache_head_dim = k_cache.shape
    assert cache_head_dim == head_dim, f"head_dim mismatch: q {head_dim}, cache {cache_head_dim}"
    assert num_heads % kv_heads == 0, (
        f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({kv_heads})"
    )
    assert _is_pow2(head_dim), f"head_dim must be a power of two, got {head_dim}"
    assert _is_pow2(block_size), f"block_size must be a power of two, got {block_size}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == b, (
        f"block_tables must be [B={b}, max_blocks], got {tuple(block_tables.shape)}"
    )
    assert context_lens.shape == (b,), (
        f"context_lens must be [B={b}], got {tuple(context_lens.shape)}"
    )
    assert not block_tables.is_floating_point() and not context_lens.is_floating_point(), (
        "block_tables and context_lens must be integer tensors"
    )
    for name, t in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("block_tables", block_tables),
        ("context_lens", context_lens),
    ):
        assert t.device == q.device, f"{name} is on {t.device}, q on {q.device}"

    out = torch.empty_like(q)
    if b == 0 or num_heads == 0:
        return out
    if q.device.type == "cpu" and not _interpret_mode():
        raise RuntimeError(
            "Triton kernels run on CPU tensors only under the interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported"
        )

    kernel = _load_triton()
    group = num_heads // kv_heads
    grid = (b, kv_heads)
    kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        float(scale) * _LOG2E,
        int(sliding_window) if sliding_window is not None else 0,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *block_tables.stride(),
        *out.stride(),
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        HAS_WINDOW=sliding_window is not None,
    )
    return out
