"""The soak (bench/soak.py): how it judges an answer and its seeded chaos."""

from __future__ import annotations

import itertools
import json

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from bench import soak
from bench.soak import Outcome, SoakConfig, StreamJudge, judge_body, plan_chaos


def _out(stream: bool = True, max_tokens: int = 3) -> Outcome:
    return Outcome(0, stream, 5, max_tokens, 0.0, "00:00:00.000")


def _data(obj: object) -> str:
    return "data: " + json.dumps(obj)


def _text(t: str) -> str:
    return _data({"id": "cmpl-1", "choices": [{"index": 0, "text": t, "finish_reason": None}]})


def _final(reason: str = "length", migrations: int = 0) -> str:
    timings = {"migrations": migrations, "attempts": 1 + migrations, "decode_worker": "d"}
    return _data(
        {
            "id": "cmpl-1",
            "choices": [{"index": 0, "text": "", "finish_reason": reason}],
            "splitserve_timings": timings,
        }
    )


def _usage(n: int) -> str:
    return _data({"id": "cmpl-1", "choices": [], "usage": {"completion_tokens": n}})


ERROR = _data({"error": {"message": "decode worker 127.0.0.1:4000 failed", "code": 502}})
GOOD = [_text("a"), "", _text("b"), _text("c"), _final(migrations=1), _usage(3), "data: [DONE]"]


def judge(lines: list[str], broken: str | None = None) -> tuple[str, str, Outcome]:
    out = _out()
    j = StreamJudge(out)
    for line in lines:
        j.feed(line)
    kind, reason = j.verdict(broken)
    return kind, reason, out


def test_a_whole_stream_is_completed_and_its_migrations_counted():
    kind, _, out = judge(GOOD)
    assert kind == "completed"
    assert (out.migrations, out.attempts, out.request_id) == (1, 2, "cmpl-1")
    assert out.completion_tokens == 3


@pytest.mark.parametrize(
    "lines, broken, kind, says",
    [
        # a clear error: an error event, then [DONE]
        ([_text("a"), ERROR, "data: [DONE]"], None, "failed", "decode worker"),
        # no answer: cut before the final chunk, before [DONE], or broken off
        ([_text("a"), _text("b")], None, "lost", "final chunk"),
        (GOOD[:-1], None, "lost", "[DONE]"),
        ([_text("a")], "RemoteProtocolError: peer closed", "lost", "peer closed"),
        ([], None, "lost", "final chunk"),
        # an answer, but a wrong one
        ([_text("a"), _final(), _usage(2), "data: [DONE]"], None, "malformed", "2 completion"),
        ([_text("a"), _final("stop"), _usage(3), "data: [DONE]"], None, "malformed", "'stop'"),
        ([_text("a"), _final(), "data: [DONE]"], None, "malformed", "no usage"),
        ([*GOOD, _text("d")], None, "malformed", "after [DONE]"),
        ([_text("a"), "data: {not json", *GOOD], None, "malformed", "unparsable"),
        ([_text("a"), _final(), _final(), _usage(3), "data: [DONE]"], None, "malformed", "two"),
        ([_text("a"), ERROR], None, "malformed", "no [DONE]"),
        ([_text("a"), ERROR], "ReadError: reset", "malformed", "ReadError"),
    ],
)
def test_stream_verdicts(lines, broken, kind, says):
    got, reason, _ = judge(lines, broken)
    assert (got, says in reason) == (kind, True), reason


def _body(reason: str = "length", tokens: int = 3) -> bytes:
    choice = {"index": 0, "text": "abc", "finish_reason": reason}
    return json.dumps(
        {
            "id": "cmpl-2",
            "choices": [choice],
            "usage": {"completion_tokens": tokens},
            "splitserve_timings": {"migrations": 2, "attempts": 3},
        }
    ).encode()


@pytest.mark.parametrize(
    "status, body, kind, says",
    [
        (200, _body(), "completed", "ok"),
        (503, b'{"error": {"message": "no decode worker has room"}}', "failed", "HTTP 503: no"),
        (400, b'{"error": "bad"}', "failed", "HTTP 400: bad"),
        (502, b"<html>Bad Gateway</html>", "malformed", "without a JSON error body"),
        (200, b"", "lost", "without a JSON body"),
        (200, _body(tokens=4), "malformed", "4 completion tokens"),
        (200, _body(reason=None), "malformed", "finish_reason None"),  # type: ignore[arg-type]
    ],
)
def test_body_verdicts(status, body, kind, says):
    out = _out(stream=False)
    got, reason = judge_body(out, status, body)
    assert (got, says in reason) == (kind, True), reason
    if kind == "completed":
        assert (out.migrations, out.request_id) == (2, "cmpl-2")


def test_alike_reasons_group_together():
    a = soak.group_reason("HTTP 502: decode worker 127.0.0.1:4000 failed after 12.5 s")
    b = soak.group_reason("HTTP 502: decode worker 127.0.0.1:39999 failed after 3 s")
    assert a == b
    assert a.startswith("HTTP 502: decode worker ADDR failed after N s")


def test_chaos_is_fixed_by_the_seed_and_alternates():
    a = plan_chaos(3, 600, (30, 60), (3, 10))
    assert a == plan_chaos(3, 600, (30, 60), (3, 10))
    assert a != plan_chaos(4, 600, (30, 60), (3, 10))
    assert 10 <= len(a) <= 20
    assert all(30 <= y.at_s - x.at_s <= 60 for x, y in itertools.pairwise(a))
    assert all(x.action != y.action for x, y in itertools.pairwise(a))
    assert all(3 <= s.freeze_s <= 10 and 0 <= s.pick < 1 for s in a)


def test_counters_are_read_per_outcome():
    registry = CollectorRegistry()
    kv = Counter("splitserve_kv_failures", "", ["role", "outcome"], registry=registry)
    kv.labels("decode", "recomputed").inc(2)
    kv.labels("decode", "failed").inc()
    Counter("splitserve_decode_local_prefills", "", ["role"], registry=registry).labels(
        "decode"
    ).inc(5)
    Gauge("splitserve_decode_migrations_in_total", "", registry=registry).set(7)  # not a counter
    got = soak.parse_counters(generate_latest(registry).decode(), soak.WORKER_COUNTERS)
    assert got == {
        "splitserve_kv_failures": 3.0,
        "splitserve_kv_failures{recomputed}": 2.0,
        "splitserve_kv_failures{failed}": 1.0,
        "splitserve_decode_local_prefills": 5.0,
    }


def test_bad_options_are_refused():
    with pytest.raises(soak.SoakError, match="chaos-interval"):
        SoakConfig(chaos_interval_s=(20, 10))
    with pytest.raises(soak.SoakError, match="rate"):
        SoakConfig(rate=0)
    assert soak.main(["--minutes", "0"]) == 2
