"""Cache-aware routing: the router remembers which worker computed which
prompt blocks (router/prefix_index.py) and weighs them against load
(router/selection.py). The pool is the real WorkerPool, fed real
pb.WorkerStatus messages as a poll would record them."""

from __future__ import annotations

import time
from typing import Any

from engine.block_pool import extend_block_hashes
from protos import splitserve_pb2 as pb
from router.pool import Worker, WorkerPool
from router.prefix_index import PrefixIndex, PromptBlocks

SYSTEM = list(range(100, 164))  # 4 full blocks of 16


def record(w: Worker, **fields: Any) -> None:
    """`w` answered a poll sent now with a Status of these fields."""
    sent = time.monotonic()
    fields = {"block_size": 16, "kv_blocks_total": 1000, "kv_blocks_free": 1000, **fields}
    w.status = pb.WorkerStatus(**fields)
    w.status_time = w.last_seen = sent
    while w.dispatched and w.dispatched[0][0] < sent:
        w.dispatched.popleft()
    w.healthy = True


def prompt(suffix: int, prefix: list[int] = SYSTEM) -> PromptBlocks:
    return PromptBlocks([*prefix, *range(1000 + suffix, 1010 + suffix)])


def send(pool: WorkerPool, p: PromptBlocks) -> tuple[Worker, list[Worker], int]:
    """Route one prompt as DecodeCall does: (decode, prefill ranking, work)."""
    n = len(p.prompt_ids)
    d = pool.pick_decode(n, set(), p)
    assert d is not None
    ranked = pool.rank_prefill(d, p)
    return d, ranked, pool.dispatched(d, ranked, n, p)


def test_the_index_matches_leading_blocks_and_forgets_old_and_excess_ones():
    now = [0.0]
    index = PrefixIndex(ttl_s=10, capacity=6, clock=lambda: now[0])
    a = extend_block_hashes([], list(range(64)), 16, 4)
    index.add(a)
    assert index.match(a) == 4 and index.match(a[:2]) == 2
    assert index.match([a[1], a[2]]) == 2  # any run the worker holds, from the caller's first
    assert index.match(extend_block_hashes([], [7] * 64, 16, 4)) == 0
    now[0] = 11.0  # past the TTL: nothing is believed any more
    assert index.match(a) == 0
    b = extend_block_hashes([], list(range(500, 628)), 16, 8)
    index.add(b)  # 8 blocks into a capacity of 6: the oldest go
    assert len(index) == 6 and index.match(b) == 0 and index.match(b[2:]) == 6


def test_reusable_blocks_leave_the_last_token_to_compute():
    assert len(PromptBlocks(list(range(64))).reusable(16)) == 3
    assert len(PromptBlocks(list(range(65))).reusable(16)) == 4
    assert PromptBlocks([1]).reusable(16) == []


def test_a_burst_sharing_a_prefix_follows_it_to_the_prefill_worker_that_computed_it():
    """Once the system prompt is computed somewhere, a burst sent at once
    (no first token yet) loads that worker only with each request's
    uncached tokens, so the burst stays with the cache."""
    decisions: list[str] = []
    pool = WorkerPool(["d:1"], ["p0:1", "p1:1"], on_decision=decisions.append)
    record(pool.decode[0], role="decode")
    for w in pool.prefill:
        record(w, role="prefill")
    _, first, work = send(pool, prompt(0))
    assert work == 74  # nothing cached yet
    chosen = first[0]
    pool.first_token(first, work)
    for i in range(1, 5):
        _, ranked, work = send(pool, prompt(i))
        assert ranked[0] is chosen, f"request {i} went elsewhere"
        assert work == 10  # the 64 system-prompt tokens are cached there
    assert chosen.pending_prompt_tokens == 4 * 10
    pool.first_token(ranked, work)
    assert chosen.pending_prompt_tokens == 3 * 10
    # An unrelated prompt goes by load: to the idle worker.
    _, other, _ = send(pool, prompt(0, prefix=list(range(5000, 5064))))
    assert other[0] is not chosen
    assert decisions == ["load"] + ["prefix_cache"] * 4 + ["load"]


