"""POST /v1/completions and /v1/chat/completions: body to response.

A streaming request answers its HTTP status only once a decode worker has
accepted it (its first message), so that a full cluster is a 503, not a 200
stream carrying an error. Until then, and for the whole of a non-streaming
request, the router watches for the client going away and cancels the
request when it does; once streaming, Starlette cancels the stream's
generator on a disconnect, which cancels the gRPC call.

With a request timeout, the whole request (reading the body included) has
that long from its arrival: a non-streaming request, or a stream that has not
started, is answered 504; a stream that started ends with an error event and
[DONE]. Either way the request's event generator is cancelled, which cancels
the gRPC call: the worker aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from router.body import read_body
from router.choices import run_choices
from router.dispatch import WorkerFailed
from router.errors import APIError, error_body
from router.flow import Delta, Finish
from router.metrics import RouterMetrics
from router.pool import WorkerPool
from router.preprocess import OFF_LOOP_BYTES, Prepared, prepare
from router.protocol import Endpoint
from router.responses import ChatFormat, CompletionFormat
from router.served_model import ServedModel
from router.textstream import TokenInfo
from router.tools import DEFAULT_PARSER as DEFAULT_TOOL_PARSER

log = logging.getLogger("splitserve.router")

T = TypeVar("T")
Events = AsyncIterator[Delta | Finish]


class ClientDisconnected(Exception):
    pass


class RequestTimedOut(Exception):
    """The request's end-to-end timeout passed."""


