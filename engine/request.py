"""The request: the one object that crosses from the engine to the scheduler.

The scheduler counts, per request, tokens *known* (prompt plus generated)
against tokens *computed* (whose KV is in the cache). There is no prefill or
decode phase: a request whose known tokens run ahead of its computed ones by
many is prefilling; by one, it is decoding.
"""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds blocks only if its KV came from elsewhere
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # blocks reserved, KV on its way
    RUNNING = "running"  # holds blocks, scheduled every step
    PREEMPTED = "preempted"  # blocks taken back; will recompute from scratch
    FINISHED_STOPPED = "stop"  # EOS, stop string or stop token
    FINISHED_LENGTH = "length"  # max_tokens or the context length
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(eq=False, slots=True)
class Request:
    """One generation request. Fields are set by the engine unless marked."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None  # the prompt's text, when it was given as text
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    # With sampling_params.prompt_logprobs: entry i is prompt token i's
    # logprob given the tokens before it (a TokenLogprob carrying its
    # position's alternatives when prompt_logprobs > 0); entry 0 is None
    # (nothing precedes it). Started here, grown in prompt order by the model
    # runner as it computes prompt chunks, complete at num_prompt_tokens
    # entries; None when not asked for, or when another engine scored the
    # prompt (remote KV) or the client has them already (a resumed request).
    prompt_logprobs: list[float | None] | None = None
    # Set by the scheduler: tokens whose KV is in this request's blocks.
    num_computed_tokens: int = 0
    # Set by the scheduler.
    status: RequestStatus = RequestStatus.WAITING
    # Set by the scheduler: prompt tokens found in the prefix cache when the
    # request was first admitted (OpenAI's usage.prompt_tokens_details.cached_tokens).
    num_cached_tokens: int = 0
    # The chained hashes of its full blocks of known tokens, grown as needed
    # (engine/block_pool.py); the scheduler's.
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    # Set by the caller: on finishing, keep the blocks until release_blocks()
    # (a prefill worker holds the KV until the decode worker has it).
    hold_blocks_on_finish: bool = False
    # Set by the scheduler when the request is first admitted to the batch.
    scheduled_time: float | None = None
    # Set by the engine when the first output token is produced / on finish.
    first_token_time: float | None = None
    finish_time: float | None = None
    stop_reason: int | str | None = None
    # Per-request RNG for seeded sampling, so a seed reproduces the same tokens
    # whatever else is in the batch. Created lazily by the sampler.
    generator: torch.Generator | None = None
    # The sampler's, for requests with a presence/frequency/repetition
    # penalty only (created lazily, on the logits' device, and caught up one
    # step at a time): how often each token id occurs in
    # output_token_ids[:num_counted_output_tokens] ([vocab] float32), and,
    # with a repetition penalty, which ids occur in the prompt or in those
    # output tokens ([vocab] bool).
    output_token_counts: torch.Tensor | None = None
    num_counted_output_tokens: int = 0
    seen_token_mask: torch.Tensor | None = None
    # Structured output (engine/structured_output.py): the grammar compiling
    # off the engine thread (set by the engine; the scheduler admits the
    # request once it is done), then its position in the grammar (set by
    # the model runner at its first sampling, from the tokens so far).
    grammar: Future[Any] | None = None
    matcher: Any = None

    def __post_init__(self) -> None:
        if self.sampling_params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Prompt positions still to score: they must be computed, not cached."""
        lps = self.prompt_logprobs
        return lps is not None and len(lps) < len(self.prompt_token_ids)

    @property
    def scored_prompt(self) -> list[float | None] | None:
        """prompt_logprobs once complete, else None."""
        return None if self.prompt_logprobs_pending else self.prompt_logprobs

    @property
    def ready(self) -> bool:
        """Whether the scheduler may admit it (its grammar, if any, compiled)."""
        return self.grammar is None or self.grammar.done()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens known: prompt plus generated."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Known tokens [start, end) across the prompt/output boundary."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]
