"""deploy/grafana/splitserve.json's shape (unique panels on the 24-column
grid, the templated Prometheus data source), its panels' descriptions, and
the areas it must show (latency per pool, batch size, queues, KV usage and
transfer, throughput, tokens per dollar, reliability), never utilisation.
No Grafana is needed: the file is read with json.loads."""

from __future__ import annotations

from tests.dashboard import (
    Dashboard,
    area_problems,
    datasource_problems,
    description_problems,
    shape_problems,
    utilisation_problems,
)


def test_dashboard_has_unique_panels_on_the_grid(dashboard: Dashboard) -> None:
    assert shape_problems(dashboard) == []


def test_every_panel_queries_the_templated_prometheus(dashboard: Dashboard) -> None:
    assert datasource_problems(dashboard) == []


def test_every_panel_says_what_it_shows_and_what_is_bad(dashboard: Dashboard) -> None:
    assert description_problems(dashboard) == []


def test_each_required_area_has_panels(dashboard: Dashboard) -> None:
    assert area_problems(dashboard) == []


def test_no_query_looks_at_utilisation(dashboard: Dashboard) -> None:
    assert utilisation_problems(dashboard) == []
