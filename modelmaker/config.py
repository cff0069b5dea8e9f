"""The transformers config of a made model: a preset's shape, an arch's defaults, overrides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelmaker.presets import ARCHS, PRESETS

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def _map_rope_overrides(probe: PretrainedConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """Fold legacy `rope_scaling` / `rope_theta` into `rope_parameters` (transformers >= 5).

    Older transformers keep the legacy keys, so they pass through untouched there.
    """
    if not hasattr(probe, "rope_parameters"):
        return overrides
    out = dict(overrides)
    if "rope_scaling" not in out and "rope_theta" not in out:
        return out
    rope: dict[str, Any] = dict(out.pop("rope_parameters", None) or probe.rope_parameters or {})
    scaling = out.pop("rope_scaling", None)
    if scaling:
        scaling = dict(scaling)
        if "type" in scaling and "rope_type" not in scaling:  # older checkpoints spell it "type"
            scaling["rope_type"] = scaling.pop("type")
        rope.update(scaling)
    if "rope_theta" in out:
        rope["rope_theta"] = float(out.pop("rope_theta"))
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", 10000.0)
    out["rope_parameters"] = rope
    return out


def build_config(
    preset: str = "tiny", arch: str = "llama", **config_overrides: Any
) -> PretrainedConfig:
    """The transformers config `make_model` would use, without weights or tokenizer."""
    import transformers

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    p, a = PRESETS[preset], ARCHS[arch]
    config_cls = getattr(transformers, a.config_class)
    kwargs: dict[str, Any] = {
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "vocab_size": p.vocab_size,
        "max_position_embeddings": p.max_position_embeddings,
        "initializer_range": p.initializer_range,
        **a.defaults,
    }
    kwargs.update(_map_rope_overrides(config_cls(), config_overrides))
    return config_cls(**kwargs)
