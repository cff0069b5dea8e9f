"""What the side-by-side experiment's results say (bench/disagg_vs_colocated.py): the form
results.json keeps each request in, which requests are good at an SLO, the highest rate each
configuration sustains, and the tables and plots. Apart from the driver, so that --reanalyze
redoes them from a saved run with no cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy import loadgen

TARGET_ATTAINMENT = 0.9
HEADLINE_SCALE = 2.0  # the SLO: twice the unloaded TPOT


REQUEST_FIELDS = ("prompt_tokens", "output_tokens", "ok", "ttft", "tpot", "max_itl")


def record(r: loadgen.RequestResult) -> dict[str, Any]:
    """One request's figures (seconds to 0.1 ms)."""

    def s(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return {
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
        "ok": r.ok,
        "ttft": s(r.ttft),
        "tpot": s(r.tpot),
        "max_itl": s(max(r.itls, default=None)),
    }


def pack(results: dict[str, Any]) -> dict[str, Any]:
    """results.json's form: each request as a row of REQUEST_FIELDS (a
    third of the size of a dict per request)."""
    out = {**results, "request_fields": list(REQUEST_FIELDS), "configs": {}}
    for cid, c in results["configs"].items():
        runs = [
            {**run, "requests": [[rec[f] for f in REQUEST_FIELDS] for rec in run["requests"]]}
            for run in c["runs"]
        ]
        out["configs"][cid] = {**c, "runs": runs}
    return out


def unpack(results: dict[str, Any]) -> dict[str, Any]:
    fields = results.pop("request_fields", None)
    if fields:
        for c in results["configs"].values():
            for run in c["runs"]:
                run["requests"] = [dict(zip(fields, row, strict=True)) for row in run["requests"]]
    return results


def is_good(
    rec: dict[str, Any],
    tpot_limit: float,
    ttft_limit: float | None = None,
    gap_limit: float | None = None,
) -> bool:
    """Within every limit; the same rule as loadgen.meets (a request with one
    output token has no TPOT or gap, and cannot break those limits)."""
    if not rec["ok"]:
        return False
    if rec["tpot"] is not None and rec["tpot"] > tpot_limit:
        return False
    if gap_limit is not None and rec["max_itl"] is not None and rec["max_itl"] > gap_limit:
        return False
    return ttft_limit is None or rec["ttft"] <= ttft_limit


def fixed_limits(results: dict[str, Any]) -> tuple[float | None, float | None]:
    return results.get("ttft_slo_s"), results.get("gap_slo_s")


def max_sustained_rate(
    points: list[tuple[float, float]], target: float = TARGET_ATTAINMENT
) -> float:
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


def analyze(results: dict[str, Any]) -> dict[str, Any]:
    """Attainment per rate and the sustained rate per SLO scale, for every
    configuration; and the disaggregated/colocated ratio per scale."""
    base = results["unloaded_tpot_s"]
    ttft_limit, gap_limit = fixed_limits(results)
    out: dict[str, Any] = {}
    for cid, c in results["configs"].items():
        per_scale = {}
        for scale in results["slo_scales"]:
            points = []
            for run in c["runs"]:
                recs = run["requests"]
                good = sum(is_good(r, scale * base, ttft_limit, gap_limit) for r in recs)
                points.append((run["request_rate"], good / len(recs)))
            per_scale[str(scale)] = {
                "attainment": points,
                "max_rate_90": max_sustained_rate(points),
            }
        out[cid] = per_scale
    ratios = {}
    if "disagg" in out and "colocated" in out:
        for scale in results["slo_scales"]:
            col = out["colocated"][str(scale)]["max_rate_90"]
            dis = out["disagg"][str(scale)]["max_rate_90"]
            ratios[str(scale)] = dis / col if col > 0 else None
    return {"per_config": out, "disagg_over_colocated": ratios}


def run_figures(run: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """One run's figures at the headline SLO."""
    limit = HEADLINE_SCALE * results["unloaded_tpot_s"]
    recs = run["requests"]
    ok = [r for r in recs if r["ok"]]
    good = sum(is_good(r, limit, *fixed_limits(results)) for r in recs)
    ttft = loadgen.latency_stats([r["ttft"] for r in ok])
    tpot = loadgen.latency_stats([r["tpot"] for r in ok if r["tpot"] is not None])
    worst_gap = loadgen.latency_stats([r["max_itl"] for r in ok if r["max_itl"] is not None])
    return {
        "goodput": good / run["duration_s"],
        "attainment": good / len(recs),
        "ttft_p99": ttft["p99"],
        "tpot_p50": tpot["p50"],
        "tpot_p99": tpot["p99"],
        "itl_max_p99": worst_gap["p99"],
        "failed": len(recs) - len(ok),
    }


def table(results: dict[str, Any], analysis: dict[str, Any]) -> str:
    base = results["unloaded_tpot_s"]
    limit = HEADLINE_SCALE * base
    lines = [
        f"TPOT SLO {limit * 1e3:.1f} ms ({HEADLINE_SCALE:g}x the unloaded {base * 1e3:.1f} ms)"
        + (f", TTFT SLO {results['ttft_slo_s']:g} s" if results.get("ttft_slo_s") else "")
        + (f", every gap under {results['gap_slo_s']:g} s" if results.get("gap_slo_s") else ""),
        "",
        "| configuration | rate (req/s) | goodput (req/s) | within SLO | TTFT p99 | TPOT p50 | "
        "TPOT p99 | worst gap p99 | cores busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in results["configs"].values():
        for run in c["runs"]:
            f = run_figures(run, results)
            cores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(run["cores_busy"].items()))
            lines.append(
                f"| {c['name']} | {run['request_rate']:g} | {f['goodput']:.2f} | "
                f"{f['attainment']:.0%} | {(f['ttft_p99'] or 0) * 1e3:.0f} ms | "
                f"{(f['tpot_p50'] or 0) * 1e3:.1f} ms | {(f['tpot_p99'] or 0) * 1e3:.1f} ms | "
                f"{(f['itl_max_p99'] or 0) * 1e3:.0f} ms | {cores} |"
            )
    scales = results["slo_scales"]
    lines += [
        "",
        "Highest rate with >= 90% of requests within the SLO (req/s), per TPOT SLO scale:",
        "",
        "| configuration | "
        + " | ".join(f"{s:g}x ({s * base * 1e3:.0f} ms)" for s in scales)
        + " |",
        "| --- |" + " ---: |" * len(scales),
    ]
    for cid, c in results["configs"].items():
        per = analysis["per_config"][cid]
        lines.append(
            f"| {c['name']} | "
            + " | ".join(f"{per[str(s)]['max_rate_90']:.2f}" for s in scales)
            + " |"
        )
    ratios = analysis["disagg_over_colocated"]
    if ratios:
        lines.append(
            "| 1P+1D / 2 colocated | "
            + " | ".join(f"{r:.2f}x" if r is not None else "-" for r in ratios.values())
            + " |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], analysis: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["unloaded_tpot_s"]
    limit = HEADLINE_SCALE * base
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for c in results["configs"].values():
        rates = [r["request_rate"] for r in c["runs"]]
        figs = [run_figures(r, results) for r in c["runs"]]
        axes[0].plot(rates, [f["attainment"] * 100 for f in figs], marker="o", label=c["name"])
        axes[1].plot(rates, [f["goodput"] for f in figs], marker="o", label=c["name"])
        axes[2].plot(rates, [(f["ttft_p99"] or 0) * 1e3 for f in figs], marker="o", label=c["name"])
        axes[3].plot(rates, [(f["tpot_p99"] or 0) * 1e3 for f in figs], marker="o", label=c["name"])
    axes[0].axhline(TARGET_ATTAINMENT * 100, color="gray", linestyle=":", label="90%")
    axes[3].axhline(limit * 1e3, color="red", linestyle="--", label="TPOT SLO")
    labels = (
        f"within SLO (%), TPOT <= {limit * 1e3:.0f} ms",
        "goodput (req/s)",
        "TTFT p99 (ms)",
        "TPOT p99 (ms)",
    )
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    scales = results["slo_scales"]
    for cid, c in results["configs"].items():
        per = analysis["per_config"][cid]
        ax.plot(scales, [per[str(s)]["max_rate_90"] for s in scales], marker="o", label=c["name"])
    ax.set_xlabel("TPOT SLO, as a multiple of the unloaded TPOT")
    ax.set_ylabel("highest rate with >= 90% within SLO (req/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "slo_scale.png", dpi=100)
    plt.close(fig)
