"""`splitserve bench`: the workloads, arrivals and figures (vLLM `bench
serve` definitions), and the command against a live cluster."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import subprocess
import sys

import pytest

from bench import loadgen
from bench.loadgen import RequestResult
from tests.cluster import ServeCluster


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


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "deploy.cli", "bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_bench_against_a_live_cluster(tiny_llama, tmp_path):
    c = ServeCluster(tiny_llama, tmp_path / "serve.log", "--colocated", "1", "--dtype", "float32")
    try:
        out_json, plots = tmp_path / "out.json", tmp_path / "plots"
        common = ["--url", c.url, "--dataset", "random", "--input-len", "24"]
        common += ["--output-len", "12", "--num-prompts", "16"]
        proc = _bench(
            *common,
            "--request-rate", "20,40,inf",
            "--slo", "ttft=30,tpot=10",
            "--price-per-hour", "36",
            "--json", str(out_json),
            "--plot-dir", str(plots),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "goodput" in proc.stdout and "TPOT" in proc.stdout
        data = json.loads(out_json.read_text())
        assert [r["summary"]["request_rate"] for r in data["runs"]] == [20.0, 40.0, "inf"]
        for run in data["runs"]:
            s = run["summary"]
            assert (s["completed"], s["failed"]) == (16, 0)
            # Generous limits: every request is good.
            assert s["good_requests"] == 16
            assert s["goodput"] == pytest.approx(16 / s["duration_s"])
            assert s["output_tokens_per_dollar"] == pytest.approx(
                s["output_tokens"] / (36 * s["duration_s"] / 3600)
            )
            for r in run["requests"]:
                assert r["output_tokens"] == 12 and r["prompt_tokens"] == 24
                assert 0 < r["ttft"] <= r["e2e"]
                assert r["tpot"] == pytest.approx((r["e2e"] - r["ttft"]) / 11)
                assert len(r["itls"]) >= 1 and all(g >= 0 for g in r["itls"])
            st = s["ttft_s"]
            assert st["p50"] <= st["p90"] <= st["p99"]
        # The Poisson run's sends are spread out; the other's all start at once.
        sent = [r["sent"] for r in data["runs"][0]["requests"]]
        assert max(sent) > 0.1 and all(r["sent"] < 0.5 for r in data["runs"][2]["requests"])
        for name in ("latency_cdf.png", "goodput_vs_rate.png"):
            assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # A limit nobody meets: goodput 0, and the command still succeeds.
        strict = _bench(*common, "--slo", "ttft=1ms", "--json", str(out_json))
        assert strict.returncode == 0, strict.stderr
        assert json.loads(out_json.read_text())["runs"][0]["summary"]["goodput"] == 0.0

        # Requests longer than the model's context are refused before any is sent.
        too_long = _bench("--url", c.url, "--input-len", "1000", "--output-len", "100")
        assert too_long.returncode == 2 and "Traceback" not in too_long.stderr
        assert too_long.stderr.strip().splitlines()[-1] == (
            "splitserve bench: error: 100 of 100 requests exceed the server's context length "
            "1024 (the longest: 1000 prompt + 100 output tokens); lower --input-len, "
            "--output-len or --long-len"
        )
    finally:
        assert c.stop() == []


@pytest.mark.parametrize(
    "args, words",
    [
        (["--url", "http://127.0.0.1:9", "--num-prompts", "2"], ["cannot reach"]),
        (["--url", "http://127.0.0.1:9", "--slo", "speed=1"], ["--slo", "ttft"]),
        (["--url", "http://127.0.0.1:9", "--request-rate", "-1"], ["--request-rate"]),
        (["--url", "http://127.0.0.1:9", "--num-prompts", "0"], ["--num-prompts"]),
    ],
)
def test_bad_input_is_one_clean_line(args, words):
    proc = _bench(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("splitserve bench: error:"), proc.stderr
    for w in words:
        assert w in line
