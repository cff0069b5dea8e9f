"""How the router chooses: the decode worker for a request, and the prefill
workers to try for it, best first. Pure functions of each worker's last
Status and the router's own counts since (router/pool.py holds those and is
the only one to change them); `turn` breaks ties in rotation.

cache_aware (the default) weighs what a worker likely holds in its prefix
cache (router/prefix_index.py) against its load, both in prompt tokens of
prefill work: the cost of sending a prompt to a worker is the prompt tokens
queued there plus the prompt's tokens it would have to compute, its
uncached part (Dynamo's cost is the same shape: overlap-weighted prefill
blocks plus decode blocks). A hot prefix so stays where it is cached until
that worker's queue outweighs what the cache saves, then spills over. When
no worker is likely to hold any of the prompt, it is least_loaded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from router.pool import Worker
    from router.prefix_index import PromptBlocks

Policy = Literal["cache_aware", "least_loaded", "round_robin"]
POLICIES: tuple[Policy, ...] = ("cache_aware", "least_loaded", "round_robin")
# A prompt whose part its decode worker likely lacks is at most this many
# tokens is prefilled on the decode worker, with no KV transfer (docs/performance.md
# has the measurement behind the figure).
DEFAULT_LOCAL_PREFILL_THRESHOLD = 0


def cached_tokens(w: Worker, prompt: PromptBlocks | None) -> int:
    """Prompt tokens worker `w` likely holds in its prefix cache."""
    if prompt is None:
        return 0
    bs = w.block_size
    return w.prefixes.match(prompt.reusable(bs)) * bs


def pick_decode(
    decode: Sequence[Worker],
    prompt_len: int,
    exclude: set[str],
    policy: Policy,
    turn: int,
    refuses: Callable[[Worker], bool],
    prompt: PromptBlocks | None = None,
) -> Worker | None:
    """The best healthy decode worker not in `exclude`, or None.

    least_loaded: those whose (estimated) free blocks fit the prompt first (a
    hint: the worker alone decides), then most free blocks, then fewest
    requests running and queued, then round-robin.
    round_robin: in turn, skipping only those that (by the estimate) cannot
    fit the prompt.

    Either way a worker that `refuses` (its queue at its bound) is skipped, as
    it would refuse the request: when all are, the caller answers 503 at once
    instead of asking each.

    cache_aware: when some worker likely holds part of the prompt, a
    colocated worker is weighed by queued prompt tokens plus the prompt's
    uncached tokens (prefill work); a decode worker by the KV it would then
    hold, in blocks: those in use now plus those of the prompt it lacks (its
    cached prefix is neither sent nor stored twice; Dynamo's decode-blocks
    term), so a conversation stays where its history is unless another
    worker holds that much less KV.
    """
    candidates = [
        (i, w)
        for i, w in enumerate(decode)
        if w.healthy and w.address not in exclude and not refuses(w)
    ]
    if not candidates:
        return None
    n = len(decode)
    cached = {w.address: cached_tokens(w, prompt) for _, w in candidates}
    by_cache = policy == "cache_aware" and any(cached.values())

    def key(iw: tuple[int, Worker]) -> tuple[bool, int, int, int]:
        i, w = iw
        free = w.est_free_blocks()
        need = -(-prompt_len // w.block_size)
        if policy == "round_robin":
            return (free < need, 0, 0, (i - turn) % n)
        load = (w.status.running + w.status.waiting) if w.status else 0
        if not by_cache:
            return (free < need, -free, load + w.in_flight, (i - turn) % n)
        if w.role == "colocated":
            work = w.est_queued_prompt_tokens() + prompt_len - cached[w.address]
            return (free < need, work, load + w.in_flight, (i - turn) % n)
        need -= cached[w.address] // w.block_size
        return (free < need, need - free, load + w.in_flight, (i - turn) % n)

    return min(candidates, key=key)[1]


def rank_prefill(
    prefill: Sequence[Worker],
    turn: int,
    policy: Policy = "least_loaded",
    prompt: PromptBlocks | None = None,
) -> list[Worker]:
    """The healthy prefill workers, least loaded first.

    Load is the larger of the queued prompt tokens the worker reported and
    the router's own count of prompt tokens sent its way that have no first
    token yet (the report lags a burst; the count misses other routers).
    cache_aware subtracts the prompt tokens the worker likely holds cached:
    what is left is the prefill work ahead of this prompt's first token.
    """
    n = max(1, len(prefill))
    by_cache = policy == "cache_aware"

    def key(iw: tuple[int, Worker]) -> tuple[int, int]:
        i, w = iw
        load = max(w.status.waiting_prompt_tokens if w.status else 0, w.pending_prompt_tokens)
        if by_cache:
            load -= cached_tokens(w, prompt)
        return (load, (i - turn) % n)

    ranked = sorted(((i, w) for i, w in enumerate(prefill) if w.healthy), key=key)
    return [w for _, w in ranked]
