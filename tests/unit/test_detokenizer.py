"""Incremental detokenization: the Rust stream and the windowed Python path
give the same text, token by token, as decoding the whole output at once."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from engine.detokenizer import IncrementalDetokenizer


class DecodeOnly:
    """The tokenizer seen only through `decode`, as a slow (Python)
    tokenizer is: the detokenizer must take its windowed path."""

    def __init__(self, tokenizer: Any) -> None:
        self.decode = tokenizer.decode


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def tokenizer(request, model_dirs):
    # llama3 is the byte-level GPT-2 style tokenizer, qwen2 the Qwen2 style one.
    return AutoTokenizer.from_pretrained(model_dirs[request.param])


def test_fast_tokenizer_takes_the_rust_stream(tokenizer):
    assert IncrementalDetokenizer(tokenizer)._stream is not None
    assert IncrementalDetokenizer(DecodeOnly(tokenizer))._stream is None


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_streamed_text_equals_whole_decode(tokenizer, data):
    vocab = len(tokenizer)
    # Special tokens (the low ids) mixed in: they are skipped in the text.
    ids = data.draw(
        st.lists(st.one_of(st.integers(0, 8), st.integers(0, vocab - 1)), min_size=1, max_size=40)
    )
    fast = IncrementalDetokenizer(tokenizer)
    windowed = IncrementalDetokenizer(DecodeOnly(tokenizer))
    pieces = []
    for token in ids:
        new = fast.push(token)
        assert windowed.push(token) == new
        pieces.append(new)
    assert fast.text == windowed.text == "".join(pieces)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    # Text waits for a character's last byte; what was released is final.
    assert whole.startswith(fast.text)
    if not whole.endswith("\ufffd"):
        assert fast.text == whole
