"""hpo's study summary pages, served beside optuna-dashboard by `hpo dashboard` (/hpo/).

optuna-dashboard sends every trial of a study to the browser on its first load and draws them
all: past about 10,000 trials the page does not open (optuna-dashboard#385). These pages ask the
database what they show, as the read-only commands do (hpo.search.reading): the counts, the best
trial, the best and the latest trials, the history binned to at most BINS columns and the
learning curves of the best CURVES trials. What a page weighs does not grow with the study, and
it refreshes itself every REFRESH seconds. Plain HTML and inline SVG: no script, nothing fetched
from elsewhere.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, unquote

from hpo import _private as sql
from hpo.errors import HpoError
from hpo.search import reading
from hpo.ui.text import fmt

BINS = 400  # columns of the history chart: each shows the lowest and highest value of its trials
CURVES = 8  # learning curves drawn: the best trials'
ROWS = 15  # trials listed: the best and the latest
REFRESH = 10  # seconds between a page's reloads
BIG = 10_000  # past this many trials, the index says that optuna-dashboard's page is slow to open

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

_STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 20px}
td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
h1{font-size:22px}h2{font-size:17px;margin-top:26px}.note{color:#666}svg{background:#fafafa;border:1px solid #ddd}"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='{REFRESH}'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>")


def index_page(conn: Any, url: str) -> str:
    """Every study, with its count and best value, linked to its summary and to optuna-dashboard."""
    rows = []
    for r in reading.study_rows(conn):
        if r.problem:
            rows.append(f"<tr><td class='l'>{html.escape(r.name)}</td><td class='l' colspan=3>{html.escape(r.problem)}</td></tr>")
            continue
        sid = reading.study_id(conn, r.name, url)
        slow = f" <span class='note'>(slow past {BIG:,} trials)</span>" if r.trials > BIG else ""
        rows.append(f"<tr><td class='l'><a href='/hpo/studies/{quote(r.name)}'>{html.escape(r.name)}</a></td>"
                    f"<td>{r.trials:,}</td><td>{fmt(r.best)}</td>"
                    f"<td class='l'><a href='/dashboard/studies/{sid}'>optuna-dashboard</a>{slow}</td></tr>")
    table = ("<table><tr><th class='l'>study</th><th>trials</th><th>best</th><th class='l'></th></tr>"
             + "".join(rows) + "</table>") if rows else "<p>No studies yet.</p>"
    return _page("hpo studies", f"<h1>Studies</h1>{table}<p class='note'>hpo's summaries read only what they show; "
                                f"<a href='/dashboard'>optuna-dashboard</a> has every trial.</p>")


def study_page(conn: Any, name: str, url: str) -> str:
    """One study: counts, the best trial, its history and curves, the best and latest trials."""
    sid = reading.study_id(conn, name, url)
    directions = sql.sql_directions(conn, sid)
    maximize = directions[0] == "maximize"
    counts = reading.state_counts(conn, sid)
    total = sum(sql.sql_state_counts(conn, sid).values())
    parts = [f"<h1>{html.escape(name)}</h1>",
             "<p>" + " &middot; ".join(f"{n:,} {state.lower()}" for state, n in counts.items()) + f" ({total:,} trials)</p>"]
    if not reading.simple(conn, sid, name):
        parts.append("<p class='note'>This study has several objectives or constraints: its best trials are on "
                     f"<a href='/dashboard/studies/{sid}'>optuna-dashboard</a> and in <code>hpo best</code>.</p>")
        return _page(name, "".join(parts))
    summary = reading.summary(conn, sid, name)
    if summary.best_number is not None:
        params = ", ".join(f"{html.escape(k)} {html.escape(fmt(v))}" for k, v in summary.best_params.items())
        parts.append(f"<p><b>Best trial #{summary.best_number}</b>: {html.escape(summary.metric)} "
                     f"{fmt(summary.best_value)} ({params})</p>")
    history = sql.sql_history(conn, sid)
    parts.append(f"<h2>{html.escape(summary.metric)} by trial ({summary.direction})</h2>"
                 + history_svg(history, maximize))
    names, best_rows = reading.trial_records(conn, sid, limit=ROWS, sort="value", maximize=maximize, state="COMPLETE")
    best = list(best_rows)
    drawn = curves_svg(reading.curves(conn, sid, [r["number"] for r in best[:CURVES]]))
    parts.append(f"<h2>Learning curves of the {min(CURVES, len(best))} best trials</h2>{drawn}")
    parts.append(f"<h2>The {len(best)} best trials</h2>{_table(best, names)}")
    latest_names, latest_rows = reading.trial_records(conn, sid, limit=ROWS, first=max(0, total - ROWS))
    latest = list(latest_rows)
    parts.append(f"<h2>The latest trials</h2>{_table(latest, latest_names)}")
    parts.append(f"<p class='note'>Every trial: <a href='/dashboard/studies/{sid}'>optuna-dashboard</a>"
                 f"{f' (slow past {BIG:,} trials)' if total > BIG else ''}, <code>hpo trials {html.escape(name)}</code>."
                 f" <a href='/hpo/'>All studies</a>.</p>")
    return _page(name, "".join(parts))


def _table(rows: list[dict[str, Any]], names: list[str]) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><td>{r['number']}</td><td class='l'>{r['state'].lower()}</td><td>{fmt(r['value'])}</td>"
        f"<td>{r['epochs']}</td>" + "".join(f"<td>{html.escape(fmt(r[f'params_{n}']))}</td>" for n in names) + "</tr>"
        for r in rows)
    return f"<table><tr><th>#</th><th class='l'>state</th><th>value</th><th>epochs</th>{head}</tr>{body}</table>"


W, H, PAD = 900, 260, 46


def _scale(lo: float, hi: float, to_lo: float, to_hi: float) -> Callable[[float], float]:
    span = (hi - lo) or 1.0
    return lambda v: round(to_lo + (v - lo) / span * (to_hi - to_lo), 1)


def _axes(xlo: float, xhi: float, ylo: float, yhi: float, y: Callable[[float], float], xlabel: str,
          right: float = W - 10) -> str:
    ticks = "".join(f"<text x='{PAD - 6}' y='{y(v) + 4:.0f}' text-anchor='end' font-size='11'>{html.escape(fmt(v))}</text>"
                    for v in (ylo + i * (yhi - ylo) / 4 for i in range(5)))
    return (f"<line x1='{PAD}' y1='{H - PAD}' x2='{right}' y2='{H - PAD}' stroke='#999'/>"
            f"<line x1='{PAD}' y1='10' x2='{PAD}' y2='{H - PAD}' stroke='#999'/>{ticks}"
            f"<text x='{PAD}' y='{H - PAD + 16}' font-size='11'>{fmt(xlo)}</text>"
            f"<text x='{right}' y='{H - PAD + 16}' font-size='11' text-anchor='end'>{fmt(xhi)}</text>"
            f"<text x='{(right + PAD) / 2:.0f}' y='{H - 8}' font-size='12' text-anchor='middle'>{html.escape(xlabel)}</text>")


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def history_svg(points: list[tuple[int, float]], maximize: bool) -> str:
    """Each complete trial's value by number, binned to BINS columns (each column's lowest and
    highest value), and the best so far as a line."""
    finite = [(n, v) for n, v in points if math.isfinite(v)]
    if not finite:
        return "<p class='note'>No complete trial yet.</p>"
    values = [v for _, v in finite]
    ylo, yhi = min(values), max(values)
    xlo, xhi = finite[0][0], max(finite[-1][0], finite[0][0] + 1)
    x, y = _scale(xlo, xhi, PAD, W - 10), _scale(ylo, yhi, H - PAD, 14)
    size = max(1, math.ceil(len(finite) / BINS))
    dots = []
    for i in range(0, len(finite), size):
        part = finite[i:i + size]
        for n, v in {min(part, key=lambda p: p[1]), max(part, key=lambda p: p[1])}:
            dots.append(f"<circle cx='{x(n)}' cy='{y(v)}' r='2' fill='#7aa6d6'/>")
    line, best = [], None
    for n, v in finite:
        if best is None or (v > best if maximize else v < best):
            if best is not None:
                line.append(f"{x(n)},{y(best)}")
            best = v
            line.append(f"{x(n)},{y(v)}")
    line.append(f"{x(xhi)},{y(best)}")  # type: ignore[arg-type]
    return (f"<svg width='{W}' height='{H}' role='img' aria-label='history'>{_axes(xlo, xhi, ylo, yhi, y, 'trial')}"
            + "".join(dots) + f"<polyline points='{' '.join(line)}' fill='none' stroke='#d62728' stroke-width='2'/>"
            + "</svg>")


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def curves_svg(curves: dict[int, dict[int, float]]) -> str:
    """The reported values by epoch of a few trials, one coloured line each, named in a legend."""
    values = _finite(v for c in curves.values() for v in c.values())
    steps = [s for c in curves.values() for s in c]
    if not values:
        return "<p class='note'>No reported values yet.</p>"
    x, y = _scale(min(steps), max(max(steps), min(steps) + 1), PAD, W - 130), _scale(min(values), max(values), H - PAD, 14)
    lines, legend = [], []
    for i, (number, curve) in enumerate(curves.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        pts = " ".join(f"{x(s)},{y(v)}" for s, v in sorted(curve.items()) if math.isfinite(v))
        lines.append(f"<polyline points='{pts}' fill='none' stroke='{colour}' stroke-width='1.5'/>")
        legend.append(f"<text x='{W - 120}' y='{24 + 16 * i}' font-size='12' fill='{colour}'>trial #{number}</text>")
    return (f"<svg width='{W}' height='{H}' role='img' aria-label='curves'>"
            f"{_axes(min(steps), max(steps), min(values), max(values), y, 'epoch', right=W - 130)}" + "".join(lines) + "".join(legend)
            + "</svg>")


def summary_app(url: str, inner: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: /hpo/ and /hpo/studies/NAME from SQL, everything else to `inner` (optuna-dashboard)."""
    from hpo.storage.tables import read_only, reads_sql

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not (path == "/hpo" or path.startswith("/hpo/")):
            return inner(environ, start_response)
        status, text = "200 OK", ""
        try:
            if not reads_sql(url):
                text = _page("hpo", "<p>hpo's summaries read SQL storages; this one is on "
                                    "<a href='/dashboard'>optuna-dashboard</a>.</p>")
            else:
                with read_only(url) as conn:
                    if path.startswith("/hpo/studies/"):
                        text = study_page(conn, unquote(path[len("/hpo/studies/"):]), url)
                    else:
                        text = index_page(conn, url)
        except HpoError as e:
            status, text = "404 Not Found", _page("hpo", f"<p>{html.escape(str(e))}</p><p><a href='/hpo/'>All studies</a></p>")
        body = text.encode()
        start_response(status, [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return app
