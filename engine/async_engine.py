"""The engine on its own thread, driven from an asyncio event loop.

A worker's event loop serves RPCs; the engine thread runs schedule/run/
post-process as long as there is work. The engine thread is the only owner
of the LLMEngine (scheduler, block pool): the event loop changes it only by
queueing a command, which runs between two steps. After each step the new
tokens of every request go back to the loop in one call, as TokenDeltas on
each request's queue.

Two things the loop may do directly, because they touch no engine state
that the thread changes: copy KV into blocks reserved for a request that is
waiting for remote KV (the scheduler never schedules it, so no step reads or
writes those blocks), and copy KV out of a finished request's held blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import Request

log = logging.getLogger("splitserve")

T = TypeVar("T")


@dataclass(slots=True)
class TokenDelta:
    """New tokens of one request since its previous delta."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finished: RequestOutput | None = None  # set on the request's last delta
    error: str | None = None  # the engine failed; the request is over


@dataclass(slots=True)
class StepInfo:
    """One engine iteration, for the worker's metrics (called on the engine thread)."""

    duration_s: float
    num_scheduled: int  # requests computed in the step (the batch)
    num_running: int
    num_waiting: int


@dataclass(slots=True)
class EngineSnapshot:
    """The engine's load, refreshed after every step and command; read without locks."""

    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    running: int = 0
    waiting: int = 0
    waiting_prompt_tokens: int = 0
    awaiting_kv: int = 0
    held: int = 0
    num_steps: int = 0
    mean_batch_size: float = 0.0
    num_preemptions: int = 0

    @property
    def kv_usage(self) -> float:
        total = self.kv_blocks_total
        return (total - self.kv_blocks_free) / total if total else 0.0


@dataclass(slots=True)
class _Live:
    request: Request
    queue: asyncio.Queue[TokenDelta]
    sent: int = 0  # output tokens already delivered


@dataclass(slots=True)
class _State:
    """Engine-thread-only bookkeeping."""

    live: dict[str, _Live] = field(default_factory=dict)


class EngineDeadError(RuntimeError):
    """The engine thread died; nothing more will run on it."""


def _ignore(message: str) -> None:
    pass


