"""Structured output: grammars that confine sampling to JSON, a JSON schema, a regex or a choice.

Built on xgrammar (the faster of xgrammar and llguidance at filling a batch's token mask:
bench/structured_output_mask.py). The life of a guided request:

  API          GuidedSpec from response_format / guided_*; validate_spec -> 400 on ValueError
  engine       future = compiler.compile(spec) at admission; the scheduler skips the request
               until future.done() (compiling runs on the compiler's thread, off the step loop);
               then request.matcher = future.result().matcher(request.output_token_ids)
  each step    apply_token_masks(logits, rows, matchers) before sampling;
               matcher.accept(token) after it (False: the token broke the grammar, an engine bug)
  finishing    once matcher.is_terminated() (it accepted a stop token) the request is finished
               with "stop", whatever ignore_eos says: a completed grammar allows only the stop
               tokens (the model's EOS ids), so a stop token is sampled exactly when the output is
               complete. max_tokens may cut it short first ("length"; the output is then invalid).
  disaggregated  the prefill worker compiles and samples the first token under the mask; the
               decode worker gets the spec (two strings: kind, spec) and compiles it, then
               matcher(tokens so far) replays them: the state is a function of the tokens.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import xgrammar as xgr

from engine.sampling_params import KINDS, GuidedSpec

__all__ = ["KINDS", "GuidedSpec", "StructuredOutputCompiler", "apply_token_masks", "validate_spec"]

# JSON is generated on one line with json.dumps' separators (", " and ": "): free whitespace
# lets a weak model loop on spaces and newlines until max_tokens.
ANY_WHITESPACE = False

# Validation keywords that xgrammar 0.2.9 parses but does not enforce (for each, a violating
# document was accepted). A schema using one is refused rather than silently half-honoured.
_UNENFORCED = frozenset(
    {"not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
     "dependentRequired", "dependentSchemas", "dependencies", "$dynamicRef", "$recursiveRef"}
)  # fmt: skip
# The string formats it enforces; others (idn-email, iri, regex, custom ones) are ignored by it.
_FORMATS = frozenset(
    {"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
     "uri-reference", "uri-template", "json-pointer", "relative-json-pointer", "uuid"}
)  # fmt: skip
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties",
                  "unevaluatedItems", "additionalItems")  # fmt: skip
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


@functools.lru_cache(maxsize=256)
def validate_spec(spec: GuidedSpec) -> None:
    """Raises ValueError naming what is wrong (an unsupported schema feature, an invalid
    regex); needs no tokenizer. ~1-2 ms for a schema of a dozen properties, ~0.02 ms for a
    regex or a choice (it builds the grammar, not the token tables)."""
    _to_grammar(spec)


def _to_grammar(spec: GuidedSpec) -> xgr.Grammar:
    """The tokenizer-independent grammar; ValueError for anything unsupported or invalid."""
    try:
        if spec.kind == "json_object":
            # strict_mode off: any properties, of any JSON type.
            return _json_grammar('{"type": "object"}', strict=False)
        if spec.kind == "json_schema":
            _check_schema(json.loads(spec.spec), "#")
            return _json_grammar(spec.spec, strict=True)
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.spec)
        if spec.kind == "choice":
            choices = json.loads(spec.spec or "null")
            if not (isinstance(choices, list) and choices and {type(c) for c in choices} == {str}):
                raise ValueError("guided_choice must be a non-empty list of strings")
            # Every escape json.dumps writes (quote, backslash, newline, \u plus four hex
            # digits) is a GBNF string-literal escape too.
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in choices))
        return xgr.Grammar.from_ebnf(spec.spec)
    except RuntimeError as e:
        # xgrammar's messages start with "[hh:mm:ss] /path/file.cc:123: "; keep what follows.
        msg = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e)).strip()
        raise ValueError(f"invalid {spec.kind}: {msg}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid {spec.kind}: not JSON ({e})") from None


# xgrammar 0.2.9 writes the characters of a length-bounded string (minLength, maxLength,
# propertyNames) as the first class below, which lets raw control characters through (invalid
# JSON: `json.loads` refuses them); its unbounded strings use the second, as JSON requires.
# Bounded strings also admit no escapes: a restriction, not an invalid output.
_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"


def _json_grammar(schema: str, *, strict: bool) -> xgr.Grammar:
    grammar = xgr.Grammar.from_json_schema(
        schema, any_whitespace=ANY_WHITESPACE, strict_mode=strict
    )
    ebnf = str(grammar)
    if _BOUNDED_STRING_CHAR not in ebnf:
        return grammar
    return xgr.Grammar.from_ebnf(ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))


def _check_schema(node: Any, path: str) -> None:
    """Walks the schema's subschemas (never enum/const/default values) for unsupported keywords."""
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise ValueError(f"invalid JSON schema: {path} must be an object or a boolean")

    def unsupported(feature: str) -> ValueError:
        return ValueError(f"unsupported JSON schema feature {feature} at {path}")

    if bad := sorted(node.keys() & _UNENFORCED):
        raise unsupported(", ".join(f"'{key}'" for key in bad))
    if "format" in node and node["format"] not in _FORMATS:
        raise unsupported(
            f"'format': {node['format']!r} (supported: {', '.join(sorted(_FORMATS))})"
        )
    if "multipleOf" in node and not isinstance(node["multipleOf"], int):
        raise unsupported("'multipleOf' with a non-integer value")
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        raise unsupported("'allOf' with more than one subschema")
    ref = node.get("$ref")
    if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
        raise unsupported(f"'$ref': {ref!r} (only local JSON pointers, '#/...')")
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                _check_schema(sub, f"{path}/{key}/{name}")
    for key in _SUBSCHEMA_ONE:
        if isinstance(node.get(key), dict | bool):
            _check_schema(node[key], f"{path}/{key}")
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                _check_schema(sub, f"{path}/{key}/{i}")


