"""One request's life after validation: dispatch, tokens in, text events out.

`run_request` is an async generator of events, the same for both endpoints
and both modes (streaming or not): a `Delta` at the first token
(possibly empty: it says the request was accepted, so a stream can answer
200 now; with `echo` it carries the prompt's text, and with `echo` and
`logprobs` the prompt tokens' logprob entries) and then whenever there is
text or logprobs to send, and one `Finish` last. Errors before the first
event are APIError (400, 502, 503 with Retry-After); after it, WorkerFailed.
A decode worker that fails mid-stream is replaced without a trace in the
events (router/dispatch.py migrates the request with every token received,
including those the TextAssembler still holds back): only
`splitserve_timings.migrations` tells. Closing the generator cancels the
gRPC call.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams
from protos import splitserve_pb2 as pb
from router.dispatch import DEFAULT_MIGRATION_LIMIT, DecodeCall
from router.metrics import RouterMetrics
from router.pool import WorkerPool
from router.preprocess import Prepared
from router.served_model import ServedModel
from router.textstream import TextAssembler, TokenInfo, prompt_token_infos
from worker.wire import prompt_logprobs_from_pb


@dataclass
class Delta:
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)  # when logprobs were asked for
    index: int = 0  # which choice (n > 1)


@dataclass
class Finish:
    delta: Delta  # the text and logprobs not yet sent
    reason: str  # "stop" | "length"
    text: str  # the whole output text (after the prompt's, with echo)
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, Any]  # the response's "splitserve_timings"
    cumulative_logprob: float  # of the output tokens (best_of ranks by it)

    @property
    def index(self) -> int:
        return self.delta.index


def usage(finishes: list[Finish]) -> dict[str, Any]:
    """The response's usage over all its choices: the prompt counted once
    (its KV is shared), every generated token counted."""
    prompt = finishes[0].prompt_tokens
    completion = sum(f.completion_tokens for f in finishes)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": finishes[0].timings.get("cached_tokens", 0)},
    }


async def run_request(
    pool: WorkerPool,
    metrics: RouterMetrics,
    served: ServedModel,
    prepared: Prepared,
    request_id: str,
    arrival: float,
    migration_limit: int = DEFAULT_MIGRATION_LIMIT,
    params: SamplingParams | None = None,
    index: int = 0,
    prompt_tokens: list[TokenInfo] | None = None,
) -> AsyncGenerator[Delta | Finish, None]:
    """Send the request to a decode worker and turn its tokens into events
    of choice `index`, sampled with `params` (default: the request's); a
    request whose worker fails mid-stream moves up to `migration_limit` times.

    With echo and logprobs, the first event's tokens start with the prompt's
    entries: `prompt_tokens` when given (another choice's, with `params`
    not asking the worker to score the prompt again), else built from the
    prompt logprobs of the worker's first message."""
    params = params or prepared.params
    call = DecodeCall(pool, metrics, request_id, prepared.prompt_ids, params, migration_limit)
    echo = prepared.echo or ""  # the prompt's text, sent before the output (echo)
    asm = TextAssembler(
        served.tokenizer,
        params.stop,
        logprobs=prepared.logprobs,
        min_tokens=params.min_tokens,
        offset_base=len(echo),
    )
    first_at: float | None = None
    last_at = arrival
    first_timings: pb.Timings | None = None
    final: pb.GenerateResponse | None = None
    started = False
    unsent_echo = echo
    unsent_prompt: list[TokenInfo] = []  # the prompt's logprob entries (echo with logprobs)
    async with aclosing(call.messages()) as messages:
        async for msg in messages:
            now = time.monotonic()
            k = len(msg.token_ids)
            if first_at is None:
                first_at = now
                first_timings = msg.timings if msg.HasField("timings") else None
                metrics.ttft.observe(now - arrival)
                metrics.prompt_tokens.inc(len(prepared.prompt_ids))
                metrics.generation_tokens.inc(k)
                if prepared.echo is not None and prepared.logprobs:
                    unsent_prompt = (
                        prompt_tokens
                        if prompt_tokens is not None
                        else _prompt_tokens(served, prepared, msg)
                    )
            elif k:
                metrics.observe_tokens(now - last_at, k)
            if k:
                last_at = now
            _push_all(asm, msg)
            if msg.finish_reason or asm.stopped:
                # A stop string the worker did not finish on: leaving the block
                # closes the stream, which cancels the call on the worker.
                final = msg if msg.finish_reason else None
                break
            text, tokens = asm.take()
            if text or tokens or not started:  # always an event at the first message
                started = True
                yield Delta(unsent_echo + text, unsent_prompt + tokens, index)
                unsent_echo, unsent_prompt = "", []
    assert first_at is not None  # messages() raises rather than end without a finish
    worker_stop = None
    if final is not None and final.WhichOneof("stop_reason") == "stop_string":
        worker_stop = final.stop_string
    rest, tokens = asm.finish(worker_stop)
    reason = "stop" if asm.stopped else (final.finish_reason if final else "stop")
    done = time.monotonic()
    n = len(asm.token_ids)
    metrics.observe_finish(first_at - arrival, done - arrival, n)
    worker = call.worker.address if call.worker is not None else ""
    yield Finish(
        delta=Delta(unsent_echo + rest, unsent_prompt + tokens, index),
        reason=reason,
        text=echo + asm.text,
        prompt_tokens=len(prepared.prompt_ids),
        completion_tokens=n,
        timings=_timings(
            first_timings,
            final,
            worker,
            call.attempts,
            call.migrations,
            first_at - arrival,
            done - arrival,
        ),
        cumulative_logprob=asm.cumulative_logprob,
    )


def _prompt_tokens(
    served: ServedModel, prepared: Prepared, msg: pb.GenerateResponse
) -> list[TokenInfo]:
    """The echoed prompt's logprob entries, from the worker's first message
    (logprobs None if it sent none)."""
    scored = (
        prompt_logprobs_from_pb(msg.prompt_logprobs) if msg.HasField("prompt_logprobs") else None
    )
    return prompt_token_infos(served.tokenizer, prepared.prompt_ids, scored, prepared.echo or "")


def _push_all(asm: TextAssembler, msg: pb.GenerateResponse) -> None:
    k = len(msg.token_ids)
    # The engine matches no stop string on a token that ended the request by
    # EOS or a stop token (finish "stop" without a stop string).
    ended_by_token = msg.finish_reason == "stop" and msg.WhichOneof("stop_reason") != "stop_string"
    for i, token in enumerate(msg.token_ids):
        logprob = msg.logprobs[i] if i < len(msg.logprobs) else None
        top = msg.top_logprobs[i] if i < len(msg.top_logprobs) else None
        alternatives = [] if top is None else list(zip(top.token_ids, top.logprobs, strict=True))
        asm.push(token, logprob, alternatives, check_stop=not (ended_by_token and i == k - 1))
        if asm.stopped:
            break


def _timings(
    first: pb.Timings | None,
    final: pb.GenerateResponse | None,
    decode_address: str,
    attempts: int,
    migrations: int,
    ttft_s: float,
    e2e_s: float,
) -> dict[str, Any]:
    """Where the time went: the worker's Timings (the final message's, falling
    back to the first message's for fields it left 0) and the router's view."""
    last = final.timings if final is not None and final.HasField("timings") else None
    sources = [t for t in (last, first) if t is not None]

    def pick(name: str) -> Any:
        for t in sources:
            value = getattr(t, name)
            if value:
                return value
        return getattr(pb.Timings(), name)  # the field's zero

    return {
        "ttft_s": round(ttft_s, 6),  # client-seen: arrival at the router to first token
        "e2e_s": round(e2e_s, 6),
        "worker_ttft_s": pick("ttft_s"),
        "queue_s": pick("queue_s"),
        "prefill_s": pick("prefill_s"),
        "kv_transfer_s": pick("kv_transfer_s"),
        "kv_transfer_bytes": pick("kv_transfer_bytes"),
        "decode_s": pick("decode_s"),
        "num_preemptions": pick("num_preemptions"),
        "cached_tokens": pick("num_cached_tokens"),
        # Of the prompt, the tokens the decode worker already held, so not
        # transferred (1P+1D; 0 colocated).
        "decode_cached_tokens": pick("decode_cached_tokens"),
        "prefill_worker": pick("prefill_address") or decode_address,
        "decode_worker": decode_address,
        "attempts": attempts,
        "migrations": migrations,  # times a failed decode worker's request moved on
    }
