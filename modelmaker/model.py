"""`make_model`: config, tokenizer and seeded random weights, written as a Hugging Face
causal-LM directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from modelmaker.config import build_config
from modelmaker.presets import ARCHS, PRESETS
from modelmaker.tokenizer import save_tokenizer

logger = logging.getLogger("splitserve")


def make_model(
    out_dir: str | Path,
    preset: str = "tiny",
    arch: str = "llama",
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a loadable Hugging Face causal-LM directory with seeded random weights.

    `config_overrides` go to the config class (e.g. `vocab_size`, `rope_scaling`,
    `rope_theta`, `sliding_window`, `tie_word_embeddings`); the tokenizer is trained to the
    final vocab_size. Same arguments give byte-identical files. Returns the directory.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(preset, arch, **config_overrides)

    special_ids = save_tokenizer(config.vocab_size, ARCHS[arch].tokenizer_style, out)
    for key, value in special_ids.items():
        setattr(config, key, value)

    gain = PRESETS[preset].final_norm_gain
    # fork_rng: seed our own init without disturbing the caller's torch RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_decoder().norm.weight.fill_(gain)
    model.generation_config = GenerationConfig(
        bos_token_id=special_ids["bos_token_id"],
        eos_token_id=special_ids["eos_token_id"],
        pad_token_id=special_ids["pad_token_id"],
    )
    # transformers draws a progress bar per save; a 1-file model needs none.
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()

    n_params = sum(t.numel() for t in model.parameters())
    logger.info(
        "built %s/%s model: %.2fM params, seed %d, at %s", preset, arch, n_params / 1e6, seed, out
    )
    return out
