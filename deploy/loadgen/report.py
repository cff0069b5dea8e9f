"""A run's figures from its requests' timings (vLLM `bench serve`
definitions): mean, p50, p90, p99 of TTFT, TPOT, ITL and E2E; requests/s and
tokens/s over the run; goodput, the requests per second that met every
limit of --slo.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from deploy.loadgen.client import RequestResult

PERCENTILES = (50, 90, 99)


def latency_stats(xs: list[float]) -> dict[str, float | None]:
    """Mean and PERCENTILES (linear interpolation between samples); None when empty."""
    if not xs:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    xs = sorted(xs)
    out: dict[str, float | None] = {"mean": statistics.fmean(xs)}
    for q in PERCENTILES:
        k = (len(xs) - 1) * q / 100
        lo, hi = math.floor(k), math.ceil(k)
        out[f"p{q}"] = xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
    return out


def meets(r: RequestResult, slo: dict[str, float]) -> bool:
    """Did this request meet every limit (ITL: every gap)?"""
    if not r.ok:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
    for key, limit in slo.items():
        if key == "itl":
            if any(gap > limit for gap in r.itls):
                return False
            continue
        value = values[key]
        if value is not None and value > limit:
            return False
    return True


def summarize(
    duration: float,
    results: Sequence[RequestResult],
    slo: dict[str, float],
    rate: float,
    cost_dollars: float | None = None,
) -> dict[str, Any]:
    """The run's figures (vLLM `bench serve` definitions)."""
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    good = sum(meets(r, slo) for r in ok)
    summary: dict[str, Any] = {
        "request_rate": rate,
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "prompt_tokens": prompt,
        "output_tokens": output,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output / duration if duration > 0 else 0.0,
        "total_token_throughput": (prompt + output) / duration if duration > 0 else 0.0,
        "slo": slo,
        "good_requests": good,
        "goodput": good / duration if duration > 0 else 0.0,
        "ttft_s": latency_stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": latency_stats([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": latency_stats([gap for r in ok for gap in r.itls]),
        "e2e_s": latency_stats([r.e2e for r in ok if r.e2e is not None]),
    }
    if cost_dollars is not None:
        summary["cost_dollars"] = cost_dollars
        summary["output_tokens_per_dollar"] = output / cost_dollars if cost_dollars > 0 else None
    return summary


def format_summary(s: dict[str, Any]) -> str:
    rate = "inf" if math.isinf(s["request_rate"]) else f"{s['request_rate']:g}"
    lines = [
        f"---- request rate {rate} req/s " + "-" * 30,
        f"completed / failed:         {s['completed']} / {s['failed']}",
        f"duration:                   {s['duration_s']:.2f} s",
        f"request throughput:         {s['request_throughput']:.2f} req/s",
        f"output token throughput:    {s['output_throughput']:.1f} tok/s",
        f"total token throughput:     {s['total_token_throughput']:.1f} tok/s",
    ]
    if s["slo"]:
        limits = ", ".join(f"{k}<={v * 1e3:g}ms" for k, v in s["slo"].items())
        lines.append(
            f"goodput ({limits}): {s['goodput']:.2f} req/s "
            f"({s['good_requests']}/{s['completed']} requests)"
        )
    if "output_tokens_per_dollar" in s:
        tpd = s["output_tokens_per_dollar"]
        shown = f"{tpd:,.0f}" if tpd is not None else "n/a (no price)"
        lines.append(f"output tokens per dollar:   {shown} (${s['cost_dollars']:.4f} spent)")
    lines.append(f"{'':<8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}   (ms)")
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        st = s[key]
        cells = "".join(
            f"{st[k] * 1e3:>10.1f}" if st[k] is not None else f"{'-':>10}"
            for k in ("mean", "p50", "p90", "p99")
        )
        lines.append(f"{label:<8}{cells}")
    for err in s["errors"]:
        lines.append(f"error: {err}")
    return "\n".join(lines)


def samples(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    ok = [r for r in results if r.ok]
    return {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [gap for r in ok for gap in r.itls],
        "e2e": [r.e2e for r in ok if r.e2e is not None],
    }


def record(r: RequestResult) -> dict[str, Any]:
    out = asdict(r)
    out["tpot"] = r.tpot
    return out
