from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
logging.getLogger("splitserve").setLevel(logging.INFO)

# The three families the engine must match transformers on, tiny and float32.
ARCH_VARIANTS = {
    # Llama 3 style: GQA (4 query heads, 2 kv heads) and llama3 rope scaling
    # with an original context short enough that the scaling matters.
    "llama3": dict(
        arch="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=500000.0,
    ),
    # Mistral style, with a sliding window shorter than the longest sequences.
    "mistral": dict(arch="mistral", sliding_window=48),
    # Qwen2 style: q/k/v biases and tied embeddings.
    "qwen2": dict(arch="qwen2"),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    from engine.builtin_model import make_model

    root = tmp_path_factory.mktemp("models")
    return {
        name: make_model(root / name, preset="tiny", **spec) for name, spec in ARCH_VARIANTS.items()
    }


@pytest.fixture(scope="session")
def tiny_llama(model_dirs) -> Path:
    return model_dirs["llama3"]


def assert_engine_clean(llm) -> None:
    """No request left and every block back on the free list."""
    eng = llm.engine
    eng.block_pool.check_integrity()
    assert not eng.has_unfinished_requests()
    assert eng.block_pool.num_free_blocks == eng.block_pool.num_blocks