@dataclass
class Generation:
    """What the two generation endpoints share, one per app."""

    served: ServedModel
    pool: WorkerPool
    metrics: RouterMetrics
    max_body_bytes: int
    migration_limit: int = 3  # see RouterConfig
    request_timeout_s: float | None = None  # end to end, from arrival; None: no limit
    tool_call_parser: str = DEFAULT_TOOL_PARSER  # see router/tools.py
    # Preparing large bodies (tokenizing, templating): one thread, so the
    # tokenizer is never entered by two large bodies at once.
    _prep: ThreadPoolExecutor = field(
        init=False,
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="router-prepare"),
    )

    def close(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)

    async def handle(self, request: Request, endpoint: Endpoint) -> Response:
        arrival = time.monotonic()
        loop = asyncio.get_running_loop()
        timeout = self.request_timeout_s
        deadline = None if timeout is None else loop.time() + timeout
        m = self.metrics
        m.in_flight.inc()
        handed_to_stream = False
        try:
            async with _deadline(deadline):
                raw = await read_body(request, self.max_body_bytes)
                prepared, fmt = await self._prepare(raw, endpoint)
                events = run_choices(
                    self.pool, m, self.served, prepared, fmt.request_id, arrival,
                    migration_limit=self.migration_limit,
                ).__aiter__()  # fmt: skip
                if prepared.stream:
                    first = await _until_disconnected(request, events.__anext__())
                else:
                    result = await _until_disconnected(request, _collect(events, fmt))
            if prepared.stream:
                count = lambda s: m.count_request(endpoint, s)  # noqa: E731
                body = _sse(events, first, fmt, prepared, count, self._timed_out, deadline)
                handed_to_stream = True
                return _SSEResponse(body, events, on_close=m.in_flight.dec)
            m.count_request(endpoint, 200)
            return JSONResponse(result)
        except RequestTimedOut:
            m.count_request(endpoint, 504)
            return self._timed_out().response()
        except APIError as e:
            m.count_request(endpoint, e.status)
            return e.response()
        except WorkerFailed as e:
            m.count_request(endpoint, 502)
            return APIError(502, str(e)).response()
        except (ClientDisconnected, ClientDisconnect):
            m.count_request(endpoint, 499)
            return Response(status_code=499)  # nobody reads it
        finally:
            if not handed_to_stream:
                m.in_flight.dec()

    def _timed_out(self) -> APIError:
        return APIError(
            504,
            f"the request did not finish within the router's request timeout "
            f"({self.request_timeout_s:g} s)",
            code="timeout",
        )

    async def _prepare(self, raw: bytes, endpoint: Endpoint) -> tuple[Prepared, CompletionFormat]:
        if len(raw) < OFF_LOOP_BYTES:
            prepared = prepare(raw, endpoint, self.served, self.tool_call_parser)
        else:  # off the event loop: the other requests keep streaming meanwhile
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(
                self._prep, prepare, raw, endpoint, self.served, self.tool_call_parser
            )
        created = int(time.time())
        if endpoint == "completions":
            rid = f"cmpl-{uuid.uuid4().hex}"
            return prepared, CompletionFormat(rid, created, self.served.name, prepared.logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        fmt = ChatFormat(rid, created, self.served.name, prepared.logprobs, prepared.tool_use)
        return prepared, fmt


class _deadline:
    """`async with _deadline(when)`: raise RequestTimedOut if the block is
    still running at loop time `when` (None: never). The block is cancelled,
    as asyncio.timeout cancels it; a TimeoutError from inside that is not the
    deadline's passes through unchanged."""

    def __init__(self, when: float | None) -> None:
        self._timeout = asyncio.timeout_at(when)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._timeout.__aexit__(*exc)
        except TimeoutError:
            if self._timeout.expired():
                raise RequestTimedOut from None
            raise


async def _collect(events: Events, fmt: CompletionFormat) -> dict[str, Any]:
    """Run a non-streaming request to the end: the whole response body."""
    tokens: dict[int, list[TokenInfo]] = {}
    finishes: list[Finish] = []
    async for ev in events:
        delta = ev.delta if isinstance(ev, Finish) else ev
        tokens.setdefault(delta.index, []).extend(delta.tokens)
        if isinstance(ev, Finish):
            finishes.append(ev)
    assert finishes, "the event stream ended without a Finish"
    return fmt.response(finishes, tokens)


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _sse(
    events: Events,
    first: Delta | Finish,
    fmt: CompletionFormat,
    prepared: Prepared,
    count: Callable[[int | str], None],
    timed_out: Callable[[], APIError],
    deadline: float | None,
) -> AsyncIterator[bytes]:
    """The server-sent events of one stream; always ends with [DONE].

    The deadline bounds each wait for the next event, never a yield: a
    timeout must cancel the request's events, not Starlette sending a chunk."""
    status: int | str = 200
    finishes: list[Finish] = []
    try:
        for obj in fmt.start_chunks(prepared.n):
            yield _data(obj)
        ev = first
        while True:
            if isinstance(ev, Finish):
                yield _data(fmt.final_chunk(ev))
                finishes.append(ev)
                if len(finishes) == prepared.n:
                    if prepared.include_usage:
                        yield _data(fmt.usage_chunk(finishes))
                    break
            elif ev.text or ev.tokens:
                yield _data(fmt.chunk(ev))
            async with _deadline(deadline):
                ev = await events.__anext__()
    except RequestTimedOut:
        status = "timeout"
        yield _data(timed_out().body())
    except (WorkerFailed, APIError) as e:
        status = "stream_error"
        yield _data(error_body(str(e), 502))
    except (asyncio.CancelledError, GeneratorExit):
        status = 499  # the client went away
        raise
    except Exception:  # a bug: end the stream visibly rather than hang it
        log.exception("stream failed")
        status = "stream_error"
        yield _data(error_body("internal error (logged by the router)", 500))
    finally:
        count(status)
    yield _DONE


class _SSEResponse(StreamingResponse):
    """A text/event-stream response that closes its generators however it ends.

    Starlette cancels the body on a client disconnect but leaves a generator
    that never started (or sits at a yield) for the garbage collector; the
    request's gRPC call must not wait for that.
    """

    def __init__(
        self, body: AsyncIterator[bytes], events: Events, on_close: Callable[[], None]
    ) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._body = body
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await _aclose(self._body)
                await _aclose(self._events)
            finally:
                self._on_close()


async def _aclose(it: AsyncIterator[Any]) -> None:
    close: Callable[[], Awaitable[None]] | None = getattr(it, "aclose", None)
    if close is not None:
        await close()


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    watcher: asyncio.Future[None] = asyncio.ensure_future(_wait_disconnect(request))
    both: list[asyncio.Future[Any]] = [task, watcher]
    try:
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in both:
            if not t.done():
                t.cancel()
        # Let a cancelled request unwind (its gRPC call is cancelled in a finally).
        await asyncio.wait(both)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    # The body has been read: the next ASGI message is the disconnect (servers
    # send it on a client's disconnect or after the response is complete).
    while (await request.receive())["type"] != "http.disconnect":
        pass
