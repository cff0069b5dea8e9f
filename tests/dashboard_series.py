"""The series the router and the workers really export (read from the
registries they build, no Prometheus needed), and the dashboard checks
against them: every metric a query names is exported, every label it
matches or groups by exists on that metric, and no aggregation adds
prefill, decode and colocated together. Each returns its problems."""

from __future__ import annotations

import re

from prometheus_client import ProcessCollector

from tests.dashboard import Dashboard, queries, variable_metrics
from tests.promql import parse_promql

# Prometheus adds these to every scraped series; no registry has them.
SCRAPE_LABELS = {"instance", "job"}
# The labels that keep the pools apart: workers' role, the router's pool gauges.
POOL_LABELS = ("role", "pool")

# Series name -> label name -> the values seen (empty where no child exists yet).
Exported = dict[str, dict[str, set[str]]]


# -- what the processes export -------------------------------------------------

# The series each metric type puts in Prometheus (the "_created" ones left out).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> Exported:
    from decode_worker.metrics import DecodeMetrics
    from prefill_worker.metrics import PrefillMetrics
    from router.metrics import RouterMetrics

    router = RouterMetrics()
    router.track_cost(lambda: [])
    registries = [
        DecodeMetrics("decode").registry,
        DecodeMetrics("colocated").registry,
        PrefillMetrics().registry,
        router.registry,
    ]
    out: Exported = {}
    for registry in registries:
        # A labelled metric with no child yet exports no sample, so its label
        # names are only on the collector (prometheus_client keeps them private).
        for collector in registry._collector_to_names:
            # The standard process metrics (process_cpu_seconds_total, ...) carry no labels.
            unlabelled = isinstance(collector, ProcessCollector)
            labelnames = () if unlabelled else getattr(collector, "_labelnames", None)
            assert labelnames is not None, f"{collector!r}: prometheus_client changed"
            for family in collector.collect():
                assert family.type in SUFFIXES, f"{family.name}: unexpected {family.type}"
                for suffix in SUFFIXES[family.type]:
                    labels = out.setdefault(family.name + suffix, {})
                    for label in (*labelnames, *(("le",) if suffix == "_bucket" else ())):
                        labels.setdefault(label, set())
                for sample in family.samples:
                    if sample.name in out:
                        for label, value in sample.labels.items():
                            out[sample.name].setdefault(label, set()).add(value)
    return out


# -- the checks (each returns its problems) --------------------------------------


def metric_problems(dash: Dashboard, exported: Exported) -> list[str]:
    problems = []
    for where, expr in queries(dash):
        try:
            query = parse_promql(expr)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if not query.selectors:
            problems.append(f"{where}: no metric in {expr!r}")
        for s in query.selectors:
            if s.metric not in exported:
                problems.append(f"{where}: {s.metric} is not exported by any process")
    for var, metric, _ in variable_metrics(dash):
        if metric not in exported:
            problems.append(f"variable {var}: {metric} is not exported by any process")
    return problems


def label_problems(dash: Dashboard, exported: Exported) -> list[str]:
    problems = []

    def has(metric: str, label: str) -> bool:
        return label in SCRAPE_LABELS or label in exported.get(metric, {label: set()})

    for where, expr in queries(dash):
        try:
            query = parse_promql(expr)
        except ValueError:
            continue  # metric_problems reports it
        for s in query.selectors:
            for label, op, value in s.matchers:
                if not has(s.metric, label):
                    problems.append(f"{where}: {s.metric} has no label {label}")
                    continue
                seen = exported.get(s.metric, {}).get(label, set())
                # A literal value must match a series the code creates.
                literal = "$" not in value and op in ("=", "=~")
                if seen and literal and not any(re.fullmatch(value, v) for v in seen):
                    problems.append(
                        f"{where}: {s.metric}{{{label}{op}{value!r}}} is none of {seen}"
                    )
        for agg in query.aggregations:
            for label in agg.labels:
                for s in query.inside(agg):
                    if not has(s.metric, label):
                        problems.append(
                            f"{where}: {agg.op} {agg.clause} {label}: {s.metric} has no {label}"
                        )
        for label in query.matching:
            for s in query.selectors:
                if not has(s.metric, label):
                    problems.append(f"{where}: on/ignoring {label}: {s.metric} has no {label}")
    for var, metric, label in variable_metrics(dash):
        if not has(metric, label):
            problems.append(f"variable {var}: {metric} has no label {label}")
    return problems


def pooling_problems(dash: Dashboard, exported: Exported) -> list[str]:
    """An aggregation over a metric labelled by pool keeps that label, unless
    every such selector pins it to one value."""
    problems = []
    for where, expr in queries(dash):
        try:
            query = parse_promql(expr)
        except ValueError:
            continue
        for agg in query.aggregations:
            for label in POOL_LABELS:
                if agg.clause == "by":
                    kept = label in agg.labels
                else:
                    kept = agg.clause == "without" and label not in agg.labels
                pooled = [
                    s
                    for s in query.inside(agg)
                    if label in exported.get(s.metric, {})
                    and not any(m[0] == label and m[1] == "=" for m in s.matchers)
                ]
                if pooled and not kept:
                    problems.append(
                        f"{where}: {agg.op} over {pooled[0].metric} adds pools together; "
                        f"keep `{label}` in its by (...)"
                    )
    return problems
