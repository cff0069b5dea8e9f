"""The model shapes (presets) and families (archs) the maker can build."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Preset:
    """Model shape plus the init that makes random weights decisive.

    head_dim is always hidden_size // num_attention_heads (16 for tiny, 64 for small).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    # Std of the normal init of every linear and embedding weight. Well above HF's 0.02 so each
    # layer's output outweighs the token's own embedding in the residual stream: at 0.02 a
    # tied-embedding (qwen2) model just repeats the last prompt token, and at 0.05 untied ones
    # fall into short cycles. It also widens the spread of the logits.
    initializer_range: float
    # Written into the final RMSNorm weight; logits scale linearly with it. Measured over six
    # prompts x 64 greedy tokens, seeds 0-2: median top-1/top-2 logit margin 1.1-1.5 (tiny) and
    # 1.4-1.7 (small) against ~0.3 at gain 1, 51-64 distinct tokens per 64, and a mean top-1
    # probability of ~0.6-0.7, so seeded sampling still differs from greedy.
    final_norm_gain: float


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        # ~0.35M params (llama), builds in well under a second: for unit tests.
        "tiny": Preset(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=2048,
            max_position_embeddings=1024,
            initializer_range=0.2,
            final_norm_gain=4.0,
        ),
        # ~56M params (llama): for benchmarks and the default model.
        "small": Preset(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=2048,
            initializer_range=0.1,
            final_norm_gain=4.0,
        ),
    }
)


@dataclass(frozen=True)
class Arch:
    """A transformers config class and the defaults that make it look like the real family."""

    config_class: str  # attribute name in `transformers`
    defaults: Mapping[str, Any]
    # Pre-tokenization the tokenizer is trained with. AutoTokenizer loads qwen2 checkpoints with
    # Qwen2Tokenizer, which imposes its own normalizer and split regex over tokenizer.json, so
    # qwen2 models get a tokenizer trained that way; otherwise the files and the loaded
    # tokenizer would split text differently.
    tokenizer_style: str = "gpt2"


ARCHS: Mapping[str, Arch] = MappingProxyType(
    {
        "llama": Arch("LlamaConfig", MappingProxyType({"tie_word_embeddings": False})),
        # Mistral's stock config has a 4096-token sliding window; off by default so the model
        # behaves like plain full attention unless a test asks for the window.
        "mistral": Arch(
            "MistralConfig",
            MappingProxyType({"tie_word_embeddings": False, "sliding_window": None}),
        ),
        # Qwen2 always has q/k/v bias (no config switch) and its small models tie embeddings.
        "qwen2": Arch(
            "Qwen2Config", MappingProxyType({"tie_word_embeddings": True}), tokenizer_style="qwen2"
        ),
    }
)
