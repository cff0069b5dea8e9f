"""The OpenAI parameters applications send, end to end through the `openai`
client on the 1P+1D and the colocated cluster (tests/e2e/conftest.py): each
gives the same output on both, and the one a single request defines."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from engine import SamplingParams
from tests.cluster import ServeCluster
from tests.e2e.api import client, model_name
from tests.unit.test_structured_output import SCHEMA

PROMPT = "The quick brown fox jumps over"
SAMPLED = {"temperature": 0.9, "top_p": 0.95}


def completion(cluster: ServeCluster, **kw):
    kw.setdefault("max_tokens", 12)
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    return client(cluster).completions.create(
        model=model_name(cluster), prompt=kw.pop("prompt", PROMPT), extra_body=extra, **kw
    )


def test_n_choices_are_the_seeded_requests_seed_plus_i(disagg, colocated):
    """n = 3 with a seed: choice i is what a single request with seed + i
    gives, on both clusters; usage counts the prompt once and every token."""
    singles = [completion(disagg, seed=40 + i, **SAMPLED).choices[0].text for i in range(3)]
    assert len(set(singles)) == 3  # the seeds really differ
    for cluster in (disagg, colocated):
        r = completion(cluster, n=3, seed=40, **SAMPLED)
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert [c.text for c in r.choices] == singles
        assert r.usage.completion_tokens == 3 * 12
        assert r.usage.prompt_tokens == completion(cluster, max_tokens=1).usage.prompt_tokens


def test_n_choices_compute_the_prompt_once(disagg, colocated):
    """The first choice computes the prompt; the others find its full blocks
    in the prefix cache (on the prefill worker, and on the decode worker, which
    then receives only the last block): each choice's final chunk says so."""
    prompt = " ".join(["a dog ran around the park, then it sat down"] * 8)  # this test's own
    for cluster in (disagg, colocated):
        stream = completion(cluster, prompt=prompt, n=3, seed=1, stream=True, **SAMPLED)
        timings = {}
        for chunk in stream:
            extra = chunk.model_extra or {}
            if "splitserve_timings" in extra:
                timings[chunk.choices[0].index] = extra["splitserve_timings"]
        assert sorted(timings) == [0, 1, 2]
        assert timings[0]["cached_tokens"] == 0
        for i in (1, 2):
            assert timings[i]["cached_tokens"] >= 64, timings[i]
            if cluster is disagg:
                assert timings[i]["decode_cached_tokens"] >= 64, timings[i]
                assert timings[i]["kv_transfer_bytes"] < timings[0]["kv_transfer_bytes"]


def test_n_choices_stream_interleaved_and_add_up_to_the_whole(disagg, colocated):
    for cluster in (disagg, colocated):
        whole = client(cluster).chat.completions.create(
            model=model_name(cluster),
            messages=[{"role": "user", "content": "Tell me a story"}],
            max_tokens=10,
            n=2,
            seed=7,
            extra_body={"ignore_eos": True},
            **SAMPLED,
        )
        stream = client(cluster).chat.completions.create(
            model=model_name(cluster),
            messages=[{"role": "user", "content": "Tell me a story"}],
            max_tokens=10,
            n=2,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            **SAMPLED,
        )
        texts, finishes, usage = ["", ""], [None, None], None
        for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                finishes[c.index] = c.finish_reason or finishes[c.index]
        assert texts == [c.message.content for c in whole.choices]
        assert finishes == ["length", "length"]
        assert usage is not None and usage.completion_tokens == 20


def test_best_of_answers_the_likeliest_of_its_choices(disagg, colocated):
    """best_of = 3, n = 1: the choice with the highest cumulative logprob of
    the three that n = 3 gives (same seeds), whose tokens all count in usage."""
    three = completion(disagg, n=3, seed=5, logprobs=0, **SAMPLED)
    scores = [sum(c.logprobs.token_logprobs) for c in three.choices]
    want = three.choices[scores.index(max(scores))].text
    for cluster in (disagg, colocated):
        r = completion(cluster, best_of=3, seed=5, **SAMPLED)
        assert [c.text for c in r.choices] == [want]
        assert r.choices[0].logprobs is None  # not asked for
        assert r.usage.completion_tokens == 3 * 12


