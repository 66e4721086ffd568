"""The Grafana dashboard's PromQL, read for the tests: its expressions and the metrics they select.

:func:`dashboard_exprs` collects every query of docker/grafana/dashboards/protoswarm.json (panel targets,
row panels' nested panels included, and the template variables' ``label_values`` selectors) with
Grafana's variables replaced by concrete values, so each one is plain PromQL that ``promtool`` or a
real Prometheus accepts. :func:`referenced_metrics` finds the metric names an expression selects, and
:func:`base_metric` maps such a series name to its row in the metric catalogue (docs/metrics.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "protoswarm.json"
CATALOGUE = REPO / "docs" / "metrics.md"

# Series that Prometheus itself adds to every scrape target; a dashboard may select them too.
SCRAPE_SERIES = frozenset({
    "up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
})

# Concrete values for Grafana's variables: the built-in intervals, and the dashboard's own variables at
# their defaults (`instance` is matched with =~, so ".*" is "All").
VARIABLE_VALUES = {
    "__rate_interval": "1m", "__interval": "1m", "__range": "1m",
    "job": "protoswarm", "instance": ".*",
}

# Identifiers that are PromQL keywords or operators, never metric names (compared in lower case).
KEYWORDS = frozenset({
    "sum", "avg", "max", "min", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "count_values",
    "group", "limitk", "limit_ratio", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "and", "or", "unless", "atan2", "inf", "nan",
})
# Keywords followed by a parenthesised list of label names, not of expressions.
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})

_ROW_RE = re.compile(r"^\|\s*`(protoswarm_[a-z0-9_]+)`\s*\|\s*([^|]*?)\s*\|", re.MULTILINE)
_VARIABLE_RE = re.compile(r"\[\[(\w+)(?::\w+)?\]\]|\$\{(\w+)(?::[^}]*)?\}|\$(\w+)")
_LABEL_VALUES_RE = re.compile(r"^\s*label_values\s*\((.*),\s*([A-Za-z_]\w*)\s*\)\s*$", re.DOTALL)
_NAME_MATCHER_RE = re.compile(r"""__name__\s*=\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')""")
_IDENT_START = re.compile(r"[A-Za-z_:]")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)[A-Za-z0-9_.]*")


def catalogue_metrics(path: Path = CATALOGUE) -> dict[str, str]:
    """Metric name → type ("gauge", "counter", "histogram", "info") from the table in docs/metrics.md.

    The type is the first word of the table's Type cell (``info (gauge = 1)`` is "info").
    """
    metrics = {}
    for name, kind in _ROW_RE.findall(path.read_text()):
        words = kind.split()
        metrics[name] = words[0].lower() if words else ""
    return metrics


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


def substitute_variables(expr: str, values: dict[str, str] = VARIABLE_VALUES) -> str:
    """Replace Grafana's ``$var``, ``${var}``, ``${var:format}`` and ``[[var]]`` with concrete values."""
    def value(match: re.Match) -> str:
        name = next(g for g in match.groups() if g is not None)
        if name not in values:
            raise ValueError(f"no value for Grafana variable {name!r} in {expr!r}")
        return values[name]
    return _VARIABLE_RE.sub(value, expr)


def dashboard_exprs(path: Path = DASHBOARD, substitute: bool = True) -> dict[str, str]:
    """Every PromQL expression of the dashboard, keyed "panel title / refId" ("var NAME" for variables;
    a repeated title gets " (panel ID)" added).

    A template variable's ``label_values(selector, label)`` query gives its inner series selector.
    With ``substitute``, Grafana variables are replaced (see ``VARIABLE_VALUES``).
    """
    dashboard = json.loads(path.read_text())
    exprs: dict[str, str] = {}

    def add(key: str, expr: str, panel_id: object = None) -> None:
        if key in exprs:  # two panels with one title: tell them apart by id
            key = f"{key} (panel {panel_id})"
        exprs[key] = substitute_variables(expr) if substitute else expr

    for panel in _panels(dashboard.get("panels") or []):
        for target in panel.get("targets") or []:
            if target.get("expr"):
                add(f"{panel.get('title', '')} / {target.get('refId', '')}", target["expr"], panel.get("id"))
    for variable in dashboard.get("templating", {}).get("list") or []:
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if not query:
            continue
        match = _LABEL_VALUES_RE.match(query)
        add(f"var {variable['name']}", match.group(1).strip() if match else query)
    return exprs


