"""bench/prefix_cache.py's arithmetic: medians over rounds and the headline
ratios against the issue's goals, on hand-made runs."""

from __future__ import annotations

from bench.prefix_cache_report import format_headline, headlines, medians, table


def run(config: str, workload: str, ttft: float, tok_s: float, hit: float | None) -> dict:
    return {
        "config": config,
        "workload": workload,
        "ttft_p50_s": ttft,
        "ttft_p99_s": 2 * ttft,
        "output_tok_s": tok_s,
        "hit_rate": hit,
        "hit_rate_role": "prefill",
        "kv_bytes": 1 << 20,
        "failed": 0,
        "requests": 8,
    }


def test_medians_and_headlines_against_the_goals():
    runs = [
        run("1p1d-cache", "prefix", 0.2, 30.0, 0.9),
        run("1p1d-cache", "prefix", 0.4, 32.0, 0.9),
        run("1p1d-cache", "prefix", 0.3, 31.0, 0.9),
        run("1p1d-nocache", "prefix", 1.8, 20.0, 0.0),
        run("1p1d-cache", "random", 1.0, 19.0, 0.0),
        run("1p1d-nocache", "random", 1.0, 20.0, None),
    ]
    med = medians(runs)
    assert med[("1p1d-cache", "prefix")]["ttft_p50_s"] == 0.3  # the median of three
    assert med[("1p1d-cache", "prefix")]["rounds"] == 3
    assert med[("1p1d-cache", "prefix")]["requests"] == 24
    heads = {h["what"]: h for h in headlines(med, "Test CPU")}
    ttft = heads["TTFT p50 no-cache / cache, 1P+1D, prefix"]
    assert ttft["ratio"] == 6.0 and ttft["met"] is True
    tok = heads["output tok/s cache / no-cache, 1P+1D, random"]
    assert tok["ratio"] == 0.95 and tok["met"] is False
    assert "NOT met" in format_headline(tok) and "[CPU: Test CPU]" in format_headline(tok)
    # Configurations that did not run give no headline.
    assert not any("colocated" in what for what in heads)
    rows = table(med, ["1p1d-cache"], ["prefix"], {"1p1d-cache": "1P+1D cache"}).splitlines()
    assert rows[2] == "| 1P+1D cache | prefix | 300 | 600 | 31.0 | 90.0% (prefill) | 1.0 | 0/24 |"
