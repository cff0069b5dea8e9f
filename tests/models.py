"""The model families the engine must match transformers on."""

from __future__ import annotations

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
