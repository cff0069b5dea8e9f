"""presence/frequency/repetition penalties, min_tokens and logit_bias: the
batched sampler against a per-request reference on random logits, the engine
against transformers' logits step by step, and SamplingParams validation."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from engine import LLM, SamplingParams
from engine.request import Request
from engine.sampler import adjust_logits_, sample
from tests.engine_checks import assert_engine_clean

VOCAB = 2048
KV = 8 * 2**20


# -- the reference: one request at a time, one token at a time ----------------------------


def reference_row(
    row: torch.Tensor,
    params: SamplingParams,
    prompt: list[int],
    output: list[int],
    eos: list[int],
) -> torch.Tensor:
    """The logits of one request after min_tokens, logit_bias and the
    penalties, in vLLM's order, written as plainly as possible."""
    row = row.float().clone()
    vocab = row.shape[0]
    if len(output) < params.min_tokens:
        for t in [*params.stop_token_ids, *eos]:
            if t < vocab:
                row[t] = -math.inf
    for t, bias in params.logit_bias:
        row[t] += bias
    if params.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            if row[t] > 0:
                row[t] = row[t] / params.repetition_penalty
            else:
                row[t] = row[t] * params.repetition_penalty
    for t, n in Counter(output).items():
        row[t] -= params.frequency_penalty * n + params.presence_penalty
    return row


def assert_argmax_of(ref: torch.Tensor, token: int) -> None:
    """`token` is a maximum of `ref` (within float32 rounding: the batched
    sums may round differently from the reference's, so ties can flip)."""
    best = ref.max()
    if math.isinf(best):
        assert ref[token] == best
    else:
        assert ref[token] >= best - 1e-4 * max(1.0, abs(float(best))), (token, int(ref.argmax()))


# -- the sampler on random logits ---------------------------------------------------------


def finite(lo: float, hi: float) -> st.SearchStrategy[float]:
    # No subnormals: the engine's CPU kernels may leave flush-to-zero set,
    # and hypothesis then cannot draw them.
    return st.floats(lo, hi, allow_subnormal=False)


@st.composite
def request_case(draw: st.DrawFn, vocab: int) -> tuple[SamplingParams, list[int], list[int]]:
    """Params (often with none of the new fields), a prompt and output so far."""
    tok = st.integers(0, vocab - 1)
    penalty = st.one_of(st.just(0.0), finite(-2.0, 2.0))
    plain = draw(st.booleans())
    params = SamplingParams(
        temperature=0.0,
        max_tokens=64,
        presence_penalty=0.0 if plain else draw(penalty),
        frequency_penalty=0.0 if plain else draw(penalty),
        repetition_penalty=1.0 if plain else draw(st.one_of(st.just(1.0), finite(0.1, 3.0))),
        min_tokens=0 if plain else draw(st.integers(0, 12)),
        logit_bias={} if plain else draw(st.dictionaries(tok, finite(-100.0, 100.0), max_size=4)),
        # Some past the logits: the engine never checks stop ids against the vocabulary.
        stop_token_ids=draw(st.lists(st.integers(0, vocab + 3), max_size=3)),
        logprobs=draw(st.sampled_from([None, 0])),
    )
    prompt = draw(st.lists(tok, min_size=1, max_size=12))
    output = draw(st.lists(tok, max_size=12))
    return params, prompt, output


@st.composite
def batch_case(draw: st.DrawFn):
    vocab = draw(st.integers(4, 40))
    cases = draw(st.lists(request_case(vocab), min_size=1, max_size=6))
    eos = draw(st.lists(st.integers(0, vocab - 1), max_size=2))
    seed = draw(st.integers(0, 2**31))
    scale = draw(st.sampled_from([0.5, 3.0, 20.0]))
    return vocab, cases, eos, seed, scale


@settings(max_examples=200, deadline=None)
@given(case=batch_case(), split=st.integers(0, 12))
def test_batched_adjustments_match_the_per_request_reference(case, split):
    vocab, cases, eos, seed, scale = case
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(cases), vocab, generator=gen) * scale
    before = logits.clone()
    # Each request has seen the first `split` of its output on an earlier
    # step, so the cached counts are caught up rather than built at once.
    reqs = []
    for i, (params, prompt, output) in enumerate(cases):
        req = Request(f"r{i}", prompt, params, output_token_ids=output[:split])
        sample(logits[i : i + 1], [req], eos)
        req.output_token_ids.extend(output[split:])
        reqs.append(req)

    got = logits.clone()
    adjust_logits_(got, reqs, eos)
    for i, (params, prompt, output) in enumerate(cases):
        want = reference_row(logits[i], params, prompt, output, eos)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-4)

    results = sample(logits, reqs, eos)
    assert torch.equal(logits, before), "the sampler changed its input"
    raw = torch.log_softmax(logits, dim=-1)
    for i, ((tok, lp), (params, prompt, output)) in enumerate(zip(results, cases, strict=True)):
        assert_argmax_of(reference_row(logits[i], params, prompt, output, eos), tok)
        if params.logprobs is None:
            assert lp is None
        else:  # the raw distribution's, before any adjustment
            assert lp == pytest.approx(float(raw[i, tok]), abs=1e-5)


