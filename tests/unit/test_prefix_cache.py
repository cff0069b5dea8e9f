"""Automatic prefix caching, proved against the cache off and transformers:
prompts that share none, one, many or all of their full blocks, a prefix
evicted halfway through, seeded sampling; and the pool's own rules (sharing
by reference, LRU eviction, exact counts)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from engine import LLM, SamplingParams
from engine.block_pool import BlockPool, extend_block_hashes
from tests.engine_checks import assert_engine_clean

BS = 16  # the engine's default block size
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), generation_config=gen)
    return out[0, len(prompt) :].tolist()


def llm(model, caching: bool, kv_cache_bytes: int = 8 << 20) -> LLM:
    return LLM(
        str(model),
        dtype="float32",
        kv_cache_bytes=kv_cache_bytes,
        enable_prefix_caching=caching,
    )


def shared_prompts(vocab: int) -> dict[str, list[int]]:
    """Second prompts that share 0, 1, many and all of their full blocks
    with `base` (which is 4 full blocks and 5 tokens long)."""
    rng = random.Random(0)
    base = [rng.randrange(4, vocab) for _ in range(4 * BS + 5)]
    fresh = [rng.randrange(4, vocab) for _ in range(40)]
    return {
        "base": base,
        "none": [(base[0] + 1) % vocab or 4, *base[1:]],  # differs in the first token
        "one": base[:BS] + fresh,
        "many": base[: 3 * BS] + fresh[:7],
        "all": list(base),  # every full block; the last token is still computed
        "all_blocks_exactly": base[: 4 * BS],  # its last full block cannot be shared
    }


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def test_shared_prefixes_give_the_same_tokens_as_no_cache_and_transformers(tiny_llama, hf):
    prompts = shared_prompts(hf.config.vocab_size)
    on, off = llm(tiny_llama, True), llm(tiny_llama, False)
    (base_on,) = on.generate([prompts["base"]], GREEDY, use_tqdm=False)
    assert base_on.num_cached_tokens == 0
    expected_cached = {"none": 0, "one": BS, "many": 3 * BS, "all": 4 * BS}
    expected_cached["all_blocks_exactly"] = 3 * BS
    for name, cached in expected_cached.items():
        prompt = prompts[name]
        (got,) = on.generate([prompt], GREEDY, use_tqdm=False)
        (ref,) = off.generate([prompt], GREEDY, use_tqdm=False)
        assert got.num_cached_tokens == cached, name
        assert ref.num_cached_tokens == 0
        assert got.token_ids == ref.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens), name
    snap = on.engine.snapshot()
    assert snap.prefix_hits == sum(expected_cached.values())
    assert snap.prefix_queries == sum(len(p) for p in prompts.values())
    assert off.engine.snapshot().prefix_hits == 0
    for x in (on, off):
        assert_engine_clean(x)


def test_requests_in_one_batch_share_blocks_by_reference(tiny_llama, hf):
    """A burst of requests behind one long system prompt: once its blocks
    are computed, the rest share them, and the pool holds one copy."""
    rng = random.Random(1)
    system = [rng.randrange(4, hf.config.vocab_size) for _ in range(5 * BS)]
    prompts = [system + [rng.randrange(4, 100) for _ in range(9)] for _ in range(6)]
    on, off = llm(tiny_llama, True), llm(tiny_llama, False)
    on.generate(prompts[:1], GREEDY, use_tqdm=False)  # computes the system prompt
    got = on.generate(prompts[1:], GREEDY, use_tqdm=False)
    ref = off.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert all(o.num_cached_tokens == 5 * BS for o in got)
    assert_engine_clean(on)


def test_a_prefix_evicted_halfway_is_recomputed_exactly(tiny_llama, hf):
    """A pool of a few dozen blocks: a flood of unrelated prompts evicts the
    LRU tail of a cached prefix (its last blocks go first), so a later
    request finds only the front half and computes the rest."""
    vocab = hf.config.vocab_size
    rng = random.Random(2)
    prefix = [rng.randrange(4, vocab) for _ in range(6 * BS)]
    small = 48 * BS * 2 * 4 * 64  # a few dozen blocks of the tiny model's KV; checked below
    on = llm(tiny_llama, True, kv_cache_bytes=small)
    pool = on.engine.block_pool
    assert 30 <= pool.num_blocks <= 200, pool
    on.generate([[*prefix, 5, 6, 7]], GREEDY, use_tqdm=False)
    cached_before = pool.num_cached_blocks
    # Unrelated prompts until some of the prefix's blocks are evicted, not all.
    hashes = extend_block_hashes([], prefix, BS, 6)
    fillers = 0
    while fillers < 200 and not 0 < len(pool.cached_prefix(hashes)) < 6:
        fillers += 1
        filler = [rng.randrange(4, vocab) for _ in range(BS)]
        on.generate([filler], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    left = len(pool.cached_prefix(hashes))
    assert 0 < left < 6, f"{left} of 6 blocks left after {fillers} fillers ({cached_before} cached)"
    prompt = [*prefix, 9, 9, 9]
    (got,) = on.generate([prompt], GREEDY, use_tqdm=False)
    assert got.num_cached_tokens == left * BS
    assert got.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)
    pool.check_integrity()
    assert_engine_clean(on)


def test_seeded_sampling_is_the_same_with_the_cache(tiny_llama, hf):
    prompts = shared_prompts(hf.config.vocab_size)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=24)
    on, off = llm(tiny_llama, True), llm(tiny_llama, False)
    on.generate([prompts["base"]], GREEDY, use_tqdm=False)
    for name in ("one", "many", "all"):
        (got,) = on.generate([prompts[name]], params, use_tqdm=False)
        (ref,) = off.generate([prompts[name]], params, use_tqdm=False)
        assert got.num_cached_tokens > 0
        assert got.token_ids == ref.token_ids, name


# -- the pool's rules -------------------------------------------------------------


def hashes_of(tokens: list[int], block_size: int) -> list[bytes]:
    return extend_block_hashes([], tokens, block_size, len(tokens) // block_size)


def test_shared_blocks_are_counted_and_freed_blocks_stay_findable_until_evicted():
    pool = BlockPool(num_blocks=6, block_size=2, enable_caching=True)
    a = [1, 2, 3, 4, 5, 6]
    pool.allocate("a", 6)
    pool.cache_blocks("a", hashes_of(a, 2), 0)
    assert pool.num_cached_blocks == 3
    prefix = pool.cached_prefix(hashes_of(a, 2)[:2])
    assert prefix == list(pool.block_table("a"))[:2]
    # Sharing costs nothing while the blocks are held: only the new block.
    assert pool.num_new_blocks_needed("b", 5, prefix) == 1
    pool.allocate("b", 5, prefix)
    assert pool._ref_counts[prefix[0]] == 2 and pool.num_free_blocks == 2
    pool.check_integrity()
    pool.free("a")
    pool.free("b")
    assert pool.num_free_blocks == 6 and pool.num_cached_blocks == 3  # kept, evictable
    # Reviving a freed cached block takes it off the free list.
    assert pool.num_new_blocks_needed("c", 4, prefix) == 2
    pool.allocate("c", 4, prefix)
    assert pool.num_free_blocks == 4
    pool.check_integrity()
    # A prefix stops at the first block that is not cached.
    assert pool.cached_prefix(hashes_of([1, 2, 9, 9, 5, 6], 2)) == prefix[:1]


def test_eviction_is_least_recently_freed_first_and_last_blocks_first():
    pool = BlockPool(num_blocks=4, block_size=1, enable_caching=True)
    old, new = [1, 2], [3, 4]
    for rid, toks in (("old", old), ("new", new)):
        pool.allocate(rid, 2)
        pool.cache_blocks(rid, hashes_of(toks, 1), 0)
    pool.free("old")
    pool.free("new")
    pool.allocate("x", 1)  # evicts old's last block: its first is still findable
    assert len(pool.cached_prefix(hashes_of(old, 1))) == 1
    assert len(pool.cached_prefix(hashes_of(new, 1))) == 2
    pool.allocate("x", 2)
    assert pool.cached_prefix(hashes_of(old, 1)) == []
    assert len(pool.cached_prefix(hashes_of(new, 1))) == 2
    pool.check_integrity()


def test_caching_off_caches_nothing():
    pool = BlockPool(num_blocks=4, block_size=2)
    pool.allocate("a", 4)
    pool.cache_blocks("a", hashes_of([1, 2, 3, 4], 2), 0)
    assert pool.num_cached_blocks == 0 and pool.cached_prefix(hashes_of([1, 2], 2)) == []


def test_a_reservation_for_remote_kv_starts_from_the_cached_prefix():
    """A decode worker's reservation looks its prompt up once (its admission,
    once the KV arrived, looks nothing up again): blocks it finds are shared
    and their KV is not received again; the blocks it received are cached
    for the next prompt, local or remote."""
    from engine.request import Request
    from engine.scheduler import Scheduler, SchedulerConfig

    s = Scheduler(SchedulerConfig(8, 256, 1024), BlockPool(32, 4, enable_caching=True))
    remote = Request("remote", list(range(20)), SamplingParams(max_tokens=2))
    assert s.reserve_for_remote_kv(remote) == 0
    s.remote_kv_arrived("remote", 7, None, [2])
    s.schedule()
    assert (s.stats.prefix_queries, s.stats.prefix_hits) == (20, 0)
    # Its prompt's blocks are cached: a local prompt finds them...
    local = Request("local", [*range(20), 9], SamplingParams(max_tokens=2))
    s.add_request(local)
    s.schedule()
    assert (s.stats.prefix_queries, s.stats.prefix_hits) == (41, 20)
    # ... and so does the next reservation: 4 of its 5 full blocks (the
    # last token is always computed, so its block is always received).
    again = Request("again", list(range(20)), SamplingParams(max_tokens=2))
    assert s.reserve_for_remote_kv(again) == 4
    assert again.num_cached_tokens == 16
    assert s.pool.block_table("again")[:4] == s.pool.block_table("remote")[:4]
    assert (s.stats.prefix_queries, s.stats.prefix_hits) == (61, 36)
    s.pool.check_integrity()
