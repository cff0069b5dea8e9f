"""The router's HTTP API, through the real app.

Validation, errors and the informational routes run against a pool pointed at
127.0.0.1:1 (nothing listens there), so any request that passes validation
must get 503 with Retry-After. Worker selection is tested on the pool with
synthetic Status answers. The token path (retries, stop strings, streaming,
cancellation, backpressure) is tested against real workers in
tests/e2e.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from protos import splitserve_pb2 as pb
from router import RouterConfig, build_app
from router.pool import WorkerPool

NOBODY = "127.0.0.1:1"
MAX_LEN = 1024  # the tiny preset's max_position_embeddings
VOCAB = 2048


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from modelmaker import make_model

    return make_model(tmp_path_factory.mktemp("router") / "tiny", preset="tiny", arch="llama")


@pytest.fixture(scope="module")
def client(model_dir) -> Iterator[TestClient]:
    app = build_app(RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,)))
    with TestClient(app) as c:
        yield c


def assert_openai_error(r: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    assert isinstance(err["message"], str) and err["message"]
    return err


C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (id, path, body: bytes or a JSON object, status, param, words in the message)
BAD_REQUESTS: list[tuple[str, str, Any, int, str | None, str]] = [
    ("malformed-json", C, b'{"prompt": "hi",', 400, None, "malformed JSON"),
    ("not-utf8", C, b'{"prompt": "\xff\xfe"}', 400, None, "UTF-8"),
    ("empty-body", C, b"", 400, None, "empty"),
    ("json-array", C, b"[1, 2]", 400, None, "JSON object"),
    ("nan", C, b'{"prompt": "hi", "temperature": NaN}', 400, None, "NaN"),
    ("max-tokens-string", C, {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("max-tokens-float", C, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("temperature-string", C, {"prompt": "hi", "temperature": "hot"}, 400, "temperature", ""),
    ("prompt-int", C, {"prompt": 5}, 400, "prompt", "must be"),
    ("prompt-missing", C, {"max_tokens": 3}, 400, "prompt", "required"),
    ("max-tokens-negative", C, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", ">= 1"),
    ("max-tokens-zero", C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("max-tokens-huge", C, {"prompt": [5, 6], "max_tokens": 10**6}, 400, "max_tokens", "1000000"),
    (
        "prompt-too-long",
        C,
        {"prompt": [5] * MAX_LEN},
        400,
        "prompt",
        f"prompt has {MAX_LEN} tokens; the context length is {MAX_LEN}",
    ),
    ("text-prompt-too-long", C, {"prompt": "hello " * 3000}, 400, "prompt", "context length"),
    ("unknown-model", C, {"model": "gpt-4", "prompt": "hi"}, 400, "model", "gpt-4"),
    ("n-17", C, {"prompt": "hi", "n": 17}, 400, "n", "n must be between 1 and 16"),
    ("empty-prompt", C, {"prompt": ""}, 400, "prompt", "empty"),
    ("empty-token-list", C, {"prompt": []}, 400, "prompt", "empty"),
    ("negative-token-id", C, {"prompt": [1, -1]}, 400, "prompt", "[0, 2048)"),
    ("token-id-past-vocab", C, {"prompt": [VOCAB]}, 400, "prompt", "[0, 2048)"),
    ("token-id-bool", C, {"prompt": [True]}, 400, "prompt", "must be"),
    ("batched", C, {"prompt": ["a", "b"]}, 400, "prompt", "batched prompts are not supported"),
    ("penalty", C, {"prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty", "[-2, 2]"),
    ("top-p-zero", C, {"prompt": "hi", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("top-p-big", C, {"prompt": "hi", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("temperature-negative", C, {"prompt": "hi", "temperature": -0.5}, 400, "temperature", ""),
    ("top-k", C, {"prompt": "hi", "top_k": -2}, 400, "top_k", ""),
    ("seed-negative", C, {"prompt": "hi", "seed": -1}, 400, "seed", ""),
    ("empty-stop", C, {"prompt": "hi", "stop": [""]}, 400, "stop", "non-empty"),
    ("stop-number", C, {"prompt": "hi", "stop": 3}, 400, "stop", "string"),
    ("logprobs-negative", C, {"prompt": "hi", "logprobs": -1}, 400, "logprobs", ""),
    ("chat-no-messages", CHAT, {"messages": []}, 400, "messages", "at least one"),
    ("chat-missing-messages", CHAT, {"model": "tiny"}, 400, "messages", "required"),
    ("chat-bad-role", CHAT, {"messages": [{"role": "x", "content": "a"}]}, 400, None, "role"),
    (
        "chat-image",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0]",
        "text",
    ),
    (
        "chat-top-logprobs",
        CHAT,
        {"messages": USER, "top_logprobs": 2},
        400,
        "top_logprobs",
        "logprobs",
    ),
    ("logprobs-21", C, {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "between 0 and 20"),
    ("chat-n", CHAT, {"messages": USER, "n": 0}, 400, "n", "n must be between 1 and 16"),
    ("chat-max-tokens", CHAT, {"messages": USER, "max_tokens": MAX_LEN}, 400, "max_tokens", ""),
    ("too-large", C, b'{"prompt": "' + b"a" * (10 << 20) + b'"}', 413, None, "limit"),
]


@pytest.mark.parametrize(
    "path, body, status, param, words",
    [r[1:] for r in BAD_REQUESTS],
    ids=[r[0] for r in BAD_REQUESTS],
)
def test_bad_requests_get_openai_errors(client, path, body, status, param, words):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    err = assert_openai_error(r, status, "invalid_request_error")
    assert words in err["message"]
    if param is not None:
        assert err["param"] == param
    if param == "model":
        assert err["code"] == "model_not_found"


def test_chunked_body_over_limit_is_413_without_reading_it_all(client):
    # Straight to the ASGI app: the test client would read the whole body first.
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1  # 64 chunks of 256 KiB: 16 MiB if read to the end
        return {"type": "http.request", "body": b" " * (256 << 10), "more_body": pulled < 64}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": C, "raw_path": C.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["type"] == "invalid_request_error"
    assert pulled <= 5  # the limit is 1 MiB


@pytest.mark.parametrize(
    "path, body",
    [
        (C, {"prompt": "hello world", "max_tokens": 4}),
        (C, {"model": "tiny", "prompt": [1, 2, 3], "stream": True}),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        (CHAT, {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}),
        (C, {"prompt": "hi", "logprobs": 20, "stream": True}),
        (C, {"prompt": [1, 2, 3], "echo": True, "n": 2}),
        (C, {"prompt": "hi", "echo": True, "logprobs": 2, "best_of": 2}),
        (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 20}),
    ],
)
def test_valid_request_without_workers_is_503_retry_after(client, path, body):
    r = client.post(path, json=body)
    assert_openai_error(r, 503, "service_unavailable")
    assert r.headers["retry-after"] == "1"


def test_health_is_503_json_without_workers(client):
    r = client.get("/health")
    assert r.status_code == 503
    assert r.json()["healthy_decode_workers"] == 0


def test_models_lists_the_served_model(client, model_dir):
    r = client.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["id"] == model_dir.name == "tiny"
    assert card["owned_by"] == "splitserve"
    assert card["max_model_len"] == MAX_LEN


def test_metrics_answer_on_both_paths(client):
    client.post(C, json={"prompt": "hi", "n": 17})
    for path in ("/metrics", "/metrics/"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert 'splitserve_router_requests_total{endpoint="completions",status="400"}' in r.text


def test_unknown_route_and_method_have_openai_shape(client):
    assert_openai_error(client.get("/v1/nothing"), 404, "invalid_request_error")
    assert_openai_error(client.get(C), 405, "invalid_request_error")


def test_cluster_polls_and_reports_the_unreachable_worker(client):
    (w,) = client.get("/cluster").json()["workers"]
    assert w["address"] == NOBODY and w["role"] == "decode"
    assert w["healthy"] is False and "UNAVAILABLE" in w["last_error"]


# -- selection, without gRPC ---------------------------------------------------------


def _pool(*free_blocks: int, prefill_waiting: tuple[int, ...] = ()) -> WorkerPool:
    decode = [f"d{i}:1" for i in range(len(free_blocks))]
    pool = WorkerPool(decode, [f"p{i}:1" for i in range(len(prefill_waiting))])
    for w, free in zip(pool.decode, free_blocks, strict=True):
        w.status = pb.WorkerStatus(role="decode", block_size=16, kv_blocks_free=free)
        w.healthy = True
    for w, waiting in zip(pool.prefill, prefill_waiting, strict=True):
        w.status = pb.WorkerStatus(role="prefill", waiting_prompt_tokens=waiting)
        w.healthy = True
    return pool


def test_decode_selection_prefers_room_and_spreads_a_burst():
    pool = _pool(10, 40, 30)
    assert pool.pick_decode(16, set()).address == "d1:1"
    assert pool.pick_decode(16, {"d1:1"}).address == "d2:1"
    # 35 blocks fit only d1; with d1 excluded none fits, and the most free wins.
    assert pool.pick_decode(35 * 16, set()).address == "d1:1"
    assert pool.pick_decode(35 * 16, {"d1:1"}).address == "d2:1"
    # A burst between polls: each dispatch lowers the estimate, so it spreads.
    picks = []
    for _ in range(6):
        w = pool.pick_decode(160, set())  # 10 blocks each
        pool.dispatched(w, [], 160)
        picks.append(w.address)
    assert picks[:2] == ["d1:1", "d2:1"] and {"d0:1", "d1:1", "d2:1"} == set(picks)
    pool.mark_unhealthy(pool.decode[1], "gone")
    assert all(pool.pick_decode(1, set()).address != "d1:1" for _ in range(3))
    pool.mark_full(pool.decode[2])
    assert pool.pick_decode(16, set()).address == "d0:1"


def test_round_robin_takes_turns_among_those_with_room():
    pool = _pool(10, 40, 30)
    pool.policy = "round_robin"
    picks = [pool.pick_decode(16, set()).address for _ in range(6)]
    assert sorted(picks) == ["d0:1", "d0:1", "d1:1", "d1:1", "d2:1", "d2:1"]
    assert len(set(picks[:3])) == 3  # each once per turn
    # 20 blocks fit only d1 and d2: d0 is skipped, not taken in its turn.
    picks = {pool.pick_decode(20 * 16, set()).address for _ in range(6)}
    assert picks == {"d1:1", "d2:1"}


def test_prefill_ranking_counts_the_routers_own_unanswered_prompts():
    pool = _pool(50, prefill_waiting=(100, 300))
    d = pool.decode[0]
    assert [p.address for p in pool.rank_prefill(d)] == ["p0:1", "p1:1"]
    ranked = pool.rank_prefill(d)
    pool.dispatched(d, ranked, 500)  # p0 now has 500 prompt tokens in flight
    assert [p.address for p in pool.rank_prefill(d)] == ["p1:1", "p0:1"]
    pool.first_token(ranked, 500)
    assert [p.address for p in pool.rank_prefill(d)] == ["p0:1", "p1:1"]


def test_api_key_guards_the_v1_routes(model_dir):
    app = build_app(
        RouterConfig(model=str(model_dir), decode_addresses=(NOBODY,), api_key="s3cret")
    )
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    with TestClient(app) as c:
        assert_openai_error(c.post(C, json=body), 401, "invalid_request_error")
        wrong = {"Authorization": "Bearer nope"}
        assert_openai_error(c.get("/v1/models", headers=wrong), 401, "invalid_request_error")
        right = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=right).status_code == 200
        assert c.post(C, json=body, headers=right).status_code == 503  # past auth: no workers
        assert c.get("/health").status_code == 503  # operators' routes stay open
        assert c.get("/metrics").status_code == 200


def test_echo_with_logprobs_asks_for_the_prompts_logprobs(model_dir):
    """echo + logprobs = N: the worker scores the prompt with N alternatives;
    without echo (or without logprobs) it does not."""
    from transformers import AutoTokenizer

    from router.preprocess import prepare
    from router.served_model import ServedModel

    served = ServedModel(
        "tiny", str(model_dir), VOCAB, MAX_LEN, AutoTokenizer.from_pretrained(model_dir)
    )

    def params(**body: Any):
        return prepare(json.dumps({"prompt": "hi", **body}).encode(), "completions", served).params

    assert params(echo=True, logprobs=2).prompt_logprobs == 2
    assert params(echo=True, logprobs=0).prompt_logprobs == 0
    assert params(logprobs=2).prompt_logprobs is None
    assert params(echo=True).prompt_logprobs is None