def test_rows_without_adjustments_are_untouched_and_pay_nothing():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    plain = Request("p", [1, 2], SamplingParams(temperature=0.0), output_token_ids=[5, 5])
    # min_tokens already reached: nothing left to mask.
    done = Request("d", [1], SamplingParams(temperature=0.0, min_tokens=2), output_token_ids=[3, 4])
    penal = Request("f", [7], SamplingParams(temperature=0.0, frequency_penalty=1.0))
    biased = Request("b", [7], SamplingParams(temperature=0.0, logit_bias={9: 50.0}))
    reqs = [plain, done, penal, biased]
    got = logits.clone()
    adjust_logits_(got, reqs)
    assert torch.equal(got[:2], logits[:2])
    toks = [t for t, _ in sample(logits, reqs)]
    assert toks[:3] == logits[:3].argmax(-1).tolist()
    assert toks[3] == 9
    # Only the penalised request keeps per-request tensors.
    assert penal.output_token_counts is not None
    for r in (plain, done, biased):
        assert r.output_token_counts is None and r.seen_token_mask is None


def test_counts_are_rebuilt_when_the_output_shrinks():
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0, repetition_penalty=2.0)
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(2)) * 3
    req = Request("r", [1], params, output_token_ids=[3, 3, 4])
    sample(logits, [req])
    req.output_token_ids = [5]
    got = logits.clone()
    adjust_logits_(got, [req])
    torch.testing.assert_close(got[0], reference_row(logits[0], params, [1], [5], []))


def test_seeded_rows_with_adjustments_depend_on_their_seed_only():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    a = SamplingParams(
        temperature=1.0,
        seed=42,
        presence_penalty=1.5,
        frequency_penalty=0.5,
        repetition_penalty=1.3,
        logit_bias={4: 3.0, 7: -5.0},
    )

    def run(reqs: list[Request], row: int, order: list[int]) -> list[int]:
        draws = []
        for _ in range(30):
            tok = sample(logits[order], reqs)[row][0]
            reqs[row].output_token_ids.append(tok)
            for r in reqs:
                if r is not reqs[row]:
                    r.output_token_ids.append(0)
            draws.append(tok)
        return draws

    first = [Request("a", [1, 4], a), Request("g", [1], SamplingParams(temperature=0.0))]
    second = [
        Request("u", [1], SamplingParams(temperature=1.0, presence_penalty=2.0)),
        Request("x", [2], SamplingParams(temperature=0.7, seed=1)),
        Request("a2", [1, 4], a),
    ]
    assert run(first, 0, [0, 1]) == run(second, 2, [2, 1, 0])
    assert len(set(first[0].output_token_ids)) > 1  # it really samples


def test_logit_bias_shifts_the_sampled_distribution():
    """With temperature 1 the draws follow softmax(logits + bias)."""
    n = 6000
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]]).repeat(n, 1)
    params = SamplingParams(temperature=1.0, logit_bias={1: math.log(3.0), 3: -100.0})
    reqs = [Request(f"r{i}", [0], params) for i in range(n)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        toks = torch.tensor([t for t, _ in sample(logits, reqs)])
    freq = torch.bincount(toks, minlength=4).float() / n
    want = torch.tensor([1.0, 3.0, 1.0, 0.0]) / 5.0
    assert (freq - want).abs().max() < 0.03, freq


# -- the engine against transformers ------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=KV)


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(4, VOCAB) for _ in range(n)]


class ReferenceProcessor(LogitsProcessor):
    """reference_row as a transformers logits processor (batch of one)."""

    def __init__(self, params: SamplingParams, prompt_len: int, eos: list[int]) -> None:
        self.params, self.prompt_len, self.eos = params, prompt_len, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ids = input_ids[0].tolist()
        prompt, out = ids[: self.prompt_len], ids[self.prompt_len :]
        return reference_row(scores[0], self.params, prompt, out, self.eos)[None]


