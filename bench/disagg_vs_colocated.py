"""The side-by-side experiment: 1 prefill + 1 decode worker against 2
colocated workers, on the same machine and the same cores, under the
interference mix (mostly short chat turns, some long prompts), over a sweep
of request rates.

Each configuration is a real `splitserve serve` cluster; each worker gets
--threads torch threads, so both configurations use the same cores. The
load comes from `splitserve bench`'s generator (bench/loadgen.py): Poisson
arrivals at each rate, the same requests for both configurations. The TPOT
limit is twice the unloaded TPOT (one short request alone on the colocated
cluster); goodput counts requests within it (and within the TTFT limit, if
given). Reported per configuration and rate: TTFT p99, TPOT p99, goodput, and
SLO attainment; then the highest rate each sustains with >= 90% of requests
within the SLO (DistServe's per-resource goodput), interpolated between the
rates swept.

    python bench/disagg_vs_colocated.py                       # the default sweep
    python bench/disagg_vs_colocated.py --rates 1,2,4,6 --num-prompts 60 --out docs/disagg
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.serving import cluster  # a `splitserve serve` cluster, ready when it yields
from engine.builtin_model import ensure_default_model

# The colocated baseline first: the unloaded TPOT (hence the SLO) is measured on it.
CONFIGS = {
    "2 colocated": ["--colocated", "2"],
    "1P+1D": ["--prefill", "1", "--decode", "1"],
}


def unloaded_tpot(url: str) -> float:
    """TPOT of one short chat-sized request alone (median of 5)."""
    spec = loadgen.make_dataset("random", 1, seed=99, input_len=128, output_len=64)
    tpots = []
    for _ in range(5):
        _, results = asyncio.run(loadgen.run_load(url, spec, math.inf, progress=False))
        tpot = results[0].tpot
        if tpot is None:
            raise RuntimeError(f"the unloaded request failed: {results[0].error}")
        tpots.append(tpot)
    return sorted(tpots)[2]


def max_sustained_rate(points: list[tuple[float, float]], target: float = 0.9) -> float:
    """The highest rate with attainment >= target, interpolated linearly
    between the swept rates; 0 if even the lowest misses it."""
    best = 0.0
    points = sorted(points)
    for i, (rate, attain) in enumerate(points):
        if attain >= target:
            best = rate
            continue
        if i > 0 and points[i - 1][1] >= target:
            r0, a0 = points[i - 1]
            best = r0 + (rate - r0) * (a0 - target) / (a0 - attain)
        break
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the built-in model)")
    p.add_argument("--rates", default="1,2,3,4,6", help="request rates to sweep (req/s)")
    p.add_argument("--num-prompts", type=int, default=60, help="requests per rate")
    p.add_argument("--long-fraction", type=float, default=0.1)
    p.add_argument("--long-len", type=int, default=1536, help="long prompt tokens")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--ttft-slo", type=float, help="also require TTFT under this (seconds)")
    p.add_argument("--out", default="docs/disagg_vs_colocated", help="results and plots here")
    args = p.parse_args(argv)
    rates = loadgen.parse_rates(args.rates)
    model = args.model or str(ensure_default_model())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = loadgen.make_dataset(
        "interference",
        args.num_prompts,
        seed=0,
        long_fraction=args.long_fraction,
        long_len=args.long_len,
    )

    results: dict[str, Any] = {"rates": rates, "configs": {}}
    slo: dict[str, float] = {}
    for name, serve_args in CONFIGS.items():
        print(f"== {name}", flush=True)
        log = Path(tempfile.gettempdir()) / f"splitserve-{name.replace(' ', '_')}.log"
        with cluster(model, [*serve_args, "--threads", str(args.threads)], log, 512) as url:
            if not slo:  # measured once, on the colocated baseline
                base = unloaded_tpot(url)
                slo = {"tpot": 2 * base}
                if args.ttft_slo:
                    slo["ttft"] = args.ttft_slo
                results["unloaded_tpot_s"] = base
                results["slo"] = slo
                print(f"   unloaded TPOT {base * 1e3:.1f} ms -> SLO TPOT {2 * base * 1e3:.1f} ms")
            runs = []
            for rate in rates:
                duration, res = asyncio.run(
                    loadgen.run_load(url, specs, rate, seed=1, progress=sys.stderr.isatty())
                )
                s = loadgen.summarize(duration, res, slo, rate)
                s["attainment"] = s["good_requests"] / len(res)
                runs.append(s)
                print(
                    f"   {rate:g} req/s: goodput {s['goodput']:.2f} req/s, "
                    f"attainment {s['attainment']:.0%}, "
                    f"TTFT p99 {(s['ttft_s']['p99'] or 0) * 1e3:.0f} ms, "
                    f"TPOT p99 {(s['tpot_s']['p99'] or 0) * 1e3:.1f} ms, failed {s['failed']}",
                    flush=True,
                )
            results["configs"][name] = {
                "runs": runs,
                "max_rate_90": max_sustained_rate(
                    [(r["request_rate"], r["attainment"]) for r in runs]
                ),
            }
    results["slo_measured_on"] = next(iter(CONFIGS))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _plot(results, out)
    print()
    print(_table(results))
    return 0


def _table(results: dict[str, Any]) -> str:
    lines = [
        "| configuration | rate (req/s) | goodput (req/s) | SLO attainment | TTFT p99 | TPOT p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in results["configs"].items():
        for r in c["runs"]:
            ttft = (r["ttft_s"]["p99"] or 0) * 1e3
            tpot = (r["tpot_s"]["p99"] or 0) * 1e3
            lines.append(
                f"| {name} | {r['request_rate']:g} | {r['goodput']:.2f} | {r['attainment']:.0%} "
                f"| {ttft:.0f} ms | {tpot:.1f} ms |"
            )
    lines.append("")
    for name, c in results["configs"].items():
        lines.append(f"{name}: highest rate with >= 90% within SLO: {c['max_rate_90']:.2f} req/s")
    return "\n".join(lines)


def _plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, c in results["configs"].items():
        rates = [r["request_rate"] for r in c["runs"]]
        axes[0].plot(rates, [r["goodput"] for r in c["runs"]], marker="o", label=name)
        axes[1].plot(
            rates, [(r["ttft_s"]["p99"] or 0) * 1e3 for r in c["runs"]], marker="o", label=name
        )
        axes[2].plot(
            rates, [(r["tpot_s"]["p99"] or 0) * 1e3 for r in c["runs"]], marker="o", label=name
        )
    axes[2].axhline(results["slo"]["tpot"] * 1e3, color="red", linestyle="--", label="TPOT SLO")
    for ax, label in zip(axes, ("goodput (req/s)", "TTFT p99 (ms)", "TPOT p99 (ms)"), strict=True):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
