"""How the router chooses: the decode worker for a request, and the prefill
workers to try for it, best first. Pure functions of each worker's last
Status and the router's own counts since (router/pool.py holds those and is
the only one to change them); `turn` breaks ties in rotation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from router.pool import Worker

Policy = Literal["least_loaded", "round_robin"]


def pick_decode(
    decode: Sequence[Worker],
    prompt_len: int,
    exclude: set[str],
    policy: Policy,
    turn: int,
    refuses: Callable[[Worker], bool],
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
    """
    candidates = [
        (i, w)
        for i, w in enumerate(decode)
        if w.healthy and w.address not in exclude and not refuses(w)
    ]
    if not candidates:
        return None
    n = len(decode)

    def key(iw: tuple[int, Worker]) -> tuple[bool, int, int, int]:
        i, w = iw
        free = w.est_free_blocks()
        need = -(-prompt_len // w.block_size)
        if policy == "round_robin":
            return (free < need, 0, 0, (i - turn) % n)
        load = (w.status.running + w.status.waiting) if w.status else 0
        return (free < need, -free, load + w.in_flight, (i - turn) % n)

    return min(candidates, key=key)[1]


def rank_prefill(prefill: Sequence[Worker], turn: int) -> list[Worker]:
    """The healthy prefill workers, least loaded first.

    Load is the larger of the queued prompt tokens the worker reported and
    the router's own count of prompt tokens sent its way that have no first
    token yet (the report lags a burst; the count misses other routers).
    """
    n = max(1, len(prefill))
    ranked = sorted(
        ((i, w) for i, w in enumerate(prefill) if w.healthy),
        key=lambda iw: (
            max(
                iw[1].status.waiting_prompt_tokens if iw[1].status else 0,
                iw[1].pending_prompt_tokens,
            ),
            (iw[0] - turn) % n,
        ),
    )
    return [w for _, w in ranked]
