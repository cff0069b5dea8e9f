"""The PrefillWorker gRPC service: the only module of this role that touches
protobuf types.

One Prefill call per request, opened by the decode worker that reserved the
KV blocks:

    D: PrefillRequest ─▶ P queues the prompt (the scheduler batches prompts by
                         token budget and chunks long ones)
    P: FirstToken     ─▶ as soon as the prompt's last chunk is computed (with
                         the prompt scored, when prompt_logprobs asks)
    P: KvChunk ...    ─▶ layer by layer, read from P's held blocks (only
                         those D lacks: the first num_cached_blocks of D's
                         reservation hold the prompt's prefix there already)
    P: KvDone         ─▶
    D: KvAck          ─▶ P frees the blocks

The engine thread moves on to the next prompts while this request's KV is on
the wire, so transfer overlaps compute. Cancellation (D gone, D aborted)
lands in the `finally`, which frees whatever the request holds.

Held blocks have a lease: from the first token, D has `kv_lease_s` to take
the KV and acknowledge it. A D that is alive but neither reads nor acks nor
hangs up (one that vanished is noticed sooner, by keepalive) loses the KV:
the blocks are freed, the call ends with DEADLINE_EXCEEDED, and
splitserve_kv_lease_expired_total counts it. Every chunk carries D's
reservation generation from the PrefillRequest, so D can tell a late chunk
from the one it is waiting for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from engine.async_engine import AsyncEngine
from engine.outputs import top_of
from kvtransfer import ray_backend
from kvtransfer.base import DEFAULT_MAX_CHUNK_BYTES, TransferStats, send_kv
from kvtransfer.grpc_backend import GrpcKvSender
from prefill_worker.metrics import PrefillMetrics
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from worker.status import worker_status
from worker.wire import params_from_pb, prompt_logprobs_to_pb

log = logging.getLogger("splitserve.prefill")

# Seconds a finished prompt's blocks stay held for its decode worker, from the
# first token to the KV's acknowledgement (--kv-lease).
DEFAULT_KV_LEASE_S = 30.0


class PrefillRefused(Exception):
    """A prompt this worker will not take; `code` is a gRPC status name
    (UNAVAILABLE: try another worker; INVALID_ARGUMENT: no worker will)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PrefillServicer(pb_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        aengine: AsyncEngine,
        metrics: PrefillMetrics,
        address: str,
        metrics_port: int,
        kv_lease_s: float = DEFAULT_KV_LEASE_S,
    ) -> None:
        if kv_lease_s <= 0:
            raise ValueError(f"the KV lease must be > 0 seconds, got {kv_lease_s}")
        self.aengine = aengine
        self.metrics = metrics
        self.address = address
        self.metrics_port = metrics_port
        self.kv_lease_s = kv_lease_s
        self.draining = False  # set when the worker is being scaled down: new prompts go elsewhere
        self.num_calls = 0  # prefills in progress (queued, computing, or sending KV)

    async def Prefill(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        msg = await context.read()
        if msg is grpc.aio.EOF or msg.WhichOneof("kind") != "request":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a PrefillRequest first")
        r = msg.request
        rid = r.request_id
        with self._call(rid) as outcome:
            try:
                first = await self._first_token(r, outcome)
            except _Refused as e:
                await context.abort(e.code, e.message)
            sender = GrpcKvSender(rid, context.write, context.read)
            try:
                # The lease covers every wait on D: the first token and the
                # chunks written into its flow-control window, and the ack.
                async with asyncio.timeout(self.kv_lease_s):
                    await context.write(pb.PrefillServerMessage(first_token=first))
                    ok, stats = await self._send_kv(r, sender)
            except TimeoutError:
                outcome[0] = "failed"
                self.metrics.kv_lease_expired.inc()
                self.aengine.release(rid)  # now, not when the call is torn down
                log.warning(
                    "request %s: KV not acknowledged within the %gs lease: blocks freed",
                    rid,
                    self.kv_lease_s,
                )
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the KV was not acknowledged within the prefill worker's "
                    f"{self.kv_lease_s:g}s lease; its blocks were freed",
                )
            self.metrics.kv_bytes.inc(stats.num_bytes)
            self.metrics.kv_seconds.observe(stats.seconds)
            if not ok:
                outcome[0] = "failed"
                log.warning("request %s: KV not acknowledged: %s", rid, sender.error)
                return
            outcome[0] = "ok"

    async def _send_kv(
        self, r: pb.PrefillRequest, sender: GrpcKvSender
    ) -> tuple[bool, TransferStats]:
        """Ship the held blocks of a finished prompt to D's reservation and
        wait for its ack; (acknowledged, stats)."""
        # The request is finished and holds its blocks for us: read_kv copies
        # them out here while the engine thread runs the next step.
        rid = r.request_id
        skip = r.num_cached_blocks  # D has these already
        return await send_kv(
            sender,
            rid,
            list(r.dest_block_ids)[skip:],
            lambda layer: self.aengine.read_kv(rid, layer, skip),
            num_layers=self.aengine.kv_layout.num_layers,
            max_chunk_bytes=r.max_chunk_bytes or DEFAULT_MAX_CHUNK_BYTES,
            reservation=r.reservation,
        )

    async def prefill_to_object_store(
        self, request: bytes
    ) -> AsyncIterator[bytes | ray_backend.RayKvPayload]:
        """The same job for the object-store transport (on Ray): yields the
        serialized FirstToken, then the prompt's KV as one RayKvPayload, which
        the caller's runtime stores once and the caller owns. The blocks are
        freed as soon as they are copied out. Raises PrefillRefused (with a
        gRPC status name) for a request it will not take."""
        r = pb.PrefillRequest.FromString(request)
        rid = r.request_id
        with self._call(rid) as outcome:
            try:
                first = await self._first_token(r, outcome)
            except _Refused as e:
                raise PrefillRefused(e.code.name, e.message) from None
            yield first.SerializeToString()
            start = time.monotonic()
            skip = r.num_cached_blocks  # D has these already
            layers = [
                self.aengine.read_kv(rid, layer, skip)
                for layer in range(self.aengine.kv_layout.num_layers)
            ]
            self.aengine.abort(rid)  # copied out: free the blocks before the payload travels
            payload = ray_backend.pack(rid, list(r.dest_block_ids)[skip:], layers, r.reservation)
            self.metrics.kv_bytes.inc(payload.nbytes)
            self.metrics.kv_seconds.observe(time.monotonic() - start)
            yield payload
            outcome[0] = "ok"

    @contextlib.contextmanager
    def _call(self, rid: str) -> Iterator[list[str]]:
        """One prefill, however it ends: counted while in flight (a draining
        worker waits for these), and its blocks freed at the end, whether
        they are held (KV sent or not) or the prompt is still queued or
        computing (cancelled). Yields the outcome to set, in a list."""
        outcome = ["aborted"]
        self.num_calls += 1
        try:
            yield outcome
        finally:
            self.num_calls -= 1
            self.aengine.abort(rid)
            self.metrics.requests.labels("prefill", outcome[0]).inc()

    async def _first_token(self, r: pb.PrefillRequest, outcome: list[str]) -> pb.FirstToken:
        """Queue the prompt and wait for its first token; its blocks stay held
        (the caller frees them with abort). Raises _Refused."""
        if self.aengine.error is not None:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, self.aengine.error)
        if self.draining:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "this prefill worker is draining")
        req = self._make_request(r)
        if isinstance(req, str):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, req)
        q = self.aengine.add_request(req)
        delta = await q.get()
        if delta.error is not None:
            outcome[0] = "failed"
            raise _Refused(grpc.StatusCode.INTERNAL, delta.error)
        out = delta.finished
        assert out is not None and out.token_ids, "prefill ends at the first token"
        self._observe_prefill(out)
        first = pb.FirstToken(
            request_id=r.request_id,
            token_id=out.token_ids[0],
            num_layers=self.aengine.kv_layout.num_layers,
            timings=pb.Timings(
                queue_s=_gap(out.arrival_time, out.scheduled_time),
                prefill_s=_gap(out.scheduled_time, out.first_token_time),
                ttft_s=_gap(out.arrival_time, out.first_token_time),
                prefill_address=self.address,
                num_cached_tokens=out.num_cached_tokens,
            ),
        )
        if out.logprobs:
            first.logprob = out.logprobs[0]
            top = top_of(out.logprobs[0])
            if top:  # logprobs > 0
                first.top_logprobs.token_ids.extend(t for t, _ in top)
                first.top_logprobs.logprobs.extend(lp for _, lp in top)
        if out.prompt_logprobs is not None:
            first.prompt_logprobs.CopyFrom(prompt_logprobs_to_pb(out.prompt_logprobs))
        self.metrics.ttft_seconds.observe(time.monotonic() - out.arrival_time)
        return first

    def _make_request(self, r: pb.PrefillRequest) -> Any:
        """The engine request for the prompt, or a message saying why not."""
        try:
            params = params_from_pb(r.sampling_params)
        except ValueError as e:
            return f"bad sampling parameters: {e}"
        # Only the first token is ours to sample; stop strings are the decode
        # worker's business (it sees the whole text).
        params = dataclasses.replace(params, max_tokens=1, stop=())
        layout = self.aengine.kv_layout
        if r.block_size != layout.block_size:
            return (
                f"block size {r.block_size} on the decode worker, {layout.block_size} "
                "here: the KV layouts differ"
            )
        try:
            req = self.aengine.make_request(r.prompt_token_ids, params, r.request_id)
        except ValueError as e:
            return str(e)
        needed = layout.blocks_for_tokens(req.num_prompt_tokens)
        if len(r.dest_block_ids) != needed:
            return f"{len(r.dest_block_ids)} destination blocks for a prompt that needs {needed}"
        if r.num_cached_blocks >= needed:
            return (
                f"{r.num_cached_blocks} of the prompt's {needed} blocks cached on the decode "
                "worker: its last block is always sent"
            )
        req.hold_blocks_on_finish = True
        return req

    def _observe_prefill(self, out: Any) -> None:
        m = self.metrics
        m.prompt_tokens.inc(len(out.prompt_token_ids))
        m.queue_seconds.observe(_gap(out.arrival_time, out.scheduled_time))
        m.compute_seconds.observe(_gap(out.scheduled_time, out.first_token_time))

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.WorkerStatus:
        if self.aengine.error is not None:  # the router then marks us unhealthy
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.aengine.error)
        engine_metrics = self.metrics.engine
        return worker_status(
            self.aengine,
            "prefill",
            self.address,
            self.metrics_port,
            cost_dollars=engine_metrics.cost.dollars(),
            tokens_produced=engine_metrics.tokens_produced(),
        )


def _gap(start: float | None, end: float | None) -> float:
    return end - start if start is not None and end is not None else 0.0
