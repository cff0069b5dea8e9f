"""deploy/grafana/splitserve.json, checked against the metrics the code exports.

No Grafana or Prometheus is needed. The tests read the dashboard with
json.loads, check its shape (panels, ids, the 24-column grid, the templated
data source), then parse every PromQL query into its series selectors and
aggregations and check them against the registries the router and the
workers really build: every metric is exported under that name, every label
a query matches or groups by exists on that metric, and no aggregation adds
prefill, decode and colocated together.

Each check returns its problems as a list; the last test breaks a copy of the
dashboard one edit at a time and expects each check to notice.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import ProcessCollector

from deploy.config import UTILISATION_WORDS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "splitserve.json"

GRID_COLUMNS = 24
DATASOURCE = "datasource"  # the templated data source variable's name
DATASOURCE_UIDS = {"${datasource}", "$datasource"}
# Prometheus adds these to every scraped series; no registry has them.
SCRAPE_LABELS = {"instance", "job"}
# The labels that keep the pools apart: workers' role, the router's pool gauges.
POOL_LABELS = ("role", "pool")

AGGREGATIONS = {
    "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar",
    "topk", "bottomk", "quantile", "count_values",
}  # fmt: skip
FUNCTIONS = {
    "rate", "irate", "increase", "delta", "idelta", "deriv", "predict_linear",
    "histogram_quantile", "avg_over_time", "max_over_time", "min_over_time",
    "sum_over_time", "count_over_time", "last_over_time", "clamp", "clamp_min",
    "clamp_max", "abs", "ceil", "floor", "round", "scalar", "vector", "time",
    "absent", "label_replace", "label_join", "sort", "sort_desc",
}  # fmt: skip
KEYWORDS = {"and", "or", "unless", "bool", "offset"}
MATCHING = {"on", "ignoring", "group_left", "group_right"}

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
# Series name -> label name -> the values seen (empty where no child exists yet).
Exported = dict[str, dict[str, set[str]]]


# -- what the processes export -------------------------------------------------

# The series each metric type puts in Prometheus (the "_created" ones left out).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _exported() -> Exported:
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


@pytest.fixture(scope="module")
def exported() -> Exported:
    return _exported()


@pytest.fixture(scope="module")
def dashboard() -> Dashboard:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict), "the dashboard is a JSON object"
    return loaded


# -- reading PromQL --------------------------------------------------------------

TOKEN = re.compile(
    r"""\s+
    | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<range>\[[^\]]*\])
    | (?P<num>\d[\w.]*)
    | (?P<id>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>{}(),])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)
    at: int  # token index


@dataclass(frozen=True)
class Aggregation:
    op: str
    clause: str | None  # "by", "without" or None
    labels: tuple[str, ...]
    span: tuple[int, int]  # token indices of its argument's parentheses


@dataclass(frozen=True)
class Query:
    selectors: tuple[Selector, ...]
    aggregations: tuple[Aggregation, ...]
    matching: tuple[str, ...]  # labels in on(...), ignoring(...), group_left(...)

    def inside(self, agg: Aggregation) -> list[Selector]:
        return [s for s in self.selectors if agg.span[0] < s.at < agg.span[1]]


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read {expr[pos:]!r} in {expr!r}")
        if m.lastgroup:
            out.append((m.lastgroup, m.group()))
        pos = m.end()
    return out


