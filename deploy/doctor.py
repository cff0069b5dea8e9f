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
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

DECODE_ROLES = ("decode", "colocated")
SMALL_BATCH = 8  # below this, a decode step wastes most of its memory traffic
ROOMY_KV = 32  # ...while a KV cache that fits this many sequences could batch them
KV_SATURATED = 0.9


class DoctorError(ValueError):
    """The cluster cannot be read: one line for the user."""


# name -> list of (labels, value)
Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


@dataclass
class Snapshot:
    """One reading of the whole cluster."""

    time: float
    workers: list[dict[str, Any]]
    router: Samples
    worker_metrics: dict[str, Samples] = field(default_factory=dict)  # by worker address


def _get(client: httpx.Client, url: str) -> httpx.Response:
    try:
        r = client.get(url)
    except httpx.HTTPError as e:
        raise DoctorError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise DoctorError(f"{url} answered HTTP {r.status_code}: {r.text[:200]}")
    return r


def snapshot(client: httpx.Client, url: str) -> Snapshot:
    base = url.rstrip("/")
    answer = _get(client, f"{base}/cluster")
    try:
        workers = answer.json()["workers"]
    except (ValueError, KeyError):
        raise DoctorError(f"{base}/cluster is not a splitserve router's answer") from None
    snap = Snapshot(time.monotonic(), workers, parse_metrics(_get(client, f"{base}/metrics").text))
    for w in workers:
        if not w.get("metrics_port"):
            continue
        host = w["address"].rpartition(":")[0]
        try:
            r = client.get(f"http://{host}:{w['metrics_port']}/metrics")
        except httpx.HTTPError:
            continue  # a worker that just left; the others still tell the story
        if r.status_code == 200:
            snap.worker_metrics[w["address"]] = parse_metrics(r.text)
    return snap


# -- window arithmetic -------------------------------------------------------------


def _sum(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v
        for lab, v in samples.get(name, [])
        if all(lab.get(k) == want for k, want in labels.items())
    )


def _role_sum(snap: Snapshot, role: str, name: str) -> float:
    """`name` summed over the workers of `role`; a sample without a role
    label (process_cpu_seconds_total, say) is its worker's."""
    return sum(
        v
        for address, m in snap.worker_metrics.items()
        if _role_of(snap, address) == role
        for lab, v in m.get(name, [])
        if lab.get("role", role) == role
    )


def _role_of(snap: Snapshot, address: str) -> str | None:
    for w in snap.workers:
        if w["address"] == address:
            return str(w["role"])
    return None


