"""One request's Generate stream, with retries and migration across decode workers.

Before the first token the request can move: RESOURCE_EXHAUSTED
(that worker is full; it reserved nothing), UNAVAILABLE or a failed connection
(it is down: mark it unhealthy) and ABORTED move on to the next decode worker,
each attempt under a fresh request id (a worker we gave up on may still hold
the old one). INVALID_ARGUMENT is the client's fault: 400. When every healthy
decode worker was tried: 503 with Retry-After.

After the first token, a worker that fails (the call breaks, or the stream
ends or aborts without finishing) costs latency, not the request: the request
migrates. Another decode worker gets the same prompt and sampling parameters
plus every token received so far (`resume_token_ids`); it recomputes them
itself (no prefill worker) and streams only the tokens after them, so the
caller sees one stream with no token missing or repeated. A request migrates
at most `migration_limit` times; past that, or when no other decode worker
takes it, the failure is a WorkerFailed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

import grpc

from engine.sampling_params import SamplingParams
from protos import splitserve_pb2 as pb
from protos import splitserve_pb2_grpc as pb_grpc
from router.errors import APIError, bad_request, no_capacity
from router.metrics import RouterMetrics
from router.pool import Worker, WorkerPool
from router.prefix_index import PromptBlocks
from worker.wire import params_to_pb

# Before the first message, these codes send the request to another worker.
_RETRY_REASONS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: "full",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.CANCELLED: "unavailable",  # cancelled by the server: shutting down
    grpc.StatusCode.ABORTED: "aborted",
}

DEFAULT_MIGRATION_LIMIT = 3


class WorkerFailed(Exception):
    """The request failed after its first token and could not migrate (or
    may not migrate again): the client already holds tokens, so it gets an
    error event rather than an HTTP error status."""

    def __init__(self, message: str, address: str = "") -> None:
        super().__init__(message)
        self.address = address  # the decode worker that failed ("" if none did)


class DecodeCall:
    """The token stream of one request, from whichever decode workers take it.

    Iterate `messages()` (inside `contextlib.aclosing`): it yields the
    workers' GenerateResponse messages, the last with finish_reason set; a
    migration is invisible in it but for `migrations`. Closing or cancelling
    the iteration cancels the gRPC call, which aborts the request on every
    worker it reached.
    """

    def __init__(
        self,
        pool: WorkerPool,
        metrics: RouterMetrics,
        base_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        migration_limit: int = DEFAULT_MIGRATION_LIMIT,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.base_id = base_id
        self.prompt_ids = prompt_ids
        self.blocks = PromptBlocks(prompt_ids)  # for cache-aware routing
        self.params = params
        self.migration_limit = migration_limit
        self.attempts = 0
        self.migrations = 0  # times the request moved after its first token
        self.worker: Worker | None = None  # the one that answered last
        # Every token a worker sent for this request, in order, whether or not
        # the caller has turned it into text yet: what a migration resumes from.
        self.received: list[int] = []

    async def messages(self) -> AsyncGenerator[pb.GenerateResponse, None]:
        failed: set[str] = set()  # workers that failed this request mid-stream
        failure: WorkerFailed | None = None  # the failure being migrated away from
        while True:
            try:
                stream = self._one_worker(failed, list(self.received))
                async with aclosing(stream):
                    async for msg in stream:
                        if failure is not None:
                            self.metrics.migrations.labels(outcome="ok").inc()
                            failure = None
                        self.received.extend(msg.token_ids)
                        yield msg
                return
            except APIError as e:
                if failure is None:  # nothing reached the caller: an HTTP error
                    raise
                self.metrics.migrations.labels(outcome="failed").inc()
                raise WorkerFailed(
                    f"{failure}; no other decode worker could take the request over: {e.message}",
                    failure.address,
                ) from None
            except WorkerFailed as e:
                if self.migrations >= self.migration_limit:
                    if self.migration_limit > 0:
                        self.metrics.migrations.labels(outcome="limit").inc()
                        raise WorkerFailed(
                            f"{e} (the request already moved {self.migrations} times, "
                            f"the --migration-limit)",
                            e.address,
                        ) from None
                    raise
                failed.add(e.address)
                self.migrations += 1
                failure = e

    async def _one_worker(
        self, exclude: set[str], resume: list[int]
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The stream from the first decode worker (not in `exclude`) that
        answers; `resume`: tokens the caller already has (a migration)."""
        tried = set(exclude)
        reasons: list[str] = []
        n = len(self.prompt_ids) + len(resume)  # tokens whose KV the worker needs
        sampling = params_to_pb(self.params)
        while True:
            # A migrated request is recomputed with its tokens: routed by load.
            blocks = None if resume else self.blocks
            w = self.pool.pick_decode(n, tried, blocks)
            if w is None or w.channel is None:
                raise no_capacity(_no_capacity_message(self.pool, reasons))
            tried.add(w.address)
            # ...on the decode worker itself.
            prefill = [] if resume else self.pool.rank_prefill(w, blocks)
            request = pb.GenerateRequest(
                request_id=f"{self.base_id}-a{self.attempts}",
                prompt_token_ids=self.prompt_ids,
                sampling_params=sampling,
                prefill_addresses=[p.address for p in prefill],
                resume_token_ids=resume,
            )
            self.attempts += 1
            work = self.pool.dispatched(w, prefill, n, blocks)
            prefill_pending = True
            # No deadline: a stream lasts as long as the generation. wait_for_ready
            # off: a worker that is down fails the call at once.
            call = pb_grpc.DecodeWorkerStub(w.channel).Generate(request, wait_for_ready=False)
            try:
                first = await self._first_message(w, call)
                if isinstance(first, str):  # failed in a way another worker may not
                    reasons.append(first)
                    continue
                self.pool.first_token(prefill, work)
                prefill_pending = False
                self.worker = w
                msg = first
                while True:
                    yield msg
                    if msg.finish_reason:
                        return
                    msg = await self._next_message(w, call)
            finally:
                if prefill_pending:
                    self.pool.first_token(prefill, work)
                self.pool.ended(w)
                call.cancel()  # no-op once the call is done

    async def _first_message(
        self, w: Worker, call: grpc.aio.UnaryStreamCall
    ) -> pb.GenerateResponse | str:
        """The first message with a token (or a finish), or why the request
        should go to another worker. Messages with neither (an acknowledgement
        a worker may send) are skipped: until a token exists the request can
        still move, since nothing has reached the client."""
        try:
            msg = await call.read()
            while (
                isinstance(msg, pb.GenerateResponse) and not msg.token_ids and not msg.finish_reason
            ):
                msg = await call.read()
        except grpc.aio.AioRpcError as e:
            code = e.code()
            reason = _RETRY_REASONS.get(code)
            if reason is None:
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise bad_request(e.details() or "invalid request") from None
                raise APIError(
                    502, f"decode worker {w.address} failed: {code.name}: {e.details()}"
                ) from None
            if reason == "unavailable":
                self.pool.mark_unhealthy(w, f"Generate: {code.name}: {e.details()}")
            elif reason == "full":
                self.pool.mark_full(w)
            self.metrics.retries.labels(reason=reason).inc()
            return reason
        if msg is grpc.aio.EOF:
            raise APIError(502, f"decode worker {w.address} ended the stream without a token")
        assert isinstance(msg, pb.GenerateResponse)
        if msg.finish_reason == "abort" and not msg.token_ids:
            self.metrics.retries.labels(reason="aborted").inc()
            return "aborted"
        return msg

    async def _next_message(self, w: Worker, call: grpc.aio.UnaryStreamCall) -> pb.GenerateResponse:
        try:
            msg = await call.read()
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.pool.mark_unhealthy(w, f"Generate: {e.code().name}: {e.details()}")
            raise WorkerFailed(
                f"decode worker {w.address} failed mid-stream: {e.code().name}: {e.details()}",
                w.address,
            ) from None
        if msg is grpc.aio.EOF:
            raise WorkerFailed(
                f"decode worker {w.address} ended the stream without finishing", w.address
            )
        assert isinstance(msg, pb.GenerateResponse)
        if msg.finish_reason == "abort":
            raise WorkerFailed(f"decode worker {w.address} aborted the request", w.address)
        return msg


def _no_capacity_message(pool: WorkerPool, reasons: list[str]) -> str:
    if not pool.decode:
        return "no decode workers are configured"
    if "full" in reasons:
        return "every decode worker is full (no room in its KV cache or its queue); retry shortly"
    if not reasons and not pool.healthy_decode:
        return "no healthy decode worker; retry shortly"
    if pool.healthy_decode and all(map(pool.queue_full, pool.healthy_decode)):
        return "every decode worker's queue is full; retry shortly"
    return "no decode worker could take the request; retry shortly"
