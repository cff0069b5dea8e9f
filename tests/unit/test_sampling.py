"""Sampling through LLM.generate: seeds, greedy equivalences, logprobs, top-k/top-p,
and SamplingParams validation."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.request import Request
from engine.sampler import _apply_top_k_top_p, sample
from tests.engine_checks import assert_engine_clean

VOCAB = 2048
KV = 8 * 2**20


def rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(4, VOCAB) for _ in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=KV)


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


PROBE = rand_prompt(random.Random(11), 12)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=40, ignore_eos=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def mixed_batch(probe_positions: tuple[int, ...]) -> tuple[list[list[int]], list[SamplingParams]]:
    """16 requests: greedy, unseeded random, other seeds, with the probe at the given slots."""
    rng = random.Random(5)
    prompts, params = [], []
    for i in range(16):
        if i in probe_positions:
            prompts.append(PROBE)
            params.append(SEEDED)
            continue
        prompts.append(rand_prompt(rng, rng.randrange(1, 40)))
        kind = i % 3
        mt = rng.randrange(8, 48)
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=mt, ignore_eos=True))
        elif kind == 1:
            params.append(SamplingParams(temperature=1.0, top_k=50, max_tokens=mt, ignore_eos=True))
        else:
            params.append(
                SamplingParams(
                    temperature=1.2, top_p=0.7, seed=100 + i, max_tokens=mt, ignore_eos=True
                )
            )
    return prompts, params


def test_seeded_request_is_reproducible_whatever_the_batch(llm, tiny_llama):
    alone = llm.generate(PROBE, SEEDED, use_tqdm=False)[0].token_ids
    assert len(alone) == 40

    prompts, params = mixed_batch(probe_positions=(6, 13))
    outs = llm.generate(prompts, params, use_tqdm=False)
    # Twice in one batch, each copy with its own generator: both equal the lone run.
    assert outs[6].token_ids == alone
    assert outs[13].token_ids == alone
    assert_engine_clean(llm)

    other = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=KV)
    assert other.generate(PROBE, SEEDED, use_tqdm=False)[0].token_ids == alone


def test_seeded_request_survives_preemption(tiny_llama, llm):
    """Preempted and recomputed, a seeded request still draws the same tokens."""
    alone = llm.generate(PROBE, SEEDED, use_tqdm=False)[0].token_ids
    prompts, params = mixed_batch(probe_positions=(15,))
    kv_per_block = llm.engine.model_config.kv_elements_per_token * 4 * 16
    starved = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=10 * kv_per_block)
    assert starved.engine.block_pool.num_blocks == 10
    outs = starved.generate(prompts, params, use_tqdm=False)
    assert outs[15].num_preemptions > 0, "the probe was never preempted: nothing tested"
    assert outs[15].token_ids == alone
    assert_engine_clean(starved)


def test_different_seeds_differ_and_unseeded_differs_from_greedy(llm):
    seeds = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=s, max_tokens=40, ignore_eos=True)
        for s in (1234, 1235, 7)
    ]
    unseeded = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=40, ignore_eos=True)
    outs = llm.generate([PROBE] * 6, [*seeds, GREEDY, unseeded, unseeded], use_tqdm=False)
    ids = [tuple(o.token_ids) for o in outs]
    assert len(set(ids[:3])) == 3, "different seeds gave the same 40 tokens"
    greedy = ids[3]
    assert greedy not in ids[:3]
    assert ids[4] != greedy and ids[5] != greedy
    assert ids[4] != ids[5], "two unseeded requests drew the same 40 tokens"
    for t in ids:
        assert len(t) == 40 and all(0 <= x < VOCAB for x in t)


def test_top_k_1_and_temperature_0_are_greedy(llm):
    rng = random.Random(21)
    prompts = [rand_prompt(rng, n) for n in (3, 17, 30)]
    greedy = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    variants = [
        SamplingParams(temperature=1.0, top_k=1, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=5.0, top_k=1, seed=3, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.0, top_p=0.3, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.0, top_k=5, top_p=0.5, seed=9, max_tokens=40, ignore_eos=True),
    ]
    # All in one batch with a genuinely random request, so the mixed sampling path runs.
    random_row = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)
    batch_prompts = [p for p in prompts for _ in variants] + [prompts[0]]
    batch_params = [v for _ in prompts for v in variants] + [random_row]
    outs = llm.generate(batch_prompts, batch_params, use_tqdm=False)
    for i, out in enumerate(outs[:-1]):
        assert out.token_ids == greedy[i // len(variants)], f"variant {i % len(variants)}"


def teacher_forced_logprobs(hf, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at each generated position: [len(generated), vocab]."""
    ids = torch.tensor([prompt + generated])
    with torch.inference_mode():
        logits = hf(ids).logits[0].float()
    n = len(prompt)
    return torch.log_softmax(logits[n - 1 : n - 1 + len(generated)], dim=-1)


