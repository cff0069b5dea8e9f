"""The byte-level BPE tokenizer: trained in process on the synthetic corpus, saved beside the
weights with the special tokens and chat template."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from modelmaker.corpus import synthetic_corpus
from modelmaker.special_tokens import BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS, UNK

if TYPE_CHECKING:
    from tokenizers import Tokenizer

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
    tok.train_from_iterator(synthetic_corpus(vocab_size), trainer)
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


def save_tokenizer(vocab_size: int, style: str, out_dir: Path) -> dict[str, int]:
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
