"""deploy/grafana/splitserve.json as the tests read it: its panels and
queries, and the checks of its shape, data source, descriptions and required
areas. Each check returns its problems as a list, so that a test can expect
none from the shipped dashboard and some from a broken copy. The checks
against the metrics the processes export are in tests/dashboard_series.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploy.config import UTILISATION_WORDS
from tests.promql import parse_promql

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "splitserve.json"

GRID_COLUMNS = 24
DATASOURCE = "datasource"  # the templated data source variable's name
DATASOURCE_UIDS = {"${datasource}", "$datasource"}

# What each required area must query (metric names as Prometheus stores them).
AREAS = {
    "client-seen latency": {
        "splitserve_router_ttft_seconds_bucket",
        "splitserve_router_tpot_seconds_bucket",
        "splitserve_router_itl_seconds_bucket",
        "splitserve_router_e2e_latency_seconds_bucket",
    },
    "prefill latency": {
        "splitserve_prefill_queue_seconds_bucket",
        "splitserve_prefill_compute_seconds_bucket",
    },
    "decode latency": {"splitserve_decode_tpot_seconds_bucket"},
    "batch size": {
        "splitserve_engine_batch_size_sum",
        "splitserve_engine_batch_size_count",
        "splitserve_running_requests",
    },
    "queue depth": {"splitserve_waiting_requests", "splitserve_waiting_prompt_tokens"},
    "KV usage": {
        "splitserve_kv_cache_usage_ratio",
        "splitserve_kv_blocks_free",
        "splitserve_preemptions_total",
        "splitserve_decode_rejected_full_total",
    },
    "KV transfer": {
        "splitserve_kv_transfer_bytes_total",
        "splitserve_kv_transfer_seconds_bucket",
    },
    "throughput": {
        "splitserve_router_generation_tokens_total",
        "splitserve_generation_tokens_total",
        "splitserve_router_requests_total",
    },
    "tokens per dollar": {
        "splitserve_cluster_tokens_per_dollar",
        "splitserve_pool_tokens_per_dollar",
        "splitserve_pool_cost_dollars",
        "splitserve_tokens_per_dollar",
    },
    "reliability": {
        "splitserve_router_retries_total",
        "splitserve_decode_prefill_retries_total",
        "splitserve_decode_local_prefills_total",
    },
}
PREFILL_LATENCY = re.compile(r"^splitserve_prefill_\w+_seconds_bucket$")
DECODE_LATENCY = re.compile(r"^splitserve_decode_\w+_seconds_bucket$")

Dashboard = dict[str, Any]


# -- walking the dashboard -------------------------------------------------------


def all_panels(dash: Dashboard) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dash.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dash: Dashboard) -> Iterator[tuple[str, str]]:
    """(where, expr) for every query a panel runs."""
    for panel in all_panels(dash):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r} {target.get('refId')}", target.get("expr", "")


def variable_metrics(dash: Dashboard) -> Iterator[tuple[str, str, str]]:
    """(variable, metric, label) for every label_values(metric, label) variable."""
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for metric, label in re.findall(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", query):
            yield var["name"], metric, label


def metrics_of(panel: dict[str, Any]) -> set[str]:
    return {s.metric for t in panel.get("targets", []) for s in parse_promql(t["expr"]).selectors}


# -- the checks (each returns its problems) --------------------------------------


def shape_problems(dash: Dashboard) -> list[str]:
    problems = []
    for key in ("title", "uid"):
        if not isinstance(dash.get(key), str) or not dash[key]:
            problems.append(f"no {key}")
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        problems.append(f"schemaVersion {dash.get('schemaVersion')!r}: want 36 or later")
    panels = list(all_panels(dash))
    if not panels:
        problems.append("no panels")
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        problems.append(f"panel ids must be unique integers: {ids}")
    boxes = []
    for p in panels:
        where = f"panel {p.get('id')} {p.get('title')!r}"
        if not p.get("type"):
            problems.append(f"{where}: no type")
        if not p.get("title"):
            problems.append(f"{where}: no title")
        g = p.get("gridPos", {})
        x, y, w, h = (g.get(k) for k in ("x", "y", "w", "h"))
        if not all(isinstance(v, int) for v in (x, y, w, h)):
            problems.append(f"{where}: gridPos {g}")
            continue
        assert isinstance(x, int) and isinstance(y, int) and isinstance(w, int)
        assert isinstance(h, int)
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > GRID_COLUMNS:
            problems.append(f"{where}: gridPos {g} is outside the {GRID_COLUMNS}-column grid")
        boxes.append((where, x, y, w, h))
    for n, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[n + 1 :]:
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                problems.append(f"{a} overlaps {b}")
    return problems


def datasource_problems(dash: Dashboard) -> list[str]:
    problems = []
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get(DATASOURCE, {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append(f"no templated Prometheus data source variable ${DATASOURCE}")

    def templated(ref: Any) -> bool:
        return (
            isinstance(ref, dict)
            and ref.get("type") == "prometheus"
            and ref.get("uid") in DATASOURCE_UIDS
        )

    for name, var in variables.items():
        if var.get("type") == "query" and not templated(var.get("datasource")):
            problems.append(f"variable {name}: datasource {var.get('datasource')!r}")
    for p in all_panels(dash):
        if p.get("type") == "row":
            continue
        where = f"panel {p.get('title')!r}"
        if not templated(p.get("datasource")):
            problems.append(f"{where}: datasource {p.get('datasource')!r}, not ${DATASOURCE}")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids):
            problems.append(f"{where}: refIds repeat: {ref_ids}")
        for t in targets:
            if not isinstance(t.get("expr"), str) or not t["expr"].strip():
                problems.append(f"{where} {t.get('refId')}: empty expr")
            if "datasource" in t and not templated(t["datasource"]):
                problems.append(f"{where} {t.get('refId')}: datasource {t['datasource']!r}")
    return problems


def description_problems(dash: Dashboard) -> list[str]:
    """Every panel says what it shows and what a bad value means: at least two
    sentences, more than a restated title."""
    problems = []
    for p in all_panels(dash):
        if p.get("type") == "row":
            continue
        text = (p.get("description") or "").strip()
        if len(re.findall(r"[.!?:](\s|$)", text)) < 2 or len(text) < 80:
            problems.append(f"panel {p.get('title')!r}: description {text!r} is too thin")
    return problems


def area_problems(dash: Dashboard) -> list[str]:
    problems = []
    panels = [p for p in all_panels(dash) if p.get("type") != "row"]
    used: set[str] = set()
    for p in panels:
        used |= metrics_of(p)
    for area, metrics in AREAS.items():
        if missing := metrics - used:
            problems.append(f"no panel for {area}: {sorted(missing)} unused")
    if not any(
        {"splitserve_engine_batch_size_sum", "splitserve_engine_batch_size_count"}
        <= {s.metric for s in parse_promql(t["expr"]).selectors}
        for p in panels
        for t in p.get("targets", [])
    ):
        problems.append("no query divides the batch-size sum by its count")
    # Prefill and decode latency in panels of their own, side by side.
    prefill = [p for p in panels if any(PREFILL_LATENCY.match(m) for m in metrics_of(p))]
    decode = [p for p in panels if any(DECODE_LATENCY.match(m) for m in metrics_of(p))]
    for p in prefill:
        if p in decode:
            problems.append(f"panel {p['title']!r} mixes prefill and decode latency")
    if not any(p["gridPos"]["y"] == d["gridPos"]["y"] for p in prefill for d in decode):
        problems.append("no prefill latency panel sits beside a decode latency panel")
    return problems


def utilisation_problems(dash: Dashboard) -> list[str]:
    words = (*UTILISATION_WORDS, "node_")
    return [
        f"{where}: {expr!r} looks at utilisation; pools scale on queues and KV pressure"
        for where, expr in queries(dash)
        if any(w in expr.lower() for w in words)
    ]
