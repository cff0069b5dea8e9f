"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

The model sees a flat batch: N tokens from many requests, their positions,
and an `AttentionBatch` saying where each token's K/V goes and what it
attends to. Tokens are ordered decode rows first (one token per request),
then prefill chunks, each contiguous.

q/k/v and gate/up projections are fused into one matmul each: fewer, larger
kernels are what a CPU (and a GPU at small batch) needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine import attention
from engine.config import ModelConfig
from engine.model.rope import RotaryEmbedding, apply_rotary

DecodeAttentionFn = Callable[..., torch.Tensor]


@dataclass(slots=True)
class PrefillChunk:
    query_start: int  # index of the chunk's first token in the flat batch
    query_len: int
    start_pos: int  # tokens of this request already in the cache
    block_table: torch.Tensor  # [n_blocks] int64


@dataclass(slots=True)
class AttentionBatch:
    """Where each token's K/V is written and what each query attends to."""

    slot_mapping: torch.Tensor  # [N] int64
    num_decode: int  # the first num_decode tokens are single-token rows
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int64
    decode_context_lens: torch.Tensor | None  # [num_decode] int64
    prefills: list[PrefillChunk]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as transformers does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [N, 1, head_dim]
        batch: AttentionBatch,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        decode_attention: DecodeAttentionFn,
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, *rope)
        k_cache, v_cache = kv_cache
        attention.write_kv(k_cache, v_cache, k, v, batch.slot_mapping)

        nd = batch.num_decode
        if nd == n and not batch.prefills:
            out = decode_attention(
                q,
                k_cache,
                v_cache,
                batch.decode_block_tables,
                batch.decode_context_lens,
                self.scale,
                self.sliding_window,
            )
        else:
            out = torch.empty_like(q)
            if nd:
                out[:nd] = decode_attention(
                    q[:nd],
                    k_cache,
                    v_cache,
                    batch.decode_block_tables,
                    batch.decode_context_lens,
                    self.scale,
                    self.sliding_window,
                )
            for c in batch.prefills:
                s, e = c.query_start, c.query_start + c.query_len
                out[s:e] = attention.paged_prefill_attention(
                    q[s:e],
                    k[s:e],
                    v[s:e],
                    k_cache,
                    v_cache,
                    c.block_table,
                    c.start_pos,
                    self.scale,
                    self.sliding_window,
                )
        return self.o_proj(out.view(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        decode_attention: DecodeAttentionFn,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope, batch, kv_cache, decode_attention)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.decode_attention: DecodeAttentionFn = attention.paged_decode_attention

    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N]
        batch: AttentionBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Final hidden states [N, hidden] (logits are computed only where needed)."""
        x = self.embed_tokens(input_ids)
        rope = self.rope.lookup(positions)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, rope, batch, kv, self.decode_attention)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, vocab] logits in the model's dtype (the sampler widens them when it must)."""
        return self.lm_head(hidden)
