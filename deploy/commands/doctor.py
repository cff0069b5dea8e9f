"""`splitserve doctor`: what is wrong with a running cluster (deploy/doctor.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    doc = sub.add_parser(
        "doctor",
        help="diagnose a running cluster: batch vs KV room, prefill and decode p95, queues, $",
        description="Read a splitserve router's /cluster and /metrics and every worker's "
        "/metrics twice, --interval apart (or every --interval for --watch seconds, keeping "
        "the busiest window: the peak), and report per pool the running batch (mean over "
        "the window) against what the KV cache could hold, queue depth and queued prompt "
        "tokens, KV pressure, CPU cores busy, prefill and decode p95 side by side, tokens "
        "per dollar, and a diagnosis with a concrete suggestion. Run it while the cluster "
        "is under load.",
    )
    doc.add_argument("--url", required=True, help="the router's base URL (http://host:port)")
    doc.add_argument(
        "--interval", type=float, default=5.0, help="seconds between readings (default 5)"
    )
    doc.add_argument(
        "--watch",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep reading for this long and report on the window with the most output "
        "tokens per second (default: one window)",
    )
    doc.add_argument(
        "--slo",
        metavar="ttft=S,tpot=S",
        help="the latencies promised to users (seconds, or ms): the diagnosis says what to "
        "add when p95 is over them (e.g. tpot=50ms)",
    )
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.set_defaults(run=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from deploy.doctor import examine, format_report
    from deploy.loadgen import parse_slo

    slo = parse_slo(args.slo)
    report = examine(
        args.url, args.interval, watch_s=args.watch, progress=sys.stderr.isatty(), slo=slo
    )
    if args.json:
        report["pools"] = [dataclasses.asdict(p) for p in report["pools"]]
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return 0
