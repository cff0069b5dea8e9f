"""No error answer carries internal text, over real HTTP (tests/router_app.py):
a crash is a 500 without the exception's text, and JSON nested too deeply or
a chat template that fails is a 400 that says so in its own words."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from router import RouterConfig, build_app
from router.errors import install_error_handlers
from tests.router_app import (
    CHAT,
    NOBODY,
    C,
    ServedApp,
    assert_error,
    keyed_router,
    post,
    tiny_model,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def router(model_dir) -> Iterator[ServedApp]:
    yield from keyed_router(model_dir)


def test_a_crash_is_a_500_without_the_exception_text():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret at /srv/internal/path.py")

    served = ServedApp(app)
    try:
        r = httpx.get(served.url + "/boom", timeout=30)
    finally:
        served.stop()
    err = assert_error(r, 500, None)
    assert err["type"] == "server_error"
    assert "secret" not in r.text and "RuntimeError" not in r.text


def test_deeply_nested_json_is_400_without_internal_text(router):
    body = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = assert_error(post(router, C, body), 400, None)
    assert "recursion" not in err["message"].lower()


BREAKING_TEMPLATE = (
    "{% if messages[0]['content'] == 'refuse' %}{{ raise_exception('roles must alternate') }}"
    "{% elif messages[0]['content'] == 'crash' %}{{ (1 // 0) }}{% endif %}"
)


def test_a_failing_chat_template_is_400_without_internal_text(model_dir, tmp_path):
    """A template that refuses the messages (raise_exception, meant for the
    user) is a 400 with its message; one that crashes is a 400 that says
    so without the exception's text."""
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "tiny"
    shutil.copytree(model_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.chat_template = BREAKING_TEMPLATE + tok.chat_template
    tok.save_pretrained(other)
    app = build_app(RouterConfig(model=str(other), decode_addresses=(NOBODY,)))
    served = ServedApp(app)
    try:
        say = lambda text: [{"role": "user", "content": text}]  # noqa: E731
        r = httpx.post(served.url + CHAT, json={"messages": say("refuse")}, timeout=30)
        err = assert_error(r, 400, "messages")
        assert "roles must alternate" in err["message"]
        r = httpx.post(served.url + CHAT, json={"messages": say("crash")}, timeout=30)
        err = assert_error(r, 400, "messages")
        assert "chat template" in err["message"]
        assert "ZeroDivision" not in r.text and "division" not in r.text
        r = httpx.post(served.url + CHAT, json={"messages": say("fine")}, timeout=30)
        assert r.status_code == 503, r.text
    finally:
        served.stop()
