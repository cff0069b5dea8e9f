"""bench/prefix_cache.py's arithmetic and tables: hit rates and KV bytes from
metric deltas, medians over rounds, the markdown table, and the headline
ratios against the issue's goals."""

from __future__ import annotations

import statistics
from typing import Any

from deploy.cluster_metrics import Snapshot

QUERIES = "splitserve_prefix_cache_queries_total"
HITS = "splitserve_prefix_cache_hits_total"
KV_BYTES = "splitserve_kv_transfer_bytes_total"

# The headline ratios: (what, numerator (config, workload), denominator, figure, goal).
HEADLINES = (
    ("TTFT p50 no-cache / cache, 1P+1D, prefix", "1p1d-nocache", "1p1d-cache", "prefix",
     "ttft_p50_s", 5.0),
    ("TTFT p50 no-cache / cache, 2 colocated, prefix", "coloc-nocache", "coloc-cache", "prefix",
     "ttft_p50_s", 5.0),
    ("TTFT p50 no-cache / cache, 1P+1D, multiturn", "1p1d-nocache", "1p1d-cache", "multiturn",
     "ttft_p50_s", None),
    ("TTFT p50 no-cache / cache, 2 colocated, multiturn", "coloc-nocache", "coloc-cache",
     "multiturn", "ttft_p50_s", None),
    ("hit rate cache_aware / round_robin, 2P+1D, prefix", "2p1d-cache_aware",
     "2p1d-round_robin", "prefix", "hit_rate", 1.5),
    ("hit rate cache_aware / round_robin, 2P+1D, multiturn", "2p1d-cache_aware",
     "2p1d-round_robin", "multiturn", "hit_rate", 1.5),
    ("TTFT p50 remote / local prefill of short remainders, 1P+1D, multiturn", "1p1d-cache",
     "1p1d-local256", "multiturn", "ttft_p50_s", None),
    ("output tok/s cache / no-cache, 1P+1D, random", "1p1d-cache", "1p1d-nocache", "random",
     "output_tok_s", 1.0),
    ("output tok/s cache / no-cache, 2 colocated, random", "coloc-cache", "coloc-nocache",
     "random", "output_tok_s", 1.0),
)  # fmt: skip


def _median(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def medians(runs: list[dict]) -> dict[tuple[str, str], dict[str, Any]]:
    """(config, workload) -> each figure's median over rounds; failures summed."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        grouped.setdefault((r["config"], r["workload"]), []).append(r)
    out = {}
    for key, rs in grouped.items():
        out[key] = {
            f: _median([r[f] for r in rs])
            for f in ("ttft_p50_s", "ttft_p99_s", "output_tok_s", "hit_rate", "kv_bytes")
        }
        out[key]["hit_rate_role"] = rs[0]["hit_rate_role"]
        out[key]["failed"] = sum(r["failed"] for r in rs)
        out[key]["requests"] = sum(r["requests"] for r in rs)
        out[key]["rounds"] = len(rs)
    return out


def fmt(x: float | None, scale: float = 1.0, spec: str = ".0f") -> str:
    return "-" if x is None else format(x * scale, spec)


def table(
    med: dict[tuple[str, str], dict[str, Any]],
    ids: list[str],
    workloads: list[str],
    names: dict[str, str],
) -> str:
    lines = [
        "| configuration | workload | TTFT p50 ms | TTFT p99 ms | output tok/s "
        "| hit rate (pool) | KV moved MiB | failed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cid in ids:
        for wl in workloads:
            m = med.get((cid, wl))
            if m is None:
                continue
            hit = m["hit_rate"]
            hit_s = "-" if hit is None else f"{hit:.1%} ({m['hit_rate_role']})"
            lines.append(
                f"| {names[cid]} | {wl} | {fmt(m['ttft_p50_s'], 1e3)} "
                f"| {fmt(m['ttft_p99_s'], 1e3)} | {fmt(m['output_tok_s'], 1, '.1f')} "
                f"| {hit_s} | {fmt(m['kv_bytes'], 2**-20, '.1f')} "
                f"| {m['failed']}/{m['requests']} |"
            )
    return "\n".join(lines)


def headlines(med: dict[tuple[str, str], dict[str, Any]], cpu: str) -> list[dict[str, Any]]:
    out = []
    for what, num, den, wl, figure, goal in HEADLINES:
        a, b = med.get((num, wl)), med.get((den, wl))
        if a is None or b is None:
            continue
        x, y = a[figure], b[figure]
        ratio = x / y if x is not None and y else None
        out.append(
            {
                "what": what,
                "figure": figure,
                "numerator": x,
                "denominator": y,
                "ratio": ratio,
                "goal": goal,
                "met": None if ratio is None or goal is None else ratio >= goal,
                "cpu": cpu,
            }
        )
    return out


def format_headline(h: dict[str, Any]) -> str:
    ratio = "n/a" if h["ratio"] is None else f"{h['ratio']:.2f}x"
    goal = ""
    if h["goal"] is not None:
        verdict = "n/a" if h["met"] is None else ("met" if h["met"] else "NOT met")
        goal = f" (goal >= {h['goal']:g}x: {verdict})"
    scale, unit = {"ttft_p50_s": (1e3, " ms"), "hit_rate": (100.0, "%")}.get(
        h["figure"], (1.0, " tok/s")
    )
    parts = " / ".join(
        "-" if v is None else f"{v * scale:.1f}{unit}" for v in (h["numerator"], h["denominator"])
    )
    return f"- {h['what']}: {ratio} ({parts}){goal}  [CPU: {h['cpu']}]"


def _per_worker(snap: Snapshot, name: str, **labels: str) -> dict[str, float]:
    """Counter `name` (samples matching `labels`) per worker address."""
    return {
        address: sum(
            v
            for lab, v in samples.get(name, [])
            if all(lab.get(k) == want for k, want in labels.items())
        )
        for address, samples in snap.worker_metrics.items()
    }


def _delta(before: Snapshot, after: Snapshot, name: str, **labels: str) -> dict[str, float]:
    b = _per_worker(before, name, **labels)
    return {a: v - b.get(a, 0.0) for a, v in _per_worker(after, name, **labels).items()}


def cache_figures(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """Prefix cache lookups and hits (prompt tokens) per role and per worker,
    and the KV bytes decode workers received, over the window."""
    role_of = {w["address"]: str(w["role"]) for w in after.workers}
    queries, hits = _delta(before, after, QUERIES), _delta(before, after, HITS)
    workers = {
        a: {"role": role_of.get(a), "queries": queries[a], "hits": hits.get(a, 0.0)}
        for a in sorted(queries)
    }
    roles: dict[str, dict[str, Any]] = {}
    for w in workers.values():
        r = roles.setdefault(str(w["role"]), {"queries": 0.0, "hits": 0.0})
        r["queries"] += w["queries"]
        r["hits"] += w["hits"]
    for r in roles.values():
        r["hit_rate"] = r["hits"] / r["queries"] if r["queries"] else None
    kv = sum(_delta(before, after, KV_BYTES, direction="received").values())
    return {"roles": roles, "workers": workers, "kv_bytes": kv}


def prompt_role(roles: dict[str, Any]) -> str:
    """The pool that computes prompts."""
    return "prefill" if "prefill" in roles else "colocated"
