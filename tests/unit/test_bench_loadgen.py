"""`splitserve bench`: the workloads, arrivals and figures (vLLM `bench
serve` definitions)."""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from collections import Counter

import pytest

from deploy import loadgen
from deploy.loadgen import RequestResult


def test_datasets_are_reproducible_and_shaped_as_named():
    a = loadgen.make_dataset("random", 20, seed=3, input_len=50, output_len=7)
    assert a == loadgen.make_dataset("random", 20, seed=3, input_len=50, output_len=7)
    assert a != loadgen.make_dataset("random", 20, seed=4, input_len=50, output_len=7)
    assert all(len(s.prompt) == 50 and s.max_tokens == 7 for s in a)
    seed = loadgen.make_dataset("seed", 200)
    assert {s.max_tokens for s in seed} <= set(loadgen.SEED_OUTPUT_LENS)
    assert len({s.max_tokens for s in seed}) == len(loadgen.SEED_OUTPUT_LENS)
    mix = loadgen.make_dataset("interference", 1000, long_fraction=0.1, long_len=2048)
    long = [s for s in mix if len(s.prompt) == 2048]
    assert 60 <= len(long) <= 140  # ~10%
    assert all(len(s.prompt) <= 256 for s in mix if len(s.prompt) != 2048)
    for bad in (dict(name="nope"), dict(num_prompts=0), dict(long_fraction=2.0)):
        kwargs = {"name": "random", "num_prompts": 5, **bad}
        with pytest.raises(loadgen.BenchError):
            loadgen.make_dataset(**kwargs)


def test_arrivals_all_at_once_poisson_and_bursty():
    assert loadgen.arrival_times(5, math.inf) == [0.0] * 5
    times = loadgen.arrival_times(4000, 8.0, seed=1)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 8.0, rel=0.1)
    # A Poisson process has gaps with a coefficient of variation of 1;
    # burstiness below 1 spreads them more, at the same mean.
    cv = statistics.stdev(gaps) / statistics.fmean(gaps)
    bursty = loadgen.arrival_times(4000, 8.0, burstiness=0.25, seed=1)
    bgaps = [b - a for a, b in itertools.pairwise(bursty)]
    assert statistics.fmean(bgaps) == pytest.approx(1 / 8.0, rel=0.15)
    assert cv == pytest.approx(1.0, rel=0.1)
    assert statistics.stdev(bgaps) / statistics.fmean(bgaps) > 1.5
    with pytest.raises(loadgen.BenchError):
        loadgen.arrival_times(3, 0.0)


def test_slo_parsing():
    assert loadgen.parse_slo("ttft=0.5,tpot=50ms") == {"ttft": 0.5, "tpot": 0.05}
    assert loadgen.parse_slo("e2e=2s") == {"e2e": 2.0}
    assert loadgen.parse_slo(None) == {}
    for bad in ("ttft", "speed=1", "ttft=fast", "tpot=-1"):
        with pytest.raises(loadgen.BenchError):
            loadgen.parse_slo(bad)
    assert loadgen.parse_rates("inf") == [math.inf]
    assert loadgen.parse_rates("1,2.5") == [1.0, 2.5]


def test_figures_follow_the_definitions():
    a = RequestResult(10, 5, ttft=0.1, e2e=0.5, output_tokens=5, itls=[0.1, 0.1, 0.1, 0.1])
    b = RequestResult(10, 5, ttft=0.3, e2e=1.1, output_tokens=5, itls=[0.2, 0.2, 0.2, 0.2])
    failed = RequestResult(10, 5, error="HTTP 503")
    assert a.tpot == pytest.approx(0.1) and b.tpot == pytest.approx(0.2)
    s = loadgen.summarize(2.0, [a, b, failed], {"ttft": 0.2, "tpot": 0.15}, rate=4.0)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["output_tokens"] == 10 and s["output_throughput"] == pytest.approx(5.0)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["good_requests"] == 1 and s["goodput"] == pytest.approx(0.5)  # only a meets both
    assert s["ttft_s"]["mean"] == pytest.approx(0.2)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2)  # interpolated between 0.1 and 0.3
    assert s["itl_s"]["p99"] == pytest.approx(0.2)
    assert loadgen.meets(a, {"itl": 0.15}) and not loadgen.meets(b, {"itl": 0.15})
    assert not loadgen.meets(failed, {})
    costed = loadgen.summarize(2.0, [a, b], {}, rate=4.0, cost_dollars=0.001)
    assert costed["output_tokens_per_dollar"] == pytest.approx(10 / 0.001)


