"""The engine on its own thread, driven from an asyncio event loop: the
workers' only way into engine state.

A worker's event loop serves RPCs; the engine thread runs schedule/run/
post-process as long as there is work. The engine thread is the only owner
of the LLMEngine (scheduler, block pool, KV pool): the event loop changes it
only by queueing a command, which runs between two steps. After each step
the new tokens of every request go back to the loop in one call, as
TokenDeltas on each request's queue.

Nothing outside engine/ touches the LLMEngine: servicers, KV transports and
deployments use AsyncEngine's methods, so the engine can move into a process
of its own behind the same interface. The loop uses these directly, with no
hop to the engine thread:

- what is fixed at start: `kv_layout`, `max_model_len`, `config`,
  `model_config`, and `make_request` (validation against those);
- `write_kv`: copy KV into blocks reserved for a request that is waiting for
  remote KV (the scheduler never schedules it, so no step reads or writes
  those blocks);
- `read_kv`: copy KV out of a finished request's held blocks (no step
  touches them until `release` or `abort`).

Both check that the blocks are still reserved or held, so a late copy fails
instead of landing in blocks that belong to another request by now.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from engine.commands import EngineDeadError, Mailbox
from engine.config import EngineConfig, ModelConfig
from engine.kv_access import DirectKv, KvLayout, KvReservation
from engine.llm_engine import LLMEngine
from engine.outputs import EngineSnapshot, StepInfo, TokenDelta
from engine.request import Request
from engine.sampling_params import SamplingParams

log = logging.getLogger("splitserve")

T = TypeVar("T")


@dataclass(slots=True)
class _Live:
    request: Request
    queue: asyncio.Queue[TokenDelta]
    sent: int = 0  # output tokens already delivered


@dataclass(slots=True)
class _State:
    """Engine-thread-only bookkeeping."""

    live: dict[str, _Live] = field(default_factory=dict)
    # Reserved for remote KV, until remote_kv_done or abort.
    reserved: dict[str, Request] = field(default_factory=dict)


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
        self._engine = engine  # the engine thread's alone once started
        self._kv_layout = KvLayout.of_cache(engine.runner.kv_caches)
        self._direct_kv = DirectKv(engine.runner.read_blocks, engine.runner.write_blocks)
        self.loop = loop
        self.on_step = on_step
        self.snapshot = EngineSnapshot()
        self.on_fatal = on_fatal
        self._mailbox = Mailbox()
        self._room_waiters: list[asyncio.Future[None]] = []  # loop thread only
        self._stop = False
        self._state = _State()
        self._refresh_snapshot()
        self._go = threading.Event()  # set by start(): the thread may step
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    @classmethod
    def build(
        cls,
        make_engine: Callable[[], LLMEngine],
        loop: asyncio.AbstractEventLoop,
        on_step: Callable[[StepInfo], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> AsyncEngine:
        """Build the LLMEngine on the thread that will step it, and return the
        AsyncEngine over it (not started yet). Blocks while the model loads.

        Why a thread of its own from the first tensor on: torch's OpenMP pool
        belongs to the thread that opens a parallel region. An engine loaded on
        one thread and stepped on another ran 4-8% slower and left ~0.4 of the
        2 cores idle (AMD EPYC, 2 cores, measured offline, nothing else
        running); loaded and stepped on one thread it matched the main thread."""
        built: list[AsyncEngine | BaseException] = []
        ready = threading.Event()

        def engine_thread() -> None:
            try:
                aengine = cls(make_engine(), loop, on_step, on_fatal)
            except BaseException as e:
                built.append(e)
                ready.set()
                return
            aengine._thread = threading.current_thread()
            built.append(aengine)
            ready.set()
            aengine._run()

        threading.Thread(target=engine_thread, name="engine", daemon=True).start()
        ready.wait()
        if isinstance(built[0], BaseException):
            raise built[0]
        return built[0]

    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()
        self._go.set()

    def stop(self) -> None:
        self._stop = True
        self._go.set()
        self._mailbox.wake.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=30)

    @property
    def error(self) -> str | None:
        """Why the engine thread died; None while it lives."""
        return self._mailbox.error

    # -- fixed at start: read from any thread -----------------------------------

    @property
    def kv_layout(self) -> KvLayout:
        """The KV pool's layout (what a KV transfer must match)."""
        return self._kv_layout

    @property
    def max_model_len(self) -> int:
        """The context length: prompt + output tokens."""
        return self._engine.max_model_len

    @property
    def config(self) -> EngineConfig:
        return self._engine.config  # frozen

    @property
    def model_config(self) -> ModelConfig:
        return self._engine.model_config  # frozen

    def make_request(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> Request:
        """A validated request, not queued yet; raises ValueError for one the
        engine would refuse. Token ids only: the tokenizer is the engine
        thread's (Hugging Face tokenizers are not safe across threads)."""
        return self._engine.make_request(list(prompt_token_ids), params, request_id)

    # -- KV copies, on the loop without the engine thread ------------------------

    def write_kv(
        self, layer: int, block_ids: Sequence[int], key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Copy one layer's K and V ([len(block_ids), *kv_layout.block_shape]
        each) into blocks of a reservation awaiting its KV (from reserve_remote
        until remote_kv_done or abort), on the calling thread: no step touches
        those blocks. ValueError for any other block."""
        self._direct_kv.write(layer, block_ids, key, value)

    def read_kv(
        self, request_id: str, layer: int, first_block: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of one layer's K and V ([n, *kv_layout.block_shape] each, in
        block-table order) of the blocks a finished request holds (made with
        hold_blocks_on_finish) from its `first_block`-th on, from its last
        delta until release or abort, on the calling thread: no step touches
        those blocks. KeyError when it holds none."""
        return self._direct_kv.read(request_id, layer, first_block)

    # -- commands for the engine thread ------------------------------------------

    async def _call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between steps; its result."""
        fut: asyncio.Future[T] = self.loop.create_future()

        def command() -> None:
            try:
                result = fn(self._engine)
            except BaseException as e:
                self.loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                self.loop.call_soon_threadsafe(_set_result, fut, result)

        def fail(message: str) -> None:
            self.loop.call_soon_threadsafe(_set_exception, fut, EngineDeadError(message))

        self._mailbox.submit(command, fail)
        return await fut

    def _wake_when_compiled(self, request: Request) -> None:
        """A request waits in the queue until its grammar is compiled: wake
        the engine thread then, not at its next timeout."""
        if request.grammar is not None and not request.grammar.done():
            request.grammar.add_done_callback(lambda _: self._mailbox.wake.set())

    def add_request(self, request: Request) -> asyncio.Queue[TokenDelta]:
        """Queue a request for the engine; its tokens arrive on the returned queue.

        Output tokens already in the request (a migrated or recomputed
        request: the client has them) are recomputed with the prompt and not
        delivered again; only the tokens after them arrive."""
        q: asyncio.Queue[TokenDelta] = asyncio.Queue()
        rid = request.request_id
        already_sent = len(request.output_token_ids)
        self._wake_when_compiled(request)

        def command() -> None:
            if rid in self._state.live:
                # Never touch the live request's stream or blocks.
                self._post([TokenDelta(rid, [], [], error=f"request id {rid!r} is in use")], q)
                return
            try:
                self._engine.add_request(request)
            except Exception as e:
                self._post([TokenDelta(rid, [], [], error=str(e))], q)
                return
            self._state.live[rid] = _Live(request, q, sent=already_sent)

        self._mailbox.submit(command, self._fail_queue(rid, q))
        return q

    async def reserve_remote(self, request: Request, wait_s: float = 0.0) -> KvReservation | None:
        """Reserve blocks for a prompt whose KV another engine computes (its
        `to_fill` blocks are then written with write_kv), or None when the
        pool stayed full for `wait_s` seconds (retried whenever blocks are
        freed)."""

        self._wake_when_compiled(request)

        def reserve(engine: LLMEngine) -> KvReservation | None:
            reservation = engine.reserve_remote(request)
            if reservation is not None:
                self._state.reserved[request.request_id] = request
            return reservation

        deadline = self.loop.time() + wait_s
        while True:
            reservation = await self._call(reserve)
            if reservation is not None:
                self._direct_kv.reserved(request.request_id, reservation.to_fill)
                return reservation
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return None
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
        self._direct_kv.forget_reservation(request_id)  # no more KV copies into it

        def command() -> None:
            req = self._state.reserved.pop(request_id, None)
            try:
                done = self._engine.remote_kv_done(request_id, first_token, logprob, kv_valid)
            except Exception as e:
                self._post([TokenDelta(request_id, [], [], error=str(e))], q)
                return
            if done is not None:
                self._post([TokenDelta(request_id, [], [], finished=done)], q)
            elif req is not None:
                self._state.live[request_id] = _Live(req, q, sent=1)

        self._mailbox.submit(command, self._fail_queue(request_id, q))
        return q

    def abort(self, request_id: str) -> None:
        """Finish the request wherever it is (queued, running, awaiting KV or
        holding blocks for a transfer) and free its blocks. Idempotent."""
        self._direct_kv.forget_reservation(request_id)
        self._direct_kv.forget_held(request_id)

        def command() -> None:
            self._state.live.pop(request_id, None)
            self._state.reserved.pop(request_id, None)
            # Again: the request may have finished (and got its blocks held)
            # in a step that ran since.
            self._direct_kv.forget_held(request_id)
            self._engine.abort_request(request_id)

        self._mailbox.submit(command)

    def release(self, request_id: str) -> None:
        """A held request's KV has been shipped: free its blocks (read_kv
        fails for it from now on). Idempotent."""
        self._direct_kv.forget_held(request_id)

        def command() -> None:
            self._direct_kv.forget_held(request_id)
            self._engine.release_blocks(request_id)

        self._mailbox.submit(command)

    # -- the engine thread -------------------------------------------------------

    def _fail_queue(self, rid: str, q: asyncio.Queue[TokenDelta]) -> Callable[[str], None]:
        return lambda message: self._post([TokenDelta(rid, [], [], error=message)], q)

    def _run(self) -> None:
        self._go.wait()
        try:
            while not self._stop:
                self._mailbox.run_all()
                if self._engine.has_work() and self._step():
                    continue
                self._refresh_snapshot()
                self._mailbox.wake.wait(timeout=0.5)
                self._mailbox.wake.clear()
        except BaseException as e:
            log.exception("engine thread died")
            message = f"engine failed: {type(e).__name__}: {e}"
            self._fail_all(message)
            if self.on_fatal is not None:
                self.on_fatal(message)

    def _step(self) -> bool:
        """One engine step; False if nothing could be scheduled (blocks pinned
        until KV arrives or held KV is released: a command will wake us)."""
        start = time.perf_counter()
        step = self._engine.run_step()
        duration = time.perf_counter() - start
        deltas = []
        live = self._state.live
        for rid, table in step.held.items():  # for read_kv, before the request's last delta
            self._direct_kv.held(rid, table)
        for out in step.finished:
            entry = live.pop(out.request_id, None)
            if entry is not None:
                new = out.token_ids[entry.sent :]
                lps = out.logprobs[entry.sent :] if out.logprobs is not None else []
                delta = TokenDelta(out.request_id, new, lps, finished=out)
                if entry.sent == 0:
                    delta.prompt_logprobs = out.prompt_logprobs
                deltas.append((delta, entry.queue))
        for rid, entry in live.items():
            req = entry.request
            n = len(req.output_token_ids)
            if n > entry.sent:
                lps = req.output_logprobs[entry.sent : n] if req.output_logprobs else []
                new = req.output_token_ids[entry.sent : n]
                delta = TokenDelta(rid, new, lps)
                if entry.sent == 0:
                    delta.prompt_logprobs = req.scored_prompt
                deltas.append((delta, entry.queue))
                entry.sent = n
        if deltas:
            self.loop.call_soon_threadsafe(_deliver, deltas)
        self._refresh_snapshot()
        if not step.num_scheduled:
            return False
        if self.on_step is not None:
            self.on_step(
                StepInfo(
                    duration_s=duration,
                    num_scheduled=step.num_scheduled,
                    num_running=self.snapshot.running,
                    num_waiting=self.snapshot.waiting,
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
        """The engine is dead: refuse new commands, end the queued ones and
        every live request. `error` is set before any request hears of the
        death, so whoever hears it finds the engine dead."""
        self._mailbox.die(message)
        deltas = [
            (TokenDelta(rid, [], [], error=message), entry.queue)
            for rid, entry in self._state.live.items()
        ]
        self._state.live.clear()
        if deltas:
            self.loop.call_soon_threadsafe(_deliver, deltas)

    def _refresh_snapshot(self) -> None:
        snapshot = self._engine.snapshot()
        if snapshot.kv_blocks_free > self.snapshot.kv_blocks_free:
            self.loop.call_soon_threadsafe(self._room_freed)
        self.snapshot = snapshot


def _deliver(deltas: list[tuple[TokenDelta, asyncio.Queue[TokenDelta]]]) -> None:
    for delta, q in deltas:
        q.put_nowait(delta)


def _set_result(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
