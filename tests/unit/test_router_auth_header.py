"""The Authorization header over real HTTP (tests/router_app.py): bytes that
are not ASCII are a 401, never a 500, and a key that is not ASCII is compared
as bytes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from router import RouterConfig, build_app
from tests.router_app import NOBODY, C, ServedApp, assert_error, keyed_router, post, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def router(model_dir) -> Iterator[ServedApp]:
    yield from keyed_router(model_dir)


@pytest.mark.parametrize(
    "value",
    [b"Bearer \xff", b"\xff\xfe", b"Bearer s3cr\xe9t", "Bearer s3cr\u00e9t".encode()],
    ids=["0xff", "only-high-bytes", "latin1", "utf8"],
)
def test_a_non_ascii_authorization_header_is_401(router, value):
    r = httpx.post(
        router.url + C,
        content=b'{"prompt": "hi"}',
        headers=[(b"content-type", b"application/json"), (b"authorization", value)],
        timeout=30,
    )
    err = assert_error(r, 401, None)
    assert err["code"] == "invalid_api_key"


def test_the_right_key_still_works(router):
    assert post(router, C, {"prompt": "hi"}).status_code == 503  # past auth: no workers


def test_a_non_ascii_key_is_compared_as_bytes(model_dir):
    key = "cl\u00e9"
    app = build_app(RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,), api_key=key))
    served = ServedApp(app)
    try:
        url = served.url + "/v1/models"
        ok = httpx.get(url, headers=[(b"authorization", f"Bearer {key}".encode())], timeout=30)
        assert ok.status_code == 200, ok.text
        bad = httpx.get(url, headers=[(b"authorization", b"Bearer cl\xe9")], timeout=30)
        assert_error(bad, 401, None)
    finally:
        served.stop()
