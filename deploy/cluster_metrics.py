"""What `splitserve doctor` observes: a running cluster's /cluster and every
/metrics read at one instant (Snapshot), and the figures of the window
between two of them, per pool (PoolReport): rates, means, percentiles,
cores busy. Judging them is deploy/doctor.py's job."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

DECODE_ROLES = ("decode", "colocated")


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


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
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
        metric_sum(after.worker_metrics[a], name) - metric_sum(before.worker_metrics[a], name)
        for a in set(before.worker_metrics) & set(after.worker_metrics)
        if _role_of(after, a) == role and name in after.worker_metrics[a]
    ]
    span = after.time - before.time
    return sum(cpu) / span if cpu and span > 0 else None


def window_mean(before: Snapshot, after: Snapshot, role: str, name: str) -> float | None:
    n = _role_sum(after, role, f"{name}_count") - _role_sum(before, role, f"{name}_count")
    total = _role_sum(after, role, f"{name}_sum") - _role_sum(before, role, f"{name}_sum")
    return total / n if n > 0 else None


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
    # Over the window: prompt tokens found in the prefix cache / looked up (None: none looked up).
    prefix_hit_rate: float | None = None
    # Over the window, router-wide: prompts sent where their prefix was likely cached.
    routed_to_cache: float = 0.0


def pool_reports(before: Snapshot, after: Snapshot) -> list[PoolReport]:
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
        tpd = metric_sum(after.router, "splitserve_pool_tokens_per_dollar", pool=role)
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
                prefix_hit_rate=_window_ratio(
                    before,
                    after,
                    role,
                    "splitserve_prefix_cache_hits_total",
                    "splitserve_prefix_cache_queries_total",
                ),
                routed_to_cache=metric_sum(
                    after.router, "splitserve_router_routing_decisions_total", reason="prefix_cache"
                )
                - metric_sum(
                    before.router,
                    "splitserve_router_routing_decisions_total",
                    reason="prefix_cache",
                ),
            )
        )
    return reports


def _window_ratio(
    before: Snapshot, after: Snapshot, role: str, part: str, whole: str
) -> float | None:
    den = _role_sum(after, role, whole) - _role_sum(before, role, whole)
    num = _role_sum(after, role, part) - _role_sum(before, role, part)
    return num / den if den > 0 else None


def output_rate(before: Snapshot, after: Snapshot) -> float:
    gen0 = metric_sum(before.router, "splitserve_router_generation_tokens_total")
    gen1 = metric_sum(after.router, "splitserve_router_generation_tokens_total")
    span = after.time - before.time
    return (gen1 - gen0) / span if span > 0 else 0.0
