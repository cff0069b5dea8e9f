"""The router's HTTP server: configuration, the FastAPI app, and `serve`.

Routes:
  POST /v1/completions, POST /v1/chat/completions   OpenAI-compatible, streaming or not
  GET  /v1/models        the one served model
  GET  /health           200 when a decode-capable worker is healthy, else 503
  GET  /metrics          Prometheus text (also at /metrics/)
  GET  /cluster          every worker's Status, polled now
"""

from __future__ import annotations

import hmac
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from engine.config import EngineConfig, ModelConfig
from kvtransfer.security import ClusterSecurity
from router.endpoints import Generation
from router.errors import APIError, install_error_handlers
from router.metrics import RouterMetrics
from router.pool import Discover, WorkerPool
from router.selection import DEFAULT_LOCAL_PREFILL_THRESHOLD, Policy
from router.served_model import ServedModel
from router.tools import DEFAULT_PARSER as DEFAULT_TOOL_PARSER
from router.tools import PARSERS as TOOL_PARSERS


@dataclass(frozen=True)
class RouterConfig:
    """How to run the router.

    model: the model directory (config.json and tokenizer files; no weights are read).
    served_model_name: the name clients send as `model` (default: the
        directory's basename).
    decode_addresses: host:port of decode or colocated workers.
    prefill_addresses: host:port of prefill workers (none for colocated).
    max_model_len: the context length (default: the model's).
    max_body_bytes: larger request bodies are refused with 413.
    poll_interval_s: how often every worker's Status is polled.
    api_key: when set, every /v1/ route requires `Authorization: Bearer <key>`
        (401 otherwise); /health, /metrics and /cluster stay open for operators.
    policy: how to pick a decode worker (router/selection.py pick_decode).
    migration_limit: how many times one request may move to another decode
        worker after its worker failed mid-stream (0: the stream ends with an
        error event instead; router/dispatch.py).
    discover: when set, asked for the workers' addresses before every poll
        (Kubernetes DNS, the Ray directory); the fixed addresses are then
        only the starting point.
    restarts: when set (`splitserve serve`, whose launcher supervises the
        workers), address -> (role, times the worker was restarted), shown
        on /cluster and counted in splitserve_worker_restarts_total.
    request_timeout_s: when set, a request still running this many seconds
        after it arrived is cancelled on its worker and answered 504 (a stream
        that started ends with an error event and [DONE]); None: no limit.
    security: how the router proves itself to the workers: the cluster
        secret on every call, mTLS (kvtransfer/security.py); default: neither.
    """

    model: str
    served_model_name: str | None = None
    decode_addresses: tuple[str, ...] = ()
    prefill_addresses: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int | None = None
    max_body_bytes: int = 1 << 20
    poll_interval_s: float = 0.5
    api_key: str | None = None  # if set, /v1/* requires "Authorization: Bearer <key>"
    discover: Discover | None = None
    policy: Policy = "cache_aware"
    migration_limit: int = 3  # times a request may move after its decode worker failed
    # Prompts whose part the decode worker lacks is at most this many tokens
    # are prefilled there, without a KV transfer (0: always disaggregate).
    local_prefill_threshold: int = DEFAULT_LOCAL_PREFILL_THRESHOLD
    tool_call_parser: str = DEFAULT_TOOL_PARSER  # how "auto" tool calls are read (router/tools.py)
    restarts: Callable[[], Mapping[str, tuple[str, int]]] | None = None
    request_timeout_s: float | None = None  # end to end; None: no limit
    security: ClusterSecurity = field(default_factory=ClusterSecurity)  # toward the workers

    @property
    def resolved_served_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name


