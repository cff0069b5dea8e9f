"""Every query of deploy/grafana/splitserve.json against the registries the
router and the workers really build: each metric is exported under that
name, each label a query matches or groups by exists on that metric, and no
aggregation adds the pools together."""

from __future__ import annotations

from tests.dashboard import Dashboard
from tests.dashboard_series import Exported, label_problems, metric_problems, pooling_problems


def test_every_metric_queried_is_exported(dashboard: Dashboard, exported: Exported) -> None:
    assert metric_problems(dashboard, exported) == []


def test_every_label_queried_exists_on_its_metric(dashboard: Dashboard, exported: Exported) -> None:
    assert label_problems(dashboard, exported) == []


def test_pools_are_never_added_together(dashboard: Dashboard, exported: Exported) -> None:
    assert pooling_problems(dashboard, exported) == []
