"""The router's end-to-end request timeout, over a real cluster
(`splitserve serve --request-timeout`): a request that cannot finish in time
is a 504 (non-streaming) or a stream that ends with an error event and
[DONE]; either way the worker aborts it and every KV block is free again."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.cluster import ServeCluster, assert_all_blocks_free

TIMEOUT_S = 1.0
PROMPT = list(range(16, 48))
# ~990 tokens one at a time: about 3 s of decode steps on a development
# machine's CPU; the first token comes within tens of milliseconds.
MAX_TOKENS = 1024 - len(PROMPT) - 2
LONG = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "timeout.log"
    c = ServeCluster(
        tiny_llama, log, "--dtype", "float32", "--threads", "1",
        "--request-timeout", str(TIMEOUT_S),
    )  # fmt: skip
    yield c
    assert c.stop() == [], "workers outlived their cluster"


def requests_counted(c: ServeCluster, status: str) -> float:
    """splitserve_router_requests_total for completions with this status."""
    text = httpx.get(f"{c.url}/metrics", timeout=10).text
    key = f'splitserve_router_requests_total{{endpoint="completions",status="{status}"}} '
    lines = [line for line in text.splitlines() if line.startswith(key)]
    return float(lines[0].removeprefix(key)) if lines else 0.0


def decoded(c: ServeCluster) -> int:
    """Output tokens the decode workers have produced since they started."""
    return sum(w["tokens_produced"] or 0 for w in c.workers("decode"))


def assert_aborted_and_freed(c: ServeCluster, decoded_before: int) -> None:
    """Every block is free again, and the worker stopped the request early
    rather than running it to its end (which would also free its blocks)."""
    assert_all_blocks_free(c.wait_idle())
    assert decoded(c) - decoded_before < MAX_TOKENS


def test_a_request_past_the_timeout_is_504_and_freed(cluster):
    c = cluster
    body = {**LONG, "temperature": 0}
    before, tokens_before = requests_counted(c, "504"), decoded(c)
    start = time.monotonic()
    r = httpx.post(f"{c.url}/v1/completions", json=body, timeout=120)
    took = time.monotonic() - start
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["code"] == "timeout" and err["type"] == "server_error"
    assert f"({TIMEOUT_S:g} s)" in err["message"]
    assert took >= TIMEOUT_S  # not refused for another reason before its time
    assert requests_counted(c, "504") == before + 1
    assert_aborted_and_freed(c, tokens_before)


def test_a_stream_past_the_timeout_ends_with_an_error_event_and_done(cluster):
    c = cluster
    body = {**LONG, "temperature": 0, "stream": True}
    before, tokens_before = requests_counted(c, "timeout"), decoded(c)
    with httpx.stream("POST", f"{c.url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200  # the first token came well within the timeout
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["error"]["code"] == "timeout"
    tokens = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert tokens and all("choices" in t for t in tokens)  # it had streamed before
    assert all(t["choices"][0]["finish_reason"] is None for t in tokens)
    assert requests_counted(c, "timeout") == before + 1
    assert_aborted_and_freed(c, tokens_before)


def test_a_request_within_the_timeout_is_untouched(cluster):
    r = httpx.post(
        f"{cluster.url}/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    "flag, in_config, expected",
    [
        ([], "", None),
        ([], "  request_timeout_s: 30\n", 30.0),
        (["--request-timeout", "5"], "  request_timeout_s: 30\n", 5.0),
    ],
)
def test_serve_takes_the_timeout_from_the_flag_or_the_config(tmp_path, flag, in_config, expected):
    from deploy.cli import build_parser
    from deploy.commands.serve import spec_from_config

    config = tmp_path / "cluster.yaml"
    config.write_text(f"router:\n  port: 8000\n{in_config}pools:\n  colocated:\n    replicas: 1\n")
    args = build_parser().parse_args(["serve", "--config", str(config), *flag])
    assert spec_from_config(args)["request_timeout_s"] == expected
