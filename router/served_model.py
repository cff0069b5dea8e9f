"""The one model this router serves, as request validation sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServedModel:
    """What validation needs to know about the one model this router serves."""

    name: str  # the `model` clients must send
    path: str  # the model directory
    vocab_size: int
    max_model_len: int  # prompt + output tokens
    tokenizer: Any  # a transformers tokenizer
