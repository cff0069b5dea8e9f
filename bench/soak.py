"""The soak: a 1 prefill + 2 decode cluster under a seeded load at about its
saturation rate for --minutes, while a random worker is killed (SIGKILL) or
frozen (SIGSTOP for 3-10 s, then SIGCONT) every 30-60 s, in turn.

Each request ends in exactly one of four ways, judged at the client:
  completed  finish_reason "length" with completion_tokens == max_tokens (EOS
             is ignored, so anything else is a token missing or repeated),
             and a well-formed answer: for a stream, text chunks, one final
             chunk, the usage chunk, then [DONE], nothing unparsable and
             nothing after [DONE]; otherwise a JSON body with the same;
  failed     a clear error: HTTP 4xx/5xx with a JSON error body, or an SSE
             error event followed by [DONE] (503 while every decode worker
             is down or full is one);
  lost       no complete answer: a stream that ends or breaks without a final
             chunk or without [DONE] and with no error event, a 200 without
             JSON, a connection error, or no end within --request-timeout
             (a hang: what the soak hunts);
  malformed  an answer, but a wrong one: a token count off, a 4xx/5xx without
             a JSON error body, an error event without [DONE], data after
             [DONE].
Exit code 1 when a request was lost or malformed, when a live worker is not
idle after the load and a quiet period (KV blocks not all free, or anything
reserved for remote KV, held, running or waiting: a leak), or when a worker
never came back; 2 for bad options or a cluster that did not start.

Also reported: requests migrated to another decode worker mid-stream
(`splitserve_timings.migrations`) and retried on another one before their
first token (`attempts` beyond migrations + 1); prompts recomputed on a
decode worker, scraped from every decode worker's /metrics every 2 s
(`splitserve_kv_failures{outcome="recomputed"}`: the prefill failed after
the first token; and `splitserve_decode_local_prefills`, which counts those
too, plus prompts no prefill worker took at all); worker restarts (/cluster
`restarts_total`); p50 and p99 TTFT and E2E of completed requests. A
restarted worker's counters start again at 0, so the last value read from
each worker process is kept: what a killed worker counted in its last 2 s
is missed.

The load reuses `splitserve bench`'s generator (deploy/loadgen/): its
datasets and Poisson arrivals. The cluster is bench/serving.py's `splitserve
serve` child process. Kills and freezes go only to the workers of that
cluster (checked: a descendant of this process, running a worker module).

    python bench/soak.py                                  # 10 minutes, the default model
    python bench/soak.py --minutes 1 --chaos-interval 10,20 --json soak.json
    python bench/soak.py --model DIR --rate auto          # measure the saturation rate first
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.cpu_info import CpuInfo
from bench.serving import cluster  # a `splitserve serve` cluster, ready when it yields
from bench.soak_chaos import plan_chaos
from bench.soak_config import DEFAULT_RATE, SoakConfig, SoakError
from bench.soak_load import soak
from bench.soak_report import format_report, log_errors, worker_logs
from bench.soak_verdicts import Outcome, StreamJudge, group_reason, judge_body
from bench.soak_watch import WORKER_COUNTERS, parse_counters
from deploy import loadgen

# What callers (and tests) use of the soak, wherever in bench/soak_*.py it lives.
__all__ = [
    "WORKER_COUNTERS",
    "Outcome",
    "SoakConfig",
    "SoakError",
    "StreamJudge",
    "format_report",
    "group_reason",
    "judge_body",
    "main",
    "parse_counters",
    "plan_chaos",
    "run",
]


def run(config: SoakConfig) -> dict[str, Any]:
    """Start the cluster, soak it, stop it; the report."""
    model = config.model
    if model is None:
        from modelmaker import ensure_default_model

        model = str(ensure_default_model())
    log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="splitserve-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    serve_log = log_dir / "serve.log"
    args = ["--prefill", "1", "--decode", "2", "--threads", str(config.threads)]
    args += list(config.serve_args)
    with cluster(model, args, serve_log, config.kv_cache_mib) as url:
        report = asyncio.run(soak(url, config))
    workers = worker_logs(serve_log)
    report["logs"] = {"dir": str(log_dir), "serve": str(serve_log), "workers": workers}
    report["worker_log_errors"] = log_errors(workers)
    report["cpu"] = CpuInfo.read().model_name
    return report


# -- command line ---------------------------------------------------------------


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX seconds, got {text!r}") from None
    return lo, hi


def _rate(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of requests/s or auto, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/soak.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = SoakConfig()
    add = p.add_argument
    add("--model", help="model directory (default: the built-in default model)")
    add("--minutes", type=float, default=d.minutes, help="load time (default 10)")
    add(
        "--rate",
        type=_rate,
        default=d.rate,
        help=f"requests per second, Poisson; 'auto' measures the cluster's saturation first "
        f"(default {DEFAULT_RATE:g}: about saturation for the default model on a 2-core AMD "
        "EPYC, where --rate auto measured 0.28; measure again on another machine or model)",
    )
    add("--seed", type=int, default=d.seed, help="of the requests, their arrivals and the chaos")
    add(
        "--chaos-interval",
        type=_pair,
        default=d.chaos_interval_s,
        metavar="MIN,MAX",
        help="seconds between chaos steps, uniform; kills and freezes in turn (default 30,60)",
    )
    add(
        "--freeze",
        type=_pair,
        default=d.freeze_s,
        metavar="MIN,MAX",
        help="seconds a frozen worker stays stopped, uniform (default 3,10)",
    )
    # multiturn chains requests (each turn after the last); a soak's load is open-loop.
    open_loop = [name for name in loadgen.DATASETS if name != "multiturn"]
    add("--dataset", choices=open_loop, default=d.dataset, help="(default seed)")
    add("--input-len", type=int, default=d.input_len, help="dataset random: prompt tokens")
    add("--output-len", type=int, default=d.output_len, help="dataset random: output tokens")
    add(
        "--stream-fraction",
        type=float,
        default=d.stream_fraction,
        help="share of streaming requests; the rest wait for a JSON body (default 0.8)",
    )
    add(
        "--request-timeout",
        type=float,
        default=d.request_timeout_s,
        help="seconds; a request with no complete answer by then is lost: a hang (default 300, "
        "some 5x the default model's E2E p99 at saturation here)",
    )
    add(
        "--settle-timeout",
        type=float,
        default=d.settle_timeout_s,
        help="seconds after the load for every worker to be back and idle (default 90, "
        "beyond the prefill KV lease)",
    )
    add("--kv-cache-mib", type=int, default=d.kv_cache_mib, help="KV per worker (default 128)")
    add("--threads", type=int, default=d.threads, help="torch threads per worker (default 1)")
    add("--serve-args", default="", help="more `splitserve serve` flags, as one string")
    add("--log-dir", type=Path, help="where the cluster's logs go (default: a new temp dir)")
    add("--json", type=Path, help="also write the report here, as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        model=args.model,
        minutes=args.minutes,
        rate=args.rate,
        seed=args.seed,
        chaos_interval_s=args.chaos_interval,
        freeze_s=args.freeze,
        dataset=args.dataset,
        input_len=args.input_len,
        output_len=args.output_len,
        stream_fraction=args.stream_fraction,
        request_timeout_s=args.request_timeout,
        settle_timeout_s=args.settle_timeout,
        kv_cache_mib=args.kv_cache_mib,
        threads=args.threads,
        serve_args=tuple(shlex.split(args.serve_args)),
        log_dir=args.log_dir,
        progress=sys.stderr.isatty(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = config_from_args(args)
        report = run(config)
    except (SoakError, loadgen.BenchError, RuntimeError) as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
