"""The workers the router knows: their health, their last Status, and the
router's own count of what it sent them since.

A background task polls every worker's Status; a failed poll or call marks
the worker unhealthy (with the error), a successful poll marks it healthy
again. Selection reads the last Status plus the router's own in-flight
estimate, so a burst of requests between two polls spreads out instead of
landing on whichever worker looked emptiest at the last poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from kvtransfer.security import ClusterSecurity, secure_channel  # keepalive, secret, TLS
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from router import selection
from router.prefix_index import PrefixIndex, PromptBlocks
from router.selection import Policy

log = logging.getLogger("splitserve.router")

DECODE_ROLES = ("decode", "colocated")

# Where the workers are now: (decode addresses, prefill addresses). Asked at
# every poll when the pool is dynamic (Kubernetes DNS, a Ray directory).
Discover = Callable[[], Awaitable[tuple[Sequence[str], Sequence[str]]]]


@dataclass(eq=False)
class Worker:
    """One worker, as the router sees it. Only WorkerPool changes its fields."""

    address: str
    pool: Literal["decode", "prefill"]  # which command-line flag named it
    channel: grpc.aio.Channel | None = None
    status: pb.WorkerStatus | None = None  # the last successful poll's answer
    status_time: float = 0.0  # monotonic time that poll was sent
    healthy: bool = False  # no until a poll succeeds
    last_error: str | None = None
    last_seen: float | None = None  # monotonic time of the last successful poll
    # The router's own bookkeeping, live:
    in_flight: int = 0  # D: Generate calls open to it now
    # D: (send time, KV blocks, prompt tokens to compute there: its uncached
    # part when it prefills) of calls sent; those after status_time are not
    # yet in the status (kv_blocks_free, waiting, ...).
    dispatched: deque[tuple[float, int, int]] = field(default_factory=deque)
    # P: prompt tokens of requests that ranked it first and have no first token yet.
    pending_prompt_tokens: int = 0
    full_at: float = -1.0  # D: monotonic time it last answered RESOURCE_EXHAUSTED
    # P, colocated: the prompt blocks sent to it recently (its likely prefix cache).
    prefixes: PrefixIndex = field(default_factory=PrefixIndex)

    @property
    def role(self) -> str:
        """What the worker says it is; before it said anything, what it was configured as."""
        return self.status.role if self.status is not None else self.pool

    @property
    def block_size(self) -> int:
        return max(1, self.status.block_size) if self.status is not None else 16

    def est_free_blocks(self) -> int:
        """Free KV blocks at the last poll, minus what the router sent since."""
        if self.status is None or self.full_at >= self.status_time:
            return 0  # it said it is full since the last poll: believe it until the next
        unseen = sum(blocks for t, blocks, _ in self.dispatched if t >= self.status_time)
        return self.status.kv_blocks_free - unseen

    def est_queued_prompt_tokens(self) -> int:
        """Prompt tokens queued at the last poll, plus those the router sent since."""
        if self.status is None:
            return sum(tokens for _, _, tokens in self.dispatched)
        unseen = sum(tokens for t, _, tokens in self.dispatched if t >= self.status_time)
        return self.status.waiting_prompt_tokens + unseen

    def queue_full(self) -> bool:
        """Whether its queue is at a bound it reported (max_waiting_requests,
        max_waiting_prompt_tokens; 0: none), counting every request the router
        sent since the last poll as still waiting: one more would be refused."""
        s = self.status
        if s is None or not (s.max_waiting_requests or s.max_waiting_prompt_tokens):
            return False
        unseen = [tokens for t, _, tokens in self.dispatched if t >= self.status_time]
        if s.max_waiting_requests and s.waiting + len(unseen) >= s.max_waiting_requests:
            return True
        tokens = s.waiting_prompt_tokens + sum(unseen)
        return bool(s.max_waiting_prompt_tokens) and tokens >= s.max_waiting_prompt_tokens

    def to_json(self, now: float) -> dict[str, Any]:
        """One row of GET /cluster."""
        s = self.status
        return {
            "role": self.role,
            "address": self.address,
            "pid": s.pid if s else None,
            "healthy": self.healthy,
            "kv_blocks_total": s.kv_blocks_total if s else None,
            "kv_blocks_free": s.kv_blocks_free if s else None,
            "block_size": s.block_size if s else None,
            "running": s.running if s else None,
            "waiting": s.waiting if s else None,
            "waiting_prompt_tokens": s.waiting_prompt_tokens if s else None,
            "awaiting_kv": s.awaiting_kv if s else None,
            "held": s.held if s else None,
            "metrics_port": s.metrics_port if s else None,
            "num_steps": s.num_steps if s else None,
            "mean_batch_size": s.mean_batch_size if s else None,
            "num_preemptions": s.num_preemptions if s else None,
            "max_model_len": s.max_model_len if s else None,
            "max_num_seqs": s.max_num_seqs if s else None,
            # "" from a worker older than these fields: unknown.
            "dtype": (s.dtype or None) if s else None,
            "dtype_reason": (s.dtype_reason or None) if s else None,
            "cost_dollars": round(s.cost_dollars, 6) if s else None,
            "tokens_produced": s.tokens_produced if s else None,
            "prefix_cache_queries": s.prefix_cache_queries if s else None,
            "prefix_cache_hits": s.prefix_cache_hits if s else None,
            "router_in_flight": self.in_flight,
            "last_error": self.last_error,
            "last_seen_s_ago": round(now - self.last_seen, 3) if self.last_seen else None,
        }


class WorkerPool:
    """Decode (or colocated) workers and prefill workers, by address.

    The addresses are fixed, or, with `discover`, asked for before every poll:
    a new address joins (healthy after its first good poll), a vanished one
    takes no new requests at once and its channel closes when its last call
    ends (a draining worker finishes its streams; they are not cut).
    """

    def __init__(
        self,
        decode: Sequence[str],
        prefill: Sequence[str],
        *,
        poll_interval_s: float = 0.5,
        poll_timeout_s: float = 1.0,
        slow_grace_s: float = 3.0,
        vocab_size: int | None = None,
        discover: Discover | None = None,
        policy: Policy = "cache_aware",
        security: ClusterSecurity | None = None,
        on_decision: Callable[[str], None] | None = None,
        local_prefill_threshold: int = 0,
    ) -> None:
        self.vocab_size = vocab_size  # the router's model: workers must match it
        self.decode = [Worker(a, "decode") for a in dict.fromkeys(decode)]
        self.prefill = [Worker(a, "prefill") for a in dict.fromkeys(prefill)]
        self.poll_interval_s = poll_interval_s
        self.poll_timeout_s = poll_timeout_s
        # A healthy worker whose Status is late (a burst saturating its event
        # loop) stays healthy this long after its last answer: busy is not
        # dead, and calling it slow beats answering 503. A frozen worker is
        # marked after this; a refused connection at once.
        self.slow_grace_s = slow_grace_s
        self.discover = discover
        self.policy = policy
        # Told why each prompt went where it went: "prefix_cache" (a worker
        # likely held part of it) or "load" (none did, or the policy ignores it).
        self.on_decision = on_decision
        # A prompt whose part the decode worker likely lacks is at most this
        # many tokens is prefilled there, with no KV transfer (0: never).
        self.local_prefill_threshold = local_prefill_threshold
        self.security = security or ClusterSecurity()  # how to reach the workers
        self.last_discovery_error: str | None = None
        self._retired: list[Worker] = []  # removed, with calls still open
        self._started = False
        self._task: asyncio.Task[None] | None = None
        self._rr = itertools.count()  # round-robin tie-break between equals

    @property
    def workers(self) -> list[Worker]:
        return self.decode + self.prefill

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open channels (in the running loop: grpc.aio binds them to it), poll
        once so the first request sees real health, then poll in the background."""
        self._started = True
        for w in self.workers:
            w.channel = secure_channel(w.address, self.security)
        await self.poll_all()
        self._task = asyncio.create_task(self._poll_loop(), name="router-worker-poll")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for w in self.workers + self._retired:
            if w.channel is not None:
                await w.channel.close()
                w.channel = None
        self._retired.clear()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_all()
            except Exception:  # the loop must outlive any one bad answer
                log.exception("polling workers failed")

    # -- health ----------------------------------------------------------------

    async def poll_all(self) -> None:
        """Refresh the membership (if discovered), then ask every worker for
        its Status now, concurrently."""
        if self.discover is not None:
            await self._rediscover()
        await asyncio.gather(*(self._poll(w) for w in self.workers))
        for w in [w for w in self._retired if w.in_flight == 0]:
            self._retired.remove(w)
            if w.channel is not None:
                await w.channel.close()
                w.channel = None

    async def _rediscover(self) -> None:
        assert self.discover is not None
        try:
            async with asyncio.timeout(self.poll_timeout_s):
                decode, prefill = await self.discover()
        except Exception as e:  # keep the last known membership
            error = f"{type(e).__name__}: {e}"
            if error != self.last_discovery_error:
                log.warning("worker discovery failed (keeping the last list): %s", error)
            self.last_discovery_error = error
            return
        self.last_discovery_error = None
        self.decode = self._update(self.decode, decode, "decode")
        self.prefill = self._update(self.prefill, prefill, "prefill")

    def _update(
        self, current: list[Worker], addresses: Sequence[str], pool: Literal["decode", "prefill"]
    ) -> list[Worker]:
        by_address = {w.address: w for w in current}
        kept = []
        for address in dict.fromkeys(addresses):
            w = by_address.pop(address, None)
            if w is None:
                log.info("discovered %s worker %s", pool, address)
                w = Worker(address, pool)
                if self._started:
                    w.channel = secure_channel(address, self.security)
            kept.append(w)
        for w in by_address.values():
            log.info("%s worker %s left the pool", pool, w.address)
            w.healthy = False
            w.last_error = "left the pool"
            self._retired.append(w)
        return kept

    async def _poll(self, w: Worker) -> None:
        if w.channel is None:
            return
        stub: Any = (
            pb_grpc.DecodeWorkerStub(w.channel)
            if w.pool == "decode"
            else pb_grpc.PrefillWorkerStub(w.channel)
        )
        sent = time.monotonic()
        try:
            status = await stub.Status(
                pb.StatusRequest(), timeout=self.poll_timeout_s, wait_for_ready=False
            )
        except grpc.aio.AioRpcError as e:
            late = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            recent = w.last_seen is not None and time.monotonic() - w.last_seen < self.slow_grace_s
            if late and w.healthy and recent:
                return
            self.mark_unhealthy(w, f"Status: {e.code().name}: {e.details()}")
            return
        if sent < w.status_time:  # a newer poll already answered
            return
        w.status, w.status_time, w.last_seen = status, sent, time.monotonic()
        while w.dispatched and w.dispatched[0][0] < sent:
            w.dispatched.popleft()
        expected = DECODE_ROLES if w.pool == "decode" else ("prefill",)
        if status.role not in expected:
            self.mark_unhealthy(
                w, f"configured as a {w.pool} worker but its role is {status.role!r}"
            )
            return
        if self.vocab_size and status.vocab_size and status.vocab_size != self.vocab_size:
            # A different model: its token ids would decode to garbage here.
            self.mark_unhealthy(
                w,
                f"serves a model with vocab_size {status.vocab_size} ({status.model}); "
                f"the router's model has {self.vocab_size}",
            )
            return
        if not w.healthy:
            log.info("worker %s (%s) is healthy", w.address, status.role)
        w.healthy = True

    def mark_unhealthy(self, w: Worker, error: str) -> None:
        if w.healthy:
            log.warning("worker %s is unhealthy: %s", w.address, error)
        w.healthy = False
        w.last_error = error

    def mark_full(self, w: Worker) -> None:
        """`w` refused a request for want of KV blocks."""
        w.full_at = time.monotonic()

    @property
    def healthy_decode(self) -> list[Worker]:
        return [w for w in self.decode if w.healthy]

    @property
    def healthy_prefill(self) -> list[Worker]:
        return [w for w in self.prefill if w.healthy]

    # -- selection (the policy is router/selection.py) ------------------------------

    def pick_decode(
        self, prompt_len: int, exclude: set[str], prompt: PromptBlocks | None = None
    ) -> Worker | None:
        """The best healthy decode worker not in `exclude`, or None (see
        selection.pick_decode)."""
        return selection.pick_decode(
            self.decode,
            prompt_len,
            exclude,
            self.policy,
            next(self._rr),
            self.queue_full,
            prompt,
        )

    def queue_full(self, w: Worker) -> bool:
        """Whether decode worker `w` would refuse a request for its queue bound:
        the bound holds for a colocated worker, and for a decode worker only
        while it would prefill itself (no healthy prefill worker); otherwise
        its queue waits on the prefill pool, which has its own."""
        return (w.role == "colocated" or not self.healthy_prefill) and w.queue_full()

    def rank_prefill(self, decode: Worker, prompt: PromptBlocks | None = None) -> list[Worker]:
        """Healthy prefill workers for `decode` to try, best first; none for a
        colocated worker, or for a prompt whose part `decode` likely lacks is
        short enough to prefill there (disaggregation pays only for the rest;
        see selection.rank_prefill)."""
        if decode.role == "colocated":
            return []
        if prompt is not None and self.local_prefill_threshold > 0:
            lacks = len(prompt.prompt_ids) - selection.cached_tokens(decode, prompt)
            if lacks <= self.local_prefill_threshold:
                return []
        return selection.rank_prefill(self.prefill, next(self._rr), self.policy, prompt)

    def dispatched(
        self,
        decode: Worker,
        prefill: Sequence[Worker],
        prompt_len: int,
        prompt: PromptBlocks | None = None,
    ) -> int:
        """Count a Generate call about to go to `decode`, and remember which
        worker computes the prompt (so holds its blocks next time). Returns
        the prompt tokens it likely computes (its uncached part), which
        first_token takes back."""
        decode.in_flight += 1
        blocks = -(-prompt_len // decode.block_size)
        computes = prefill[0] if prefill else decode
        cached = selection.cached_tokens(computes, prompt)
        work = prompt_len - cached
        decode.dispatched.append((time.monotonic(), blocks, prompt_len if prefill else work))
        if prefill:
            prefill[0].pending_prompt_tokens += work
        if prompt is None:
            return work
        if self.on_decision is not None:
            if not prefill and decode.role != "colocated" and self.healthy_prefill:
                reason = "local_prefill"
            elif self.policy == "cache_aware" and (
                cached > 0 or (prefill and selection.cached_tokens(decode, prompt) > 0)
            ):
                reason = "prefix_cache"
            else:
                reason = "load"
            self.on_decision(reason)
        # Whoever computes the prompt caches its blocks, and so does the
        # decode worker its KV is sent to.
        for w in {computes, decode}:
            if w.status is not None:
                w.prefixes.capacity = max(1, w.status.kv_blocks_total)
            w.prefixes.add(prompt.hashes(w.block_size))
        return work

    def first_token(self, prefill: Sequence[Worker], work: int) -> None:
        """The prompt is computed: its `work` (what dispatched returned) no
        longer loads its prefill worker."""
        if prefill:
            prefill[0].pending_prompt_tokens -= work

    def ended(self, decode: Worker) -> None:
        """A Generate call to `decode` ended, however it ended."""
        decode.in_flight -= 1
