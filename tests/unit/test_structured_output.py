"""engine.structured_output on the tiny model's tokenizer, with the real xgrammar: greedy
sampling from random logits under the grammar's mask always yields a valid output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar
from transformers import AutoTokenizer

from engine.structured_output import (
    CompiledGrammar,
    GrammarMatcher,
    GuidedSpec,
    StructuredOutputCompiler,
    _apply_bitmask_cpu,
    apply_token_masks,
    validate_spec,
)

EOS = 2
# The model's logits are wider than the tokenizer (2048 ids): padded ids must never be sampled.
PAD_COLUMNS = 40

SCHEMA = {
    "type": "object",
    "properties": {
        "status": {"enum": ["ok", "degraded", "down"]},
        "active": {"type": "boolean"},
        "replicas": {"type": "integer", "minimum": 1, "maximum": 12},
        "offset": {"type": "integer", "minimum": -50, "maximum": 50},
        "owner": {
            "type": "object",
            "properties": {
                "team": {"enum": ["infra", "ml", "serving"]},
                "oncall": {"type": "boolean"},
                "level": {"type": "integer", "minimum": 0, "maximum": 3},
            },
            "required": ["team", "oncall"],
        },
        "zones": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ports": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": 65535},
            "minItems": 1,
            "maxItems": 4,
        },
        "label": {"type": "string", "maxLength": 6},
    },
    "required": ["status", "active", "replicas", "owner", "zones", "ports"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    c = StructuredOutputCompiler(tokenizer, vocab_size=len(tokenizer) + PAD_COLUMNS)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def vocab(compiler) -> int:
    return compiler.vocab_size


def compile_spec(compiler: StructuredOutputCompiler, spec: GuidedSpec) -> CompiledGrammar:
    return compiler.compile(spec).result(timeout=60)


def allowed(m: GrammarMatcher, vocab: int) -> torch.Tensor:
    logits = torch.zeros(1, vocab)
    apply_token_masks(logits, [0], [m])
    return ~torch.isinf(logits[0])  # [vocab] bool


def generate(
    grammar: CompiledGrammar,
    vocab: int,
    seed: int,
    runs: int,
    max_tokens: int = 200,
    closing_bias: torch.Tensor | None = None,
) -> list[list[int]]:
    """`runs` greedy generations from seeded random logits, batched: row 0 has no grammar and
    must come through untouched; row r + 1 is run r, until it accepts EOS. With closing_bias,
    it is added to every row from step 20 on (so open-ended grammars finish)."""
    gen = torch.Generator().manual_seed(seed)
    matchers = [grammar.matcher() for _ in range(runs)]
    outputs: list[list[int]] = [[] for _ in range(runs)]
    live = list(range(runs))
    for step in range(max_tokens):
        if not live:
            return outputs
        logits = torch.randn(runs + 1, vocab, generator=gen)
        if closing_bias is not None and step >= 20:
            logits += closing_bias
        raw = logits.clone()
        rows = [r + 1 for r in live]
        apply_token_masks(logits, rows, [matchers[r] for r in live])
        assert torch.equal(logits[0], raw[0])
        assert torch.isinf(logits[rows, -PAD_COLUMNS:]).all()
        for r in live:
            tok = int(logits[r + 1].argmax())
            assert matchers[r].accept(tok)
            if tok != EOS:
                outputs[r].append(tok)
        live = [r for r in live if not matchers[r].is_terminated()]
    raise AssertionError(f"{len(live)} runs did not finish in {max_tokens} tokens")


def test_json_schema_outputs_parse_and_validate(compiler, tokenizer, vocab):
    grammar = compile_spec(compiler, GuidedSpec.json_schema(SCHEMA))
    outputs = generate(grammar, vocab, seed=0, runs=50)
    docs = [json.loads(tokenizer.decode(out)) for out in outputs]
    for doc in docs:
        jsonschema.validate(doc, SCHEMA)
    # Random logits explore the schema: both booleans, several enum values, optional fields.
    assert {d["active"] for d in docs} == {True, False}
    assert len({d["status"] for d in docs}) >= 2
    assert any("offset" in d for d in docs) or any("label" in d for d in docs)


def test_json_object_outputs_parse_as_objects(compiler, tokenizer, vocab):
    grammar = compile_spec(compiler, GuidedSpec("json_object"))
    # Closing characters favoured after 20 tokens, else random logits rarely close a string.
    closing = torch.zeros(vocab)
    for tok_id in range(len(tokenizer)):
        text = tokenizer.decode([tok_id])
        if text and set(text) <= set('"}]'):
            closing[tok_id] = 10.0
    closing[EOS] = 10.0
    outputs = generate(grammar, vocab, seed=1, runs=20, closing_bias=closing)
    objs = [json.loads(tokenizer.decode(out)) for out in outputs]
    assert all(isinstance(o, dict) for o in objs)
    assert any(o for o in objs)  # not only {}


def test_regex_outputs_fullmatch(compiler, tokenizer, vocab):
    pattern = r"[A-Z]{2}-\d{3,5}(\.[a-z]{1,4})?"
    grammar = compile_spec(compiler, GuidedSpec("regex", pattern))
    for out in generate(grammar, vocab, seed=2, runs=20):
        assert re.fullmatch(pattern, tokenizer.decode(out))


def test_choice_yields_one_of_the_choices(compiler, tokenizer, vocab):
    choices = ["yes", "no", "maybe later", 'say "hi"', "Zürich", "a\\b"]
    grammar = compile_spec(compiler, GuidedSpec.choice(choices))
    texts = [tokenizer.decode(out) for out in generate(grammar, vocab, seed=3, runs=30)]
    assert set(texts) <= set(choices)
    assert len(set(texts)) >= 2


def test_complete_grammar_allows_only_eos(compiler, tokenizer, vocab):
    grammar = compile_spec(compiler, GuidedSpec("regex", "ab"))
    m = grammar.matcher(tokenizer.encode("ab", add_special_tokens=False))
    assert m.is_completed() and not m.is_terminated()
    assert allowed(m, vocab).nonzero().flatten().tolist() == [EOS]
    assert not m.accept(tokenizer.encode("c", add_special_tokens=False)[0])
    assert m.accept(EOS) and m.is_terminated()
    with pytest.raises(RuntimeError, match="terminated"):
        allowed(m, vocab)
    assert not m.accept(EOS)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 6},
        {"type": "string", "minLength": 1},
        {"type": "object", "propertyNames": {"maxLength": 3}},
        {"type": "string"},
    ],
)
def test_json_strings_refuse_raw_control_characters(compiler, tokenizer, vocab, schema):
    # Bounded strings through xgrammar alone would take "\x04" raw (json.loads refuses it).
    grammar = compile_spec(compiler, GuidedSpec.json_schema(schema))
    prefix = '{"' if "propertyNames" in schema else '"'
    m = grammar.matcher(tokenizer.encode(prefix, add_special_tokens=False))
    ok = allowed(m, vocab)
    controls = [
        t for t in range(len(tokenizer)) if any(ord(c) < 0x20 for c in tokenizer.decode([t]))
    ]
    assert controls and not ok[controls].any()
    assert ok[tokenizer.encode("a", add_special_tokens=False)[0]]


def test_replay_after_the_first_token_gives_the_same_masks(compiler, vocab):
    grammar = compile_spec(compiler, GuidedSpec.json_schema(SCHEMA))
    (tokens,) = generate(grammar, vocab, seed=4, runs=1)
    undisturbed = grammar.matcher()
    assert undisturbed.accept(tokens[0])
    # What a decode worker does with the prefill worker's first token.
    replayed = grammar.matcher(tokens[:1])
    for tok in [*tokens[1:], EOS]:
        assert torch.equal(allowed(replayed, vocab), allowed(undisturbed, vocab))
        assert undisturbed.accept(tok) and replayed.accept(tok)
    assert replayed.is_terminated() and undisturbed.is_terminated()


def test_replay_refuses_tokens_outside_the_grammar(compiler, tokenizer):
    grammar = compile_spec(compiler, GuidedSpec("regex", "[0-9]+"))
    digits = tokenizer.encode("12", add_special_tokens=False)
    with pytest.raises(ValueError, match=f"token {EOS} at output position {len(digits) + 1}"):
        grammar.matcher([*digits, EOS, EOS])  # nothing after a stop token


def test_rollback_restores_the_mask(compiler, tokenizer, vocab):
    grammar = compile_spec(compiler, GuidedSpec.json_schema(SCHEMA))
    m = grammar.matcher(tokenizer.encode('{"status": "ok", "active": ', add_special_tokens=False))
    before = allowed(m, vocab)
    assert m.accept(tokenizer.encode("true", add_special_tokens=False)[0])
    assert not torch.equal(allowed(m, vocab), before)
    m.rollback(1)
    assert torch.equal(allowed(m, vocab), before)


@pytest.mark.parametrize(
    "spec, named",
    [
        (GuidedSpec("json_schema", '{"type": "array", "uniqueItems": true}'), "'uniqueItems' at #"),
        (
            GuidedSpec.json_schema({"properties": {"a": {"not": {"type": "integer"}}}}),
            "'not' at #/properties/a",
        ),
        (GuidedSpec.json_schema({"if": {"type": "integer"}, "then": {"minimum": 1}}), "'if'"),
        (GuidedSpec.json_schema({"type": "string", "format": "idn-email"}), "'format'"),
        (GuidedSpec.json_schema({"allOf": [{"minimum": 1}, {"maximum": 3}]}), "'allOf'"),
        (GuidedSpec.json_schema({"$ref": "https://example.com/s.json"}), "'$ref'"),
        (GuidedSpec.json_schema({"type": "frob"}), 'Unsupported type "frob"'),
        (GuidedSpec("json_schema", "{not json"), "not JSON"),
        (GuidedSpec("regex", r"(a)\1"), "Backreference is not supported"),
        (GuidedSpec("regex", "(?<=a)b"), "Lookbehind is not supported"),
        (GuidedSpec("regex", "(abc"), "parenthesis is not closed"),
        (GuidedSpec("choice", "[]"), "non-empty list of strings"),
        (GuidedSpec("choice", "[1, 2]"), "non-empty list of strings"),
        (GuidedSpec("grammar", "root ::= undefined_rule"), "undefined_rule"),
    ],
)
def test_unsupported_or_invalid_specs_raise_value_error(compiler, spec, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        validate_spec(spec)
    with pytest.raises(ValueError, match=re.escape(named)):
        compiler.compile(spec).result(timeout=60)


def test_supported_features_validate():
    validate_spec(GuidedSpec.json_schema(SCHEMA))
    validate_spec(GuidedSpec.json_schema({"allOf": [{"type": "integer"}], "title": "x"}))
    validate_spec(GuidedSpec.json_schema({"type": "string", "format": "date-time"}))
    validate_spec(
        GuidedSpec.json_schema(
            {"$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/n"}}}
        )
    )
    # A property named like an unsupported keyword is a name, not the keyword.
    validate_spec(GuidedSpec.json_schema({"properties": {"not": {"enum": ["x", {"if": 1}]}}}))
    with pytest.raises(ValueError, match="unknown guided decoding kind"):
        GuidedSpec("xml", "<a/>")


def test_compile_cache_returns_the_same_grammar(compiler):
    spec = GuidedSpec.json_schema(SCHEMA)
    first = compiler.compile(spec)
    grammar = first.result(timeout=60)
    # An equal spec built from differently spaced text hits the same entry.
    again = compiler.compile(GuidedSpec.json_schema(json.dumps(SCHEMA, indent=2)))
    assert again is first and again.done() and again.result() is grammar
    other = compiler.compile(GuidedSpec("regex", "[a-z]+")).result(timeout=60)
    assert other is not grammar


def test_specs_are_hashable_wire_pairs():
    spec = GuidedSpec.choice(["a", "b"])
    wire = (spec.kind, spec.spec)  # two protobuf strings
    assert GuidedSpec(*wire) == spec and hash(GuidedSpec(*wire)) == hash(spec)


def test_logits_wider_than_the_compiler_are_refused(compiler, vocab):
    m = compile_spec(compiler, GuidedSpec("regex", "a")).matcher()
    with pytest.raises(ValueError, match="vocab_size"):
        apply_token_masks(torch.zeros(1, vocab + 1), [0], [m])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4], [3, 0, 2, 4, 1], [1, 4]])
def test_cpu_apply_equals_the_library_kernel(dtype, rows):
    gen = torch.Generator().manual_seed(5)
    vocab = 2048 + PAD_COLUMNS  # not a multiple of 32: the last word is partly padding
    logits = torch.randn(5, vocab, generator=gen).to(dtype)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, (vocab + 31) // 32), generator=gen)
    bitmask = bitmask.to(torch.int32)
    ours, theirs = logits.clone(), logits.clone()
    _apply_bitmask_cpu(ours, bitmask, rows)
    xgrammar.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab, indices=rows)
    assert torch.equal(ours, theirs)
    others = [r for r in range(5) if r not in rows]
    assert torch.isinf(ours[rows]).any() and not torch.isinf(ours[others]).any()
