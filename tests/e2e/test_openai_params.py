"""The OpenAI parameters applications send, end to end through the `openai`
client on the 1P+1D and the colocated cluster (tests/e2e/conftest.py): each
gives the same output on both, and the one a single request defines."""

from __future__ import annotations

from engine import SamplingParams
from tests.cluster import ServeCluster
from tests.e2e.api import client, model_name

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
