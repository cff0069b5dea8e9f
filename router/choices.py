"""Several choices for one prompt (`n`, `best_of`): one engine request each.

Each choice is a request of its own (`<id>-<i>`), as vLLM's front end fans
`n` out, so every worker, transfer and migration path serves it unchanged.
The prompt's KV is computed once: the first choice goes alone until its
second token (or its end), by which time the worker that computed the
prompt holds its full blocks in the prefix cache, and so does the decode
worker it was sent to; the cache-aware router sends the other choices
after them, and they compute (and receive) only the last, partial block. A seeded
request gives choice i the seed `seed + i`, so each choice's stream is
reproducible on its own. With echo and logprobs only the first choice asks
for the prompt's logprobs; the others take its entries.

`best_of` > `n` (completions, not streamed) generates `best_of` choices and
answers the `n` with the highest cumulative log-probability, best first.

Events are those of router/flow.py, tagged with their choice's index; a
choice that fails fails the request (the others are cancelled).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

from router.dispatch import DEFAULT_MIGRATION_LIMIT
from router.flow import Delta, Finish, run_request
from router.metrics import RouterMetrics
from router.pool import WorkerPool
from router.preprocess import Prepared
from router.served_model import ServedModel
from router.textstream import TokenInfo

_SEED_LIMIT = 2**64

Event = Delta | Finish


async def run_choices(
    pool: WorkerPool,
    metrics: RouterMetrics,
    served: ServedModel,
    prepared: Prepared,
    request_id: str,
    arrival: float,
    migration_limit: int = DEFAULT_MIGRATION_LIMIT,
) -> AsyncGenerator[Event, None]:
    """The events of every choice, in the order they happen; each choice
    ends with its Finish. Errors as flow.run_request's."""

    # Choice 0's prompt logprob entries (echo with logprobs): the prompt is
    # scored once, and the other choices, which start after choice 0's first
    # event, reuse them (so they may start from the prefix cache).
    scored_prompt: list[TokenInfo] = []

    async def first_choice(events: AsyncGenerator[Event, None]) -> AsyncGenerator[Event, None]:
        async with aclosing(events) as it:
            async for ev in it:
                if not scored_prompt:
                    delta = ev.delta if isinstance(ev, Finish) else ev
                    scored_prompt.extend(delta.tokens[: len(prepared.prompt_ids)])
                yield ev

    def choice(i: int) -> AsyncGenerator[Event, None]:
        params = prepared.params
        prompt_tokens = None
        if prepared.best_of > 1:
            rid = f"{request_id}-{i}"
            if params.seed is not None:
                params = dataclasses.replace(params, seed=(params.seed + i) % _SEED_LIMIT)
            if i > 0 and params.prompt_logprobs is not None:
                assert scored_prompt, "choice 0 goes first"
                params = dataclasses.replace(params, prompt_logprobs=None)
                prompt_tokens = list(scored_prompt)
        else:
            rid = request_id
        events = run_request(
            pool,
            metrics,
            served,
            prepared,
            rid,
            arrival,
            migration_limit,
            params,
            index=i,
            prompt_tokens=prompt_tokens,
        )
        if i == 0 and prepared.best_of > 1 and params.prompt_logprobs is not None:
            return first_choice(events)
        return events

    if prepared.best_of == 1:
        async with aclosing(choice(0)) as events:
            async for ev in events:
                yield ev
        return
    if prepared.best_of > prepared.n:
        finishes = []
        tokens: dict[int, list[TokenInfo]] = {}
        async with aclosing(_fan_out(choice, prepared.best_of)) as events:
            async for ev in events:
                delta = ev.delta if isinstance(ev, Finish) else ev
                tokens.setdefault(ev.index, []).extend(delta.tokens)
                if isinstance(ev, Finish):
                    finishes.append(ev)
        for ev in best(finishes, tokens, prepared.n):
            yield ev
        return
    async with aclosing(_fan_out(choice, prepared.n)) as events:
        async for ev in events:
            yield ev


def best(finishes: list[Finish], tokens: dict[int, list[TokenInfo]], n: int) -> list[Finish]:
    """The `n` choices with the highest cumulative logprob, best first,
    renumbered 0..n-1, each whole in its Finish (its text, and in its delta
    all its `tokens`). Usage still counts every token generated: the first
    carries the completion tokens of all."""
    ranked = sorted(finishes, key=lambda f: f.cumulative_logprob, reverse=True)[:n]
    generated = sum(f.completion_tokens for f in finishes)
    out = []
    for i, f in enumerate(ranked):
        delta = Delta(f.text, tokens.get(f.index, []), i)
        counted = generated if i == 0 else 0
        out.append(dataclasses.replace(f, delta=delta, completion_tokens=counted))
    return out


async def _fan_out(
    choice: Callable[[int], AsyncGenerator[Event, None]], count: int
) -> AsyncGenerator[Event, None]:
    """Choice 0 until its second event (or its end), then the rest beside it; events as
    they come. Closing this generator cancels every choice."""
    queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async with aclosing(choice(i)) as events:
                async for ev in events:
                    await queue.put((i, ev))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the consumer raises it
            await queue.put((i, e))
            return
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(0))]
    running = 1
    first_events = 0  # of choice 0, until the others start
    try:
        while running:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                running -= 1
                continue
            if i == 0 and len(tasks) == 1:
                first_events += 1
                # After its first token the prompt is computed and cached where
                # it was prefilled; after its second, the decode worker has
                # the KV too (the first token overtakes the transfer): the
                # others follow it.
                if first_events == 2 or isinstance(item, Finish):
                    tasks += [asyncio.create_task(pump(j)) for j in range(1, count)]
                    running += count - 1
            yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
