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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from engine.config import EngineConfig, ModelConfig
from router.endpoints import Generation
from router.errors import APIError, install_error_handlers
from router.metrics import RouterMetrics
from router.pool import Discover, WorkerPool
from router.preprocess import ServedModel


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
    policy: how to pick a decode worker (router/pool.py pick_decode).
    discover: when set, asked for the workers' addresses before every poll
        (Kubernetes DNS, the Ray directory); the fixed addresses are then
        only the starting point.
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
    policy: Literal["least_loaded", "round_robin"] = "least_loaded"

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


def build_app(config: RouterConfig) -> FastAPI:
    """The router as an ASGI app; worker polling runs during its lifespan."""
    served = load_served_model(config)
    metrics = RouterMetrics()
    pool = WorkerPool(
        config.decode_addresses,
        config.prefill_addresses,
        poll_interval_s=config.poll_interval_s,
        vocab_size=served.vocab_size,
        discover=config.discover,
        policy=config.policy,
    )
    metrics.track_cost(lambda: pool.workers)
    gen = Generation(served, pool, metrics, config.max_body_bytes)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="splitserve router", lifespan=lifespan)
    install_error_handlers(app)
    if config.api_key:
        expected = f"Bearer {config.api_key}"

        @app.middleware("http")
        async def require_api_key(request: Request, call_next: Any) -> Response:
            if request.url.path.startswith("/v1/") and not hmac.compare_digest(
                request.headers.get("authorization", ""), expected
            ):
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
        return {"workers": [w.to_json(now) for w in pool.workers]}

    return app


def serve(config: RouterConfig) -> None:
    """Run the router until interrupted (Ctrl-C or SIGTERM stop it cleanly)."""
    import uvicorn

    app = build_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
