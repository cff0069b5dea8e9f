"""The model maker (modelmaker/): loadable, deterministic, and decisive-but-varied under greedy."""

from __future__ import annotations

import logging
import os
import statistics
import unicodedata
from pathlib import Path

# Read by huggingface_hub when it is imported: nothing here may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelmaker import (
    ARCHS,
    PRESETS,
    default_model,
    default_model_dir,
    ensure_default_model,
    make_model,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}
MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
PROMPTS = ("Hello world", "The quick brown fox jumps over", "Brakoo stim ai fleng, trou.")
ROUND_TRIP_TEXTS = (
    "Hello, world! Spaces   and\ttabs\n\nnew lines; a . b , c 12345 don't",
    "def f(x):\n    return {'k': [1, 2]}  # ~`@$%^&*",
    unicodedata.normalize("NFC", "café naïve Ünïcödé — 日本語のテキスト, emoji 😀👍, Ελληνικά"),
)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {arch: make_model(tmp_path_factory.mktemp(arch), arch=arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(
        tmp_path_factory.mktemp("llama3"), rope_scaling=LLAMA3_ROPE, rope_theta=500000.0
    )


def _greedy(model_dir: Path, n: int = 64) -> tuple[list[list[int]], list[float]]:
    """Greedy continuations of PROMPTS and the top-1/top-2 logit margin of every step."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    outputs, margins = [], []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,  # a greedy eos must not shorten the sample
                output_logits=True,
                return_dict_in_generate=True,
            )
        outputs.append(out.sequences[0, ids.shape[1] :].tolist())
        for logits in out.logits:
            top2 = logits[0].topk(2).values
            margins.append(float(top2[0] - top2[1]))
    return outputs, margins


def test_tables_cover_the_documented_presets_and_archs():
    assert set(PRESETS) == {"tiny", "small"}
    assert set(ARCHS) == {"llama", "mistral", "qwen2"}
    with pytest.raises(ValueError, match="preset"):
        make_model("unused", preset="huge")
    with pytest.raises(ValueError, match="arch"):
        make_model("unused", arch="gpt2")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_loads_with_expected_config(tiny_dirs: dict[str, Path], arch: str):
    d = tiny_dirs[arch]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (d / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    cfg = model.config
    assert cfg.model_type == arch
    assert type(model).__name__ == MODEL_CLASSES[arch]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 176, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.max_position_embeddings == 1024
    attn = model.model.layers[0].self_attn
    # head_dim 16: q has 4 heads, k/v have 2.
    assert attn.q_proj.weight.shape == (64, 64) and attn.k_proj.weight.shape == (32, 64)
    assert len(tok) == cfg.vocab_size == PRESETS["tiny"].vocab_size
    gen = model.generation_config
    assert gen.bos_token_id == tok.bos_token_id == cfg.bos_token_id
    assert gen.eos_token_id == tok.eos_token_id == cfg.eos_token_id
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id]) == ["<s>", "</s>"]

    keys = set(model.state_dict())
    bias_keys = {k for k in keys if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
    if arch == "qwen2":
        assert len(bias_keys) == 3 * cfg.num_hidden_layers
        assert cfg.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert not bias_keys
        assert not cfg.tie_word_embeddings
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    if arch == "mistral":
        assert cfg.sliding_window is None


def test_llama3_rope_scaling_override(llama3_dir: Path):
    cfg = AutoModelForCausalLM.from_pretrained(llama3_dir).config
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
    for key, value in LLAMA3_ROPE.items():
        assert rope[key] == value
    outputs, _ = _greedy(llama3_dir, n=16)
    assert all(len(set(o)) >= 4 for o in outputs)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path):
    a = make_model(tmp_path / "a", arch="qwen2", seed=3)
    b = make_model(tmp_path / "b", arch="qwen2", seed=3)
    c = make_model(tmp_path / "c", arch="qwen2", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_caller_rng_is_untouched(tmp_path: Path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    make_model(tmp_path, seed=7)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tokenizer_round_trip_and_chat_template(tiny_dirs: dict[str, Path], arch: str):
    tok = AutoTokenizer.from_pretrained(tiny_dirs[arch])
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    assert tok("hi").input_ids[0] == tok.bos_token_id

    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.convert_tokens_to_ids("<|user|>") in ids
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_is_decisive_and_varied(tiny_dirs: dict[str, Path], arch: str):
    outputs, margins = _greedy(tiny_dirs[arch])
    for out in outputs:
        assert len(out) == 64 and len(set(out)) >= 10, out
    assert statistics.median(margins) > 0.5


def test_vocab_size_override_retrains_tokenizer(tmp_path: Path):
    d = make_model(tmp_path, vocab_size=1024)
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == AutoModelForCausalLM.from_pretrained(d).config.vocab_size == 1024


def test_make_model_logs_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="splitserve"):
        make_model(tmp_path)
    records = [r for r in caplog.records if r.name == "splitserve"]
    assert len(records) == 1
    assert "params" in records[0].getMessage() and str(tmp_path) in records[0].getMessage()


def test_default_model_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / "small-llama-seed0"
    monkeypatch.delenv("SPLITSERVE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "splitserve" / "models" / "small-llama-seed0"
    assert default_model_dir() == expected


def test_ensure_default_model_builds_once_and_atomically(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    # The small preset is too slow for a unit test; the caching logic is preset-independent.
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "DEFAULT_PRESET", "tiny")
    models = tmp_path / "models"

    real_make_model = default_model.make_model

    def crash_mid_write(out_dir: Path, **kwargs: object) -> Path:
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(default_model, "make_model", crash_mid_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_default_model()
    assert not default_model_dir().exists()
    assert list(models.iterdir()) == []  # the temp dir is cleaned up too

    monkeypatch.setattr(default_model, "make_model", real_make_model)
    path = ensure_default_model()
    assert path == default_model_dir() == models / "tiny-llama-seed0"
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "llama"
    assert [p.name for p in models.iterdir()] == ["tiny-llama-seed0"]

    def must_not_rebuild(*args: object, **kwargs: object) -> Path:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(default_model, "make_model", must_not_rebuild)
    assert ensure_default_model() == path
