"""Paged attention over block tables: the PyTorch path (CPU and reference).

KV cache layout, one pair of tensors per layer:
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
Token at position p of a request lives at slot
    block_table[p // block_size] * block_size + p % block_size.

Grouped-query attention: query head h reads kv head h // (num_heads // num_kv_heads),
the same mapping as transformers' `repeat_kv`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,  # [N, kv_heads, head_dim]
    v: torch.Tensor,  # [N, kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [N] int64, flat slot of each token
) -> None:
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks] int64 (padding entries may be any valid id)
) -> torch.Tensor:
    """Contiguous copy of each row's blocks: [B, max_blocks * block_size, kv_heads, head_dim]."""
    b, max_blocks = block_tables.shape
    _, block_size, kv_heads, head_dim = cache.shape
    return cache[block_tables].view(b, max_blocks * block_size, kv_heads, head_dim)


def paged_decode_attention(
    q: torch.Tensor,  # [B, num_heads, head_dim], one query token per row
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    context_lens: torch.Tensor,  # [B] int64, tokens to attend to (the query's own included)
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per row over its cached context: [B, num_heads, head_dim]."""
    b, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    k = gather_kv(k_cache, block_tables).transpose(1, 2)  # [B, kv_heads, T, D]
    v = gather_kv(v_cache, block_tables).transpose(1, 2)
    t = k.shape[2]
    pos = torch.arange(t, device=q.device)
    valid = pos[None, :] < context_lens[:, None]  # [B, T]
    if sliding_window is not None:
        valid &= pos[None, :] >= (context_lens[:, None] - sliding_window)
    # The `group` query heads that share a kv head become `group` query rows of
    # that head, so no kv head is ever repeated.
    qg = q.view(b, kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(b, num_heads, head_dim)


def paged_prefill_attention(
    q: torch.Tensor,  # [L, num_heads, head_dim], the chunk's queries
    k: torch.Tensor,  # [L, kv_heads, head_dim], the chunk's own keys
    v: torch.Tensor,  # [L, kv_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [n_blocks] int64, covering at least the first `start` tokens
    start: int,  # tokens of this request already cached before the chunk
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of a prompt chunk at positions [start, start+L) over the
    cached prefix and the chunk itself: [L, num_heads, head_dim]."""
    length, num_heads, _ = q.shape
    group = num_heads // k_cache.shape[2]
    total = start + length
    if start:
        # A continued chunk: the prefix comes from the paged cache.
        k = torch.cat((gather_kv(k_cache, block_table[None])[0, :start], k))
        v = torch.cat((gather_kv(v_cache, block_table[None])[0, :start], v))
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    qh = q.transpose(0, 1)[None]  # [1, H, L, D]
    kh = k.transpose(0, 1)[None]  # [1, H, T, D]
    vh = v.transpose(0, 1)[None]
    if start == 0 and sliding_window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        qpos = torch.arange(start, total, device=q.device)[:, None]
        kpos = torch.arange(total, device=q.device)[None, :]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)  # [L, H, D]
