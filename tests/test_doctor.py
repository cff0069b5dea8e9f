"""`splitserve doctor` against live clusters under load: a batch held down
by its cap while the KV cache has room, and a decode pool out of KV; plus
the window arithmetic it rests on."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from deploy.doctor import PoolReport, Snapshot, diagnose, parse_metrics, window_quantile
from tests.cluster import ServeCluster

HIST = """# TYPE splitserve_router_ttft_seconds histogram
splitserve_router_ttft_seconds_bucket{{le="0.1"}} {a}
splitserve_router_ttft_seconds_bucket{{le="0.5"}} {b}
splitserve_router_ttft_seconds_bucket{{le="+Inf"}} {c}
splitserve_router_ttft_seconds_count {c}
splitserve_router_ttft_seconds_sum 1.0
"""


def _snap(a: int, b: int, c: int) -> Snapshot:
    return Snapshot(0.0, [], parse_metrics(HIST.format(a=a, b=b, c=c)))


def test_window_quantiles_interpolate_like_prometheus():
    before, after = _snap(10, 10, 10), _snap(20, 30, 30)
    # Over the window: 10 requests under 0.1 s, 10 more under 0.5 s.
    assert window_quantile(before, after, None, "splitserve_router_ttft_seconds", 0.5) == (
        pytest.approx(0.1)
    )
    assert window_quantile(before, after, None, "splitserve_router_ttft_seconds", 0.75) == (
        pytest.approx(0.3)
    )
    assert window_quantile(after, after, None, "splitserve_router_ttft_seconds", 0.5) is None


def _pool(role: str, **figures: float) -> PoolReport:
    base = dict(
        replicas=1, running=0, waiting=0, queued_prompt_tokens=0, queued_prompt_tokens_change=0,
        kv_usage=0.1, kv_blocks_total=1000, mean_batch=None, fits_sequences=None,
        rejected_full=0, preemptions=0, tokens_per_dollar=None, max_num_seqs=64, cores_busy=None,
    )  # fmt: skip
    return PoolReport(role=role, **{**base, **figures})  # type: ignore[arg-type]


def test_an_slo_miss_names_the_pool_to_grow():
    # A decode batch at its cap, KV roomy, and requests waiting: without an
    # SLO the remedy is a bigger batch; with TPOT already over it, it is not.
    decode = _pool("decode", running=64, waiting=10, mean_batch=60.0, kv_usage=0.3)
    prefill = _pool("prefill")
    latency = {
        "router_tpot_p95": 0.08,
        "router_ttft_p95": 2.0,
        "prefill_queue_p95": 1.5,
        "prefill_compute_p95": 0.3,
    }
    assert any("raise max_num_seqs" in d for d in diagnose([decode, prefill], latency))
    d = diagnose([decode, prefill], latency, slo={"tpot": 0.05, "ttft": 1.0})
    assert any(
        "TPOT p95 80 ms is over the SLO's 50 ms" in x and "add decode replicas" in x for x in d
    )
    assert not any("raise max_num_seqs" in x for x in d)
    assert [x for x in d if "add prefill replicas" in x] == [
        "TTFT p95 2000 ms is over the SLO's 1000 ms (prefill queue p95 1500 ms): prompts wait "
        "for a free engine: add prefill replicas"
    ]
    # A prompt whose own compute is over the SLO: more replicas will not help.
    slow = {**latency, "prefill_queue_p95": 0.0, "prefill_compute_p95": 1.2}
    d = diagnose([decode, prefill], slow, slo={"ttft": 1.0})
    assert any("more replicas will not help" in x for x in d)
    # Within the SLO, nothing is said about it.
    d = diagnose([decode, prefill], latency, slo={"tpot": 0.1, "ttft": 3.0})
    assert not any("SLO" in x for x in d)


def _load(url: str, n: int, output_len: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "deploy.cli", "bench", "--url", url, "--dataset", "random"]
    cmd += ["--input-len", "100", "--output-len", str(output_len), "--num-prompts", str(n)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _doctor(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "deploy.cli", "doctor", "--url", url, "--interval", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _under_load(c: ServeCluster, n: int, output_len: int, *extra: str) -> str:
    load = _load(c.url, n, output_len)
    try:
        deadline = time.monotonic() + 60
        while not any((w["running"] or 0) > 0 for w in c.workers("decode")):
            assert time.monotonic() < deadline, "the load never reached the decode worker"
            time.sleep(0.2)
        proc = _doctor(c.url, *extra)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    finally:
        load.kill()
        load.wait()


@pytest.mark.slow
def test_doctor_finds_a_batch_held_down_by_its_cap(tiny_llama, tmp_path):
    c = ServeCluster(
        tiny_llama, tmp_path / "serve.log", "--max-num-seqs", "4", "--kv-cache-mib", "64",
        "--dtype", "float32",
    )  # fmt: skip
    try:
        out = _under_load(c, 24, 800)
        assert "prefill: queue" in out and "decode: TPOT" in out  # measured apart
        assert "raise max_num_seqs" in out, out
        # Watching: four 1 s windows, the report on the busiest one.
        report = json.loads(_under_load(c, 24, 800, "--json", "--watch", "4", "--interval", "1"))
        assert report["windows"] == 4 and len(report["window_output_tokens_per_s"]) == 4
        assert report["output_tokens_per_s"] == max(report["window_output_tokens_per_s"]) > 0
        decode = next(p for p in report["pools"] if p["role"] == "decode")
        assert decode["running"] == decode["max_num_seqs"] == 4 and decode["waiting"] > 0
        assert any("max_num_seqs" in d for d in report["diagnosis"])
        # The decoder's process is busy stepping; the idle prefill worker's is not.
        prefill = next(p for p in report["pools"] if p["role"] == "prefill")
        assert decode["cores_busy"] > 0.2 and 0 <= prefill["cores_busy"] < decode["cores_busy"]
    finally:
        assert c.stop() == []


@pytest.mark.slow
def test_doctor_finds_a_decode_pool_out_of_kv(tiny_llama, tmp_path):
    # 1 MiB of float32 KV for the tiny model: 128 blocks, about two of these sequences.
    c = ServeCluster(
        tiny_llama, tmp_path / "serve.log", "--kv-cache-mib", "1", "--dtype", "float32"
    )
    try:
        out = _under_load(c, 24, 800)
        assert "decode pool saturated on KV" in out and "add decode replicas" in out, out
    finally:
        assert c.stop() == []


def test_doctor_on_nothing_is_one_clean_line():
    proc = _doctor("http://127.0.0.1:9")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("splitserve doctor: error: cannot reach")
    for bad in (["--slo", "itl=5ms"], ["--slo", "tpot=fast"], ["--watch", "-1"]):
        proc = _doctor("http://127.0.0.1:9", *bad)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (bad, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
