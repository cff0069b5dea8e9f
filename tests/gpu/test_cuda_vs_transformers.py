"""On CUDA, the engine's greedy tokens equal transformers `generate`, token for token.

The built-in `tiny` and `small` llama models in float32 (TF32 off), through the Triton decode
kernel and through the PyTorch path: 8 prompts of lengths around block boundaries (block size
16) up to 33 blocks, 64 new tokens each, decoded in mixed batches (a small step budget makes
prefill chunks ride along with decode rows). In bfloat16 the two round differently, so there
the agreement is only reported (`-rP` shows it); what must hold is that the Triton kernel ran.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.cuda_checks import CUDA, needs_cuda, no_tf32, release_cuda_memory

pytestmark = needs_cuda

NUM_PROMPTS = 8
NEW_TOKENS = 64
# One token, block-boundary neighbours (block size 16), up to 33 blocks.
PROMPT_LENGTHS = (1, 7, 16, 33, 80, 150, 300, 513)
PRESETS = ("tiny", "small")


@dataclass(frozen=True)
class Reference:
    prompts: list[list[int]]
    tokens: list[list[int]]  # transformers' greedy continuation of each prompt


def make_prompts(vocab: int, n: int = NUM_PROMPTS, seed: int = 0) -> list[list[int]]:
    """n token-id prompts of different lengths, avoiding the special ids at the bottom."""
    rng = random.Random(seed)
    lengths = [PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(n)]
    return [[rng.randrange(16, vocab) for _ in range(length)] for length in lengths]


def transformers_greedy(
    model_dir: Path, dtype: torch.dtype, prompts: Sequence[list[int]]
) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(CUDA).eval()
    # No EOS: the engine ignores it too, so both always produce NEW_TOKENS.
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0
    )
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=CUDA)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            outs.append(out[0, len(p) :].tolist())
    del model
    release_cuda_memory()
    return outs


def engine_greedy(
    model_dir: Path, dtype: str, backend: str, prompts: Sequence[list[int]]
) -> tuple[list[list[int]], str]:
    """The engine's greedy tokens, and the name of the decode-attention function it used."""
    from engine import LLM, SamplingParams

    llm = LLM(
        str(model_dir),
        dtype=dtype,
        device="cuda",
        attention_backend=backend,
        kv_cache_bytes=256 * 2**20,
        max_num_batched_tokens=256,
    )
    fn = llm.engine.runner.model.decode_attention
    used = f"{fn.__module__}.{fn.__name__}"
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(list(prompts), params, use_tqdm=False)
    tokens = [o.token_ids for o in outs]
    del llm, outs
    release_cuda_memory()
    return tokens, used


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@pytest.fixture(scope="module")
def preset_models(tmp_path_factory) -> dict[str, Path]:
    from modelmaker import make_model

    root = tmp_path_factory.mktemp("presets")
    return {p: make_model(root / p, preset=p) for p in PRESETS}


@pytest.fixture(scope="module")
def reference(preset_models) -> Callable[[str, str], Reference]:
    """transformers' tokens per (preset, dtype), computed once: every backend compares to them."""
    from engine.config import ModelConfig
    from engine.dtype_choice import DTYPES

    done: dict[tuple[str, str], Reference] = {}

    def get(preset: str, dtype: str) -> Reference:
        if (preset, dtype) not in done:
            model_dir = preset_models[preset]
            prompts = make_prompts(ModelConfig.from_pretrained(model_dir).vocab_size)
            with no_tf32():
                tokens = transformers_greedy(model_dir, DTYPES[dtype], prompts)
            done[(preset, dtype)] = Reference(prompts, tokens)
        return done[(preset, dtype)]

    return get


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("preset", PRESETS)
def test_float32_greedy_tokens_equal_transformers(preset, backend, preset_models, reference):
    want = reference(preset, "float32")
    with no_tf32():
        got, used = engine_greedy(preset_models[preset], "float32", backend, want.prompts)
    if backend == "triton":
        assert "triton" in used, f"decode attention fell back to {used}"
    assert [len(g) for g in got] == [NEW_TOKENS] * len(got)
    diverged = [
        (len(p), common_prefix(g, w))
        for p, g, w in zip(want.prompts, got, want.tokens, strict=True)
        if g != w
    ]
    assert not diverged, (
        f"{len(got) - len(diverged)}/{len(got)} prompts identical; "
        f"(prompt tokens, first differing output token): {diverged}"
    )


def test_bfloat16_decodes_through_triton(preset_models, reference, record_property):
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bfloat16")
    want = reference("small", "bfloat16")
    got, used = engine_greedy(preset_models["small"], "bfloat16", "triton", want.prompts)
    assert "triton" in used, f"decode attention fell back to {used}"
    assert [len(g) for g in got] == [NEW_TOKENS] * len(got)

    total = NEW_TOKENS * len(got)
    agree_bf16 = sum(common_prefix(g, w) for g, w in zip(got, want.tokens, strict=True))
    agree_fp32 = sum(
        common_prefix(g, w) for g, w in zip(got, reference("small", "float32").tokens, strict=True)
    )
    record_property("tokens_agreeing_with_transformers_bfloat16", agree_bf16 / total)
    record_property("tokens_agreeing_with_transformers_float32", agree_fp32 / total)
    print(
        f"small bfloat16 triton: {agree_bf16}/{total} tokens ({agree_bf16 / total:.0%}) match "
        f"transformers bfloat16 up to the first divergence, {agree_fp32 / total:.0%} float32"
    )