def hf_greedy_with(
    hf, prompt: list[int], params: SamplingParams, eos: list[int], stop_ids: set[int]
) -> list[int]:
    """Greedy decoding, step by step, from transformers' float32 logits
    adjusted by the reference; ends after a token in stop_ids."""
    gen = GenerationConfig(
        do_sample=False,
        max_new_tokens=params.max_tokens,
        eos_token_id=sorted(stop_ids) or None,
        pad_token_id=0,
    )
    processors = LogitsProcessorList([ReferenceProcessor(params, len(prompt), eos)])
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]), generation_config=gen, logits_processor=processors
        )
    return out[0, len(prompt) :].tolist()


PENALTIES = [
    dict(presence_penalty=1.5),
    dict(presence_penalty=-2.0),
    dict(frequency_penalty=0.8),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),
    dict(
        presence_penalty=-0.5,
        frequency_penalty=1.2,
        repetition_penalty=1.3,
        logit_bias={5: 4.0, 6: -3.0},
    ),
    {},  # none: these rows take the plain path in the same batches
]


def test_greedy_with_penalties_matches_transformers(llm, hf):
    rng = random.Random(3)
    prompts = [rand_prompt(rng, n) for n in (4, 9, 17, 6, 30, 11)]
    cases = [
        (prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, **kw))
        for kw in PENALTIES
        for prompt in prompts
    ]
    outs = llm.generate([p for p, _ in cases], [sp for _, sp in cases], use_tqdm=False)
    for i, ((prompt, params), out) in enumerate(zip(cases, outs, strict=True)):
        want = hf_greedy_with(hf, prompt, params, [], set())
        assert out.token_ids == want, f"penalties {PENALTIES[i // len(prompts)]}, prompt {i}"
    # Each setting changed the greedy output of some prompt: each was really tested.
    plain = [o.token_ids for o in outs[-len(prompts) :]]
    for k, kw in enumerate(PENALTIES[:-1]):
        got = [o.token_ids for o in outs[k * len(prompts) : (k + 1) * len(prompts)]]
        assert got != plain, f"{kw} changed nothing"
    assert_engine_clean(llm)


def test_logit_bias_of_100_forces_a_token(llm):
    rng = random.Random(4)
    prompts = [rand_prompt(rng, n) for n in (5, 13)]
    forced = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logit_bias={77: 100})
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts * 2, [forced, forced, plain, plain], use_tqdm=False)
    assert outs[0].token_ids == outs[1].token_ids == [77] * 12
    # Sampling too: +100 leaves every other token with probability ~e^-100.
    hot = SamplingParams(
        temperature=1.5, seed=3, max_tokens=12, ignore_eos=True, logit_bias={77: 100}
    )
    assert llm.generate(prompts[0], hot, use_tqdm=False)[0].token_ids == [77] * 12
    # -100 on the plain first token bans it.
    first = outs[2].token_ids[0]
    banned = SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, logit_bias={first: -100.0}
    )
    assert first not in llm.generate(prompts[0], banned, use_tqdm=False)[0].token_ids
    assert_engine_clean(llm)


def test_min_tokens_holds_back_stop_tokens(llm, hf):
    prompt = rand_prompt(random.Random(6), 10)
    plain = llm.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False
    )[0].token_ids
    stop = plain[2]
    first_stop = plain.index(stop)
    early = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop])
    held = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop], min_tokens=8)
    out_early, out_held = llm.generate([prompt, prompt], [early, held], use_tqdm=False)
    assert out_early.token_ids == plain[: first_stop + 1] and out_early.finish_reason == "stop"
    assert len(out_held.token_ids) >= 8 and stop not in out_held.token_ids[:8]
    eos = list(llm.engine.eos_token_ids)
    want = hf_greedy_with(hf, prompt, held, eos, {stop, *eos})
    assert out_held.token_ids == want


def test_min_tokens_holds_back_eos(llm):
    """EOS pushed to the top by logit_bias: held back for min_tokens tokens,
    then it ends the request."""
    eos = llm.engine.eos_token_ids[0]
    prompt = rand_prompt(random.Random(7), 8)
    pushed = SamplingParams(temperature=0.0, max_tokens=20, logit_bias={eos: 100.0})
    assert llm.generate(prompt, pushed, use_tqdm=False)[0].token_ids == [eos]
    held = SamplingParams(temperature=0.0, max_tokens=20, logit_bias={eos: 100.0}, min_tokens=5)
    out = llm.generate(prompt, held, use_tqdm=False)[0]
    assert len(out.token_ids) == 6 and eos not in out.token_ids[:5]
    assert out.token_ids[5] == eos and out.finish_reason == "stop"
    # As in vLLM, EOS is held back for min_tokens even when it would not stop the request.
    ignoring = SamplingParams(
        temperature=0.0, max_tokens=8, ignore_eos=True, logit_bias={eos: 100.0}, min_tokens=5
    )
    out = llm.generate(prompt, ignoring, use_tqdm=False)[0]
    assert eos not in out.token_ids[:5] and out.token_ids[5:] == [eos] * 3
    assert_engine_clean(llm)


