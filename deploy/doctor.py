"""`splitserve doctor`: what an operator needs to know about a running
cluster, read from its router and workers, and what to do about it.

It reads the router's /cluster (every worker, with its metrics port) and
/metrics, and every worker's /metrics, twice, --interval apart; or, with
--watch, every --interval for that long, and reports on the busiest window
(the most output tokens per second: the peak). Rates and percentiles are
over that window, so run it while the cluster is under the load you care
about. It reports per pool: replicas, running batch (mean over the window)
against what the KV cache could hold, queue depth, queued prompt tokens, KV
pressure, CPU cores busy; prefill and decode latencies side by side (p95);
tokens per dollar; and a diagnosis with a concrete suggestion.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import httpx

from deploy.cluster_metrics import (
    DECODE_ROLES,
    DoctorError,
    PoolReport,
    metric_sum,
    output_rate,
    pool_reports,
    snapshot,
    window_quantile,
)

SMALL_BATCH = 8  # below this, a decode step wastes most of its memory traffic
ROOMY_KV = 32  # ...while a KV cache that fits this many sequences could batch them
KV_SATURATED = 0.9


# -- window arithmetic -------------------------------------------------------------


# -- the report ----------------------------------------------------------------------


def _slo_misses(
    pools: list[PoolReport], latency: dict[str, float | None], slo: dict[str, float]
) -> tuple[list[str], bool, bool]:
    """Suggestions for latencies over the user's SLO; and whether TPOT and
    TTFT are over it (over TPOT, a bigger batch is no remedy: every step
    would slow)."""
    out = []
    tpot = latency.get("router_tpot_p95") or latency.get("decode_tpot_p95")
    tpot_over = "tpot" in slo and tpot is not None and tpot > slo["tpot"]
    if tpot_over:
        assert tpot is not None
        for p in pools:
            if p.role not in DECODE_ROLES:
                continue
            batch = f"{p.mean_batch:.1f}" if p.mean_batch is not None else "-"
            out.append(
                f"TPOT p95 {tpot * 1e3:.0f} ms is over the SLO's {slo['tpot'] * 1e3:.0f} ms "
                f"with the {p.role} batch averaging {batch}: each step is too slow for the "
                f"SLO: add {p.role} replicas (raising max_num_seqs would slow every step "
                "further)"
            )
    ttft = latency.get("router_ttft_p95")
    ttft_over = "ttft" in slo and ttft is not None and ttft > slo["ttft"]
    if ttft_over:
        assert ttft is not None
        queue, compute = latency.get("prefill_queue_p95"), latency.get("prefill_compute_p95")
        where = "prefill" if any(p.role == "prefill" for p in pools) else "colocated"
        head = f"TTFT p95 {ttft * 1e3:.0f} ms is over the SLO's {slo['ttft'] * 1e3:.0f} ms"
        if compute is not None and compute > slo["ttft"]:
            out.append(
                f"{head}, and a prompt's own compute takes {compute * 1e3:.0f} ms (p95): more "
                "replicas will not help; shorter prompts or a faster accelerator will"
            )
        else:
            parts = f" (prefill queue p95 {queue * 1e3:.0f} ms)" if queue is not None else ""
            out.append(f"{head}{parts}: prompts wait for a free engine: add {where} replicas")
    return out, tpot_over, ttft_over


def diagnose(
    pools: list[PoolReport],
    latency: dict[str, float | None],
    workers: list[dict[str, Any]] | None = None,
    slo: dict[str, float] | None = None,
) -> list[str]:
    """Concrete suggestions, most pressing first; one line saying so when
    nothing stands out. `slo` ({"ttft": s, "tpot": s}) adds the latencies
    the user promised to the rules."""
    slo_lines, tpot_over, ttft_over = _slo_misses(pools, latency, slo or {})
    out = [
        f"{w['role']} worker {w['address']} is unhealthy ({w.get('last_error') or 'no answer'}): "
        "the router sends it nothing; if it stays so, replace it"
        for w in workers or []
        if not w.get("healthy")
    ]
    for p in pools:
        if p.role not in DECODE_ROLES:
            continue
        # Requests waiting while batch slots are free wait for KV blocks.
        blocked = p.waiting > 0 and p.max_num_seqs and p.running < p.max_num_seqs
        signs = [f"KV {p.kv_usage:.0%} used"]
        if p.rejected_full:
            signs.append(f"{p.rejected_full:.0f} requests turned away for want of blocks")
        if p.preemptions:
            signs.append(f"{p.preemptions:.0f} preemptions")
        if blocked:
            signs.append(f"{p.waiting} waiting with {p.max_num_seqs - p.running} batch slots free")
        if p.kv_usage >= KV_SATURATED or p.rejected_full > 0 or p.preemptions > 0 or blocked:
            why = ", ".join(signs)
            out.append(
                f"{p.role} pool saturated on KV ({why}): add {p.role} replicas "
                "(or give each more KV memory)"
            )
    out += slo_lines
    capped_roles = set()
    for p in pools:
        capped = p.max_num_seqs and p.running >= p.max_num_seqs
        # Over the TPOT SLO a bigger batch is no remedy (said above).
        if (
            not tpot_over
            and p.role in DECODE_ROLES
            and capped
            and p.waiting > 0
            and p.kv_usage < KV_SATURATED
        ):
            capped_roles.add(p.role)
            out.append(
                f"{p.role} batch is at its cap ({p.running} running = max_num_seqs) with "
                f"{p.waiting} waiting while only {p.kv_usage:.0%} of KV is used: raise "
                "max_num_seqs (the KV cache has room for more)"
            )
    for p in pools:
        # Prompts share prefixes (workers find some in their own caches), yet
        # the router sent none where it was cached: it is not steering.
        if (
            p.role in ("prefill", "colocated")
            and p.replicas >= 2
            and p.prefix_hit_rate
            and not p.routed_to_cache
        ):
            out.append(
                f"{p.role} pool finds {p.prefix_hit_rate:.0%} of prompt tokens in its prefix "
                "caches, but the router sent no prompt where its prefix was cached: routing is "
                "defeating the cache (use the router's cache_aware policy: router.policy in the "
                "config, --policy for the router)"
            )
    for p in pools:
        if p.role == "prefill" and p.queued_prompt_tokens_change > 0 and p.waiting > 0:
            out.append(
                f"prefill queue growing (+{p.queued_prompt_tokens_change} queued prompt tokens "
                f"over the window, {p.queued_prompt_tokens} now): add prefill replicas"
            )
    queue, compute = latency.get("prefill_queue_p95"), latency.get("prefill_compute_p95")
    if (
        not ttft_over
        and queue is not None
        and compute is not None
        and queue > 2 * compute
        and queue > 0.05
    ):
        out.append(
            f"prompts wait longer than they compute (prefill queue p95 {queue * 1e3:.0f} ms, "
            f"compute p95 {compute * 1e3:.0f} ms): add prefill replicas"
        )
    for p in pools:
        if (
            p.role in DECODE_ROLES
            and p.role not in capped_roles  # already explained, with the fix
            and p.mean_batch is not None
            and p.mean_batch < SMALL_BATCH
            and p.fits_sequences is not None
            and p.fits_sequences >= ROOMY_KV
            and p.kv_usage < KV_SATURATED
        ):
            out.append(
                f"{p.role} batch averages {p.mean_batch:.1f} while its KV cache could hold "
                f"~{p.fits_sequences} such sequences: the scheduler or the offered load, not "
                "the model, is the bottleneck (send more concurrent requests, or raise "
                "max_num_seqs and the token budget)"
            )
    if not out:
        out.append("no bottleneck stands out in this window")
    return out


def examine(
    url: str,
    interval_s: float = 5.0,
    timeout_s: float = 10.0,
    watch_s: float = 0.0,
    progress: bool = False,
    slo: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Read the cluster every `interval_s`: twice, or for `watch_s` seconds;
    the report on the busiest window (the most output tokens per second:
    the peak) as a dict. `slo`: {"ttft": s, "tpot": s}, either or both."""
    unknown = set(slo or {}) - {"ttft", "tpot"}
    if unknown:
        raise DoctorError(f"--slo takes ttft and tpot only, not {', '.join(sorted(unknown))}")
    if not interval_s > 0:
        raise DoctorError(f"--interval must be > 0, got {interval_s}")
    if watch_s < 0:
        raise DoctorError(f"--watch must be >= 0, got {watch_s}")
    windows = max(1, math.ceil(watch_s / interval_s)) if watch_s else 1
    bar = None
    if progress and windows > 1:
        from tqdm import tqdm

        bar = tqdm(total=windows, desc="reading the cluster", unit="window", leave=False)
    with httpx.Client(timeout=timeout_s) as client:
        snaps = [snapshot(client, url)]
        for _ in range(windows):
            time.sleep(interval_s)
            snaps.append(snapshot(client, url))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    rates = [output_rate(a, b) for a, b in itertools.pairwise(snaps)]
    peak = max(range(windows), key=lambda i: rates[i])
    before, after = snaps[peak], snaps[peak + 1]
    if not after.workers:
        raise DoctorError(f"{url} knows no workers")
    latency = {
        "prefill_compute_p95": window_quantile(
            before, after, "prefill", "splitserve_prefill_compute_seconds", 0.95
        ),
        "prefill_queue_p95": window_quantile(
            before, after, "prefill", "splitserve_prefill_queue_seconds", 0.95
        ),
        "decode_tpot_p95": window_quantile(
            before, after, "decode", "splitserve_decode_tpot_seconds", 0.95
        )
        or window_quantile(before, after, "colocated", "splitserve_decode_tpot_seconds", 0.95),
        "router_ttft_p95": window_quantile(
            before, after, None, "splitserve_router_ttft_seconds", 0.95
        ),
        "router_tpot_p95": window_quantile(
            before, after, None, "splitserve_router_tpot_seconds", 0.95
        ),
    }
    pools = pool_reports(before, after)
    return {
        "url": url,
        "window_s": after.time - before.time,
        "windows": windows,
        "peak_window": peak,  # 0-based, of `windows`
        "window_output_tokens_per_s": rates,
        "pools": pools,
        "latency": latency,
        "output_tokens_per_s": rates[peak],
        "cluster_tokens_per_dollar": metric_sum(
            after.router, "splitserve_cluster_tokens_per_dollar"
        )
        or None,
        "slo": slo or {},
        "diagnosis": diagnose(pools, latency, after.workers, slo),
    }


