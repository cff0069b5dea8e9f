"""Enough of PromQL to check a dashboard's queries: an expression's series
selectors (metric and label matchers), its aggregations (with their by or
without labels and the selectors inside them), and the labels of its vector
matching. Anything it does not know is an error, not a guess."""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def parse_promql(expr: str) -> Query:
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
