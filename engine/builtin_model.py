"""Built-in model maker: small random-weight Hugging Face models built entirely offline.

The engine, its tests and its benchmarks need real model directories (config.json,
model.safetensors, generation_config.json, tokenizer files) but cannot download from a model
hub. `make_model` writes one from a fixed seed: a byte-level BPE tokenizer trained in-process on
a synthetic corpus plus random weights that are scaled so greedy decoding is decisive (large
top-1/top-2 logit margins) yet varied. The same call gives byte-identical files on any machine.

`ensure_default_model` builds the "small" llama model once into a per-user cache and returns it.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PretrainedConfig

logger = logging.getLogger("splitserve")


# ---------------------------------------------------------------------------------------------
# Presets and architectures
# ---------------------------------------------------------------------------------------------


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

DEFAULT_PRESET = "small"
DEFAULT_ARCH = "llama"
DEFAULT_SEED = 0


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# BpeTrainer gives these the first ids, in order: unk/bos/eos get Llama's 0/1/2, so ids in logs
# and tests look familiar.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, *ROLE_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Syllable pieces for pseudo-words. Many distinct multi-syllable words give BPE enough distinct
# pairs to reach a 32000-token vocabulary from a few MB of text.
_ONSETS = (
    "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
    "br", "ch", "cl", "dr", "fl", "gr", "kr", "pl", "qu", "sh", "sk", "sp", "st", "th", "tr",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "oo", "ou", "ie")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "ng", "ck", "st", "nd", "x")
_SYLLABLES_PER_WORD = (1, 1, 2, 2, 2, 3, 3, 4)
_SENTENCE_ENDS = ".....?!"

# Real text so common English words, digits, newlines and code-ish punctuation get tokens too.
_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A serving engine splits prefill from decode:
the prefill pool reads the whole prompt at once, and the decode pool writes one token at a
time for many requests together. Each request keeps its keys and values in fixed-size blocks,
so memory is shared without copying. What time is it? It is 12:45 on Monday, 3 June 2024.
Hello, world! Please answer the question below, briefly and clearly.
def add(a, b):
    return a + b  # {"key": [1, 2, 3], "ok": true}
"""


def _synthetic_corpus(vocab_size: int, seed: int = 0) -> list[str]:
    """Deterministic text: Zipf-distributed pseudo-words in sentences, plus fixed English.

    Only `random.Random(seed)` drives it, so it is the same on every machine and Python build.
    """
    rng = random.Random(seed)
    syllables = sorted({o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS})
    # Twice as many words as tokens: BPE then has more whole words than it can give ids to,
    # so it always reaches the requested size.
    lexicon_size = 2 * vocab_size
    lexicon: list[str] = []
    seen: set[str] = set()
    while len(lexicon) < lexicon_size:
        n = rng.choice(_SYLLABLES_PER_WORD)
        word = "".join(rng.choice(syllables) for _ in range(n))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    cum_weights: list[float] = []
    total = 0.0
    for rank in range(lexicon_size):
        total += 1.0 / (rank + 2.7)  # Zipf-Mandelbrot, exponent 1
        cum_weights.append(total)
    n_words = 12 * vocab_size
    words = rng.choices(lexicon, cum_weights=cum_weights, k=n_words)
    lines: list[str] = []
    i = 0
    while i < n_words:
        n = rng.randint(4, 16)
        sentence = words[i : i + n]
        i += n
        sentence[0] = sentence[0].capitalize()
        if len(sentence) > 6 and rng.random() < 0.3:
            sentence[len(sentence) // 2] += ","
        if rng.random() < 0.1:
            sentence.insert(rng.randrange(len(sentence) + 1), str(rng.randrange(1000)))
        lines.append(" ".join(sentence) + rng.choice(_SENTENCE_ENDS))
    # Weighted so the English words win merges over rare pseudo-words.
    english = _ENGLISH.splitlines(keepends=True)
    lines.extend(english * max(1, vocab_size // 100))
    return lines


# Qwen2Tokenizer's split regex (digits one at a time, letters kept whole), copied so training
# uses exactly the pre-tokenization transformers applies when loading a qwen2 checkpoint.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TOKENIZER_STYLES = ("gpt2", "qwen2")


@functools.lru_cache(maxsize=8)
def _train_tokenizer(vocab_size: int, style: str = "gpt2") -> str:
    """Train the byte-level BPE; returns its JSON so callers cannot mutate the cached copy."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None))
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(f"unknown tokenizer style {style!r}; choose from {TOKENIZER_STYLES}")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes up front: any UTF-8 text encodes, with no <unk> ever needed.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_synthetic_corpus(vocab_size), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"BPE reached {tok.get_vocab_size()} tokens, wanted {vocab_size}: corpus too small"
        )
    # Registered as added tokens so "<|user|>" in text becomes one id; ids already exist.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return tok.to_str()


def build_tokenizer(vocab_size: int, style: str = "gpt2") -> Tokenizer:
    """A fresh `tokenizers.Tokenizer` (trained once per process per vocab size and style)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_train_tokenizer(vocab_size, style))


def _save_tokenizer(vocab_size: int, style: str, out_dir: Path) -> dict[str, int]:
    """Write tokenizer files; returns the special token ids for the model config."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(vocab_size, style),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        # Byte-level BPE round-trips exactly; HF's cleanup would turn "a ." into "a.".
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    if len(tok) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, model expects {vocab_size}")
    if tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError("special tokens did not get the first ids")
    tok.save_pretrained(out_dir)
    return {
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
    }


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


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

    special_ids = _save_tokenizer(config.vocab_size, ARCHS[arch].tokenizer_style, out)
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


# ---------------------------------------------------------------------------------------------
# Default model cache
# ---------------------------------------------------------------------------------------------


def default_model_dir() -> Path:
    """Where the default model lives: $SPLITSERVE_CACHE or ~/.cache/splitserve."""
    root = os.environ.get("SPLITSERVE_CACHE") or Path.home() / ".cache" / "splitserve"
    return Path(root) / "models" / f"{DEFAULT_PRESET}-{DEFAULT_ARCH}-seed{DEFAULT_SEED}"


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def ensure_default_model() -> Path:
    """Return the default model directory, building it on first use.

    The model is written to a temp dir beside the target and renamed into place, so a crash
    mid-write never leaves a half model where loaders look, and concurrent builders race safely.
    """
    path = default_model_dir()
    if _is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        # Not produced by the rename below (that only moves finished models): discard it.
        logger.warning("removing incomplete model directory %s", path)
        shutil.rmtree(path)
    logger.info("building default model (%s/%s) at %s", DEFAULT_PRESET, DEFAULT_ARCH, path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        make_model(tmp, preset=DEFAULT_PRESET, arch=DEFAULT_ARCH, seed=DEFAULT_SEED)
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process finished first; its model is identical, so keep it.
            if not _is_complete(path):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
