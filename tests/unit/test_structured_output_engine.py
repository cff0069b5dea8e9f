"""Structured output in the engine: the tiny random-weight model, confined by
a grammar, produces documents that parse and validate; a grammar changes
nothing for the requests beside it; the output stops at the grammar's end
even with ignore_eos; a spec the library refuses is a ValueError at once."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.sampling_params import GuidedSpec
from tests.unit.test_structured_output import SCHEMA


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=8 << 20)


def guided(spec: GuidedSpec, **kw) -> SamplingParams:
    kw = {"temperature": 1.0, "max_tokens": 200, "ignore_eos": True, **kw}
    return SamplingParams(structured_output=spec, **kw)


def test_json_schema_outputs_parse_and_validate(llm):
    """50 seeded requests in one batch: each a document of the schema, ended
    by the grammar (finish "stop") although ignore_eos is set."""
    spec = GuidedSpec.json_schema(SCHEMA)
    params = [guided(spec, seed=s) for s in range(50)]
    outs = llm.generate(["Describe the service:"] * 50, params, use_tqdm=False)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs}) > 10  # sampled, not one fixed document


def test_regex_choice_and_json_object(llm):
    outs = llm.generate(
        ["a", "b", "c"],
        [
            guided(GuidedSpec("regex", r"[0-9]{3}-[a-z]{2,4}"), seed=1),
            guided(GuidedSpec.choice(["yes", "no", "maybe so"]), seed=2),
            guided(GuidedSpec("json_object"), seed=3, temperature=0.0),
        ],
        use_tqdm=False,
    )
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", outs[0].text)
    assert outs[1].text in ("yes", "no", "maybe so")
    assert outs[2].finish_reason == "length" or isinstance(json.loads(outs[2].text), dict)


def test_a_guided_request_leaves_its_neighbours_unchanged(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["Once upon a time"], plain, use_tqdm=False)[0].token_ids
    beside = llm.generate(
        ["Once upon a time", "Describe the service:"],
        [plain, guided(GuidedSpec.json_schema(SCHEMA), seed=4)],
        use_tqdm=False,
    )
    assert beside[0].token_ids == alone


def test_seeded_guided_sampling_is_reproducible(llm):
    params = guided(GuidedSpec.json_schema(SCHEMA), seed=9)
    a = llm.generate(["x"], params, use_tqdm=False)[0].text
    b = llm.generate(["x", "y"], [params, guided(GuidedSpec("json_object"), seed=1)])[0].text
    assert a == b


def test_an_unsupported_schema_feature_is_refused_by_name(llm):
    spec = GuidedSpec.json_schema({"type": "object", "properties": {"a": {"not": {}}}})
    with pytest.raises(ValueError, match="'not'"):
        llm.generate(["x"], guided(spec), use_tqdm=False)
    with pytest.raises(ValueError, match="min_tokens"):
        guided(GuidedSpec("json_object"), min_tokens=3)
