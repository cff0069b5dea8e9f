"""The iteration-level scheduler.

One scheduler for every role. It knows no prefill or decode phase, only, per
request, tokens known (prompt + generated) against tokens computed (in the
KV cache). Each step it hands out a token budget:

1. running requests first, oldest first: each gets the tokens it is missing
   (1 for a decoding request; a chunk for one still prefilling). When one
   cannot get the blocks it needs, the newest running request is preempted
   (its blocks freed, to be recomputed later) until it can, or until it is
   itself the newest, in which case it is the one preempted;
2. then, if nothing was preempted, waiting requests in arrival order, each
   admitted only when its first chunk's blocks can be allocated, until the
   budget or the cap on running requests is reached. A slot freed by a
   finished request is thus refilled at the very next step.

So prefill chunks ride along with decode steps (chunked prefill): a long
prompt never stalls the running batch for more than one budget's worth.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from engine.block_pool import BlockPool
from engine.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int  # cap on running requests
    max_num_batched_tokens: int  # token budget per step
    max_model_len: int  # a request stops with "length" when it reaches this


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens to compute this step, from request.num_computed_tokens
    block_table: Sequence[int]  # read-only view owned by the block pool

    @property
    def completes_known_tokens(self) -> bool:
        """After this step every known token is computed, so a token is sampled."""
        req = self.request
        return req.num_computed_tokens + self.num_new_tokens == req.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)  # this step, newest first

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    running_batch_sum: int = 0  # sum over steps of running requests, for the average

    @property
    def mean_running(self) -> float:
        return self.running_batch_sum / self.num_steps if self.num_steps else 0.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_pool: BlockPool) -> None:
        self.config = config
        self.pool = block_pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: oldest first
        self.requests: dict[str, Request] = {}
        self.awaiting_kv: dict[str, Request] = {}  # blocks reserved, KV being received
        self.held: dict[str, Request] = {}  # finished, blocks kept until released
        self.stats = SchedulerStats()

    # -- queue ----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Finish a request now, wherever it is; its blocks are freed at once."""
        held = self.held.get(request_id)
        if held is not None:
            self.release_blocks(request_id)
            return held
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.hold_blocks_on_finish = False
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def finish(self, request: Request, status: RequestStatus) -> None:
        assert status.finished
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        elif request.status is RequestStatus.WAITING_FOR_REMOTE_KV:
            del self.awaiting_kv[request.request_id]
        request.status = status
        self.requests.pop(request.request_id, None)
        if request.hold_blocks_on_finish:
            self.held[request.request_id] = request
        else:
            self.pool.free(request.request_id)

    def release_blocks(self, request_id: str) -> None:
        """Free the blocks a finished request was holding (hold_blocks_on_finish)."""
        if self.held.pop(request_id, None) is not None:
            self.pool.free(request_id)

    # -- KV computed elsewhere (the decode role) --------------------------------

    def reserve_for_remote_kv(self, request: Request) -> bool:
        """Reserve blocks for the whole prompt before anyone spends prefill work
        on it. False, with nothing held, when the blocks are not there."""
        rid = request.request_id
        if rid in self.requests or rid in self.held:
            raise ValueError(f"request id {rid!r} is already in use")
        if not self.pool.can_allocate(rid, request.num_prompt_tokens):
            return False
        self.pool.allocate(rid, request.num_prompt_tokens)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.requests[rid] = request
        self.awaiting_kv[rid] = request
        return True

    def remote_kv_arrived(
        self,
        request_id: str,
        first_token: int,
        logprob: float | None,
        eos_token_ids: Sequence[int],
    ) -> Request | None:
        """The prompt's KV is in the reserved blocks and the prefill worker
        sampled `first_token`. The request joins the queue with its prompt
        counted as computed; returns it if the first token already ends it."""
        req = self.awaiting_kv.pop(request_id)
        req.num_computed_tokens = req.num_prompt_tokens
        req.status = RequestStatus.WAITING
        self.waiting.append(req)
        req.output_token_ids.append(first_token)
        if logprob is not None:
            req.output_logprobs.append(logprob)
        status = self._stop_status(req, first_token, eos_token_ids)
        if status is None:
            return None
        self.finish(req, status)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_schedulable(self) -> bool:
        """Requests that a step could work on (not those waiting for remote KV)."""
        return len(self.requests) > len(self.awaiting_kv)

    # -- one step ---------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self._reserve(req, n, out.preempted):
                out.scheduled.append(
                    ScheduledRequest(req, n, self.pool.block_table(req.request_id))
                )
                budget -= n
                i += 1
            # else: req itself was preempted; it was the last running request.

        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if not self.pool.can_allocate(req.request_id, req.num_computed_tokens + n):
                    break  # FCFS: nobody overtakes the head of the queue
                self.waiting.popleft()
                self.pool.allocate(req.request_id, req.num_computed_tokens + n)
                req.status = RequestStatus.RUNNING
                if req.scheduled_time is None:
                    req.scheduled_time = time.monotonic()
                self.running.append(req)
                out.scheduled.append(
                    ScheduledRequest(req, n, self.pool.block_table(req.request_id))
                )
                budget -= n

        if out.scheduled:
            self.stats.num_steps += 1
            self.stats.running_batch_sum += len(out.scheduled)
        return out

    def _reserve(self, req: Request, n: int, preempted: list[Request]) -> bool:
        """Allocate blocks for n more tokens of a running request, preempting the
        newest running requests if needed. False if `req` itself was preempted."""
        target = req.num_computed_tokens + n
        while not self.pool.can_allocate(req.request_id, target):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        self.pool.allocate(req.request_id, target)
        return True

    def _preempt(self, req: Request) -> None:
        # Recompute, not swap: the KV is dropped and rebuilt from the known
        # tokens (prompt + generated so far) when the request runs again.
        self.pool.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self.stats.num_preemptions += 1

    def update(
        self,
        output: SchedulerOutput,
        sampled: Iterable[tuple[int, float | None] | None],
        eos_token_ids: Sequence[int],
    ) -> list[Request]:
        """Advance each scheduled request by what was computed and sampled
        (one entry per scheduled request, None where nothing was sampled).
        Returns the requests that finished; their blocks are already free."""
        finished = []
        for sched, sample in zip(output.scheduled, sampled, strict=True):
            req = sched.request
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += sched.num_new_tokens
            if sample is None:
                continue
            token, logprob = sample
            req.output_token_ids.append(token)
            if logprob is not None:
                req.output_logprobs.append(logprob)
            status = self._stop_status(req, token, eos_token_ids)
            if status is not None:
                self.finish(req, status)
                finished.append(req)
        return finished

    def _stop_status(
        self, req: Request, token: int, eos_token_ids: Sequence[int]
    ) -> RequestStatus | None:
        params = req.sampling_params
        if token in params.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and token in eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if (
            req.num_output_tokens >= params.max_tokens
            or req.num_tokens >= self.config.max_model_len
        ):
            return RequestStatus.FINISHED_LENGTH
        return None
