"""A router app served by uvicorn on 127.0.0.1, and how the router's input
tests ask it: the router points at 127.0.0.1:1 (nothing listens there), so a
request that passes validation gets 503, which tells "accepted" from "refused"."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from router import RouterConfig, build_app
from tests.cluster import free_port

NOBODY = "127.0.0.1:1"
KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


class ServedApp:
    """An ASGI app served by uvicorn in a thread, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modelmaker import make_model

    return make_model(tmp_path_factory.mktemp("router") / "tiny", preset="tiny", arch="llama")


def keyed_router(model_dir: Path) -> Iterator[ServedApp]:
    """For a fixture to yield from: a router that wants KEY, pointed at nobody."""
    app = build_app(RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,), api_key=KEY))
    served = ServedApp(app)
    yield served
    served.stop()


def post(router: ServedApp, path: str, body: Any, headers: dict[str, Any] | None = None):
    """POST `body` as JSON with ASCII escapes, so a lone surrogate travels as
    the six characters \\ud800 (httpx's own encoder would fail on it)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode("ascii")
    h = {**AUTH, "content-type": "application/json", **(headers or {})}
    return httpx.post(router.url + path, content=raw, headers=h, timeout=30)


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
        # The message names the field too, for clients that show only it.
        assert param.split("[")[0].split(".")[-1] in err["message"]
    return err