def _parse(expr: str) -> Query:
    """The selectors and aggregations of a PromQL expression. Enough of the
    grammar for dashboards: anything it does not know is an error."""
    toks = _tokens(expr)
    closing: dict[int, int] = {}
    stack: list[int] = []
    for i, (_, tok) in enumerate(toks):
        if tok == "(":
            stack.append(i)
        elif tok == ")":
            if not stack:
                raise ValueError(f"unbalanced ')' in {expr!r}")
            closing[stack.pop()] = i
    if stack:
        raise ValueError(f"unbalanced '(' in {expr!r}")

    def text(i: int) -> str:
        return toks[i][1] if i < len(toks) else ""

    def label_list(i: int) -> tuple[tuple[str, ...], int]:
        """Labels of the list opening at token i; the index after it."""
        if text(i) != "(":
            raise ValueError(f"expected a label list at {text(i)!r} in {expr!r}")
        inner = [t for _, t in toks[i + 1 : closing[i]] if t != ","]
        return tuple(inner), closing[i] + 1

    selectors: list[Selector] = []
    aggregations: list[Aggregation] = []
    matching: list[str] = []
    skip: set[int] = set()
    i = 0
    while i < len(toks):
        kind, word = toks[i]
        if i in skip or kind != "id":
            if word == "{" and i not in skip:
                raise ValueError(f"a selector without a metric name in {expr!r}")
            i += 1
            continue
        if word in AGGREGATIONS and text(i + 1) in ("(", "by", "without"):
            clause: str | None = None
            labels: tuple[str, ...] = ()
            j = i + 1
            if text(j) in ("by", "without"):
                clause = text(j)
                labels, j = label_list(j + 1)
            if text(j) != "(":
                raise ValueError(f"{word} without an argument in {expr!r}")
            end = closing[j]
            if clause is None and text(end + 1) in ("by", "without"):
                clause = text(end + 1)
                labels, after = label_list(end + 2)
                skip.update(range(end + 1, after))
            aggregations.append(Aggregation(word, clause, labels, (j, end)))
            i = j + 1
        elif word in MATCHING:
            if text(i + 1) == "(":
                labels, after = label_list(i + 1)
                matching.extend(labels)
                skip.update(range(i + 1, after))
            i += 1
        elif text(i + 1) == "(":
            if word not in FUNCTIONS:
                raise ValueError(f"unknown function {word}() in {expr!r}")
            i += 1
        elif word in KEYWORDS or word in ("by", "without"):
            i += 1
        else:
            matchers: list[tuple[str, str, str]] = []
            j = i + 1
            if text(j) == "{":
                j += 1
                while text(j) != "}":
                    label, op, value = text(j), text(j + 1), text(j + 2)
                    if op not in ("=", "!=", "=~", "!~") or toks[j + 2][0] != "str":
                        raise ValueError(f"bad matcher {label}{op}{value} in {expr!r}")
                    matchers.append((label, op, value[1:-1]))
                    j += 3
                    if text(j) == ",":
                        j += 1
                skip.update(range(i + 1, j + 1))
            selectors.append(Selector(word, tuple(matchers), i))
            i += 1
    return Query(tuple(selectors), tuple(aggregations), tuple(matching))


# -- walking the dashboard -------------------------------------------------------


def _panels(dash: Dashboard) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dash.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def _queries(dash: Dashboard) -> Iterator[tuple[str, str]]:
    """(where, expr) for every query a panel runs."""
    for panel in _panels(dash):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r} {target.get('refId')}", target.get("expr", "")


def _variable_metrics(dash: Dashboard) -> Iterator[tuple[str, str, str]]:
    """(variable, metric, label) for every label_values(metric, label) variable."""
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for metric, label in re.findall(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", query):
            yield var["name"], metric, label


def _metrics_of(panel: dict[str, Any]) -> set[str]:
    return {s.metric for t in panel.get("targets", []) for s in _parse(t["expr"]).selectors}


# -- the checks (each returns its problems) --------------------------------------


def shape_problems(dash: Dashboard) -> list[str]:
    problems = []
    for key in ("title", "uid"):
        if not isinstance(dash.get(key), str) or not dash[key]:
            problems.append(f"no {key}")
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        problems.append(f"schemaVersion {dash.get('schemaVersion')!r}: want 36 or later")
    panels = list(_panels(dash))
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
    for p in _panels(dash):
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
    for p in _panels(dash):
        if p.get("type") == "row":
            continue
        text = (p.get("description") or "").strip()
        if len(re.findall(r"[.!?:](\s|$)", text)) < 2 or len(text) < 80:
            problems.append(f"panel {p.get('title')!r}: description {text!r} is too thin")
    return problems


def metric_problems(dash: Dashboard, exported: Exported) -> list[str]:
    problems = []
    for where, expr in _queries(dash):
        try:
            query = _parse(expr)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if not query.selectors:
            problems.append(f"{where}: no metric in {expr!r}")
        for s in query.selectors:
            if s.metric not in exported:
                problems.append(f"{where}: {s.metric} is not exported by any process")
    for var, metric, _ in _variable_metrics(dash):
        if metric not in exported:
            problems.append(f"variable {var}: {metric} is not exported by any process")
    return problems


def label_problems(dash: Dashboard, exported: Exported) -> list[str]:
    problems = []

    def has(metric: str, label: str) -> bool:
        return label in SCRAPE_LABELS or label in exported.get(metric, {label: set()})

    for where, expr in _queries(dash):
        try:
            query = _parse(expr)
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
    for var, metric, label in _variable_metrics(dash):
        if not has(metric, label):
            problems.append(f"variable {var}: {metric} has no label {label}")
    return problems


def pooling_problems(dash: Dashboard, exported: Exported) -> list[str]:
    """An aggregation over a metric labelled by pool keeps that label, unless
    every such selector pins it to one value."""
    problems = []
    for where, expr in _queries(dash):
        try:
            query = _parse(expr)
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


def area_problems(dash: Dashboard) -> list[str]:
    problems = []
    panels = [p for p in _panels(dash) if p.get("type") != "row"]
    used: set[str] = set()
    for p in panels:
        used |= _metrics_of(p)
    for area, metrics in AREAS.items():
        if missing := metrics - used:
            problems.append(f"no panel for {area}: {sorted(missing)} unused")
    if not any(
        {"splitserve_engine_batch_size_sum", "splitserve_engine_batch_size_count"}
        <= {s.metric for s in _parse(t["expr"]).selectors}
        for p in panels
        for t in p.get("targets", [])
    ):
        problems.append("no query divides the batch-size sum by its count")
    # Prefill and decode latency in panels of their own, side by side.
    prefill = [p for p in panels if any(PREFILL_LATENCY.match(m) for m in _metrics_of(p))]
    decode = [p for p in panels if any(DECODE_LATENCY.match(m) for m in _metrics_of(p))]
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
        for where, expr in _queries(dash)
        if any(w in expr.lower() for w in words)
    ]


