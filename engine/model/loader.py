"""Loading a Llama-family model from a local Hugging Face directory.

Reads `model.safetensors` or a sharded `model.safetensors.index.json`, maps
transformers' parameter names onto ours (q/k/v and gate/up fused), and
checks that every parameter was filled exactly once.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.model.llama import LlamaForCausalLM

log = logging.getLogger("splitserve")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# transformers name (inside a layer) -> (our name, shard index into the fused tensor)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class WeightLoadError(ValueError):
    pass


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files; WeightLoadError if there are none."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise WeightLoadError(
        f"no safetensors weights in {path} (expected model.safetensors or "
        "model.safetensors.index.json; .bin checkpoints are not supported)"
    )


def _iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def _fused_offsets(cfg: ModelConfig, ours: str) -> list[int]:
    if ours.endswith("qkv_proj"):
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [0, q, q + kv, q + 2 * kv]
    i = cfg.intermediate_size
    return [0, i, 2 * i]


def load_model(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int
) -> LlamaForCausalLM:
    """Build the model and fill it from the directory's safetensors files."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    # Parameters were made on the meta device (no init cost); give them real,
    # uninitialised storage of the right dtype, then fill every one below.
    model = model.to_empty(device=device).to(dtype)
    model.rope.build(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: dict[str, int] = {}

    def put(name: str, tensor: torch.Tensor, rows: slice | None = None) -> None:
        if name not in params:
            raise WeightLoadError(f"checkpoint tensor maps to unknown parameter {name!r}")
        target = params[name].data
        if rows is not None:
            target = target[rows]
        if tuple(target.shape) != tuple(tensor.shape):
            raise WeightLoadError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(target.shape)}"
            )
        target.copy_(tensor.to(dtype))
        filled[name] = filled.get(name, 0) + 1

    for hf_name, tensor in _iter_tensors(cfg.path):
        if "rotary_emb" in hf_name:
            continue  # older checkpoints store inv_freq; we compute it
        m = _LAYER.match(hf_name)
        if m is None:
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: the embedding is the head
            put(name, tensor)
            continue
        layer, rest = m.groups()
        module, _, kind = rest.rpartition(".")
        if module in _FUSED:
            ours, shard = _FUSED[module]
            off = _fused_offsets(cfg, ours)
            put(f"layers.{layer}.{ours}.{kind}", tensor, slice(off[shard], off[shard + 1]))
        else:
            put(f"layers.{layer}.{rest}", tensor)

    _check_complete(cfg, model, filled)
    model.rope.cast(dtype)
    model.eval()
    log.info(
        "loaded %s (%s, %.1fM params, %s, %s)",
        cfg.path,
        cfg.model_type,
        cfg.num_params / 1e6,
        str(dtype).removeprefix("torch."),
        device,
    )
    return model


def _check_complete(cfg: ModelConfig, model: LlamaForCausalLM, filled: dict[str, int]) -> None:
    missing = []
    for name, _ in model.named_parameters():
        want = 1
        for fused, shards in (("qkv_proj", 3), ("gate_up_proj", 2)):
            if f".{fused}." in name:
                want = shards
        if filled.get(name, 0) != want:
            missing.append(f"{name} ({filled.get(name, 0)}/{want} parts)")
    if missing:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise WeightLoadError(f"{cfg.path}: parameters not filled by the checkpoint: {shown}")