def test_penalties_and_logit_bias_equal_the_offline_engine(disagg, colocated, offline):
    """Penalties and a logit bias cross the wire (to the prefill worker, which
    samples the first token, and to the decode worker) and give what the
    offline engine gives."""
    kw = {
        "presence_penalty": 0.8,
        "frequency_penalty": 0.6,
        "logit_bias": {"17": 4.0, "42": -100.0},
        "extra_body": {"repetition_penalty": 1.3},
    }
    want = offline.generate(
        [PROMPT],
        SamplingParams(
            temperature=0,
            max_tokens=24,
            ignore_eos=True,
            presence_penalty=0.8,
            frequency_penalty=0.6,
            repetition_penalty=1.3,
            logit_bias={17: 4.0, 42: -100.0},
        ),
        use_tqdm=False,
    )[0]
    plain = completion(disagg, max_tokens=24, temperature=0).choices[0].text
    assert want.text != plain  # the parameters change the output
    for cluster in (disagg, colocated):
        assert completion(cluster, max_tokens=24, temperature=0, **kw).choices[0].text == want.text


def test_min_tokens_holds_back_eos(disagg, colocated, offline):
    """EOS biased to the top: it ends the output at once, unless min_tokens
    masks it for that many tokens."""
    eos = offline.engine.eos_token_ids[0]
    bias = {str(eos): 100.0}
    for cluster in (disagg, colocated):
        eos_ends = {"ignore_eos": False}
        r = completion(cluster, max_tokens=20, temperature=0, logit_bias=bias, extra_body=eos_ends)
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
        r = completion(
            cluster,
            max_tokens=20,
            temperature=0,
            logit_bias=bias,
            extra_body={"min_tokens": 6, **eos_ends},
        )
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 7


def test_json_schema_response_format_is_followed_and_equal_on_both(disagg, colocated):
    """The prefill worker samples the first token under the grammar; the
    decode worker rebuilds the grammar's state from it: the documents are the
    colocated cluster's, and each validates."""
    fmt = {"type": "json_schema", "json_schema": {"name": "service", "schema": SCHEMA}}
    texts = {}
    for cluster in (disagg, colocated):
        texts[cluster.url] = []
        for seed in range(4):
            r = client(cluster).chat.completions.create(
                model=model_name(cluster),
                messages=[{"role": "user", "content": "Describe the service"}],
                max_tokens=200,
                response_format=fmt,
                seed=seed,
                temperature=1.0,
            )
            text = r.choices[0].message.content
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(text), SCHEMA)
            texts[cluster.url].append(text)
    assert texts[disagg.url] == texts[colocated.url]


def test_guided_choice_and_regex(disagg, colocated):
    for cluster in (disagg, colocated):
        r = completion(
            cluster, max_tokens=20, seed=3, extra_body={"guided_choice": ["red", "green"]}
        )
        assert r.choices[0].text in ("red", "green")
        r = completion(cluster, max_tokens=20, seed=3, extra_body={"guided_regex": "[a-c]{4}!"})
        assert re.fullmatch("[a-c]{4}!", r.choices[0].text)


def test_an_unsupported_schema_feature_is_a_400_naming_it(disagg):
    bad = {"type": "object", "properties": {"a": {"type": "string", "not": {"const": "x"}}}}
    with pytest.raises(openai.BadRequestError, match="'not'"):
        completion(disagg, extra_body={"guided_json": bad})
    both = {"guided_regex": "a+", "guided_choice": ["a"]}
    with pytest.raises(openai.BadRequestError, match="guided_choice and guided_regex"):
        completion(disagg, extra_body=both)


def _chat(cluster: ServeCluster, messages, **kw):
    return client(cluster).chat.completions.create(
        model=model_name(cluster), messages=messages, extra_body={"ignore_eos": True}, **kw
    )