# -- the tests -------------------------------------------------------------------


def test_dashboard_has_unique_panels_on_the_grid(dashboard: Dashboard) -> None:
    assert shape_problems(dashboard) == []


def test_every_panel_queries_the_templated_prometheus(dashboard: Dashboard) -> None:
    assert datasource_problems(dashboard) == []


def test_every_panel_says_what_it_shows_and_what_is_bad(dashboard: Dashboard) -> None:
    assert description_problems(dashboard) == []


def test_every_metric_queried_is_exported(dashboard: Dashboard, exported: Exported) -> None:
    assert metric_problems(dashboard, exported) == []


def test_every_label_queried_exists_on_its_metric(dashboard: Dashboard, exported: Exported) -> None:
    assert label_problems(dashboard, exported) == []


def test_pools_are_never_added_together(dashboard: Dashboard, exported: Exported) -> None:
    assert pooling_problems(dashboard, exported) == []


def test_each_required_area_has_panels(dashboard: Dashboard) -> None:
    assert area_problems(dashboard) == []


def test_no_query_looks_at_utilisation(dashboard: Dashboard) -> None:
    assert utilisation_problems(dashboard) == []


def test_the_parser_reads_selectors_and_groupings() -> None:
    q = _parse(
        'histogram_quantile(0.95, sum by (le, role) (rate(a_bucket{role=~"$role"}[5m])))'
        " / on(role) group_left sum(b_total) by (role) > bool 0"
    )
    assert [(s.metric, s.matchers) for s in q.selectors] == [
        ("a_bucket", (("role", "=~", "$role"),)),
        ("b_total", ()),
    ]
    assert [(a.op, a.clause, a.labels) for a in q.aggregations] == [
        ("sum", "by", ("le", "role")),
        ("sum", "by", ("role",)),
    ]
    assert [s.metric for s in q.inside(q.aggregations[0])] == ["a_bucket"]
    assert q.matching == ("role",)
    for bad in ("nosuchfunc(a)", "sum(a", '{__name__="a"}', "a{role~'x'}"):
        with pytest.raises(ValueError):
            _parse(bad)


# One edit each, and the check that must notice it.


def _first(dash: Dashboard, kind: str = "timeseries") -> dict[str, Any]:
    return next(p for p in _panels(dash) if p.get("type") == kind)


def _with_expr(dash: Dashboard, old: str, new: str) -> None:
    for p in _panels(dash):
        for t in p.get("targets", []):
            t["expr"] = t["expr"].replace(old, new)


def _set(path: str, value: Any) -> Callable[[Dashboard], None]:
    def edit(dash: Dashboard) -> None:
        *keys, last = path.split(".")
        node: Any = _first(dash)
        for key in keys:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value

    return edit


