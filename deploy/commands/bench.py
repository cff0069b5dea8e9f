"""`splitserve bench`: load any OpenAI-compatible endpoint (deploy/loadgen/)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    bn = sub.add_parser(
        "bench",
        help="load an OpenAI-compatible endpoint and report TTFT, TPOT, ITL, goodput",
        description="Send a workload to any OpenAI-compatible /v1/completions endpoint "
        "(splitserve's or another server's), streaming, and report what vLLM's `bench serve` "
        "reports. TTFT: send to the first token. TPOT: (E2E - TTFT) / (output tokens - 1), per "
        "request. ITL: the gaps between streamed chunks. E2E: send to the last token. Each as "
        "mean, p50, p90, p99; request and token throughput; goodput: requests per second "
        "meeting every --slo limit. Prompts are token ids (exact lengths on any server); EOS "
        "is ignored so output lengths are as asked.",
        epilog="example: splitserve bench --url http://127.0.0.1:8000 --dataset interference "
        "--num-prompts 200 --request-rate 1,2,4 --slo ttft=1,tpot=100ms --json out.json "
        "--plot-dir plots/",
    )
    bn.add_argument("--url", required=True, help="the server's base URL (http://host:port)")
    bn.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    bn.add_argument(
        "--api-key", default=os.environ.get("SPLITSERVE_API_KEY"), help="Bearer token, if needed"
    )
    bn.add_argument(
        "--dataset",
        choices=["random", "seed", "interference", "prefix", "multiturn"],
        default="random",
        help="random: --input-len/--output-len each; seed: ~128-token prompts, outputs from "
        "{32,...,512}; interference: short chat turns with --long-fraction of --long-len-token "
        "prompts; prefix: one of --prefix-count shared --prefix-len-token prefixes, then a "
        "distinct --suffix-len-token suffix; multiturn: --conversations of --turns turns, each "
        "resending the history (earlier turns and --output-len-token stand-ins for their "
        "answers) plus --turn-len new tokens, sent after the turn before it finished "
        "(default: %(default)s)",
    )
    bn.add_argument(
        "--num-prompts",
        type=int,
        help="requests per rate (default 100; not for multiturn, which sends --conversations x "
        "--turns)",
    )
    bn.add_argument("--input-len", type=int, default=128, help="random: prompt tokens")
    bn.add_argument(
        "--output-len",
        type=int,
        default=128,
        help="random, prefix, multiturn: output tokens per request (default 128)",
    )
    bn.add_argument(
        "--long-fraction", type=float, default=0.1, help="interference: share of long prompts"
    )
    bn.add_argument(
        "--long-len",
        type=int,
        default=1536,
        help="interference: long prompt tokens (default 1536: with its output, it fits the "
        "built-in model's 2048-token context)",
    )
    bn.add_argument(
        "--prefix-count", type=int, default=4, help="prefix: shared prefixes (default 4)"
    )
    bn.add_argument(
        "--prefix-len", type=int, default=1024, help="prefix: tokens per prefix (default 1024)"
    )
    bn.add_argument(
        "--suffix-len", type=int, default=64, help="prefix: tokens after the prefix (default 64)"
    )
    bn.add_argument(
        "--conversations", type=int, default=8, help="multiturn: conversations (default 8)"
    )
    bn.add_argument(
        "--turns", type=int, default=4, help="multiturn: turns per conversation (default 4)"
    )
    bn.add_argument(
        "--turn-len",
        type=int,
        default=64,
        help="multiturn: new tokens per turn, on top of the history (default 64)",
    )
    bn.add_argument(
        "--request-rate",
        default="inf",
        help="requests per second, or inf (all at once); a comma list runs each in turn "
        "(default: %(default)s)",
    )
    bn.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the gaps between arrivals: 1 = Poisson, lower = burstier",
    )
    bn.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    bn.add_argument(
        "--slo",
        help="limits for goodput, e.g. ttft=0.5,tpot=50ms (seconds unless ms; names: ttft, "
        "tpot, itl, e2e)",
    )
    bn.add_argument(
        "--price-per-hour",
        type=float,
        help="what the deployment costs per hour (USD), for tokens per dollar; against a "
        "splitserve router it is read from the cluster's metrics instead",
    )
    bn.add_argument("--seed", type=int, default=0, help="for the dataset and the arrivals")
    bn.add_argument("--json", help="write the summaries and per-request records here")
    bn.add_argument("--plot-dir", help="write PNG plots here (latency CDFs, goodput vs rate)")
    bn.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import math
    from pathlib import Path

    from deploy import loadgen

    slo = loadgen.parse_slo(args.slo)
    rates = loadgen.parse_rates(args.request_rate)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise loadgen.BenchError("--max-concurrency must be at least 1")
    if args.price_per_hour is not None and args.price_per_hour < 0:
        raise loadgen.BenchError("--price-per-hour must be >= 0")
    if args.dataset == "multiturn" and args.num_prompts is not None:
        raise loadgen.BenchError(
            "--num-prompts does not apply to multiturn: it sends --conversations x --turns"
        )
    specs = loadgen.make_dataset(
        args.dataset,
        100 if args.num_prompts is None else args.num_prompts,
        seed=args.seed,
        input_len=args.input_len,
        output_len=args.output_len,
        long_fraction=args.long_fraction,
        long_len=args.long_len,
        prefix_count=args.prefix_count,
        prefix_len=args.prefix_len,
        suffix_len=args.suffix_len,
        conversations=args.conversations,
        turns=args.turns,
        turn_len=args.turn_len,
    )
    runs: list[dict[str, Any]] = []
    for rate in rates:
        cost_before = asyncio.run(loadgen.cluster_cost(args.url))
        duration, results = asyncio.run(
            loadgen.run_load(
                args.url,
                specs,
                rate,
                burstiness=args.burstiness,
                seed=args.seed,
                model=args.model,
                api_key=args.api_key,
                max_concurrency=args.max_concurrency,
                progress=sys.stderr.isatty(),
            )
        )
        cost_after = asyncio.run(loadgen.cluster_cost(args.url))
        if args.price_per_hour is not None:
            cost: float | None = args.price_per_hour * duration / 3600
        elif cost_before is not None and cost_after is not None and cost_after > 0:
            cost = cost_after - cost_before  # what a splitserve cluster says it cost
        else:
            cost = None
        summary = loadgen.summarize(duration, results, slo, rate, cost)
        print(loadgen.format_summary(summary), flush=True)
        runs.append(
            {
                "summary": summary,
                "samples": loadgen.samples(results),
                "requests": [loadgen.record(r) for r in results],
            }
        )
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("api_key", "command", "run")}
        config["num_prompts"] = len(specs)  # what was sent, multiturn's count included
        # JSON has no infinity: "all at once" is written as the string "inf".
        out = [
            {
                **run,
                "summary": {**run["summary"], "request_rate": str(run["summary"]["request_rate"])},
            }
            if math.isinf(run["summary"]["request_rate"])
            else run
            for run in runs
        ]
        text = json.dumps({"config": config, "runs": out}, indent=1, allow_nan=False)
        Path(args.json).write_text(text)
        print(f"results: {args.json}")
    if args.plot_dir:
        for path in loadgen.plot(runs, Path(args.plot_dir)):
            print(f"plot: {path}")
    return 0 if all(r["summary"]["completed"] for r in runs) else 1
