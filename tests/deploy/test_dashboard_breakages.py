"""Each dashboard check must notice the breakage it exists for: a copy of
deploy/grafana/splitserve.json broken one edit at a time, and the check
that must report it."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.dashboard import (
    Dashboard,
    all_panels,
    area_problems,
    datasource_problems,
    description_problems,
    shape_problems,
    utilisation_problems,
)
from tests.dashboard_series import Exported, label_problems, metric_problems, pooling_problems

# One edit each, and the check that must notice it.


def _first(dash: Dashboard, kind: str = "timeseries") -> dict[str, Any]:
    return next(p for p in all_panels(dash) if p.get("type") == kind)


def _with_expr(dash: Dashboard, old: str, new: str) -> None:
    for p in all_panels(dash):
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
