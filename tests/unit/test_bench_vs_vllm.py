"""bench/vs_vllm.py's own logic: the ratio table and the skip path
when vLLM cannot be installed (no vLLM is installed here)."""

from __future__ import annotations

import json
import math

from bench import vs_vllm


def test_ratios_and_table():
    vllm = {"tok_s": 100.0, "ttft_p50_ms": 50.0, "ttft_p99_ms": 200.0}
    vllm |= {"tpot_p50_ms": 80.0, "tpot_p99_ms": 100.0}
    ours = {"tok_s": 150.0, "ttft_p50_ms": 25.0, "ttft_p99_ms": 400.0}
    ours |= {"tpot_p50_ms": 40.0, "tpot_p99_ms": 0.0}
    r = vs_vllm.ratios(ours, vllm)
    assert r == {
        "tok_s": 1.5,
        "ttft_p50_ms": 0.5,
        "ttft_p99_ms": 2.0,
        "tpot_p50_ms": 0.5,
        "tpot_p99_ms": 0.0,
    }
    assert math.isnan(vs_vllm.ratios(vllm, {**vllm, "tok_s": 0.0})["tok_s"])
    runs = [{**ours, "tok_s": 140.0}, {**ours, "tok_s": 160.0}, {**ours, "tok_s": 150.0}]
    assert vs_vllm.medians(runs)["tok_s"] == 150.0

    table = vs_vllm.format_table({"vLLM": vllm, "colocated": ours})
    lines = table.splitlines()
    assert lines[0].split() == [
        "server",
        "tok/s",
        "TTFT",
        "p50",
        "TTFT",
        "p99",
        "TPOT",
        "p50",
        "TPOT",
        "p99",
    ]
    assert lines[1].split()[:3] == ["vLLM", "100.0", "50.0ms"]
    # The baseline has no ratio row; the other config has one, in the metrics' order.
    assert lines[-1].split() == ["colocated", "1.50x", "0.50x", "2.00x", "0.50x", "0.00x"]
    assert sum(line.startswith("vLLM") for line in lines) == 1


def test_skips_with_one_line_when_vllm_cannot_be_installed(tmp_path, capsys):
    out = tmp_path / "out.json"
    # A venv under a file cannot be created: the install fails at once, offline.
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = vs_vllm.main(["--vllm-venv", str(blocker / "venv"), "--json", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    skipped = [line for line in lines if line.startswith("vs_vllm: skipped: ")]
    assert len(skipped) == 1 and "cannot create" in skipped[0]
    result = json.loads(out.read_text())
    assert result["skipped"] and result["dtype"] in ("float32", "bfloat16")
    assert result["cpu"]["model_name"]
