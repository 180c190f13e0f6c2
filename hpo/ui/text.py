"""A study's results as text: numbers short enough for a table, aligned columns, the summary that
`hpo run`, `hpo best` and hpo.run() print. No optuna: the read-only commands print from SQL."""

from __future__ import annotations

import math
from typing import Any

from hpo.search.records import Summary


def fmt(value: Any) -> str:
    """Numbers short enough for a table: 4 significant digits, no trailing zeros."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value.is_integer() and abs(value) >= 1e4 and abs(value) < 1e15:
            return str(int(value))  # a count (n_params) stays a count
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return "-" if value is None else str(value)


def render_summary(summary: Summary, elapsed: float | None = None) -> str:
    c = summary.counts
    parts = [f"{c[k]} {k.lower()}" for k in ("COMPLETE", "PRUNED", "FAIL", "RESUMED", "RUNNING", "WAITING") if c.get(k)]
    took = f" in {elapsed:.1f} s" if elapsed is not None else ""
    lines = [f"Study {summary.name}: {sum(c.values())} trials ({', '.join(parts) or 'none yet'}){took}"]
    if summary.multi_objective:
        return "\n".join(lines + render_front(summary))
    if summary.best_number is None:
        lines.append("No trial has completed yet.")
        return "\n".join(lines)
    lines.append(f"Best trial #{summary.best_number}: {summary.metric} {fmt(summary.best_value)}")
    width = max((len(k) for k in summary.best_params), default=0)
    lines += [f"  {k:<{width}}  {fmt(v)}" for k, v in summary.best_params.items()]
    if summary.test:
        t = summary.test
        lines.append(f"Test {t['metric'].removeprefix('test_')} of the best model: {fmt(t['value'])}")
        if t.get("model_path"):
            lines.append(f"Best model: {t['model_path']}")
    return "\n".join(lines)


def render_front(summary: Summary) -> list[str]:
    """The Pareto front as a table: objectives, constrained metrics, test scores, parameters."""
    if not summary.front:
        return ["No feasible trial has completed yet: the front is empty."]
    goals = ", ".join(f"{n} ({d[:3]})" for n, d in summary.objectives)
    head = [f"Pareto front: {len(summary.front)} trials ({goals}); no other trial beats one of them on every objective"]
    params = list(dict.fromkeys(k for t in summary.front for k in t.params))
    measured = list(dict.fromkeys(k for t in summary.front for k in t.measured))
    tests = list(dict.fromkeys(m for t in summary.front if t.test for m in [t.test["metric"]]))
    rows = [["trial", *(n for n, _ in summary.objectives), *measured, *tests, *params]]
    for t in summary.front:
        rows.append([f"#{t.number}", *(fmt(v) for v in t.values.values()), *(fmt(t.measured.get(m)) for m in measured),
                     *(fmt(t.test["value"]) if t.test and t.test["metric"] == m else "-" for m in tests),
                     *(fmt(t.params.get(p)) for p in params)])
    return head + table_lines(rows)


def table_lines(rows: list[list[str]]) -> list[str]:
    """Rows of text as aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