def _expr(old: str, new: str) -> Callable[[Dashboard], None]:
    return lambda dash: _with_expr(dash, old, new)


def _drop_panels(pattern: str) -> Callable[[Dashboard], None]:
    def edit(dash: Dashboard) -> None:
        dash["panels"] = [
            p
            for p in dash["panels"]
            if not any(re.search(pattern, t["expr"]) for t in p.get("targets", []))
        ]

    return edit


def _edit_variable(dash: Dashboard) -> None:
    dash["templating"]["list"][0]["type"] = "custom"


def _clash_ids(dash: Dashboard) -> None:
    dash["panels"][2]["id"] = dash["panels"][1]["id"]


def _overlap(dash: Dashboard) -> None:
    dash["panels"][2]["gridPos"] = dict(dash["panels"][1]["gridPos"])


def _no_uid(dash: Dashboard) -> None:
    del dash["uid"]


Check = Callable[[Dashboard, Exported], list[str]]
BREAKAGES: list[tuple[str, Callable[[Dashboard], None], Check]] = [
    ("duplicate id", _clash_ids, lambda d, e: shape_problems(d)),
    ("overlapping panels", _overlap, lambda d, e: shape_problems(d)),
    ("past column 24", _set("gridPos.x", 20), lambda d, e: shape_problems(d)),
    ("no uid", _no_uid, lambda d, e: shape_problems(d)),
    ("no type", _set("type", ""), lambda d, e: shape_problems(d)),
    (
        "fixed datasource",
        _set("datasource", {"type": "prometheus", "uid": "prom1"}),
        lambda d, e: datasource_problems(d),
    ),
    ("no datasource variable", _edit_variable, lambda d, e: datasource_problems(d)),
    ("empty expr", _set("targets.0.expr", " "), lambda d, e: datasource_problems(d)),
    ("no description", _set("description", ""), lambda d, e: description_problems(d)),
    (
        "misspelt metric",
        _expr("splitserve_waiting_requests", "splitserve_waiting_reqs"),
        metric_problems,
    ),
    (
        "counter without _total",
        _expr("splitserve_preemptions_total", "splitserve_preemptions"),
        metric_problems,
    ),
    (
        "gauge as histogram",
        _expr("splitserve_kv_blocks_free", "splitserve_kv_blocks_free_bucket"),
        metric_problems,
    ),
    (
        "label on the wrong metric",
        _expr(
            "sum by (reason) (rate(splitserve_router_retries",
            "sum by (role) (rate(splitserve_router_retries",
        ),
        label_problems,
    ),
    (
        "matcher on a missing label",
        _expr("splitserve_pool_cost_dollars{pool=", "splitserve_pool_cost_dollars{role="),
        label_problems,
    ),
    ("a role nobody has", _expr('role="prefill"', 'role="prefil"'), label_problems),
    (
        "pools summed",
        _expr("sum by (role) (splitserve_waiting_requests", "sum(splitserve_waiting_requests"),
        pooling_problems,
    ),
    (
        "pools summed in a quantile",
        _expr(
            "sum by (le, role) (rate(splitserve_decode_tpot",
            "sum by (le) (rate(splitserve_decode_tpot",
        ),
        pooling_problems,
    ),
    (
        "no KV transfer panel",
        _drop_panels("splitserve_kv_transfer_bytes"),
        lambda d, e: area_problems(d),
    ),
    (
        "no prefill latency panel",
        _drop_panels("splitserve_prefill_compute"),
        lambda d, e: area_problems(d),
    ),
    (
        "no tokens per dollar",
        _drop_panels("splitserve_pool_tokens_per_dollar"),
        lambda d, e: area_problems(d),
    ),
    (
        "utilisation",
        _expr("splitserve_running_requests", "node_cpu_seconds_total"),
        lambda d, e: utilisation_problems(d),
    ),
]


@pytest.mark.parametrize(
    ("edit", "check"), [b[1:] for b in BREAKAGES], ids=[b[0] for b in BREAKAGES]
)
def test_each_check_notices_a_broken_dashboard(
    dashboard: Dashboard, exported: Exported, edit: Callable[[Dashboard], None], check: Check
) -> None:
    assert check(dashboard, exported) == [], "the shipped dashboard must pass first"
    broken = copy.deepcopy(dashboard)
    edit(broken)
    assert broken != dashboard, "the edit changed nothing"
    assert check(broken, exported), "the check missed the edit"