def test_logprobs_match_transformers(llm, hf):
    rng = random.Random(8)
    prompts = [rand_prompt(rng, n) for n in (5, 23)]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    # A random request's logprobs are of the unmodified distribution (no temperature/top-p).
    sampled = SamplingParams(
        temperature=1.5, top_p=0.8, seed=4, max_tokens=24, ignore_eos=True, logprobs=0
    )
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(
        [*prompts, prompts[0], prompts[1]], [greedy, greedy, sampled, plain], use_tqdm=False
    )
    for prompt, out in zip([*prompts, prompts[0]], outs[:3], strict=True):
        assert out.logprobs is not None
        assert len(out.logprobs) == len(out.token_ids) == 24
        assert all(isinstance(x, float) and x <= 0.0 for x in out.logprobs)
        ref = teacher_forced_logprobs(hf, prompt, out.token_ids)
        want = ref.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-4, rtol=0)
    # Greedy tokens are the argmax, so their logprob is the row maximum.
    for prompt, out in zip(prompts, outs[:2], strict=True):
        ref = teacher_forced_logprobs(hf, prompt, out.token_ids)
        assert ref.argmax(-1).tolist() == out.token_ids
    assert outs[3].logprobs is None
    assert llm.generate(prompts[0], plain, use_tqdm=False)[0].logprobs is None


def test_top_logprobs_are_transformers_top_k(llm, hf):
    """logprobs = N: at each position the N most likely tokens of the raw
    distribution, most likely first, whatever the sampling or the batch (rows
    asking for 0, 2 or 5 alternatives, a penalized row, a greedy plain one)."""
    rng = random.Random(9)
    prompts = [rand_prompt(rng, n) for n in (4, 19, 30, 7)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=5),
        SamplingParams(temperature=1.3, seed=3, max_tokens=10, ignore_eos=True, logprobs=2),
        SamplingParams(
            temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3, presence_penalty=1.5
        ),
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0),
    ]
    outs = llm.generate([*prompts, prompts[0]], [*params, GREEDY], use_tqdm=False)
    for prompt, p, out in zip(prompts, params, outs[:4], strict=True):
        assert out.top_logprobs is not None and len(out.top_logprobs) == len(out.token_ids)
        ref = teacher_forced_logprobs(hf, prompt, out.token_ids)
        want_lp, want_ids = torch.topk(ref, p.logprobs or 1, dim=-1)
        for pos, top in enumerate(out.top_logprobs):
            if not p.logprobs:
                assert top == []
                continue
            assert [t for t, _ in top] == want_ids[pos].tolist(), f"position {pos}"
            got = torch.tensor([lp for _, lp in top])
            torch.testing.assert_close(got, want_lp[pos], atol=1e-3, rtol=0)
    assert outs[4].logprobs is None and outs[4].top_logprobs is None
    assert outs[0].top_logprobs is not None
    # Greedy: the chosen token is the first alternative, with the same logprob.
    assert [top[0] for top in outs[0].top_logprobs] == list(
        zip(outs[0].token_ids, outs[0].logprobs or [], strict=True)
    )


# -- the sampler itself, on hand-made logits ------------------------------------------------


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5]] * 5)
    out = _apply_top_k_top_p(logits, [1, 2, 3, 0, -1], [1.0] * 5)
    assert kept(out) == [[1], [1, 5], [1, 3, 5], list(range(6)), list(range(6))]
    # Survivors keep their values, in their original positions.
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], logits[finite])
    # k >= vocab keeps everything.
    assert kept(_apply_top_k_top_p(logits[:1], [6], [1.0])) == [list(range(6))]
    assert kept(_apply_top_k_top_p(logits[:1], [100], [1.0])) == [list(range(6))]


def test_top_k_keeps_exactly_k_among_ties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert len(kept(_apply_top_k_top_p(logits, [2], [1.0]))[0]) == 2


def test_top_p_keeps_the_minimal_prefix_reaching_p():
    # Token order by probability: 2 (0.5), 0 (0.25), 3 (0.15), 1 (0.1).
    row = logits_of([0.25, 0.1, 0.5, 0.15])
    cases = {
        0.3: [2],  # 0.5 alone reaches 0.3
        0.5 - 1e-3: [2],
        0.6: [0, 2],  # 0.5 < 0.6 <= 0.75
        0.8: [0, 2, 3],  # 0.75 < 0.8 <= 0.9
        0.95: [0, 1, 2, 3],
        1.0: [0, 1, 2, 3],
    }
    ps = list(cases)
    out = _apply_top_k_top_p(row.repeat(len(ps), 1), [0] * len(ps), ps)
    assert kept(out) == list(cases.values())