class _MaskWorkspace:
    """The batch fill's thread pool and a reused bitmask buffer, shared by one compiler's
    matchers. Used from the engine thread only."""

    def __init__(self, vocab_size: int, threads: int | Literal["auto"]) -> None:
        self.vocab_size = vocab_size
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self.bitmask = xgr.allocate_token_bitmask(64, vocab_size)  # [rows, ceil(vocab / 32)]

    def bitmask_for(self, rows: int) -> torch.Tensor:
        if self.bitmask.shape[0] < rows:
            self.bitmask = xgr.allocate_token_bitmask(rows, self.vocab_size)
        return self.bitmask[:rows]


@dataclass(frozen=True, slots=True)
class CompiledGrammar:
    """A spec compiled for one tokenizer; immutable, shared by every request with that spec."""

    spec: GuidedSpec
    compiled: xgr.CompiledGrammar
    workspace: _MaskWorkspace

    def matcher(self, token_ids: Sequence[int] = ()) -> GrammarMatcher:
        """A fresh matcher that has already accepted `token_ids` (see GrammarMatcher.replay)."""
        m = GrammarMatcher(self)
        m.replay(token_ids)
        return m


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, grammar: CompiledGrammar) -> None:
        self.grammar = grammar
        self.xgr_matcher = xgr.GrammarMatcher(grammar.compiled)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token. False (state unchanged) when the grammar forbids it,
        or the matcher has terminated."""
        return bool(self.xgr_matcher.accept_token(token_id))

    def replay(self, token_ids: Sequence[int]) -> None:
        """Reset, then accept `token_ids` in order: rebuilds the state of a matcher that has
        seen them (a decode worker taking over from prefill, a recomputed request).
        ValueError if one is refused."""
        self.xgr_matcher.reset()
        for i, tok in enumerate(token_ids):
            if not self.xgr_matcher.accept_token(tok):
                raise ValueError(f"token {tok} at output position {i} breaks the grammar")

    def rollback(self, num_tokens: int = 1) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative decoding's rejected drafts)."""
        self.xgr_matcher.rollback(num_tokens)

    def is_completed(self) -> bool:
        """The output so far is a complete match (a stop token may now be sampled)."""
        return bool(self.xgr_matcher.is_completed())

    def is_terminated(self) -> bool:
        """A stop token was accepted: the request is finished."""
        return bool(self.xgr_matcher.is_terminated())