def format_report(r: dict[str, Any]) -> str:
    pools: list[PoolReport] = r["pools"]
    head = f"splitserve doctor: {r['url']}, over {r['window_s']:.1f} s"
    if r["windows"] > 1:
        lo, hi = min(r["window_output_tokens_per_s"]), max(r["window_output_tokens_per_s"])
        head += (
            f" (the peak: window {r['peak_window'] + 1} of {r['windows']}, "
            f"which ranged {lo:.0f}-{hi:.0f} output tok/s)"
        )
    lines = [
        f"{head}; {r['output_tokens_per_s']:.1f} output tok/s",
        "",
        f"{'pool':<10}{'replicas':>9}{'running':>9}{'waiting':>9}{'queued tok':>12}"
        f"{'KV used':>9}{'batch':>8}{'KV fits':>9}{'cores':>7}{'cache hits':>12}",
    ]
    for p in pools:
        batch = f"{p.mean_batch:.1f}" if p.mean_batch is not None else "-"
        fits = f"~{p.fits_sequences}" if p.fits_sequences is not None else "-"
        cores = f"{p.cores_busy:.2f}" if p.cores_busy is not None else "-"
        hits = f"{p.prefix_hit_rate:.0%}" if p.prefix_hit_rate is not None else "-"
        lines.append(
            f"{p.role:<10}{p.replicas:>9}{p.running:>9}{p.waiting:>9}{p.queued_prompt_tokens:>12}"
            f"{p.kv_usage:>9.0%}{batch:>8}{fits:>9}{cores:>7}{hits:>12}"
        )

    def ms(key: str) -> str:
        v = r["latency"].get(key)
        return f"{v * 1e3:.0f} ms" if v is not None else "-"

    lines += [
        "",
        f"p95, prefill: queue {ms('prefill_queue_p95')}, compute {ms('prefill_compute_p95')}"
        f"   |   decode: TPOT {ms('decode_tpot_p95')}"
        f"   |   client: TTFT {ms('router_ttft_p95')}, TPOT {ms('router_tpot_p95')}",
    ]
    if r.get("slo"):
        lines.append(
            "SLO: "
            + ", ".join(f"{k.upper()} {v * 1e3:.0f} ms" for k, v in sorted(r["slo"].items()))
        )
    tpd = [f"{p.role} {p.tokens_per_dollar:,.0f}" for p in pools if p.tokens_per_dollar is not None]
    cluster = r["cluster_tokens_per_dollar"]
    if cluster is not None or tpd:
        shown = f"{cluster:,.0f} output tokens/$" if cluster is not None else "-"
        lines.append(
            f"tokens per dollar: cluster {shown}" + (f" ({', '.join(tpd)})" if tpd else "")
        )
    else:
        lines.append("tokens per dollar: no price set (price_per_replica_hour in the config)")
    lines += ["", "diagnosis:"] + [f"  - {d}" for d in r["diagnosis"]]
    return "\n".join(lines)
