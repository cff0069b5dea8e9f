"""The PromQL reader the dashboard checks rely on (tests/promql.py): what it
finds in a query, and that it refuses what it cannot read."""

from __future__ import annotations

import pytest

from tests.promql import parse_promql


def test_the_parser_reads_selectors_and_groupings() -> None:
    q = parse_promql(
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
            parse_promql(bad)
