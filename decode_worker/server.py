"""The DecodeWorker gRPC service: the only module of this role that serves
protobuf types to the router.

Generate, disaggregated:
  1. validate and reserve the prompt's blocks (or answer RESOURCE_EXHAUSTED:
     no prefill work is spent on a request that has nowhere to go);
  2. a task fills them (kvtransfer/fetch.py) from the prefill pool; its first token
     (with the prompt's logprobs, when asked for) goes to the router at once;
  3. once the KV is written the request joins the running batch and its
     tokens stream back, several per message when the router lags.
If no prefill worker delivers before the first token, the worker frees the
reservation and prefills the prompt itself. Generate, colocated (or with no
prefill workers named): the request is queued here and prefilled with
chunked prefill in the running batch.

Whatever ends the call (finish, router cancel, error), the `finally` aborts
the request in the engine, which frees every block it holds or reserved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from decode_worker.metrics import DecodeMetrics
from decode_worker.options import DecodeOptions
from engine.async_engine import AsyncEngine
from engine.kv_access import KvReservation
from engine.outputs import RequestOutput, TokenDelta, TopLogprobs
from engine.request import Request
from kvtransfer.base import KvReceiver
from kvtransfer.fetch import FirstToken, PrefillEvent, PrefillResult, PrefillTransport
from kvtransfer.grpc_backend import GrpcPrefill
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from worker.status import worker_status
from worker.wire import params_from_pb, params_to_pb, prompt_logprobs_to_pb

log = logging.getLogger("splitserve.decode")


@dataclass(slots=True)
class _Progress:
    """One Generate call's timeline, for metrics and the final Timings."""

    arrival: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_output_tokens: int = 0
    finished: bool = False


