"""How a PromQL expression combines a metric across replicas, read from the expression's text.

Enough of PromQL for the shipped alert rules and dashboard queries (docs/metrics.md, "Several
replicas"): where a metric is named, which aggregation operator encloses it and whether that
aggregation keeps the `instance` label. Label matchers and quoted strings are blanked out first,
so that a metric name inside a matcher or a legend is not taken for a selector. Not a parser:
an expression it cannot read the way it expects is reported as a violation, never passed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile"}
)
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_MODIFIER = re.compile(r"\s*(by|without)\s*\(([^()]*)\)")


@dataclass(frozen=True, slots=True)
class Use:
    """One place an expression names a metric, and how it is combined there.

    `operator` is the innermost aggregation whose argument holds the selector (None: no
    aggregation encloses it); `sole` says whether the selector is that aggregation's whole
    argument (``max by (team) (llm_team_spend{...})``) rather than part of a larger expression
    inside it; `keeps_instance` whether that aggregation's grouping keeps ``instance``, so that
    it combines nothing across replicas.
    """

    metric: str
    operator: str | None
    sole: bool
    keeps_instance: bool

    @property
    def across_replicas(self) -> bool:
        """Whether this use combines series of different replicas."""
        return self.operator is not None and not self.keeps_instance


def blank(expr: str) -> str:
    """`expr` with the insides of quoted strings, ``{...}`` matchers and ``[...]`` ranges
    replaced by spaces, so that positions stay the same."""
    out = list(expr)
    index = 0
    while index < len(expr):
        char = expr[index]
        if char in "\"'`":
            end = index + 1
            while end < len(expr) and expr[end] != char:
                end += 2 if expr[end] == "\\" else 1
            out[index + 1 : end] = " " * (end - index - 1)
            index = end + 1
        elif char in "{[":
            closing = "}" if char == "{" else "]"
            end = index + 1
            while expr[end] != closing:
                if expr[end] in "\"'":
                    quote = expr[end]
                    end += 1
                    while expr[end] != quote:
                        end += 2 if expr[end] == "\\" else 1
                end += 1
            out[index + 1 : end] = " " * (end - index - 1)
            index = end + 1
        else:
            index += 1
    return "".join(out)


def _enclosing(text: str, position: int) -> list[tuple[int, int]]:
    """The (open, close) positions of the parentheses around `position`, innermost first."""
    stack: list[int] = []
    pairs: list[tuple[int, int]] = []
    for index, char in enumerate(text):
        if char == "(":
            stack.append(index)
        elif char == ")":
            opened = stack.pop()
            if opened < position < index:
                pairs.append((opened, index))
    return sorted(pairs, key=lambda pair: pair[1] - pair[0])


def _word_before(text: str, index: int) -> tuple[str, int]:
    """The identifier that ends right before `index` (spaces skipped), and where it starts."""
    end = index
    while end > 0 and text[end - 1].isspace():
        end -= 1
    start = end
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_:"):
        start -= 1
    return text[start:end], start


def _aggregation(text: str, opened: int, closed: int) -> tuple[str, list[str], bool] | None:
    """If the parentheses (opened, closed) hold an aggregation's argument: its operator, its
    grouping labels and whether the grouping is ``without``; else None (a function call, a
    grouping of arithmetic, or a ``by``/``on`` label list)."""
    word, _ = _word_before(text, opened)
    labels: list[str] = []
    without = False
    if not word:
        # `max by (team) (x)`: the argument follows the modifier.
        before = opened
        while before > 0 and text[before - 1].isspace():
            before -= 1
        if before == 0 or text[before - 1] != ")":
            return None
        inner_close = before - 1
        inner_open = text.rindex("(", 0, inner_close)
        modifier, modifier_start = _word_before(text, inner_open)
        if modifier not in ("by", "without"):
            return None
        word, _ = _word_before(text, modifier_start)
        labels = [label.strip() for label in text[inner_open + 1 : inner_close].split(",")]
        without = modifier == "without"
    if word not in AGGREGATIONS:
        return None
    after = _MODIFIER.match(text, closed + 1)
    if after is not None:  # `max (x) by (team)`
        labels = [label.strip() for label in after[2].split(",")]
        without = after[1] == "without"
    return word, [label for label in labels if label], without


def uses(expr: str, metrics: frozenset[str]) -> list[Use]:
    """Every place `expr` selects one of `metrics`, with how it is combined there."""
    text = blank(expr)
    found: list[Use] = []
    for match in _NAME.finditer(text):
        metric = match[0]
        if metric not in metrics:
            continue
        operator: str | None = None
        sole = False
        keeps_instance = False
        for opened, closed in _enclosing(text, match.start()):
            aggregation = _aggregation(text, opened, closed)
            if aggregation is None:
                continue
            operator, labels, without = aggregation
            argument = text[opened + 1 : closed]
            if operator in ("topk", "bottomk", "quantile", "count_values"):
                argument = argument.split(",", 1)[-1]
            sole = re.fullmatch(rf"\s*{metric}\s*(\{{\s*\}}|\[\s*\])?\s*", argument) is not None
            keeps_instance = ("instance" not in labels) if without else ("instance" in labels)
            break
        found.append(Use(metric, operator, sole, keeps_instance))
    return found


@dataclass(frozen=True, slots=True)
class Rule:
    """How a metric may be combined across replicas (docs/metrics.md, "Several replicas")."""

    operators: frozenset[str]
    """The aggregations that may combine series of different replicas."""
    per_instance: bool
    """Whether it may be used replica by replica: bare, or grouped by ``instance``."""
    sole: bool
    """Whether an aggregation over replicas must take the selector alone (a gauge: its
    replicas' series must be combined before anything else is done with them)."""


def violations(expr: str, rules: dict[str, Rule]) -> list[str]:
    """What in `expr` combines a metric across replicas otherwise than `rules` say."""
    found = []
    for use in uses(expr, frozenset(rules)):
        rule = rules[use.metric]
        if not use.across_replicas:
            if not rule.per_instance:
                how = "bare" if use.operator is None else f"{use.operator} by instance"
                found.append(f"{use.metric}: used per replica ({how})")
        elif use.operator not in rule.operators:
            found.append(f"{use.metric}: combined across replicas with {use.operator}")
        elif rule.sole and not use.sole:
            found.append(f"{use.metric}: {use.operator} over more than the metric itself")
    return found
