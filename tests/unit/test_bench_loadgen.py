"""`splitserve bench`: the workloads, arrivals and figures (vLLM `bench
serve` definitions)."""

from __future__ import annotations

import itertools
import math
import statistics

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