def test_top_logprobs_equal_on_both_clusters_and_the_offline_engine(disagg, colocated, offline):
    """logprobs = 3 (completions: the sampled token, then the 3 likeliest) and
    top_logprobs = 3 (chat: the 3 likeliest), whole and streamed: the offline
    engine's alternatives, the first token's from the prefill worker."""
    tok = offline.tokenizer
    text = lambda t: tok.decode([t], skip_special_tokens=False)  # noqa: E731
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    messages = [{"role": "user", "content": "Tell me a story"}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    outs = offline.generate([PROMPT, chat_ids], params, use_tqdm=False)
    want_completion, want_chat = [], []
    for tokens, lps, tops, into in (
        (outs[0].token_ids, outs[0].logprobs, outs[0].top_logprobs, want_completion),
        (outs[1].token_ids, outs[1].logprobs, outs[1].top_logprobs, want_chat),
    ):
        for token, lp, top in zip(tokens, lps or [], tops or [], strict=True):
            alternatives = [(text(t), alt) for t, alt in top]
            into.append(((text(token), lp), alternatives))

    def completion_entry(sampled, alternatives):
        entry = dict([sampled])
        for key, lp in alternatives:
            entry.setdefault(key, lp)
        return list(entry.items())

    want = [completion_entry(*w) for w in want_completion]
    want_alts = [alternatives for _, alternatives in want_chat]
    for cluster in (disagg, colocated):
        kw = {"max_tokens": 8, "temperature": 0}
        whole = completion(cluster, logprobs=3, **kw).choices[0].logprobs
        streamed = [
            entry
            for chunk in completion(cluster, logprobs=3, stream=True, **kw)
            for c in chunk.choices
            if c.logprobs is not None
            for entry in c.logprobs.top_logprobs
        ]
        assert whole.tokens == [sampled[0] for sampled, _ in want_completion]
        for got in (whole.top_logprobs, streamed):
            got_items = [list(entry.items()) for entry in got]
            assert [[k for k, _ in e] for e in got_items] == [[k for k, _ in e] for e in want]
            for g, w in zip(got_items, want, strict=True):
                assert [lp for _, lp in g] == pytest.approx([lp for _, lp in w], abs=1e-4)

        content = _chat(cluster, messages, logprobs=True, top_logprobs=3, **kw)
        content = content.choices[0].logprobs.content
        streamed_content = [
            entry
            for chunk in _chat(cluster, messages, logprobs=True, top_logprobs=3, stream=True, **kw)
            for c in chunk.choices
            if c.logprobs is not None
            for entry in c.logprobs.content
        ]
        for got in (content, streamed_content):
            alts = [[(a.token, a.logprob) for a in entry.top_logprobs] for entry in got]
            assert [[t for t, _ in a] for a in alts] == [[t for t, _ in a] for a in want_alts]
            for g, w in zip(alts, want_alts, strict=True):
                assert [lp for _, lp in g] == pytest.approx([lp for _, lp in w], abs=1e-4)
            assert all(a.bytes == list(a.token.encode()) for e in got for a in e.top_logprobs)


def test_echo_starts_each_choice_with_the_prompt(disagg, colocated, offline):
    """echo: the prompt's text (a token prompt decoded), then the output;
    streamed, the prompt comes in the first chunk; n and best_of echo too."""
    plain = completion(disagg, temperature=0).choices[0].text
    ids = offline.tokenizer.encode(PROMPT)
    for cluster in (disagg, colocated):
        r = completion(cluster, temperature=0, echo=True, n=2)
        assert [c.text for c in r.choices] == [PROMPT + plain] * 2
        r = completion(cluster, prompt=ids, temperature=0, echo=True)
        assert r.choices[0].text == offline.tokenizer.decode(ids) + plain
        chunks = [
            c.text
            for chunk in completion(cluster, temperature=0, echo=True, stream=True)
            for c in chunk.choices
        ]
        assert chunks[0].startswith(PROMPT) and "".join(chunks) == PROMPT + plain
    r = completion(disagg, best_of=2, echo=True, **SAMPLED)
    assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].text) > len(PROMPT)


