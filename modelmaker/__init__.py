"""Small random-weight Hugging Face models, built entirely offline.

The engine, its tests and its benchmarks need real model directories (config.json,
model.safetensors, generation_config.json, tokenizer files) but cannot download from a model
hub. `make_model` writes one from a fixed seed: a byte-level BPE tokenizer trained in-process on
a synthetic corpus plus random weights that are scaled so greedy decoding is decisive (large
top-1/top-2 logit margins) yet varied. The same call gives byte-identical files on any machine.

`ensure_default_model` builds the "small" llama model once into a per-user cache and returns it.

A leaf: it imports nothing of ours, so whatever needs a model (the engine's default, tests,
benchmarks, `splitserve make-model`) may use it.
"""

from __future__ import annotations

from modelmaker.config import build_config
from modelmaker.default_model import default_model_dir, ensure_default_model
from modelmaker.model import make_model
from modelmaker.presets import ARCHS, PRESETS, Arch, Preset
from modelmaker.tokenizer import TOKENIZER_STYLES, build_tokenizer

__all__ = [
    "ARCHS",
    "PRESETS",
    "TOKENIZER_STYLES",
    "Arch",
    "Preset",
    "build_config",
    "build_tokenizer",
    "default_model_dir",
    "ensure_default_model",
    "make_model",
]
