"""`splitserve doctor` against live clusters under load: a batch held down
by its cap while the KV cache has room, and a decode pool out of KV."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.cluster import ServeCluster


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
