"""`splitserve bench` the command: against a live cluster, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.cluster import ServeCluster


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "deploy.cli", "bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


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
            "1024 (the longest: 1000 prompt + 100 output tokens); lower --output-len or the "
            "prompts' lengths (--input-len, --long-len; prefix: --prefix-len, --suffix-len; "
            "multiturn: --turns, --turn-len)"
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