SEEDED = SamplingParams(
    temperature=0.9,
    top_p=0.95,
    seed=99,
    max_tokens=32,
    ignore_eos=True,
    presence_penalty=0.7,
    frequency_penalty=0.4,
    repetition_penalty=1.2,
    logit_bias={11: 2.0},
    min_tokens=4,
)


def test_seeded_sampling_with_penalties_is_reproducible(llm, tiny_llama):
    rng = random.Random(8)
    probe = rand_prompt(rng, 12)
    alone = llm.generate(probe, SEEDED, use_tqdm=False)[0].token_ids
    assert len(alone) == 32
    others = [rand_prompt(rng, rng.randrange(10, 40)) for _ in range(12)]
    mixed = [
        SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, frequency_penalty=1.0),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=5, max_tokens=45, ignore_eos=True),
    ] * 4
    outs = llm.generate([probe, *others, probe], [SEEDED, *mixed, SEEDED], use_tqdm=False)
    assert outs[0].token_ids == alone and outs[-1].token_ids == alone
    # Preempted and recomputed, with the counts kept on the request: the same tokens.
    kv_per_block = llm.engine.model_config.kv_elements_per_token * 4 * 16
    starved = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=10 * kv_per_block)
    prompts = [*others[:3], probe, *others[3:]]
    outs = starved.generate(prompts, [*mixed[:3], SEEDED, *mixed[3:]], use_tqdm=False)
    assert outs[3].token_ids == alone
    assert outs[3].num_preemptions > 0, "the probe was never preempted: nothing tested"
    assert_engine_clean(starved)


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(presence_penalty=2.5), "presence_penalty must be in"),
        (dict(presence_penalty=-2.01), "presence_penalty must be in"),
        (dict(presence_penalty=float("nan")), "presence_penalty must be in"),
        (dict(frequency_penalty=3), "frequency_penalty must be in"),
        (dict(frequency_penalty="1"), "frequency_penalty must be in"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be > 0"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be > 0"),
        (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
        (dict(min_tokens=1.5), "min_tokens must be an integer >= 0"),
        (dict(logit_bias={5: 100.5}), "logit_bias values must be in"),
        (dict(logit_bias={5: float("nan")}), "logit_bias values must be in"),
        (dict(logit_bias={5: "1"}), "logit_bias values must be in"),
        (dict(logit_bias={"5": 1.0}), "logit_bias keys must be token ids"),
        (dict(logit_bias={-1: 1.0}), "logit_bias keys must be token ids"),
        (dict(logit_bias=[1, 2]), "logit_bias must map token ids to biases"),
    ],
    ids=lambda v: ",".join(f"{k}={x!r}" for k, x in v.items()) if isinstance(v, dict) else "",
)
def test_bad_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_good_values_and_logit_bias_normalised():
    p = SamplingParams(logit_bias={9: 1, 3: -100.0, 5: 100})
    assert p.logit_bias == ((3, -100.0), (5, 100.0), (9, 1.0))
    assert all(isinstance(b, float) for _, b in p.logit_bias)
    # Same mapping in another order or as pairs: equal, hashable params.
    q = SamplingParams(logit_bias=[(5, 100.0), (9, 1.0), (3, -100.0)])
    assert p == q and hash(p) == hash(q)
    assert SamplingParams(logit_bias=None).logit_bias == ()
    edges = SamplingParams(
        presence_penalty=-2.0, frequency_penalty=2, repetition_penalty=1e-3, min_tokens=0
    )
    assert edges.penalizes
    assert not SamplingParams().penalizes
    # min_tokens beyond max_tokens is allowed: max_tokens ends the request first.
    assert SamplingParams(max_tokens=2, min_tokens=5).min_tokens == 5


def test_engine_rejects_logit_bias_ids_past_the_vocabulary(llm):
    bad = SamplingParams(max_tokens=4, logit_bias={VOCAB: 1.0, 3: 1.0})
    with pytest.raises(ValueError, match=rf"logit_bias token ids must be in \[0, {VOCAB}\)"):
        llm.generate([1, 2, 3], bad, use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.engine.make_request("hello", bad)
    assert_engine_clean(llm)