def test_a_hot_prefix_spills_over_when_its_worker_is_loaded_enough():
    """The cost is prefill work in tokens: cached tokens saved against
    tokens queued. A worker whose queue outweighs the cache's saving loses."""
    pool = WorkerPool(["d:1"], ["p0:1", "p1:1"])
    record(pool.decode[0], role="decode")
    p0, p1 = pool.prefill
    record(p0, role="prefill")
    record(p1, role="prefill")
    p0.prefixes.add(prompt(0).hashes(16))  # p0 computed the system prompt before
    record(p0, role="prefill", waiting_prompt_tokens=40)  # saves 64, queued 40: still p0
    assert pool.rank_prefill(pool.decode[0], prompt(1))[0] is p0
    record(p0, role="prefill", waiting_prompt_tokens=100)  # queued 100 > 64 saved: p1
    assert pool.rank_prefill(pool.decode[0], prompt(1))[0] is p1
    # least_loaded ignores the cache.
    pool.policy = "least_loaded"
    record(p0, role="prefill", waiting_prompt_tokens=10)
    assert pool.rank_prefill(pool.decode[0], prompt(1))[0] is p1


def test_colocated_workers_keep_their_prefixes_and_fall_back_to_least_loaded():
    pool = WorkerPool(["c0:1", "c1:1"], [])
    c0, c1 = pool.decode
    record(c0, role="colocated", kv_blocks_free=500)
    record(c1, role="colocated", kv_blocks_free=900)
    # No worker holds anything: least_loaded, the one with more free blocks.
    d, _, _ = send(pool, prompt(0))
    assert d is c1
    # The same prefix again goes where it was computed, though c0 has more room now.
    record(c0, role="colocated", kv_blocks_free=990)
    record(c1, role="colocated", kv_blocks_free=900)
    assert [send(pool, prompt(i))[0] for i in (1, 2, 3)] == [c1, c1, c1]
    # ...until what is queued there outweighs what its cache saves.
    record(c1, role="colocated", kv_blocks_free=900, waiting_prompt_tokens=200)
    assert send(pool, prompt(4))[0] is c0
    # A decode worker of a disaggregated pool receives only what it lacks:
    # its cached blocks count against the KV it holds (in blocks), so it
    # wins unless another has that much more room.
    history = prompt(0, prefix=list(range(7000, 7064)))
    c1.prefixes.add(history.hashes(16))  # c1 received this conversation's KV before
    record(c0, role="decode", kv_blocks_free=902)
    record(c1, role="decode", kv_blocks_free=900)
    assert pool.pick_decode(74, set(), history) is c1  # 1 block to receive, 4 cached
    record(c0, role="decode", kv_blocks_free=990)
    assert pool.pick_decode(74, set(), history) is c0
    pool.policy = "least_loaded"
    record(c0, role="decode", kv_blocks_free=902)
    assert pool.pick_decode(74, set(), history) is c0


def test_a_decode_worker_prefills_itself_what_it_lacks_when_that_is_short():
    """Conditional disaggregation: a short prompt, or the next turn of a
    conversation whose history the decode worker received, is prefilled on
    the decode worker; anything longer goes to the prefill pool."""
    decisions: list[str] = []
    pool = WorkerPool(["d:1"], ["p0:1"], on_decision=decisions.append, local_prefill_threshold=32)
    d, p0 = pool.decode[0], pool.prefill[0]
    record(d, role="decode")
    record(p0, role="prefill")
    short = PromptBlocks(list(range(30)))
    assert pool.rank_prefill(d, short) == []
    turn1 = prompt(0)  # 74 tokens: more than the decode worker may compute
    _, ranked, _ = send(pool, turn1)
    assert ranked == [p0]
    # Turn 2 resends turn 1 (whose KV the decode worker received) plus 20 tokens.
    turn2 = PromptBlocks([*turn1.prompt_ids, *range(2000, 2020)])
    _, ranked, work = send(pool, turn2)
    assert ranked == [] and work == len(turn2.prompt_ids) - 64
    assert decisions == ["load", "local_prefill"]
    pool.local_prefill_threshold = 0  # off: always the prefill pool
    assert pool.rank_prefill(d, short) == [p0]
