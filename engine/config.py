"""Frozen configuration: what the model is, and how the engine runs it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where an engine is built, not by the router
    import torch

    from engine.dtype_choice import DtypeChoice

# The names engine.dtype_choice.DTYPES maps to torch dtypes.
DTYPE_NAMES = ("bfloat16", "float16", "float32")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, read from a Hugging Face `config.json` (and
    `generation_config.json` for EOS ids). Only the Llama family is accepted."""

    path: Path
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    attention_bias: bool  # biases on q/k/v
    o_proj_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str | None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not a model directory: no config.json in it")
        raw = json.loads(cfg_file.read_text())
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} (architectures {raw.get('architectures')}) is not "
                f"supported; splitserve runs the Llama family: {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(Llama 2/3, Mistral, Qwen2)"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        head_dim = raw.get("head_dim") or hidden // num_heads
        num_kv_heads = raw.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads {num_heads} is not a multiple of "
                f"num_key_value_heads {num_kv_heads}"
            )
        theta, scaling = _rope_params(raw)
        sliding = raw.get("sliding_window")
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            sliding = None
        return cls(
            path=path,
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rope_theta=theta,
            rope_scaling=scaling,
            # Qwen2 always has q/k/v biases; Llama says so in `attention_bias`.
            attention_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            o_proj_bias=model_type == "llama" and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=sliding,
            eos_token_ids=_eos_ids(path, raw),
            bos_token_id=raw.get("bos_token_id"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements per token over all layers (times the dtype's size: bytes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @cached_property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h


def _rope_params(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files
    # write `rope_theta` and `rope_scaling` at the top level.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or None
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        scaling = {**scaling, "rope_type": rope_type}
        if rope_type == "default":
            scaling = None
    return theta, scaling


def _eos_ids(path: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    gen = path / "generation_config.json"
    sources = [json.loads(gen.read_text())] if gen.is_file() else []
    sources.append(raw)
    for src in sources:
        eos = src.get("eos_token_id")
        for e in eos if isinstance(eos, list) else [eos]:
            if isinstance(e, int) and e not in ids:
                ids.append(e)
    return tuple(ids)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model. Derived sizes are properties."""

    model: str
    # "auto": bfloat16 on a CPU with AMX/AVX512-BF16, float32 on other CPUs, the
    # checkpoint's dtype on GPU (engine/dtype_choice.py says why)
    dtype: str = "auto"
    device: str = "auto"  # "auto": cuda when available, else cpu
    block_size: int = 16
    kv_cache_bytes: int = 512 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # Decode attention: "auto" picks "triton" on CUDA, "cpu" (the C kernel)
    # on CPU, falling back to "torch" (the PyTorch path) where unavailable.
    attention_backend: str = "auto"
    # Linear layers: "auto" packs them for oneDNN on CPU in float32, and in
    # bfloat16 where the CPU has bfloat16 instructions (1.7-2x faster GEMMs than
    # nn.Linear on the CPUs measured; engine/model/packed_linear.py), "torch"
    # keeps nn.Linear, "onednn" insists on packing.
    linear_backend: str = "auto"
    # Automatic prefix caching: full blocks of computed KV are shared by
    # requests whose tokens start the same way (engine/block_pool.py).
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.kv_cache_bytes < 1:
            raise ValueError("kv_cache_bytes must be > 0")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ValueError(
                f"dtype must be 'auto' or one of {list(DTYPE_NAMES)}, got {self.dtype!r}"
            )
        if self.attention_backend not in ("auto", "torch", "cpu", "triton"):
            raise ValueError("attention_backend must be 'auto', 'torch', 'cpu' or 'triton'")
        if self.linear_backend not in ("auto", "torch", "onednn"):
            raise ValueError("linear_backend must be 'auto', 'torch' or 'onednn'")

    @cached_property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def dtype_choice(self, model: ModelConfig) -> DtypeChoice:
        """The dtype the engine runs `model` in, with the reason for it."""
        from engine.dtype_choice import choose_dtype

        return choose_dtype(self.dtype, self.torch_device, model.torch_dtype)

    def torch_dtype(self, model: ModelConfig) -> torch.dtype:
        return self.dtype_choice(model).dtype

    def resolved_max_model_len(self, model: ModelConfig) -> int:
        limit = model.max_position_embeddings
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {limit}"
            )
        return self.max_model_len

    def kv_block_bytes(self, model: ModelConfig) -> int:
        elem = self.torch_dtype(model).itemsize
        return model.kv_elements_per_token * elem * self.block_size

    def num_kv_blocks(self, model: ModelConfig) -> int:
        return self.kv_cache_bytes // self.kv_block_bytes(model)


def engine_default(field: str) -> Any:
    """An EngineConfig field's default: engine defaults live in EngineConfig
    alone, and every flag, config file and API that offers one reads it here."""
    return EngineConfig.__dataclass_fields__[field].default


DEFAULT_KV_CACHE_MIB: int = engine_default("kv_cache_bytes") // 2**20
