"""The iteration-level scheduler.

One scheduler for every role. It knows no prefill or decode phase, only, per
request, tokens known (prompt + generated) against tokens computed (in the
KV cache). Each step it hands out a token budget:

1. running requests first, oldest first: each gets the tokens it is missing
   (1 for a decoding request; a chunk for one still prefilling). When one
   cannot get the blocks it needs, blocks are taken back (see "Making room")
   until it can, or until it is itself the newest running request, in which
   case it is the one preempted;
2. then waiting requests in arrival order, each admitted only when its first
   chunk's blocks can be allocated, until the budget or the cap on running
   requests is reached. A slot freed by a finished request is thus refilled
   at the very next step.

So prefill chunks ride along with decode steps (chunked prefill): a long
prompt never stalls the running batch for more than one budget's worth.

Who holds blocks: running requests; waiting requests whose prompt KV came
from another engine ("ready", see `remote_kv_arrived`); reservations for KV
still arriving (`awaiting_kv`); finished requests whose KV is being shipped
(`held`). Only the first two are the scheduler's to take back.

Making room (preemption by recompute): a running request that cannot grow
takes the blocks of the newest running requests; when it is itself the
newest, those of ready waiting requests, newest first (their prompts are
recomputed here later, which costs what the transfer saved); only then is
it preempted itself. So the oldest running request always grows, and
finishes. When nothing is running and the head of the queue cannot be
admitted, it takes the blocks of ready requests queued behind it. While
something runs, admission just waits: finishing requests free blocks.

Progress is an invariant, not a hope: whenever a request could be scheduled
(waiting or running), `schedule()` returns a non-empty batch, unless the
blocks standing in the way are pinned by events outside the scheduler, a
reservation awaiting KV (ended by the KV's arrival, the reservation's TTL or
an abort) or held KV (ended by the receiver's ack or the lease). Each of
those ends in bounded time and returns the blocks or turns them into a ready
request, which can be preempted; a request never needs more blocks than the
pool has (the engine refuses it at admission). tests/unit/test_scheduler_progress.py
drives every interleaving of these events and checks this after each one.

Reservations leave room: a remote-KV reservation also covers the slot of the
request's first decode step (so a request whose KV arrived can always take
its first step), and is granted only while at least `watermark` blocks stay
free after it (room for running requests to grow without preempting), so
reservations queue rather than evict running work.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from engine.block_pool import BlockPool, extend_block_hashes
from engine.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int  # cap on running requests
    max_num_batched_tokens: int  # token budget per step
    max_model_len: int  # a request stops with "length" when it reaches this
    # Free blocks a remote-KV reservation must leave: room for running
    # requests to grow, so a burst of reservations does not force preemptions.
    reservation_watermark: int = 1


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
    # Prefix cache: prompt tokens looked up at first admission, and found.
    prefix_queries: int = 0
    prefix_hits: int = 0

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

    def stop_by_string(self, request: Request) -> None:
        """A stop string ended `request`. One that reached max_tokens in the
        same step is already finished: the stop string wins, as in vLLM."""
        if request.is_finished:
            request.status = RequestStatus.FINISHED_STOPPED
        else:
            self.finish(request, RequestStatus.FINISHED_STOPPED)

    def release_blocks(self, request_id: str) -> None:
        """Free the blocks a finished request was holding (hold_blocks_on_finish)."""
        if self.held.pop(request_id, None) is not None:
            self.pool.free(request_id)

    # -- KV computed elsewhere (the decode role) --------------------------------

    def reserve_for_remote_kv(self, request: Request) -> int | None:
        """Reserve blocks for the whole prompt and its first decode step before
        anyone spends prefill work on it, starting with the prompt's cached
        prefix; returns how many of its blocks that prefix covers (their KV
        is here already), or None, with nothing held, when the blocks are
        not there (leaving the watermark free)."""
        rid = request.request_id
        if rid in self.requests or rid in self.held:
            raise ValueError(f"request id {rid!r} is already in use")
        tokens = request.num_prompt_tokens + 1
        # Even with prompt logprobs: the prompt is scored where it is computed.
        prefix = self._cached_prefix(request)
        need = self.pool.num_new_blocks_needed(rid, tokens, prefix)
        if need + self._watermark() > self.pool.num_free_blocks:
            return None
        self.pool.allocate(rid, tokens, prefix)
        request.num_cached_tokens = len(prefix) * self.pool.block_size
        if self.pool.enable_caching:
            self.stats.prefix_queries += request.num_prompt_tokens
            self.stats.prefix_hits += request.num_cached_tokens
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.requests[rid] = request
        self.awaiting_kv[rid] = request
        return len(prefix)

    def remote_kv_arrived(
        self,
        request_id: str,
        first_token: int,
        logprob: float | None,
        eos_token_ids: Sequence[int],
        kv_valid: bool = True,
    ) -> Request | None:
        """The prompt's KV is in the reserved blocks and the prefill worker
        sampled `first_token`. The request joins the queue with its prompt
        counted as computed; returns it if the first token already ends it.
        With kv_valid False the KV did not arrive whole: the blocks are
        freed and the prompt is recomputed here (the token stays sampled)."""
        req = self.awaiting_kv.pop(request_id)
        if kv_valid:
            req.num_computed_tokens = req.num_prompt_tokens
            self._cache_computed(req, 0)
        else:
            self.pool.free(request_id)
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
        """Requests that a step could work on (not those waiting for remote KV
        or for their grammar to compile)."""
        return bool(self.running) or any(r.ready for r in self.waiting)

    @property
    def num_pinned_blocks(self) -> int:
        """Blocks only an outside event frees: reservations awaiting KV and held KV."""
        table = self.pool.block_table
        return sum(len(table(rid)) for rid in self.awaiting_kv) + sum(
            len(table(rid)) for rid in self.held
        )

    def _watermark(self) -> int:
        # Never more than the pool minus one request's worth, so a lone
        # reservation in a tiny pool is still granted.
        return min(self.config.reservation_watermark, self.pool.num_blocks // 2)

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

        # After a preemption the freed room goes to the running batch next
        # step, unless nothing is left running: then admission must go on now.
        if not out.preempted or not out.scheduled:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                # First come, first served, among requests whose grammar is
                # compiled (compiling must not hold up the queue).
                head = next((r for r in self.waiting if r.ready), None)
                if head is None:
                    break
                req = head
                prefix = self._cached_prefix(req)
                if req.prompt_logprobs is not None:
                    # Prompt logprobs come from computing the prompt: start no
                    # later than the first position not scored yet.
                    prefix = prefix[: (len(req.prompt_logprobs) - 1) // self.pool.block_size]
                computed = len(prefix) * self.pool.block_size or req.num_computed_tokens
                n = min(req.num_tokens - computed, budget)
                target = computed + n
                if not self.pool.can_allocate(req.request_id, target, prefix) and not (
                    not self.running and self._make_room(req, target, out.preempted, prefix)
                ):
                    break  # FCFS: nobody overtakes the head of the queue
                if req is self.waiting[0]:
                    self.waiting.popleft()
                else:
                    self.waiting.remove(req)
                # A request whose KV came from elsewhere holds its blocks: no lookup.
                looked_up = self.pool.enable_caching and not self.pool.block_table(req.request_id)
                self.pool.allocate(req.request_id, target, prefix)
                req.num_computed_tokens = computed
                req.status = RequestStatus.RUNNING
                if req.scheduled_time is None:
                    req.scheduled_time = time.monotonic()
                    if looked_up:  # else it is what its reservation found
                        req.num_cached_tokens = len(prefix) * self.pool.block_size
                        self.stats.prefix_queries += req.num_prompt_tokens
                        self.stats.prefix_hits += req.num_cached_tokens
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
        newest running requests if needed, then ready waiting ones (see Making
        room). False if `req` itself was preempted."""
        target = req.num_computed_tokens + n
        while not self.pool.can_allocate(req.request_id, target):
            if self.running[-1] is req and self._make_room(req, target, preempted):
                break
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        self.pool.allocate(req.request_id, target)
        return True

    def _make_room(
        self, req: Request, target: int, preempted: list[Request], prefix: Sequence[int] = ()
    ) -> bool:
        """Free blocks of ready waiting requests (their KV came from elsewhere),
        newest first, until `req` can grow to `target` tokens (starting from
        the shared `prefix`, for one that holds nothing). True if it can."""
        rid = req.request_id
        for victim in reversed(self.waiting):
            if self.pool.can_allocate(rid, target, prefix):
                return True
            if victim is not req and self.pool.block_table(victim.request_id):
                self._drop_kv(victim)  # it keeps its place in the queue
                preempted.append(victim)
        return self.pool.can_allocate(rid, target, prefix)

    def _cached_prefix(self, req: Request) -> list[int]:
        """The cached blocks a request that holds none can start from: full
        blocks of its known tokens, short of the last token (always computed:
        its logits give the next token)."""
        if not self.pool.enable_caching or self.pool.block_table(req.request_id):
            return []
        bs = self.pool.block_size
        tokens = req.prompt_token_ids + req.output_token_ids
        hashes = extend_block_hashes(req.block_hashes, tokens, bs, (len(tokens) - 1) // bs)
        return self.pool.cached_prefix(hashes[: (len(tokens) - 1) // bs])

    def _cache_computed(self, req: Request, before: int) -> None:
        """Register the blocks that became full and computed since `before`
        tokens were computed."""
        bs = self.pool.block_size
        start, end = before // bs, req.num_computed_tokens // bs
        if end > start and self.pool.enable_caching:
            tokens = req.prompt_token_ids + req.output_token_ids
            hashes = extend_block_hashes(req.block_hashes, tokens, bs, end)
            self.pool.cache_blocks(req.request_id, hashes[:end], start)

    def _preempt(self, req: Request) -> None:
        """A running request leaves the batch for the front of the queue."""
        self._drop_kv(req)
        self.waiting.appendleft(req)

    def _drop_kv(self, req: Request) -> None:
        # Recompute, not swap: the KV is dropped and rebuilt from the known
        # tokens (prompt + generated so far) when the request runs again.
        self.pool.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
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
            self._cache_computed(req, req.num_computed_tokens - sched.num_new_tokens)
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
        if token in eos_token_ids and (not params.ignore_eos or params.structured_output):
            # A complete grammar allows only EOS: it ends a guided request.
            return RequestStatus.FINISHED_STOPPED
        if (
            req.num_output_tokens >= params.max_tokens
            or req.num_tokens >= self.config.max_model_len
        ):
            return RequestStatus.FINISHED_LENGTH
        return None
