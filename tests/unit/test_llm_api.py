"""The offline API: LLM(...).generate, its inputs, outputs, validation and loading."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil

import pytest
import torch

from engine import LLM, RequestOutput, SamplingParams
from engine.config import UnsupportedModelError
from tests.engine_checks import assert_engine_clean

VOCAB = 2048


def rand_prompts(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(n)] for n in lengths]


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=4 * 2**20)


# -- prompts and outputs -----------------------------------------------------------------


def check_output(llm: LLM, out: RequestOutput, max_tokens: int) -> None:
    assert isinstance(out, RequestOutput)
    assert out.outputs[0] is out
    assert len(out.token_ids) == max_tokens and out.finish_reason == "length"
    assert all(isinstance(t, int) and 0 <= t < VOCAB for t in out.token_ids)
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.stop_reason is None and out.logprobs is None
    assert out.first_token_time is not None
    assert out.arrival_time <= out.first_token_time <= out.finish_time
    assert out.ttft == pytest.approx(out.first_token_time - out.arrival_time)
    assert out.latency == pytest.approx(out.finish_time - out.arrival_time)
    assert 0 <= out.ttft <= out.latency


def test_single_string_prompt(llm):
    outs = llm.generate("Hello, world!", greedy(), use_tqdm=False)
    assert len(outs) == 1
    out = outs[0]
    check_output(llm, out, 16)
    assert out.prompt == "Hello, world!"
    assert out.prompt_token_ids == llm.tokenizer.encode("Hello, world!")
    assert_engine_clean(llm)


def test_single_token_id_prompt_equals_its_string(llm):
    ids = llm.tokenizer.encode("Hello, world!")
    outs = llm.generate(ids, greedy(), use_tqdm=False)
    assert len(outs) == 1
    check_output(llm, outs[0], 16)
    assert outs[0].prompt is None and outs[0].prompt_token_ids == ids
    assert outs[0].token_ids == llm.generate("Hello, world!", greedy(), use_tqdm=False)[0].token_ids


def test_lists_of_prompts_come_back_in_order(llm):
    strings = ["The quick brown fox", "What time is it?", "def add(a, b):"]
    ids = rand_prompts(1, (1, 7, 33, 12))
    mixed = [strings[0], ids[0], strings[1], ids[1], ids[2], strings[2], ids[3]]
    alone = [llm.generate(p, greedy(), use_tqdm=False)[0] for p in mixed]
    outs = llm.generate(mixed, greedy(), use_tqdm=False)
    assert len(outs) == len(mixed)
    for p, a, o in zip(mixed, alone, outs, strict=True):
        check_output(llm, o, 16)
        want_ids = llm.tokenizer.encode(p) if isinstance(p, str) else p
        assert o.prompt_token_ids == want_ids
        assert o.prompt == (p if isinstance(p, str) else None)
        assert o.token_ids == a.token_ids
    assert len({o.request_id for o in outs}) == len(outs)
    # A tuple of token ids is a prompt too.
    assert llm.generate(tuple(ids[1]), greedy(), use_tqdm=False)[0].token_ids == alone[3].token_ids
    assert llm.generate([], greedy(), use_tqdm=False) == []
    assert_engine_clean(llm)


def test_one_sampling_params_per_prompt(llm):
    prompts = rand_prompts(2, (5, 9, 3, 20))
    lengths = [3, 11, 1, 7]
    outs = llm.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == lengths
    assert [o.prompt_token_ids for o in outs] == prompts
    for n, o in zip(lengths, outs, strict=True):
        check_output(llm, o, n)
    with pytest.raises(ValueError, match="4 prompts"):
        llm.generate(prompts, [greedy()] * 3, use_tqdm=False)
    with pytest.raises(ValueError):
        llm.generate(prompts, [greedy()] * 5, use_tqdm=False)
    assert_engine_clean(llm)


def test_a_prompt_of_the_wrong_type_raises(llm):
    with pytest.raises(TypeError):
        llm.generate([[1, 2], 3.5], greedy(), use_tqdm=False)  # type: ignore[list-item]
    assert_engine_clean(llm)


# -- validation --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=2**20, max_model_len=64)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([], "empty"),
        (list(range(4, 68)), "context length is 64"),  # 64 tokens: no room to generate
        (list(range(4, 104)), "100 tokens"),
        ([5, 6, VOCAB], "token ids"),
        ([5, -1, 6], "token ids"),
    ],
    ids=["empty", "max_model_len", "longer", "out_of_vocab", "negative"],
)
def test_bad_prompt_raises_and_queues_nothing(short_llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        short_llm.generate([prompt], greedy(), use_tqdm=False)
    assert_engine_clean(short_llm)


def test_prompt_one_short_of_the_context_generates_one_token(short_llm):
    out = short_llm.generate(list(range(4, 67)), greedy(10), use_tqdm=False)[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"


def test_generation_stops_at_the_context_length(short_llm):
    prompt = rand_prompts(3, (50,))[0]
    out = short_llm.generate(prompt, greedy(100), use_tqdm=False)[0]
    assert len(prompt) + len(out.token_ids) == 64
    assert out.finish_reason == "length"
    assert_engine_clean(short_llm)


def test_request_larger_than_the_whole_kv_cache_raises(tiny_llama):
    kv_per_block = 2 * 2 * 2 * 16 * 4 * 16  # tiny llama, float32, 16-token blocks
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=4 * kv_per_block)
    assert llm.engine.block_pool.num_blocks == 4  # 64 tokens in all
    prompt = rand_prompts(4, (10,))[0]
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate(prompt, greedy(100), use_tqdm=False)
    assert_engine_clean(llm)
    # 10 + 54 = 64 tokens fit exactly.
    out = llm.generate(prompt, greedy(54), use_tqdm=False)[0]
    assert len(out.token_ids) == 54
    assert_engine_clean(llm)


def test_a_bad_third_prompt_rejects_the_whole_batch(short_llm):
    prompts = rand_prompts(5, (4, 8, 0, 6))
    with pytest.raises(ValueError, match="prompt 2"):
        short_llm.generate(prompts, greedy(), use_tqdm=False)
    assert_engine_clean(short_llm)
    # Nothing from the rejected batch runs later either.
    outs = short_llm.generate(prompts[:2], greedy(), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts[:2]
    assert_engine_clean(short_llm)


# -- dtypes and backends -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_generate(tiny_llama, dtype):
    llm = LLM(str(tiny_llama), dtype=dtype, kv_cache_bytes=2**20)
    assert llm.engine.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    prompts = rand_prompts(6, (3, 25, 11))
    outs = llm.generate(prompts, greedy(24, logprobs=0), use_tqdm=False)
    for o in outs:
        assert len(o.token_ids) == 24
        assert all(0 <= t < VOCAB for t in o.token_ids)
        assert all(math.isfinite(x) and x <= 0 for x in o.logprobs)
        assert len(set(o.token_ids)) > 5  # not stuck on one token (as NaN logits would be)
    assert_engine_clean(llm)


def test_c_and_torch_decode_backends_agree(tiny_llama):
    from engine import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no C compiler: the C decode kernel is unavailable")
    prompts = rand_prompts(7, (1, 4, 9, 16, 17, 31, 40, 63))
    c = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=2**20, attention_backend="cpu")
    t = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=2**20, attention_backend="torch")
    assert c.engine.runner.model.decode_attention is cpu_kernels.paged_decode_attention_cpu
    assert t.engine.runner.model.decode_attention is not cpu_kernels.paged_decode_attention_cpu
    params = greedy(40, logprobs=0)
    oc = c.generate(prompts, params, use_tqdm=False)
    ot = t.generate(prompts, params, use_tqdm=False)
    for a, b in zip(oc, ot, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(
            torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0
        )


# -- model directories -------------------------------------------------------------------


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257}
        )
    )
    with pytest.raises(UnsupportedModelError) as e:
        LLM(str(tmp_path))
    msg = str(e.value)
    assert "gpt2" in msg
    for family in ("llama", "mistral", "qwen2"):
        assert family in msg


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        LLM(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        LLM(str(tmp_path / "does-not-exist"))


def test_directory_without_weights(tiny_llama, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model, ignore=shutil.ignore_patterns("*.safetensors*"))
    with pytest.raises(ValueError, match="no safetensors weights") as e:
        LLM(str(model), dtype="float32", kv_cache_bytes=2**20)
    assert str(model) in str(e.value)


def test_directory_with_only_config_names_what_is_missing(tiny_llama, tmp_path):
    """config.json alone (no tokenizer, no weights): the error should say what is missing
    from which directory, not suggest installing sentencepiece."""
    shutil.copy(tiny_llama / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError) as e:
        LLM(str(tmp_path), dtype="float32", kv_cache_bytes=2**20)
    msg = str(e.value)
    assert str(tmp_path) in msg, msg
    assert "safetensors" in msg or "tokenizer" in msg


def test_sharded_checkpoint_loads(tiny_llama, tmp_path, llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    hf.save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 3

    prompts = rand_prompts(8, (2, 15, 40))
    want = [o.token_ids for o in llm.generate(prompts, greedy(32), use_tqdm=False)]
    got = LLM(str(sharded), dtype="float32", kv_cache_bytes=2**20).generate(
        prompts, greedy(32), use_tqdm=False
    )
    assert [o.token_ids for o in got] == want


def test_kv_capacity_is_logged(tiny_llama, caplog):
    kv_per_block = 2 * 2 * 2 * 16 * 4 * 16  # tiny llama, float32, 16-token blocks
    with caplog.at_level(logging.INFO, logger="splitserve"):
        llm = LLM(
            str(tiny_llama), dtype="float32", kv_cache_bytes=96 * kv_per_block, max_model_len=512
        )
    assert llm.engine.block_pool.num_blocks == 96
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "splitserve" and "KV cache" in r.getMessage()
    ]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    # 96 blocks; a 512-token sequence needs 32 of them, so 3 fit.
    assert "96 blocks" in lines[0] and "1536 tokens" in lines[0]
    assert "3.0 sequences" in lines[0] and "512" in lines[0]