@dataclass(slots=True)
class _Command:
    run: Callable[[], None]  # on the engine thread, between steps
    on_dead: Callable[[str], None]  # instead of run, if the engine died first


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        loop: asyncio.AbstractEventLoop,
        on_step: Callable[[StepInfo], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        """`on_fatal(message)` runs once, on the engine thread, if the engine
        dies: a worker process then exits so its supervisor replaces it."""
        self.engine = engine
        self.loop = loop
        self.on_step = on_step
        self.snapshot = EngineSnapshot()
        self.on_fatal = on_fatal
        self.error: str | None = None  # set if the engine thread died
        # (command, what to do instead if the engine is dead); see _submit.
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._death = threading.Lock()  # orders _submit against the thread's death
        self._wake = threading.Event()
        self._room_waiters: list[asyncio.Future[None]] = []  # loop thread only
        self._stop = False
        self._state = _State()
        self._refresh_snapshot()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    # -- called from the event loop ----------------------------------------------

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between steps; its result."""
        fut: asyncio.Future[T] = self.loop.create_future()

        def command() -> None:
            try:
                result = fn(self.engine)
            except BaseException as e:
                self.loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                self.loop.call_soon_threadsafe(_set_result, fut, result)

        def fail(message: str) -> None:
            self.loop.call_soon_threadsafe(_set_exception, fut, EngineDeadError(message))

        self._submit(command, fail)
        return await fut

    def add_request(self, request: Request) -> asyncio.Queue[TokenDelta]:
        """Queue a request for the engine; its tokens arrive on the returned queue.

        Output tokens already in the request (a migrated or recomputed
        request: the client has them) are recomputed with the prompt and not
        delivered again; only the tokens after them arrive."""
        q: asyncio.Queue[TokenDelta] = asyncio.Queue()
        rid = request.request_id
        already_sent = len(request.output_token_ids)

        def command() -> None:
            if rid in self._state.live:
                # Never touch the live request's stream or blocks.
                self._post([TokenDelta(rid, [], [], error=f"request id {rid!r} is in use")], q)
                return
            try:
                self.engine.add_request(request)
            except Exception as e:
                self._post([TokenDelta(rid, [], [], error=str(e))], q)
                return
            self._state.live[rid] = _Live(request, q, sent=already_sent)

        self._submit(command, self._fail_queue(rid, q))
        return q

    async def reserve_remote(self, request: Request, wait_s: float = 0.0) -> Sequence[int] | None:
        """Reserve blocks for a prompt whose KV another engine computes; the
        block table to fill, or None when the pool stayed full for `wait_s`
        seconds (retried whenever blocks are freed)."""

        def reserve(engine: LLMEngine) -> Sequence[int] | None:
            table = engine.reserve_remote(request)
            return None if table is None else list(table)

        deadline = self.loop.time() + wait_s
        while True:
            table = await self.call(reserve)
            remaining = deadline - self.loop.time()
            if table is not None or remaining <= 0:
                return table
            room: asyncio.Future[None] = self.loop.create_future()
            self._room_waiters.append(room)
            try:
                # Polled too, so a wake-up lost to a race costs a fraction of a second.
                await asyncio.wait({room}, timeout=min(remaining, 0.25))
            finally:
                if room in self._room_waiters:
                    self._room_waiters.remove(room)

    def remote_kv_done(
        self, request_id: str, first_token: int, logprob: float | None, kv_valid: bool = True
    ) -> asyncio.Queue[TokenDelta]:
        """The reservation is filled; the request joins the batch. Tokens after
        the first (which the caller already has) arrive on the returned queue.
        With kv_valid False (the transfer failed after the first token) the
        reservation is dropped and the prompt recomputed here instead."""
        q: asyncio.Queue[TokenDelta] = asyncio.Queue()

        def command() -> None:
            req = self.engine.scheduler.awaiting_kv.get(request_id)
            try:
                done = self.engine.remote_kv_done(request_id, first_token, logprob, kv_valid)
            except Exception as e:
                self._post([TokenDelta(request_id, [], [], error=str(e))], q)
                return
            if done is not None:
                self._post([TokenDelta(request_id, [], [], finished=done)], q)
            elif req is not None:
                self._state.live[request_id] = _Live(req, q, sent=1)

        self._submit(command, self._fail_queue(request_id, q))
        return q

    def abort(self, request_id: str) -> None:
        """Finish the request wherever it is (queued, running, awaiting KV or
        holding blocks for a transfer) and free its blocks. Idempotent."""

        def command() -> None:
            self._state.live.pop(request_id, None)
            self.engine.abort_request(request_id)

        self._submit(command)

    def release_blocks(self, request_id: str) -> None:
        """A held request's KV has been shipped: free its blocks."""
        self._submit(lambda: self.engine.release_blocks(request_id))

    # -- the engine thread -------------------------------------------------------

    def _fail_queue(self, rid: str, q: asyncio.Queue[TokenDelta]) -> Callable[[str], None]:
        return lambda message: self._post([TokenDelta(rid, [], [], error=message)], q)

    def _submit(
        self, command: Callable[[], None], on_dead: Callable[[str], None] = _ignore
    ) -> None:
        """Queue a command for the engine thread. If the engine is dead, or
        dies before running it, `on_dead(error)` runs instead: no caller
        waits on a command that will never run."""
        with self._death:
            if self.error is None:
                self._commands.put(_Command(command, on_dead))
                self._wake.set()
                return
        on_dead(self.error)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_commands()
                if self.engine.scheduler.has_schedulable() and self._step():
                    continue
                self._refresh_snapshot()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
        except BaseException as e:
            log.exception("engine thread died")
            message = f"engine failed: {type(e).__name__}: {e}"
            with self._death:
                self.error = message
            self._fail_all(message)
            if self.on_fatal is not None:
                self.on_fatal(message)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command.run()

    def _step(self) -> bool:
        """One engine step; False if nothing could be scheduled (blocks pinned
        until KV arrives or held KV is released: a command will wake us)."""
        start = time.perf_counter()
        steps_before = self.engine.scheduler.stats.num_steps
        batch_before = self.engine.scheduler.stats.running_batch_sum
        finished = self.engine.step()
        duration = time.perf_counter() - start
        stats = self.engine.scheduler.stats
        deltas = []
        live = self._state.live
        for out in finished:
            entry = live.pop(out.request_id, None)
            if entry is not None:
                new = out.token_ids[entry.sent :]
                lps = out.logprobs[entry.sent :] if out.logprobs is not None else []
                deltas.append((TokenDelta(out.request_id, new, lps, finished=out), entry.queue))
        for rid, entry in live.items():
            req = entry.request
            n = len(req.output_token_ids)
            if n > entry.sent:
                lps = req.output_logprobs[entry.sent : n] if req.output_logprobs else []
                new = req.output_token_ids[entry.sent : n]
                deltas.append((TokenDelta(rid, new, lps), entry.queue))
                entry.sent = n
        if deltas:
            self.loop.call_soon_threadsafe(_deliver, deltas)
        self._refresh_snapshot()
        if stats.num_steps == steps_before:
            return False
        if self.on_step is not None:
            self.on_step(
                StepInfo(
                    duration_s=duration,
                    num_scheduled=stats.running_batch_sum - batch_before,
                    num_running=len(self.engine.scheduler.running),
                    num_waiting=len(self.engine.scheduler.waiting),
                )
            )
        return True

    def _room_freed(self) -> None:
        for room in self._room_waiters:
            if not room.done():
                room.set_result(None)

    def _post(self, deltas: list[TokenDelta], q: asyncio.Queue[TokenDelta]) -> None:
        self.loop.call_soon_threadsafe(_deliver, [(d, q) for d in deltas])

    def _fail_all(self, message: str) -> None:
        """The engine is dead: end every live request and every command still
        queued (self.error is already set, so no new one is queued)."""
        deltas = [
            (TokenDelta(rid, [], [], error=message), entry.queue)
            for rid, entry in self._state.live.items()
        ]
        self._state.live.clear()
        if deltas:
            self.loop.call_soon_threadsafe(_deliver, deltas)
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command.on_dead(message)

    def _refresh_snapshot(self) -> None:
        sched = self.engine.scheduler
        pool = self.engine.block_pool
        stats = sched.stats
        if pool.num_free_blocks > self.snapshot.kv_blocks_free:
            self.loop.call_soon_threadsafe(self._room_freed)
        self.snapshot = EngineSnapshot(
            kv_blocks_total=pool.num_blocks,
            kv_blocks_free=pool.num_free_blocks,
            running=len(sched.running),
            waiting=len(sched.waiting),
            waiting_prompt_tokens=sum(
                max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in sched.waiting
            ),
            awaiting_kv=len(sched.awaiting_kv),
            held=len(sched.held),
            num_steps=stats.num_steps,
            mean_batch_size=stats.mean_running,
            num_preemptions=stats.num_preemptions,
        )


def _deliver(deltas: list[tuple[TokenDelta, asyncio.Queue[TokenDelta]]]) -> None:
    for delta, q in deltas:
        q.put_nowait(delta)


def _set_result(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