def _buckets(snap: Snapshot, role: str | None, name: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram `name` (workers of `role`, or
    the router when role is None), summed over processes."""
    sources = (
        [snap.router]
        if role is None
        else [m for a, m in snap.worker_metrics.items() if _role_of(snap, a) == role]
    )
    out: dict[float, float] = {}
    for samples in sources:
        for lab, v in samples.get(f"{name}_bucket", []):
            if role is not None and lab.get("role", role) != role:
                continue
            le = float(lab["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def window_quantile(
    before: Snapshot, after: Snapshot, role: str | None, name: str, q: float
) -> float | None:
    """The q-quantile of histogram `name` over the window (interpolated
    within the bucket, as Prometheus' histogram_quantile); None if empty."""
    b0, b1 = _buckets(before, role, name), _buckets(after, role, name)
    bounds = sorted(b1)
    counts = [b1[le] - b0.get(le, 0.0) for le in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(le):
                return prev_le
            width = count - prev_count
            frac = (rank - prev_count) / width if width > 0 else 1.0
            return prev_le + (le - prev_le) * frac
        prev_le, prev_count = le, count
    return prev_le


def window_cores_busy(before: Snapshot, after: Snapshot, role: str) -> float | None:
    """CPU cores the pool's processes kept busy over the window (CPU seconds
    per second, summed over replicas); None when none reports it."""
    name = "process_cpu_seconds_total"
    # Only workers read at both ends: one that joined or left mid-window
    # would count its whole life.
    cpu = [
        _sum(after.worker_metrics[a], name) - _sum(before.worker_metrics[a], name)
        for a in set(before.worker_metrics) & set(after.worker_metrics)
        if _role_of(after, a) == role and name in after.worker_metrics[a]
    ]
    span = after.time - before.time
    return sum(cpu) / span if cpu and span > 0 else None


def window_mean(before: Snapshot, after: Snapshot, role: str, name: str) -> float | None:
    n = _role_sum(after, role, f"{name}_count") - _role_sum(before, role, f"{name}_count")
    total = _role_sum(after, role, f"{name}_sum") - _role_sum(before, role, f"{name}_sum")
    return total / n if n > 0 else None


# -- the report ----------------------------------------------------------------------


@dataclass
class PoolReport:
    role: str
    replicas: int
    running: int
    waiting: int
    queued_prompt_tokens: int
    queued_prompt_tokens_change: int
    kv_usage: float
    kv_blocks_total: int
    mean_batch: float | None
    fits_sequences: int | None  # how many sequences of the current mix the KV could hold
    rejected_full: float
    preemptions: float  # over the window
    tokens_per_dollar: float | None
    max_num_seqs: int  # the running-batch cap, summed over replicas
    cores_busy: float | None  # CPU seconds per second over the window, all replicas


def _pools(before: Snapshot, after: Snapshot) -> list[PoolReport]:
    reports = []

    # Every worker that ever answered a poll: one that is unhealthy now (too
    # busy to answer in time, say) still tells the story with its last answer.
    def known(w: dict[str, Any], role: str) -> bool:
        return bool(w["role"] == role and w.get("kv_blocks_total") is not None)

    roles = sorted({w["role"] for w in after.workers if w.get("kv_blocks_total") is not None})
    for role in roles:
        ws = [w for w in after.workers if known(w, role)]
        ws0 = [w for w in before.workers if known(w, role)]
        total = sum(w["kv_blocks_total"] or 0 for w in ws)
        free = sum(w["kv_blocks_free"] or 0 for w in ws)
        running = sum(w["running"] or 0 for w in ws)
        queued = sum(w["waiting_prompt_tokens"] or 0 for w in ws)
        queued0 = sum(w["waiting_prompt_tokens"] or 0 for w in ws0)
        used = total - free
        fits = None
        if role in DECODE_ROLES and running > 0 and used > 0:
            fits = int(total / (used / running))
        tpd = _sum(after.router, "splitserve_pool_tokens_per_dollar", pool=role)
        reports.append(
            PoolReport(
                role=role,
                replicas=len(ws),
                running=running,
                waiting=sum(w["waiting"] or 0 for w in ws),
                queued_prompt_tokens=queued,
                queued_prompt_tokens_change=queued - queued0,
                kv_usage=used / total if total else 0.0,
                kv_blocks_total=total,
                mean_batch=window_mean(before, after, role, "splitserve_engine_batch_size"),
                fits_sequences=fits,
                rejected_full=_role_sum(after, role, "splitserve_decode_rejected_full_total")
                - _role_sum(before, role, "splitserve_decode_rejected_full_total"),
                preemptions=_role_sum(after, role, "splitserve_preemptions_total")
                - _role_sum(before, role, "splitserve_preemptions_total"),
                tokens_per_dollar=tpd or None,
                max_num_seqs=sum(w.get("max_num_seqs") or 0 for w in ws),
                cores_busy=window_cores_busy(before, after, role),
            )
        )
    return reports


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


def _output_rate(before: Snapshot, after: Snapshot) -> float:
    gen0 = _sum(before.router, "splitserve_router_generation_tokens_total")
    gen1 = _sum(after.router, "splitserve_router_generation_tokens_total")
    span = after.time - before.time
    return (gen1 - gen0) / span if span > 0 else 0.0


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
    rates = [_output_rate(a, b) for a, b in itertools.pairwise(snaps)]
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
    pools = _pools(before, after)
    return {
        "url": url,
        "window_s": after.time - before.time,
        "windows": windows,
        "peak_window": peak,  # 0-based, of `windows`
        "window_output_tokens_per_s": rates,
        "pools": pools,
        "latency": latency,
        "output_tokens_per_s": rates[peak],
        "cluster_tokens_per_dollar": _sum(after.router, "splitserve_cluster_tokens_per_dollar")
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
        f"{'KV used':>9}{'batch':>8}{'KV fits':>9}{'cores':>7}",
    ]
    for p in pools:
        batch = f"{p.mean_batch:.1f}" if p.mean_batch is not None else "-"
        fits = f"~{p.fits_sequences}" if p.fits_sequences is not None else "-"
        cores = f"{p.cores_busy:.2f}" if p.cores_busy is not None else "-"
        lines.append(
            f"{p.role:<10}{p.replicas:>9}{p.running:>9}{p.waiting:>9}{p.queued_prompt_tokens:>12}"
            f"{p.kv_usage:>9.0%}{batch:>8}{fits:>9}{cores:>7}"
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
