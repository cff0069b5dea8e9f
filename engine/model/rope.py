"""Rotary position embeddings: the frequencies, with Llama 3 and linear scaling.

The formulas follow the published Llama 3 recipe; the order of float32 ops
mirrors transformers' so that float32 outputs agree to the last bits.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        return _llama3(inv_freq, factor, scaling)
    raise ValueError(f"unsupported rope type {kind!r}")


def _llama3(inv_freq: torch.Tensor, factor: float, s: dict[str, Any]) -> torch.Tensor:
    # Long wavelengths (beyond the original context) are slowed by `factor`,
    # short ones kept, and the band between them interpolated smoothly.
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables for every position up to `max_positions`."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling = theta, scaling
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)
        self.build()

    def build(self, device: torch.device | None = None) -> None:
        """(Re)compute the float32 tables, on `device` if given."""
        inv_freq = inv_frequencies(self.head_dim, self.theta, self.scaling)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos() if device is None else emb.cos().to(device)
        self.sin = emb.sin() if device is None else emb.sin().to(device)

    def cast(self, dtype: torch.dtype) -> None:
        # Kept in the model's dtype, as transformers casts cos/sin before use.
        self.cos = self.cos.to(dtype)
        self.sin = self.sin.to(dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each position: [N, 1, D] each, broadcast over heads.
        Looked up once per forward pass and shared by every layer."""
        return self.cos[positions][:, None, :], self.sin[positions][:, None, :]


def apply_rotary(
    q: torch.Tensor,  # [N, H, D]
    k: torch.Tensor,  # [N, KV, D]
    cos: torch.Tensor,  # [N, 1, D]
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
