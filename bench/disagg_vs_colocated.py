"""The side-by-side experiment: 1 prefill + 1 decode worker against 2
colocated workers, on the same machine and the same cores, under the
interference mix (mostly short chat turns, some long prompts), over a sweep
of request rates.

Each configuration is a real `splitserve serve` cluster, and all of them run
at once, idle but for the one under load: every (repeat, rate) is sent to
each configuration in turn, so drift in a shared machine's speed lands on
all of them alike. Each worker gets --threads torch threads, so every
configuration uses the same cores. The load comes from `splitserve bench`'s
generator (deploy/loadgen/): Poisson arrivals at each rate, the same
requests for every configuration.

The TPOT limit is a multiple (--slo-scales; the headline is 2) of the
unloaded TPOT, measured as one short request alone on the colocated
cluster; a request is good when it meets it (and --ttft-slo, and
--gap-slo on its longest gap between tokens, if given).
Reported per configuration and rate: TTFT and TPOT p99, goodput, SLO
attainment, and how busy each pool's cores were; then, per SLO scale, the
highest rate each configuration sustains with >= 90% of requests good
(DistServe's per-resource goodput), interpolated between the rates swept.
Every request's figures are kept in results.json, so other SLOs can be
judged later without rerunning (--reanalyze).

    python bench/disagg_vs_colocated.py                  # the README's sweep, ~20 minutes
    python bench/disagg_vs_colocated.py --long-fraction 0.3 --out docs/disagg_vs_colocated/heavy
    python bench/disagg_vs_colocated.py --configs colocated,disagg --rates 2,4,8 --repeats 1
    python bench/disagg_vs_colocated.py --reanalyze docs/disagg_vs_colocated/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.disagg_results import (
    HEADLINE_SCALE,
    analyze,
    is_good,
    max_sustained_rate,
    pack,
    plot,
    record,
    table,
    unpack,
)
from bench.serving import cluster  # a `splitserve serve` cluster, ready when it yields
from deploy import loadgen
from deploy.cluster_metrics import snapshot, window_cores_busy
from modelmaker import ensure_default_model

# The experiment's arithmetic lives in bench/disagg_results.py; these names stay importable
# from here, where the experiment is.
__all__ = ["analyze", "is_good", "main", "max_sustained_rate", "pack", "unpack"]


def configurations(chunk_tokens: int) -> dict[str, tuple[str, list[str]]]:
    """id -> (name in tables, `splitserve serve` arguments)."""
    return {
        "colocated": ("2 colocated", ["--colocated", "2"]),
        "disagg": ("1P+1D", ["--prefill", "1", "--decode", "1"]),
        # Sarathi-style: the colocated engine's other answer to interference,
        # a small per-step token budget, so a long prompt is cut into chunks
        # that ride along with the decodes instead of stalling them.
        "colocated-chunked": (
            f"2 colocated, {chunk_tokens}-token steps",
            ["--colocated", "2", "--max-num-batched-tokens", str(chunk_tokens)],
        ),
    }


def unloaded_tpot(url: str, trials: int = 9) -> float:
    """TPOT of one chat-sized request alone (the median of `trials`: a
    shared machine's speed wanders, and the SLO rests on this figure)."""
    spec = loadgen.make_dataset("random", 1, seed=99, input_len=128, output_len=128)
    tpots = []
    for _ in range(trials):
        _, results = asyncio.run(loadgen.run_load(url, spec, math.inf, progress=False))
        tpot = results[0].tpot
        if tpot is None:
            raise RuntimeError(f"the unloaded request failed: {results[0].error}")
        tpots.append(tpot)
    return sorted(tpots)[trials // 2]


def _cores_busy(client: httpx.Client, url: str, before: Any) -> dict[str, float]:
    after = snapshot(client, url)
    roles = sorted({w["role"] for w in after.workers})
    busy = {role: window_cores_busy(before, after, role) for role in roles}
    return {role: round(v, 3) for role, v in busy.items() if v is not None}


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or str(ensure_default_model())
    chosen = configurations(args.chunk_tokens)
    ids = [c.strip() for c in args.configs.split(",")]
    for cid in ids:
        if cid not in chosen:
            raise SystemExit(f"unknown configuration {cid!r}; choose from {', '.join(chosen)}")
    rates = loadgen.parse_rates(args.rates)
    specs = loadgen.make_dataset(
        "interference",
        args.num_prompts,
        seed=args.seed,
        long_fraction=args.long_fraction,
        long_len=args.long_len,
    )
    results: dict[str, Any] = {
        "mix": {
            "dataset": "interference",
            "num_prompts": args.num_prompts,
            "long_fraction": args.long_fraction,
            "long_len": args.long_len,
            "seed": args.seed,
        },
        "rates": rates,
        "repeats": args.repeats,
        "threads_per_worker": args.threads,
        "slo_scales": [float(s) for s in args.slo_scales.split(",")],
        "ttft_slo_s": args.ttft_slo,
        "gap_slo_s": args.gap_slo,
        "configs": {
            cid: {"name": chosen[cid][0], "serve_args": chosen[cid][1], "runs": []} for cid in ids
        },
    }
    with contextlib.ExitStack() as stack, httpx.Client(timeout=10) as client:
        urls = {}
        for cid in ids:
            log = Path(tempfile.gettempdir()) / f"splitserve-bench-{cid}.log"
            serve_args = [*chosen[cid][1], "--threads", str(args.threads)]
            urls[cid] = stack.enter_context(cluster(model, serve_args, log, 512))
            print(f"== {chosen[cid][0]}: {urls[cid]} (log {log})", flush=True)
        # Each configuration's, for the record; the SLO rests on the colocated one.
        unloaded = {cid: unloaded_tpot(url) for cid, url in urls.items()}
        base = unloaded["colocated" if "colocated" in unloaded else ids[0]]
        results["unloaded_tpot_s"] = base
        results["unloaded_tpot_by_config_s"] = unloaded
        print(
            "   unloaded TPOT: "
            + ", ".join(f"{chosen[c][0]} {t * 1e3:.1f} ms" for c, t in unloaded.items())
        )
        print(
            f"   unloaded TPOT {base * 1e3:.1f} ms -> "
            f"headline SLO {HEADLINE_SCALE * base * 1e3:.1f} ms"
        )
        runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
        busy: dict[tuple[str, float], list[dict[str, float]]] = {}
        durations: dict[tuple[str, float], float] = {}
        for rep in range(args.repeats):
            for rate in rates:
                for cid in ids:
                    before = snapshot(client, urls[cid])
                    duration, res = asyncio.run(
                        loadgen.run_load(
                            urls[cid],
                            specs,
                            rate,
                            seed=1000 * args.seed + 1 + rep,
                            progress=sys.stderr.isatty(),
                        )
                    )
                    busy.setdefault((cid, rate), []).append(_cores_busy(client, urls[cid], before))
                    runs.setdefault((cid, rate), []).extend(record(r) for r in res)
                    durations[(cid, rate)] = durations.get((cid, rate), 0.0) + duration
                    s = loadgen.summarize(duration, res, {"tpot": HEADLINE_SCALE * base}, rate)
                    print(
                        f"   [{rep + 1}/{args.repeats}] {chosen[cid][0]} @ {rate:g} req/s: "
                        f"within SLO {s['good_requests'] / len(res):.0%}, "
                        f"TTFT p99 {(s['ttft_s']['p99'] or 0) * 1e3:.0f} ms, "
                        f"TPOT p99 {(s['tpot_s']['p99'] or 0) * 1e3:.1f} ms, "
                        f"cores busy {busy[(cid, rate)][-1]}, failed {s['failed']}",
                        flush=True,
                    )
    for cid in ids:
        for rate in rates:
            recs = runs[(cid, rate)]
            results["configs"][cid]["runs"].append(
                {
                    "request_rate": rate,
                    "duration_s": durations[(cid, rate)],
                    "requests": recs,
                    "cores_busy": {
                        role: sum(b.get(role, 0.0) for b in busy[(cid, rate)]) / args.repeats
                        for role in busy[(cid, rate)][0]
                    },
                }
            )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="model directory (default: the built-in model)")
    p.add_argument(
        "--configs",
        default="colocated,disagg,colocated-chunked",
        help="which, in order: colocated (2 colocated workers), disagg (1 prefill + 1 decode), "
        "colocated-chunked (2 colocated, --chunk-tokens per step)",
    )
    p.add_argument("--chunk-tokens", type=int, default=256, help="colocated-chunked's step budget")
    p.add_argument("--rates", default="3,4,5,6,7,8,9", help="request rates to sweep (req/s)")
    p.add_argument("--num-prompts", type=int, default=120, help="requests per rate and repeat")
    p.add_argument("--repeats", type=int, default=2, help="sweeps, interleaved")
    p.add_argument("--long-fraction", type=float, default=0.1, help="share of long prompts")
    p.add_argument("--long-len", type=int, default=1536, help="long prompt tokens")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0, help="of the requests and their arrivals")
    p.add_argument("--slo-scales", default="1.25,1.5,2,3,4", help="TPOT SLOs, x unloaded TPOT")
    p.add_argument("--ttft-slo", type=float, help="also require TTFT under this (seconds)")
    p.add_argument("--gap-slo", type=float,
                   help="also require every gap between tokens under this (seconds)")  # fmt: skip
    p.add_argument("--out", default="docs/disagg_vs_colocated", help="results and plots here")
    p.add_argument("--reanalyze", metavar="RESULTS_JSON",
                   help="no load: redo the tables and plots of a saved run (with these "
                   "--slo-scales, --ttft-slo and --gap-slo) into --out")  # fmt: skip
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.reanalyze:
        try:
            results = unpack(json.loads(Path(args.reanalyze).read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"cannot read {args.reanalyze}: {type(e).__name__}: {e}") from None
        results["slo_scales"] = [float(s) for s in args.slo_scales.split(",")]
        results["ttft_slo_s"] = args.ttft_slo
        results["gap_slo_s"] = args.gap_slo
    else:
        results = run_experiment(args)
    analysis = analyze(results)
    results["analysis"] = analysis
    (out / "results.json").write_text(json.dumps(pack(results), separators=(",", ":")))
    plot(results, analysis, out)
    report = table(results, analysis)
    (out / "table.md").write_text(report + "\n")
    print()
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
