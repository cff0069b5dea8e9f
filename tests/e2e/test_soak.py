"""The soak (bench/soak.py) against a real 1 prefill + 2 decode cluster,
with a worker killed and one frozen: it must lose nothing and leak nothing."""

from __future__ import annotations

import json

from bench import soak
from bench.soak import SoakConfig, plan_chaos

# -- a 30-second soak --------------------------------------------------------------

# About saturation for the tiny model's 1P+2D cluster on the 2-core test
# machine (--rate auto measured ~5 req/s with 32 in flight).
RATE = 5.0


def test_chaos_loses_nothing_and_leaks_nothing(tiny_llama, tmp_path):
    config = SoakConfig(
        model=str(tiny_llama),
        minutes=0.5,
        rate=RATE,
        seed=1,
        # Steps at 7-10 s intervals, kills and freezes in turn: the first two
        # (by 20 s at the latest) are one kill and one freeze.
        chaos_interval_s=(7.0, 10.0),
        # Small pools, so the load also reaches KV pressure (preemption,
        # backpressure) while workers die.
        kv_cache_mib=2,
        # Generous (a request takes seconds here); past it a request is lost.
        request_timeout_s=60.0,
        settle_timeout_s=45.0,
        log_dir=tmp_path / "logs",
        serve_args=("--dtype", "float32"),
    )
    steps = plan_chaos(config.seed, config.duration_s, config.chaos_interval_s, config.freeze_s)
    assert {s.action for s in steps[:2]} == {"kill", "freeze"}

    report = soak.run(config)
    (tmp_path / "soak.json").write_text(json.dumps(report, indent=2))
    summary = soak.format_report(report)
    print(summary)

    assert report["kills"] >= 1 and report["freezes"] >= 1, summary
    assert report["restarts_total"] >= report["kills"], summary
    assert report["sent"] > 0 and report["completed"] > 0, summary
    assert report["lost"] == 0, (summary, report["lost_requests"], report["logs"])
    assert report["malformed"] == 0, (summary, report["malformed_requests"])
    assert report["completed"] + report["failed"] == report["sent"], summary
    assert report["leaked"] == [] and report["not_back"] == [], (summary, report["logs"])
    assert report["ok"], summary