def load_served_model(config: RouterConfig) -> ServedModel:
    """Read the model's config and tokenizer (raises ValueError/OSError on a bad directory)."""
    from transformers import AutoTokenizer

    model_cfg = ModelConfig.from_pretrained(config.model)
    max_len = EngineConfig(
        model=config.model, max_model_len=config.max_model_len
    ).resolved_max_model_len(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    except Exception as e:  # transformers raises many types for a bad or missing tokenizer
        raise ValueError(f"could not load a tokenizer from {config.model}: {e}") from e
    return ServedModel(
        name=config.resolved_served_name,
        path=str(config.model),
        vocab_size=model_cfg.vocab_size,
        max_model_len=max_len,
        tokenizer=tokenizer,
    )


def build_app(config: RouterConfig, served: ServedModel | None = None) -> FastAPI:
    """The router as an ASGI app; worker polling runs during its lifespan.
    `served`: the model's tokenizer and limits, if already loaded."""
    served = served if served is not None else load_served_model(config)
    metrics = RouterMetrics()
    pool = WorkerPool(
        config.decode_addresses,
        config.prefill_addresses,
        poll_interval_s=config.poll_interval_s,
        vocab_size=served.vocab_size,
        discover=config.discover,
        policy=config.policy,
        security=config.security,
        on_decision=lambda reason: metrics.routing_decisions.labels(reason).inc(),
        local_prefill_threshold=config.local_prefill_threshold,
    )
    metrics.track_cost(lambda: pool.workers)
    if config.restarts is not None:
        metrics.track_restarts(config.restarts)
    if config.tool_call_parser not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser must be one of {TOOL_PARSERS}")
    if config.request_timeout_s is not None and not config.request_timeout_s > 0:
        raise ValueError(f"request_timeout_s must be > 0, got {config.request_timeout_s}")
    gen = Generation(
        served,
        pool,
        metrics,
        config.max_body_bytes,
        migration_limit=config.migration_limit,
        request_timeout_s=config.request_timeout_s,
        tool_call_parser=config.tool_call_parser,
    )
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        try:
            yield
        finally:
            gen.close()
            await pool.close()

    app = FastAPI(title="splitserve router", lifespan=lifespan)
    install_error_handlers(app)
    if config.api_key:
        # Bytes, not str: compare_digest refuses a non-ASCII str, and a header
        # may carry any byte (Starlette decodes it as latin-1, which encodes back).
        expected = f"Bearer {config.api_key}".encode()

        @app.middleware("http")
        async def require_api_key(request: Request, call_next: Any) -> Response:
            given = request.headers.get("authorization", "").encode("latin-1")
            if request.url.path.startswith("/v1/") and not hmac.compare_digest(given, expected):
                return APIError(
                    401, "missing or wrong API key (send Authorization: Bearer <key>)",
                    code="invalid_api_key",
                ).response()  # fmt: skip
            response: Response = await call_next(request)
            return response

    app.state.pool = pool
    app.state.metrics = metrics
    app.state.served = served

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gen.handle(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gen.handle(request, "chat_completions")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": served.name,
            "object": "model",
            "created": started,
            "owned_by": "splitserve",
            "root": served.path,
            "max_model_len": served.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy = len(pool.healthy_decode)
        body = {
            "status": "ok" if healthy else "unavailable",
            "healthy_decode_workers": healthy,
            "decode_workers": len(pool.decode),
            "healthy_prefill_workers": len(pool.healthy_prefill),
            "prefill_workers": len(pool.prefill),
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # Both spellings, and no redirect between them (a mounted prometheus app
    # would redirect /metrics to /metrics/, which some scrapers do not follow).
    app.add_api_route("/metrics", metrics_text, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics/", metrics_text, methods=["GET"], include_in_schema=False)

    @app.get("/cluster")
    async def cluster() -> dict[str, Any]:
        # Poll now rather than show the last poll: a caller that just saw its
        # requests finish must see their blocks free.
        await pool.poll_all()
        now = time.monotonic()
        rows = [w.to_json(now) for w in pool.workers]
        if config.restarts is None:
            return {"workers": rows}
        restarts = config.restarts()
        for row in rows:
            row["restarts"] = restarts.get(row["address"], ("", 0))[1]
        return {"workers": rows, "restarts_total": sum(n for _, n in restarts.values())}

    return app


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; RuntimeError, saying what to do, when
    the address is taken or not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise RuntimeError(
            f"cannot listen on {host}:{port}: {e.strerror}; is another server using it? "
            "Choose another --port (or --host)"
        ) from None
    return sock


def serve(
    config: RouterConfig,
    listener: socket.socket | None = None,
    on_listening: Callable[[], None] | None = None,
    served: ServedModel | None = None,
) -> None:
    """Run the router until interrupted (Ctrl-C or SIGTERM stop it cleanly).

    The port is bound (`listener`, or bound here) before `on_listening()`
    runs: a client that connects as soon as it is told the address waits in
    the backlog while the app starts, instead of being refused."""
    import uvicorn

    app = build_app(config, served)
    sock = listener if listener is not None else bind_listener(config.host, config.port)
    if on_listening is not None:
        on_listening()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