class StructuredOutputCompiler:
    """Compiles specs for one tokenizer on its own thread, caching the results by spec.

    vocab_size: the model's (the logits' width), which may exceed the tokenizer's; ids past the
    tokenizer's are never allowed. stop_token_ids: what a completed grammar allows (the
    engine's EOS ids; default the tokenizer's eos_token_id). mask_threads: the batch fill's
    threads; 1 was fastest here at batch 1-64 (a thread hand-off costs more than a row's fill,
    ~2 us), more may pay for heavy grammars on many cores. Building the tokenizer's tables
    takes ~0.02 s (2k vocab), ~0.4 s (32k), ~1.3 s (128k): build one per engine, at start.
    """

    def __init__(
        self,
        tokenizer: Any,  # a transformers tokenizer
        *,
        vocab_size: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        compile_threads: int = 1,
        mask_threads: int | Literal["auto"] = 1,
        cache_size: int = 256,
    ) -> None:
        stops = list(stop_token_ids) if stop_token_ids else None
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stops
        )
        self.vocab_size: int = self.info.vocab_size
        # The library's own cache is off: this class's cache holds the futures.
        self._xgr = xgr.GrammarCompiler(self.info, max_threads=compile_threads, cache_enabled=False)
        self._workspace = _MaskWorkspace(self.vocab_size, mask_threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[GuidedSpec, Future[CompiledGrammar]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: GuidedSpec) -> Future[CompiledGrammar]:
        """The compiled grammar, as a future: done at once on a cache hit. Its result() raises
        ValueError for a spec that validate_spec would refuse. Safe from any thread."""
        with self._lock:
            future = self._cache.get(spec)
            if future is None:
                future = self._pool.submit(self._compile, spec)
                self._cache[spec] = future
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(spec)
            return future

    def _compile(self, spec: GuidedSpec) -> CompiledGrammar:
        compiled = self._xgr.compile_grammar(_to_grammar(spec))
        return CompiledGrammar(spec, compiled, self._workspace)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def apply_token_masks(
    logits: torch.Tensor,  # [M, vocab_size] float32 (bf16/fp16 too), CPU or CUDA; in place
    rows: Sequence[int],  # the rows of logits with a grammar, distinct
    matchers: Sequence[GrammarMatcher],  # matchers[i] for logits[rows[i]], none terminated
) -> None:
    """Sets the tokens each row's grammar forbids to -inf (padded ids past the tokenizer's
    vocabulary included): the batch's bitmask filled in one library call, then applied in one
    vectorized op. Other rows are untouched. From the engine thread only."""
    if not rows:
        return
    assert len(rows) == len(matchers), (len(rows), len(matchers))
    ws = matchers[0].grammar.workspace
    assert all(m.grammar.workspace is ws for m in matchers), "matchers of different compilers"
    if logits.shape[-1] != ws.vocab_size:
        raise ValueError(
            f"logits have {logits.shape[-1]} columns, the compiler's vocab_size is "
            f"{ws.vocab_size}: build it with the model's vocab_size"
        )
    for m in matchers:
        if m.is_terminated():
            raise RuntimeError(f"a terminated matcher ({m.grammar.spec.kind}) asked for a mask")
    bitmask = ws.bitmask_for(logits.shape[0])  # row i is logits[i]'s
    idx = list(rows)
    ws.batch.batch_fill_next_token_bitmask([m.xgr_matcher for m in matchers], bitmask, idx)
    if logits.device.type == "cpu":
        _apply_bitmask_cpu(logits, bitmask, idx)
    else:  # the library's kernel (Triton on CUDA)
        bitmask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=ws.vocab_size, indices=idx)


_NEG_INF = torch.tensor(float("-inf"))


def _apply_bitmask_cpu(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Bits to bools with numpy, then one torch.where: 3-4x faster than xgrammar's CPU kernel
    on an AMD EPYC (AVX2, one torch thread): 3.2 against 10.7 ms at 64 x 32000 float32, 10.4
    against 42 ms at 64 x 128256 (bench/structured_output_mask.py, fill included)."""
    assert sys.byteorder == "little"  # bit k of int32 word w is token 32 * w + k
    vocab = logits.shape[1]
    whole = len(rows) == logits.shape[0]  # rows are distinct: every row, in some order
    words = bitmask if whole else bitmask[rows]
    bits = np.unpackbits(words.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little")
    allowed = torch.from_numpy(bits).view(torch.bool)  # [len(rows), vocab]
    if whole:
        torch.where(allowed, logits, _NEG_INF, out=logits)
    else:
        idx = torch.tensor(rows)
        logits.index_copy_(0, idx, torch.where(allowed, logits.index_select(0, idx), _NEG_INF))
