"""The engine against transformers on the same weights: the correctness oracle."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from engine import LLM, SamplingParams
from engine.model import packed_linear
from engine.model.llama import AttentionBatch, PrefillChunk
from tests.engine_checks import assert_engine_clean
from tests.models import ARCH_VARIANTS

NEW_TOKENS = 64


def prompts_for(vocab: int, n: int = 10, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 9, 17, 31, 40, 57, 70, 96, 5][:n]
    return [[rng.randrange(4, vocab) for _ in range(length)] for length in lengths]


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), generation_config=gen)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", list(ARCH_VARIANTS))
def test_greedy_tokens_equal_transformers(model_dirs, variant):
    path = model_dirs[variant]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", kv_cache_bytes=8 * 2**20, max_num_batched_tokens=128)
    prompts = prompts_for(hf.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    # All submitted at once: prefill chunks (budget 128) ride along with decodes.
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.stats.mean_running > 4
    # On a CPU the default packs the linear layers for oneDNN: that path is the one proven here.
    runner = llm.engine.runner
    packed = packed_linear.onednn_available(runner.dtype, runner.device)
    assert runner.linear_backend == ("onednn" if packed else "torch")
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt of {len(prompt)}"
        assert out.finish_reason == "length"
        assert len(set(out.token_ids)) > 10  # a degenerate model would prove nothing
    assert_engine_clean(llm)


@pytest.mark.parametrize("linear_backend", ["torch", "onednn"])
@pytest.mark.parametrize("variant", list(ARCH_VARIANTS))
def test_prompt_logits_match_transformers(model_dirs, variant, linear_backend):
    path = model_dirs[variant]
    if linear_backend == "onednn" and not packed_linear.onednn_available(
        torch.float32, torch.device("cpu")
    ):
        pytest.skip("this torch build has no oneDNN")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(
        str(path),
        dtype="float32",
        device="cpu",
        kv_cache_bytes=8 * 2**20,
        linear_backend=linear_backend,
    )
    runner, pool = llm.engine.runner, llm.engine.block_pool
    prompt = prompts_for(hf.config.vocab_size)[-2]  # 96 tokens: past the window of 48
    # One prefill through the paged cache, logits at every position.
    table = list(pool.allocate("probe", len(prompt)))
    bs = pool.block_size
    n = len(prompt)
    batch = AttentionBatch(
        slot_mapping=torch.tensor([table[p // bs] * bs + p % bs for p in range(n)]),
        num_decode=0,
        decode_block_tables=None,
        decode_context_lens=None,
        prefills=[PrefillChunk(0, n, 0, torch.tensor(table))],
    )
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(prompt), torch.arange(n), batch, runner.kv_caches)
        ours = runner.model.compute_logits(hidden).float()
        ref = hf(torch.tensor([prompt])).logits[0].float()
    pool.free("probe")
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"relative logit error {rel:.2e}"


def test_chunked_prefill_equals_one_shot(tiny_llama):
    """A prompt prefilled in chunks of 7 continues from cached blocks exactly."""
    prompt = prompts_for(2048)[-2]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    whole = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=4 * 2**20)
    chunked = LLM(
        str(tiny_llama), dtype="float32", kv_cache_bytes=4 * 2**20, max_num_batched_tokens=7
    )
    a = whole.generate(prompt, params)[0]
    b = chunked.generate(prompt, params)[0]
    assert chunked.engine.scheduler.stats.num_steps >= 96 // 7 + 24
    assert a.token_ids == b.token_ids


def test_output_does_not_depend_on_company(tiny_llama):
    """The same greedy request alone, among 32, and under a KV budget so small
    that requests are preempted and recomputed."""
    vocab = 2048
    rng = random.Random(3)
    probe = [rng.randrange(4, vocab) for _ in range(40)]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    others = [[rng.randrange(4, vocab) for _ in range(rng.randrange(5, 60))] for _ in range(31)]
    other_params = [
        SamplingParams(temperature=0.0, max_tokens=rng.randrange(8, 64), ignore_eos=True)
        for _ in others
    ]

    alone = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=4 * 2**20)
    ref = alone.generate(probe, params)[0].token_ids

    crowded = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=8 * 2**20)
    outs = crowded.generate(
        [*others[:16], probe, *others[16:]],
        [*other_params[:16], params, *other_params[16:]],
        use_tqdm=False,
    )
    assert outs[16].token_ids == ref
    assert crowded.engine.scheduler.stats.mean_running > 16
    assert_engine_clean(crowded)

    # 24 blocks of 16 tokens: the 32 requests cannot all hold their KV at once.
    kv_per_block = crowded.engine.model_config.kv_elements_per_token * 4 * 16
    starved = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=24 * kv_per_block)
    assert starved.engine.block_pool.num_blocks == 24
    outs2 = starved.generate(
        [*others[:16], probe, *others[16:]],
        [*other_params[:16], params, *other_params[16:]],
        use_tqdm=False,
    )
    assert starved.engine.scheduler.stats.num_preemptions > 0
    assert sum(o.num_preemptions for o in outs2) > 0
    assert outs2[16].token_ids == ref
    for a, b in zip(outs, outs2, strict=True):
        assert a.token_ids == b.token_ids
    assert_engine_clean(starved)


def _hf_prompt_logprobs(path, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab]: row p is the log-softmax after prompt[: p + 1]."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)


def _assert_prompt_logprobs(out, prompt: list[int], ref: torch.Tensor, n_top: int) -> None:
    lps, tops = out.prompt_logprobs, out.prompt_top_logprobs
    assert lps is not None and tops is not None
    assert len(lps) == len(prompt) and lps[0] is None and tops[0] is None
    want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert torch.tensor(lps[1:]) == pytest.approx(want, abs=1e-4)
    for p, top in enumerate(tops[1:]):
        want_lps, want_ids = torch.topk(ref[p], n_top) if n_top else (torch.tensor([]), [])
        assert [t for t, _ in top] == list(want_ids.tolist() if n_top else [])
        assert [lp for _, lp in top] == pytest.approx(want_lps.tolist(), abs=1e-4)


def test_prompt_logprobs_equal_transformers(tiny_llama):
    """prompt_logprobs: each prompt token's logprob and the top N at its
    position, as transformers' log-softmax gives them, for a prompt computed
    in chunks of 16 and one already in the prefix cache (recomputed, not
    taken from it); requests without them get none and keep the cache."""
    prompt = prompts_for(2048)[-2]  # 96 tokens: 6 chunks
    ref = _hf_prompt_logprobs(tiny_llama, prompt)
    llm = LLM(
        str(tiny_llama),
        dtype="float32",
        kv_cache_bytes=4 * 2**20,
        max_num_batched_tokens=16,
        enable_prefix_caching=True,
    )
    plain = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    first = llm.generate(prompt, plain)[0]
    assert first.prompt_logprobs is None and first.num_cached_tokens == 0
    for n_top in (3, 0):
        scored = SamplingParams(
            temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=n_top
        )
        out = llm.generate([prompt, prompts_for(2048)[2]], [scored, plain], use_tqdm=False)
        assert out[0].num_cached_tokens == 0  # the cached prompt was computed again
        assert out[0].token_ids == first.token_ids
        _assert_prompt_logprobs(out[0], prompt, ref, n_top)
        assert out[1].prompt_logprobs is None
    assert llm.generate(prompt, plain)[0].num_cached_tokens == 80  # the cache is still there
    # A one-token prompt has nothing to score.
    one = llm.generate([7], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert one.prompt_logprobs == [None]
    assert_engine_clean(llm)


def test_prompt_logprobs_survive_a_preemption_mid_prompt(tiny_llama):
    """A request preempted after some prompt chunks recomputes them without
    scoring their positions twice; it may then start from the cached blocks
    it had scored already."""
    prompt = prompts_for(2048)[-3]  # 70 tokens
    ref = _hf_prompt_logprobs(tiny_llama, prompt)
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=4 * 2**20, max_num_batched_tokens=32)
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    req = eng.make_request(prompt, params)
    eng.add_request(req)
    eng.step()  # positions 0..31: tokens 1..32 scored
    assert req.prompt_logprobs is not None and len(req.prompt_logprobs) == 33
    eng.scheduler.running.remove(req)
    eng.scheduler._preempt(req)
    outs = eng.step()
    assert req.num_computed_tokens == 64  # 32 from the cache (scored), 32 computed
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert req.num_cached_tokens == 0 and req.num_preemptions == 1
    _assert_prompt_logprobs(outs[0], prompt, ref, 2)
    assert_engine_clean(llm)