def test_echo_with_logprobs_scores_the_prompt(disagg, colocated, offline):
    """echo + logprobs = 2: the prompt's tokens come first in logprobs (the
    first without a logprob), scored as the offline engine scores them
    (prompt_logprobs), then the output's, offsets running on over the whole
    text; streamed, the prompt's entries come in the first chunk; every
    choice of n = 2 carries them."""
    tok = offline.tokenizer
    ids = tok.encode(PROMPT)
    params = SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=2
    )
    want = offline.generate(PROMPT, params)[0]
    assert want.prompt_top_logprobs is not None and want.top_logprobs is not None
    assert want.prompt_logprobs is not None and want.logprobs is not None

    def text(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    want_ids = ids + want.token_ids
    want_lps = [*want.prompt_logprobs[1:], *want.logprobs]
    tops = [*want.prompt_top_logprobs[1:], *want.top_logprobs]
    want_keys = [
        list(dict.fromkeys([text(t), *(text(alt) for alt, _ in top)]))
        for t, top in zip(want_ids[1:], tops, strict=True)
    ]
    kw = {"max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 2}
    for cluster in (disagg, colocated):
        r = completion(cluster, n=2, **kw)
        assert r.choices[0].logprobs == r.choices[1].logprobs
        assert r.choices[0].text == PROMPT + want.text
        lp = r.choices[0].logprobs
        assert lp.tokens == [text(t) for t in want_ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(want_lps, abs=1e-4)
        assert [list(top) for top in lp.top_logprobs[1:]] == want_keys
        assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(PROMPT)
        assert lp.text_offset == sorted(lp.text_offset)
        chunks = list(completion(cluster, stream=True, **kw))
        first = chunks[0].choices[0]
        assert first.text.startswith(PROMPT) and len(first.logprobs.tokens) >= len(ids)
        streamed = [c.logprobs for chunk in chunks for c in chunk.choices if c.logprobs]
        assert [t for s in streamed for t in s.tokens] == lp.tokens
        assert [o for s in streamed for o in s.text_offset] == lp.text_offset
        assert [x for s in streamed for x in s.token_logprobs] == lp.token_logprobs


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
    {"role": "user", "content": "And Paris?"},
]


def chat(cluster: ServeCluster, **kw):
    kw.setdefault("max_tokens", 200)
    return client(cluster).chat.completions.create(
        model=model_name(cluster), messages=HISTORY, tools=[WEATHER_TOOL], **kw
    )


def test_forced_tool_calls_follow_the_tools_schema(disagg, colocated):
    """tool_choice "required" and a named function: the answer is a call whose
    arguments validate against the tool's parameters, the same on both."""
    schema = WEATHER_TOOL["function"]["parameters"]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        got = []
        for cluster in (disagg, colocated):
            r = chat(cluster, tool_choice=choice, seed=11, temperature=1.0)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls" and c.message.content is None
            (call,) = c.message.tool_calls
            assert call.id.startswith("call_") and call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), schema)
            got.append(call.function.arguments)
        assert got[0] == got[1]


def test_auto_tool_calls_are_parsed_streamed_and_not(disagg, colocated):
    """The random model is steered (by a regex) to write a Hermes call: the
    hermes parser turns it into tool_calls, whole and streamed alike."""
    call = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}</tool_call>'
    )
    steer = {"guided_regex": "Sure\\. " + re.escape(call)}
    for cluster in (disagg, colocated):
        r = chat(cluster, extra_body=steer)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content == "Sure."
        assert [
            (t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls
        ] == [("get_weather", {"city": "Paris", "days": 2})]
        content, calls, finish = "", [], None
        for chunk in chat(cluster, extra_body=steer, stream=True):
            for ch in chunk.choices:
                content += ch.delta.content or ""
                calls += ch.delta.tool_calls or []
                finish = ch.finish_reason or finish
        assert content == "Sure. " and finish == "tool_calls"
        assert [(t.function.name, t.function.arguments) for t in calls] == [
            (t.function.name, t.function.arguments) for t in c.message.tool_calls
        ]
        # tool_choice "none": the tools are not offered and nothing is parsed.
        r = chat(cluster, extra_body=steer, tool_choice="none")
        assert r.choices[0].message.tool_calls is None and call in r.choices[0].message.content