def test_top_p_is_applied_to_the_top_k_renormalised_distribution():
    # top_k=2 leaves 0.4 and 0.3, renormalised to 4/7 and 3/7: p=0.5 keeps only the first.
    row = logits_of([0.4, 0.3, 0.2, 0.1])
    out = _apply_top_k_top_p(row.repeat(2, 1), [2, 0], [0.5, 0.5])
    assert kept(out) == [[0], [0, 1]]


def test_the_top_token_always_survives():
    # One dominant token: any top_p, however small, and any top_k keep it.
    row = torch.tensor([[-3.0, 8.0, 0.0, 1.0]])
    for k in (0, 1, 2, -1):
        for p in (1e-6, 0.01, 0.5, 1.0):
            assert 1 in kept(_apply_top_k_top_p(row, [k], [p]))[0]
    # Even with a flat distribution, top_p tiny keeps exactly one token.
    flat = torch.zeros(1, 8)
    assert len(kept(_apply_top_k_top_p(flat, [0], [1e-6]))[0]) == 1


def requests_for(params: SamplingParams, n: int) -> list[Request]:
    return [Request(f"r{i}", [1], params) for i in range(n)]


def test_sampled_frequencies_follow_the_filtered_distribution():
    """The exponential race draws from softmax(logits / T) after top-k/top-p."""
    n = 6000
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = logits_of(probs).repeat(n, 1)
    with torch.random.fork_rng(devices=[]):  # unseeded rows use the global RNG
        torch.manual_seed(0)
        # top_p 0.9 drops the 0.05 token; the rest renormalise over 0.95.
        reqs = requests_for(SamplingParams(temperature=1.0, top_p=0.9), n)
        toks = torch.tensor([t for t, _ in sample(logits, reqs)])
        freq = torch.bincount(toks, minlength=4).float() / n
        assert freq[3] == 0
        want = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
        assert (freq - want).abs().max() < 0.03, freq

        # Temperature 0.5 squares the probabilities before renormalising.
        reqs = requests_for(SamplingParams(temperature=0.5), n)
        toks = torch.tensor([t for t, _ in sample(logits, reqs)])
        freq = torch.bincount(toks, minlength=4).float() / n
        sq = torch.tensor(probs) ** 2
        assert (freq - sq / sq.sum()).abs().max() < 0.03, freq


def test_seeded_sampler_rows_depend_on_their_seed_only():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    a = SamplingParams(temperature=1.0, seed=42)
    first = [
        Request("a", [1], a),
        Request("g", [1], SamplingParams(temperature=0.0)),
        Request("u", [1], SamplingParams(temperature=1.0)),
    ]
    second = [
        Request("x", [1], SamplingParams(temperature=0.7, seed=1)),
        Request("y", [1], SamplingParams(temperature=1.0)),
        Request("a2", [1], a),
    ]
    draws_first, draws_second = [], []
    for _ in range(20):
        draws_first.append(sample(logits, first)[0][0])
        draws_second.append(sample(logits[[2, 1, 0]], second)[2][0])
    assert draws_first == draws_second
    assert len(set(draws_first)) > 1  # it really samples


# -- SamplingParams validation ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1.0),
        dict(temperature=float("nan")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=float("nan")),
        dict(top_k=-2),
        dict(max_tokens=0),
        dict(max_tokens=1.5),
        dict(max_tokens=-3),
        dict(stop=[""]),
        dict(stop=["ok", ""]),
        dict(stop_token_ids=[-1]),
        dict(logprobs=-1),
        dict(prompt_logprobs=-1),
        dict(prompt_logprobs=21),
        dict(prompt_logprobs=1.5),
    ],
    ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_bad_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_and_accept_good_values():
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[5, 6]).stop_token_ids == (5, 6)
    assert SamplingParams(stop=None).stop == ()
    p = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_tokens=1, logprobs=0)
    assert p.greedy and p.max_tokens == 1
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    assert SamplingParams(prompt_logprobs=20).prompt_logprobs == 20
    assert not SamplingParams(temperature=1e-3).greedy
    assert SamplingParams(stop=["ab", "abcd"]).max_stop_len == 4
    with pytest.raises((AttributeError, TypeError)):
        p.temperature = 1.0  # type: ignore[misc]
    assert math.isclose(SamplingParams(top_p=1e-9).top_p, 1e-9)


def test_unseeded_draws_never_take_a_token_of_probability_zero():
    """The inverse-CDF draw: zeros at either end or inside, in bfloat16 too."""
    from engine.sampler import _draw_by_inverse_cdf

    probs = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0]).repeat(4000, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            drawn = _draw_by_inverse_cdf(probs.to(dtype))
            freq = torch.bincount(drawn, minlength=6).float() / len(drawn)
            assert freq[0] == freq[2] == freq[5] == 0
            assert (freq - probs[0]).abs().max() < 0.03, freq
