"""Prefill on one engine, decode on another, KV copied block by block between
their separate KV pools: the output equals one engine doing both.

This is the engine's half of disaggregated serving (the transport comes with
the workers): a prefill engine holds a finished prompt's blocks until the KV
is read; a decode engine reserves blocks before the prompt is computed,
receives the KV into them, then continues from the first token.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from engine import LLM, SamplingParams
from engine.request import RequestStatus
from tests.engine_checks import assert_engine_clean, held_kv


def run_to_end(engine) -> dict:
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id] = out
    return outs


def prefill_remotely(prefill: LLM, decode: LLM, prompts, params):
    """Disaggregated generation of `prompts`; returns the decode side's outputs."""
    p_eng, d_eng = prefill.engine, decode.engine
    first, tables = {}, {}
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        # Decode side first: blocks reserved before any prefill work is spent.
        reservation = d_eng.reserve_remote(d_eng.make_request(prompt, params, request_id=rid))
        assert reservation is not None and reservation.num_cached_blocks == 0
        tables[rid] = reservation.block_ids
        # The prefill side samples the first token with the request's own
        # parameters (and seed), then stops.
        first_params = dataclasses.replace(params, max_tokens=1, stop=())
        req = p_eng.make_request(prompt, first_params, request_id=rid)
        req.hold_blocks_on_finish = True
        p_eng.add_request(req)
    for rid, out in run_to_end(p_eng).items():
        assert len(out.token_ids) == 1
        first[rid] = out.token_ids[0]
        assert p_eng.block_pool.block_table(rid)  # held until the KV is read
    outs = {}
    for rid, token in first.items():
        for layer, (k, v) in enumerate(held_kv(p_eng, rid)):
            d_eng.runner.write_blocks(layer, tables[rid], k, v)
        p_eng.release_blocks(rid)
        done = d_eng.remote_kv_done(rid, token)
        if done is not None:
            outs[rid] = done
    assert_engine_clean(prefill)
    outs.update(run_to_end(d_eng))
    return [outs[f"r{i}"] for i in range(len(prompts))]


GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
# Seeded sampling: the decode side's generator skips the draw made for the
# first token on the prefill side.
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=40, ignore_eos=True)


@pytest.mark.parametrize(
    ("variant", "params"), [("llama3", GREEDY), ("qwen2", GREEDY), ("llama3", SEEDED)]
)
def test_disaggregated_equals_colocated(model_dirs, variant, params):
    path = str(model_dirs[variant])
    rng = random.Random(5)
    prompts = [[rng.randrange(4, 2048) for _ in range(n)] for n in (1, 7, 16, 33, 50, 71)]
    colocated = LLM(path, dtype="float32", kv_cache_bytes=4 * 2**20)
    expected = colocated.generate(prompts, params, use_tqdm=False)

    # Different pool sizes, so the two engines' block ids differ.
    prefill = LLM(path, dtype="float32", kv_cache_bytes=2 * 2**20)
    decode = LLM(path, dtype="float32", kv_cache_bytes=6 * 2**20)
    got = prefill_remotely(prefill, decode, prompts, params)
    for e, g in zip(expected, got, strict=True):
        assert g.token_ids == e.token_ids
        assert g.finish_reason == "length"
    assert_engine_clean(decode)


def test_reservation_is_refused_when_full_and_frees_on_abort(tiny_llama):
    probe = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=2**20)
    block_bytes = probe.engine.config.kv_block_bytes(probe.engine.model_config)
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=40 * block_bytes)
    eng = llm.engine
    blocks = eng.block_pool.num_blocks
    assert blocks == 40
    # A reservation covers the prompt and its first decode step (one more block
    # for a prompt of whole blocks) and leaves the watermark (1 block) free.
    big = [5] * ((blocks - 3) * eng.config.block_size)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    reservation = eng.reserve_remote(eng.make_request(big, params, request_id="a"))
    assert reservation is not None and len(reservation.block_ids) == blocks - 3  # the prompt's
    assert eng.block_pool.num_free_blocks == 2
    # Backpressure: a second prompt of two blocks would eat into the
    # watermark: refused, and nothing held.
    assert eng.reserve_remote(eng.make_request([5] * 20, params, request_id="b")) is None
    assert eng.block_pool.num_free_blocks == 2
    # A request waiting for KV is not scheduled, and aborting it frees its blocks.
    assert eng.step() == []
    out = eng.abort_request("a")
    assert out is not None and out.finish_reason == "abort"
    assert_engine_clean(llm)
    with pytest.raises(KeyError):
        eng.remote_kv_done("a", 7)


def test_first_token_can_finish_the_request(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=2**20)
    eng = llm.engine
    req = eng.make_request([9, 8, 7], SamplingParams(max_tokens=1), request_id="one")
    eng.reserve_remote(req)
    out = eng.remote_kv_done("one", 42)
    assert out is not None and out.token_ids == [42] and out.finish_reason == "length"
    assert req.status is RequestStatus.FINISHED_LENGTH
    assert_engine_clean(llm)


def test_held_blocks_are_freed_by_abort(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_bytes=2**20)
    eng = llm.engine
    req = eng.make_request([3] * 40, SamplingParams(max_tokens=1), request_id="p")
    req.hold_blocks_on_finish = True
    eng.add_request(req)
    run_to_end(eng)
    assert eng.block_pool.num_used_blocks == 3
    eng.abort_request("p")  # e.g. the receiver died: nothing stays held
    assert_engine_clean(llm)