def test_prefix_dataset_shares_its_prefixes_and_nothing_else():
    kw = dict(seed=5, output_len=9, prefix_count=4, prefix_len=32, suffix_len=8)
    specs = loadgen.make_dataset("prefix", 42, **kw)
    assert specs == loadgen.make_dataset("prefix", 42, **kw)
    assert specs != loadgen.make_dataset("prefix", 42, **{**kw, "seed": 6})
    assert all(len(s.prompt) == 40 and s.max_tokens == 9 and s.after is None for s in specs)
    uses = Counter(tuple(s.prompt[:32]) for s in specs)
    assert sorted(uses.values()) == [10, 10, 11, 11]  # 4 prefixes, dealt evenly
    assert len({tuple(s.prompt[32:]) for s in specs}) == 42  # every suffix its own
    order = [tuple(s.prompt[:32]) for s in specs]
    assert order != [order[i % 4] for i in range(42)]  # shuffled, not round-robin
    with pytest.raises(loadgen.BenchError, match="--prefix-len"):
        loadgen.make_dataset("prefix", 5, prefix_len=0)
    with pytest.raises(loadgen.BenchError, match="--suffix-len"):
        loadgen.make_dataset("prefix", 50, suffix_len=1, token_range=(100, 110))


def test_multiturn_prompts_resend_the_history_in_order():
    kw = dict(seed=2, output_len=7, conversations=3, turns=4, turn_len=5)
    specs = loadgen.make_dataset("multiturn", 1, **kw)  # num_prompts: not for multiturn
    assert specs == loadgen.make_dataset("multiturn", 100, **kw)
    assert specs != loadgen.make_dataset("multiturn", 1, **{**kw, "seed": 3})
    assert len(specs) == 12
    for i, s in enumerate(specs):
        turn = i // 3  # turn-major: every first turn, then every second...
        assert len(s.prompt) == (turn + 1) * 5 + turn * 7 and s.max_tokens == 7
        if turn == 0:
            assert s.after is None
        else:
            assert s.after == i - 3
            before = specs[i - 3].prompt
            assert s.prompt[: len(before)] == before
    assert len({tuple(s.prompt[:5]) for s in specs[:3]}) == 3  # the conversations differ
    with pytest.raises(loadgen.BenchError, match="--turns"):
        loadgen.make_dataset("multiturn", 1, turns=0)


def test_dispatch_sends_a_request_only_after_the_one_it_follows():
    specs = loadgen.make_dataset("multiturn", 1, conversations=3, turns=3, turn_len=2)
    log: list[tuple[str, int]] = []

    async def send(i: int) -> int:
        log.append(("start", i))
        # Earlier requests take longer, so only waiting keeps the order.
        await asyncio.sleep(0.002 * (len(specs) - i))
        log.append(("end", i))
        return i

    results = asyncio.run(loadgen.dispatch(specs, [0.0] * len(specs), time.perf_counter(), send))
    assert results == list(range(len(specs)))
    for i, s in enumerate(specs):
        if s.after is not None:
            assert log.index(("end", s.after)) < log.index(("start", i))
    assert {i for _, i in log[:3]} == {0, 1, 2}  # the first turns go together
    bad = [loadgen.RequestSpec([1], 1, after=1), loadgen.RequestSpec([1], 1)]
    with pytest.raises(loadgen.BenchError, match="earlier"):
        asyncio.run(loadgen.dispatch(bad, [0.0, 0.0], time.perf_counter(), send))
