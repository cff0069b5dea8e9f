"""Per-request sampling parameters, named as vLLM names them."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# What a structured output may be (engine/structured_output.py compiles them).
KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# The most alternatives prompt_logprobs may ask for at each position.
MAX_PROMPT_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class GuidedSpec:
    """What the output must match; hashable, and two strings on the wire.
    Defined here, free of the grammar library, so the router can build one.

    kind: one of KINDS. spec: the JSON schema's text (json_schema), the regex (regex), the
    choices as a JSON list of strings (choice), an EBNF grammar in xgrammar's GBNF dialect
    (grammar); empty for json_object (any JSON object).
    """

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown guided decoding kind {self.kind!r}; expected one of {KINDS}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> GuidedSpec:
        """Canonical text (compact, key order kept: it is the output's property order), so
        equal schemas share a cache entry."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            text = json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON schema: not JSON ({e})") from None
        return cls("json_schema", text)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> GuidedSpec:
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_p: keep the smallest set of tokens whose probability mass reaches top_p.
    top_k: keep the k most likely tokens; 0 or -1 keeps all.
    max_tokens: the most tokens to generate (the request stops with "length").
    ignore_eos: keep generating past the model's EOS token(s).
    stop: strings that end generation; the output text stops before them.
    stop_token_ids: token ids that end generation (kept in token_ids, like EOS).
    seed: makes this request's sampling reproducible whatever batch it runs in.
    logprobs: when set (any int >= 0), return the log-probability of each
        chosen token under the model's unmodified distribution: the raw
        logits' log-softmax, before logit_bias, min_tokens, the penalties,
        temperature, top-k and top-p (vLLM's default "raw_logprobs").
    prompt_logprobs: when set (0 to MAX_PROMPT_LOGPROBS), also score the
        prompt: for every prompt token after the first, its logprob given
        the tokens before it, with this many most likely alternatives at
        its position (RequestOutput.prompt_logprobs). The whole prompt is
        then computed, never taken from the prefix cache (as in vLLM).
    presence_penalty: in [-2, 2]; subtracted once from the logit of every
        token already generated (OpenAI's definition; the prompt is not
        counted).
    frequency_penalty: in [-2, 2]; times the number of times a token was
        already generated, subtracted from its logit (OpenAI's definition).
    repetition_penalty: > 0, 1 disables it; for every token in the prompt or
        already generated, a positive logit is divided by it and a negative
        one multiplied by it (vLLM's definition).
    min_tokens: while fewer tokens than this have been generated, EOS and
        stop_token_ids cannot be sampled (EOS is masked even with
        ignore_eos, as in vLLM). max_tokens still wins when it is smaller.
    logit_bias: token id -> bias in [-100, 100], added to that token's
        logit. Given as a dict (or (id, bias) pairs), stored as (id, bias)
        pairs sorted by id, so the params stay hashable. The engine checks
        the ids against the vocabulary.

    structured_output: a grammar the output must follow (JSON, a JSON
        schema, a regex, a choice): tokens it forbids are masked before
        sampling, and the request stops (with EOS) once the grammar is
        complete, even with ignore_eos.

    Logit processing follows vLLM's order: logit_bias and min_tokens on the
    raw logits, then the repetition, frequency and presence penalties, then
    temperature, top-k and top-p.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    structured_output: GuidedSpec | None = None
    # Derived: whether any of the five fields above is set, so that the
    # sampler's path for requests with none of them reads one flag.
    adjusts_logits: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        # Accept the list/str forms users pass to vLLM, store immutable tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "logit_bias", _logit_bias_pairs(self.logit_bias))
        self._validate()
        adjusts = self.penalizes or bool(self.logit_bias) or self.min_tokens > 0
        object.__setattr__(self, "adjusts_logits", adjusts)

    def _validate(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must hold non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must hold non-negative integers")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        pl = self.prompt_logprobs
        if pl is not None and (not _is_int(pl) or not 0 <= pl <= MAX_PROMPT_LOGPROBS):
            raise ValueError(
                f"prompt_logprobs must be an integer in [0, {MAX_PROMPT_LOGPROBS}], got {pl!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        rp = self.repetition_penalty
        if not _is_number(rp) or not 0.0 < rp < math.inf:
            raise ValueError(f"repetition_penalty must be > 0 and finite, got {rp!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.structured_output is not None and self.min_tokens > 0:
            # A complete grammar allows only EOS, which min_tokens would forbid.
            raise ValueError("min_tokens cannot be combined with a structured output")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    @property
    def penalizes(self) -> bool:
        """Whether a presence, frequency or repetition penalty applies."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _logit_bias_pairs(value: Any) -> tuple[tuple[int, float], ...]:
    """A dict or (id, bias) pairs as validated (id, bias) pairs sorted by id;
    a repeated id keeps its last bias, as a dict would."""
    if not value:
        return ()
    try:
        items = dict(value.items() if isinstance(value, Mapping) else value)
    except (TypeError, ValueError):
        raise ValueError("logit_bias must map token ids to biases") from None
    for tok, bias in items.items():
        if not _is_int(tok) or tok < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {tok!r}")
        if not _is_number(bias) or not -100.0 <= bias <= 100.0:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for {tok}")
    return tuple(sorted((int(tok), float(bias)) for tok, bias in items.items()))