class DecodeServicer(pb_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        aengine: AsyncEngine,
        metrics: DecodeMetrics,
        address: str,
        metrics_port: int,
        colocated: bool,
        options: DecodeOptions,
        prefill_transport: PrefillTransport | None = None,
    ) -> None:
        self.aengine = aengine
        self.metrics = metrics
        self.address = address
        self.metrics_port = metrics_port
        self.role = "colocated" if colocated else "decode"
        self.options = options
        self.kv_reservation_ttl_s = options.kv_reservation_ttl_s
        self.stream_interval = options.stream_interval
        layout = aengine.kv_layout
        # Chunks are written on the event loop, straight into the reservation.
        self.receiver = KvReceiver(
            aengine.write_kv, layout.num_layers, layout.block_shape, layout.dtype
        )
        self.prefill = prefill_transport or GrpcPrefill()
        self.draining = False  # being scaled down: refuse new requests, finish the rest
        self.num_streams = 0  # Generate calls open now
        self._active: set[str] = set()  # request ids of the Generate calls open now
        self._reserving = 0  # requests waiting for room in the KV cache
        self._reserving_tokens = 0  # and their prompt tokens

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.WorkerStatus:
        if self.aengine.error is not None:  # the router then marks us unhealthy
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.aengine.error)
        engine_metrics = self.metrics.engine
        status = worker_status(
            self.aengine,
            self.role,
            self.address,
            self.metrics_port,
            cost_dollars=engine_metrics.cost.dollars(),
            tokens_produced=engine_metrics.tokens_produced(),
        )
        status.waiting += self._reserving
        status.waiting_prompt_tokens += self._reserving_tokens
        status.max_waiting_requests = self.options.max_waiting_requests
        status.max_waiting_prompt_tokens = self.options.max_waiting_prompt_tokens
        return status

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        progress = _Progress(arrival=time.monotonic())
        if self.aengine.error is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.aengine.error)
        if self.draining:  # before any token: the router sends it to another worker
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this decode worker is draining")
        rid = request.request_id
        if rid in self._active:  # never touch the first one's blocks or stream
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} is already in use"
            )
        overloaded = self._overloaded(len(request.prompt_token_ids))
        if overloaded:
            self.metrics.rejected_overloaded.inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, overloaded)
        self.num_streams += 1
        self._active.add(rid)
        try:
            async for message in self._generate(request, context, progress):
                yield message
        finally:
            self._active.discard(rid)
            self.num_streams -= 1

    def _overloaded(self, prompt_tokens: int) -> str | None:
        """Why a new request is refused at once (the queue is at its bound), or None."""
        opts = self.options
        snap = self.aengine.snapshot
        waiting = snap.waiting + self._reserving
        tokens = snap.waiting_prompt_tokens + self._reserving_tokens
        if opts.max_waiting_requests and waiting >= opts.max_waiting_requests:
            return f"overloaded: {waiting} requests queued (bound {opts.max_waiting_requests})"
        if (
            opts.max_waiting_prompt_tokens
            and tokens + prompt_tokens > opts.max_waiting_prompt_tokens
        ):
            return (
                f"overloaded: {tokens} prompt tokens queued (bound "
                f"{opts.max_waiting_prompt_tokens})"
            )
        return None

    async def _generate(
        self,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
        progress: _Progress,
    ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id
        try:
            params = params_from_pb(request.sampling_params)
            req = self.aengine.make_request(request.prompt_token_ids, params, rid)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        resumed = list(request.resume_token_ids)
        if resumed:  # migrated from a failed decode worker: recompute it all here
            if len(resumed) >= params.max_tokens or req.num_prompt_tokens + len(resumed) >= (
                self.aengine.max_model_len
            ):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{len(resumed)} resumed tokens leave nothing to generate",
                )
            req.output_token_ids = resumed
            progress.first_token_time = progress.last_token_time = progress.arrival
            self.metrics.migrations_in.inc()
        prefill_task: asyncio.Task[None] | None = None
        outcome = "aborted"
        try:
            addresses = (
                list(request.prefill_addresses) if self.role == "decode" and not resumed else []
            )
            result = PrefillResult()
            if addresses:
                reservation = await self._reserve(req, context)
                events: asyncio.Queue[PrefillEvent] = asyncio.Queue()
                prefill_task = asyncio.create_task(
                    self._fill(req, reservation, addresses, events, result)
                )
                queue = None
                while queue is None:
                    event = await events.get()
                    if event.kind == "first_token":
                        assert event.first is not None
                        yield self._first_token_message(rid, event.first, progress, req)
                    elif event.kind == "kv_ready":
                        assert result.first is not None
                        if result.failures:
                            self.metrics.prefill_retries.labels(
                                self.role, "next_prefill_worker"
                            ).inc(len(result.failures))
                        self.metrics.kv_bytes.inc(result.kv_bytes)
                        self.metrics.kv_seconds.observe(result.kv_seconds)
                        queue = self.aengine.remote_kv_done(
                            rid, result.first.token_id, result.first.logprob
                        )
                    else:
                        queue = await self._prefill_failed(
                            req, event.error, progress, result, context
                        )
            else:
                queue = self.aengine.add_request(req)
            top = bool(params.logprobs)  # each token's alternatives go out too
            async for message in self._stream(rid, queue, progress, result, context, top):
                yield message
            outcome = "ok"
        finally:
            if prefill_task is not None:
                prefill_task.cancel()
            if not progress.finished:
                self.aengine.abort(rid)
            self.metrics.requests.labels(self.role, outcome).inc()

    async def _fill(
        self,
        req: Request,
        reservation: KvReservation,
        addresses: list[str],
        events: asyncio.Queue[PrefillEvent],
        result: PrefillResult,
    ) -> None:
        """The transport's fill, guarded: whatever goes wrong in it, the
        Generate call hears a final event (it never waits forever)."""
        try:
            prefill = pb.PrefillRequest(
                request_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids,
                sampling_params=params_to_pb(req.sampling_params),
                dest_block_ids=reservation.block_ids,
                num_cached_blocks=reservation.num_cached_blocks,
                block_size=self.aengine.kv_layout.block_size,
            )
            await self.prefill.fill(
                self.receiver,
                prefill,
                addresses,
                self.kv_reservation_ttl_s,  # from now, renewed by the prefill's progress
                events,
                result,
            )
        except Exception as e:
            log.exception("request %s: the KV transfer failed unexpectedly", req.request_id)
            events.put_nowait(
                PrefillEvent("failed", error=f"KV transfer error ({type(e).__name__})")
            )
        # Ignored when the transport already ended with kv_ready or failed.
        events.put_nowait(PrefillEvent("failed", error="the KV transfer ended without a result"))

    async def _reserve(self, req: Request, context: grpc.aio.ServicerContext) -> KvReservation:
        """The prompt's blocks, waiting for room while the cache is full (up to
        kv_reservation_wait_s), or the call ends RESOURCE_EXHAUSTED."""
        self._reserving += 1
        self._reserving_tokens += req.num_prompt_tokens
        try:
            reservation = await self.aengine.reserve_remote(req, self.options.kv_reservation_wait_s)
        except ValueError as e:  # e.g. a request id already in use
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
        finally:
            self._reserving -= 1
            self._reserving_tokens -= req.num_prompt_tokens
        if reservation is None:
            self.metrics.rejected_full.inc()
            snap = self.aengine.snapshot
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"no room in the KV cache for a {req.num_prompt_tokens}-token prompt "
                f"({snap.kv_blocks_free} of {snap.kv_blocks_total} blocks free)",
            )
        assert reservation is not None
        return reservation

    async def _prefill_failed(
        self,
        req: Request,
        error: str,
        progress: _Progress,
        result: PrefillResult,
        context: grpc.aio.ServicerContext,
    ) -> asyncio.Queue[TokenDelta]:
        """No prefill worker delivered. The reservation is freed and the
        prompt is computed here instead: before the first token went out,
        from scratch; after it, with the first token as already generated
        (policy "recompute"), so the stream goes on without a gap or a
        repeat. Policy "fail" ends the request instead."""
        rid = req.request_id
        first = result.first
        if progress.first_token_time is not None and first is not None:
            if self.options.kv_failure_policy == "fail":
                self.metrics.kv_failures.labels(self.role, "failed").inc()
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill failed: {error}")
            self.metrics.kv_failures.labels(self.role, "recomputed").inc()
            self.metrics.local_prefills.inc()
            log.warning("request %s: recomputing the prompt here after: %s", rid, error)
            return self.aengine.remote_kv_done(rid, first.token_id, first.logprob, kv_valid=False)
        self.aengine.abort(rid)  # frees the reservation
        local = self.aengine.make_request(req.prompt_token_ids, req.sampling_params, rid)
        local.arrival_time = req.arrival_time
        self.metrics.prefill_retries.labels(self.role, "local_fallback").inc()
        self.metrics.local_prefills.inc()
        log.warning("request %s: prefilling here: %s", rid, error)
        return self.aengine.add_request(local)

    def _first_token_message(
        self, rid: str, first: FirstToken, progress: _Progress, req: Request
    ) -> pb.GenerateResponse:
        now = time.monotonic()
        progress.first_token_time = progress.last_token_time = now
        progress.num_output_tokens = 1
        self.metrics.ttft_seconds.observe(now - progress.arrival)
        self.metrics.generation_tokens.inc()
        timings = pb.Timings()
        timings.CopyFrom(first.timings)
        timings.ttft_s = now - progress.arrival
        timings.prefill_address = first.prefill_address
        msg = pb.GenerateResponse(request_id=rid, token_ids=[first.token_id], timings=timings)
        if req.sampling_params.logprobs is not None and first.logprob is not None:
            msg.logprobs.append(first.logprob)
            if req.sampling_params.logprobs and first.top_logprobs is not None:
                msg.top_logprobs.append(first.top_logprobs)
        if first.prompt_logprobs is not None:
            msg.prompt_logprobs.CopyFrom(first.prompt_logprobs)
        return msg

    async def _stream(
        self,
        rid: str,
        queue: asyncio.Queue[TokenDelta],
        progress: _Progress,
        result: PrefillResult,
        context: grpc.aio.ServicerContext,
        top: bool,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The engine's tokens (with each one's top alternatives when `top`),
        several per message when the router lags."""
        msg = pb.GenerateResponse(request_id=rid)
        while True:
            deltas = [await queue.get()]
            while not queue.empty():  # the router lags: send what piled up at once
                deltas.append(queue.get_nowait())
            first = progress.first_token_time is None
            finished = None
            before = len(msg.token_ids)
            for delta in deltas:
                if delta.error is not None:
                    await context.abort(grpc.StatusCode.INTERNAL, delta.error)
                msg.token_ids.extend(delta.token_ids)
                msg.logprobs.extend(delta.logprobs)
                if delta.prompt_logprobs is not None:  # with the first token sampled here
                    msg.prompt_logprobs.CopyFrom(prompt_logprobs_to_pb(delta.prompt_logprobs))
                if top:
                    msg.top_logprobs.extend(_top_pb(t) for t in delta.top_logprobs)
                finished = delta.finished or finished
            self._observe_tokens(len(msg.token_ids) - before, progress)
            if finished is not None:
                progress.finished = True
                self._finish_message(msg, finished, progress, result)
                yield msg
                return
            # The first token goes out at once (TTFT); later ones every
            # stream_interval tokens (fewer messages when throughput matters more).
            if len(msg.token_ids) >= self.stream_interval or (first and msg.token_ids):
                yield msg
                msg = pb.GenerateResponse(request_id=rid)

    def _observe_tokens(self, n: int, progress: _Progress) -> None:
        if n == 0:
            return
        now = time.monotonic()
        if progress.first_token_time is None:
            progress.first_token_time = now
            self.metrics.ttft_seconds.observe(now - progress.arrival)
            n_gaps = n - 1
        else:
            n_gaps = n
        if n_gaps and progress.last_token_time is not None:
            gap = (now - progress.last_token_time) / n_gaps
            for _ in range(n_gaps):
                self.metrics.itl_seconds.observe(gap)
        progress.last_token_time = now
        progress.num_output_tokens += n
        self.metrics.generation_tokens.inc(n)

    def _finish_message(
        self,
        msg: pb.GenerateResponse,
        out: RequestOutput,
        progress: _Progress,
        result: PrefillResult,
    ) -> None:
        now = time.monotonic()
        msg.finish_reason = out.finish_reason
        if isinstance(out.stop_reason, str):
            msg.stop_string = out.stop_reason
        elif isinstance(out.stop_reason, int):
            msg.stop_token_id = out.stop_reason
        msg.num_prompt_tokens = len(out.prompt_token_ids)
        msg.num_output_tokens = len(out.token_ids)
        first = result.first
        t = msg.timings
        if first is not None:  # prefilled remotely
            t.queue_s = first.timings.queue_s
            t.prefill_s = first.timings.prefill_s
            t.prefill_address = first.prefill_address
            t.num_cached_tokens = first.timings.num_cached_tokens
            t.decode_cached_tokens = out.num_cached_tokens
            t.kv_transfer_s = result.kv_seconds
            t.kv_transfer_bytes = result.kv_bytes
        else:
            t.queue_s = _gap(out.arrival_time, out.scheduled_time)
            t.prefill_s = _gap(out.scheduled_time, out.first_token_time)
            t.num_cached_tokens = out.num_cached_tokens
        if progress.first_token_time is not None:
            t.ttft_s = progress.first_token_time - progress.arrival
            t.decode_s = now - progress.first_token_time
            if len(out.token_ids) > 1:
                self.metrics.tpot_seconds.observe(t.decode_s / (len(out.token_ids) - 1))
        t.num_preemptions = out.num_preemptions
        self.metrics.e2e_seconds.observe(now - progress.arrival)
        self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
        if out.scheduled_time is not None:
            ready = out.arrival_time if first is None else (progress.first_token_time or now)
            self.metrics.queue_seconds.observe(max(0.0, out.scheduled_time - ready))


def _top_pb(top: TopLogprobs) -> pb.TopLogprobs:
    return pb.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])


def _gap(start: float | None, end: float | None) -> float:
    return end - start if start is not None and end is not None else 0.0