def _skip_string(expr: str, i: int) -> int:
    """Index just past the string literal that starts at ``expr[i]``."""
    quote, i = expr[i], i + 1
    while i < len(expr):
        if expr[i] == "\\" and quote != "`":
            i += 2
            continue
        if expr[i] == quote:
            return i + 1
        i += 1
    raise ValueError(f"unterminated string in {expr!r}")


def _skip_until(expr: str, i: int, close: str) -> int:
    """Index just past the ``close`` that ends the bracket opened at ``expr[i]``, strings skipped."""
    i += 1
    while i < len(expr):
        if expr[i] in "\"'`":
            i = _skip_string(expr, i)
            continue
        if expr[i] == close:
            return i + 1
        i += 1
    raise ValueError(f"unclosed {expr[i - 1] if i else ''!r}…{close!r} in {expr!r}")


def _next_char(expr: str, i: int) -> str:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return expr[i] if i < len(expr) else ""


def referenced_metrics(expr: str) -> set[str]:
    """The metric names an expression selects: bare selector names and ``{__name__="…"}`` matchers.

    A small tokenizer, not a parser: it skips string literals, comments, ``{…}`` label matchers,
    ``[…]`` ranges, numbers and durations, function names (an identifier before ``(``), label lists
    after by/without/on/ignoring/group_left/group_right, and keywords; the identifiers left are metrics.
    """
    names: set[str] = set()
    i = 0
    while i < len(expr):
        c = expr[i]
        if c.isspace():
            i += 1
        elif c in "\"'`":
            i = _skip_string(expr, i)
        elif c == "#":
            end = expr.find("\n", i)
            i = len(expr) if end < 0 else end
        elif c == "{":
            end = _skip_until(expr, i, "}")
            for double, single in _NAME_MATCHER_RE.findall(expr[i:end]):
                names.add(double or single)
            i = end
        elif c == "[":
            i = _skip_until(expr, i, "]")
        elif c.isdigit() or (c == "." and i + 1 < len(expr) and expr[i + 1].isdigit()):
            i = _NUMBER.match(expr, i).end()
        elif _IDENT_START.match(c):
            ident = _IDENT.match(expr, i).group()
            i += len(ident)
            word = ident.lower()
            follows = _next_char(expr, i)
            if word in LABEL_LIST_KEYWORDS:
                if follows == "(":
                    i = _skip_until(expr, expr.index("(", i), ")")
            elif word in KEYWORDS or follows == "(":
                continue  # a keyword, an aggregation or a function
            else:
                names.add(ident)
        else:
            i += 1  # operators, parentheses, commas, @
    return names


def base_metric(name: str, catalogue: dict[str, str]) -> str | None:
    """The catalogue metric that series ``name`` belongs to, or None when there is none.

    Gauges, info metrics and counters (whose catalogue names end in ``_total``) match as written; a
    histogram only through its ``_bucket``/``_sum``/``_count``/``_created`` series; ``X_created`` is
    also the created series of counter ``X_total``.
    """
    kind = catalogue.get(name)
    if kind is not None and kind != "histogram":
        return name
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        if name.endswith(suffix):
            base = name.removesuffix(suffix)
            if catalogue.get(base) == "histogram":
                return base
    if name.endswith("_created") and catalogue.get(name.removesuffix("_created") + "_total") == "counter":
        return name.removesuffix("_created") + "_total"
    return None
