"""`hpo report`: PNG plots and a Markdown summary of a study, for reading without a browser.

The plots are Optuna's own (optuna.visualization.matplotlib): optimization history, learning
curves of every trial (pruned ones visibly cut short), parameter importances and parallel
coordinates.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import HpoError
from hpo.search.records import SPEC_ATTR
from hpo.search.summary import objective_names, summarize
from hpo.storage.lineage import Segment, schedule
from hpo.ui.text import fmt, render_front


def _plots(study: optuna.Study) -> dict[str, Callable[[optuna.Study], Any]]:
    from optuna.visualization import matplotlib as vis

    if len(study.directions) == 1:
        metric = (study.metric_names or [str((study.user_attrs.get(SPEC_ATTR) or {}).get("metric", "value"))])[0]
        plots: dict[str, Callable[[optuna.Study], Any]] = {}
        if finals(study.get_trials(deepcopy=False)):  # population-based training: each member's schedule
            plots["population"] = lambda s: population(s, metric)
        return plots | {  # every axis says which metric it shows, not "Objective Value"
            "history": lambda s: vis.plot_optimization_history(s, target_name=metric),
            "learning_curves": lambda s: learning_curves(s, metric),
            "importances": lambda s: _labelled(vis.plot_param_importances(s, target_name=metric), "parameter",
                                               f"importance for {metric}"),
            "parallel_coordinate": lambda s: vis.plot_parallel_coordinate(s, target_name=metric),
        }
    # Several objectives: the front, then each objective's history and importances by name.
    names = objective_names(study, study.user_attrs.get(SPEC_ATTR) or {})
    plots = {}
    if len(names) in (2, 3):
        plots["pareto_front"] = lambda s: vis.plot_pareto_front(s, target_names=names)
    for i, name in enumerate(names):
        plots[f"history_{name}"] = _per_objective(vis.plot_optimization_history, i, name)
        plots[f"importances_{name}"] = _per_objective(vis.plot_param_importances, i, name)
    plots["learning_curves"] = vis.plot_intermediate_values
    return plots


NAMED = 5  # the best trials named in the learning curves' legend; the others are drawn faintly
BAND_ABOVE = 2000  # more trials than this: their curves as a band per epoch, not a line each


def learning_curves(study: optuna.Study, metric: str) -> Any:
    """Every trial's learning curve, legible at any size: the best few in colour and named, the
    others faint (pruned ones visibly cut short), or past BAND_ABOVE trials their 10-90% band and
    median per epoch, so the time and memory it takes stay bounded."""
    import matplotlib.pyplot as plt

    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    if not trials:
        raise ValueError("no trial has reported an epoch yet")
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = sorted(done, key=lambda t: float(t.value or 0.0) * (-1.0 if maximize else 1.0))[:NAMED]
    named = {t.number for t in best}
    fig, ax = plt.subplots(figsize=(10, 6))
    if len(trials) > BAND_ABOVE:
        by_epoch: dict[int, list[float]] = {}
        for t in trials:
            for epoch, value in t.intermediate_values.items():
                by_epoch.setdefault(epoch, []).append(value)
        import numpy as np

        epochs = sorted(by_epoch)
        low, mid, high = (np.array([np.nanpercentile(by_epoch[e], q) for e in epochs]) for q in (10, 50, 90))
        ax.fill_between(epochs, low, high, color="0.8", label=f"10-90% of {len(trials)} trials")
        ax.plot(epochs, mid, color="0.5", linewidth=1, label="median")
    else:
        for t in trials:
            if t.number not in named:
                epochs = sorted(t.intermediate_values)
                ax.plot(epochs, [t.intermediate_values[e] for e in epochs], color="0.6", linewidth=0.6, alpha=0.35)
    for t in best:
        epochs = sorted(t.intermediate_values)
        ax.plot(epochs, [t.intermediate_values[e] for e in epochs], linewidth=1.8, label=f"#{t.number}: {fmt(t.value)}")
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    ax.set_title(f"Learning curves of {len(trials)} trials ({pruned} pruned); the best {len(best)} named")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.legend(loc="lower right" if maximize else "upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return ax


def finals(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    """Each population member's last completed segment (search.strategy pbt), by member."""
    out: dict[int, FrozenTrial] = {}
    for t in trials:
        seg = Segment.of(t)
        if seg is not None and t.state == TrialState.COMPLETE and (
                seg.member not in out or seg.end >= (Segment.of(out[seg.member]) or seg).end):
            out[seg.member] = t
    return out


def population(study: optuna.Study, metric: str) -> Any:
    """Population-based training: each member's parameter schedule over epochs (the lineage of its
    last segment, exploits included) above its metric's curve."""
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False)
    last = finals(trials)
    names = sorted({k for t in last.values() for k in t.params})
    varied = [n for n in names if len({round(float(s["params"][n]), 12) for t in last.values()
                                       for s in schedule(trials, t.number) if isinstance(s["params"].get(n), (int, float))}) > 1]
    shown = "lr" if "lr" in varied else (varied[0] if varied else names[0])
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    by_number = {x.number: x for x in trials}
    for member, t in sorted(last.items()):
        steps = schedule(trials, t.number)
        xs = [e for s in steps for e in s["epochs"]]
        ys = [s["params"].get(shown) for s in steps for _ in (0, 1)]
        line, = axes[0].plot(xs, ys, linewidth=1.5, label=f"member {member}: {fmt(t.value)}")
        curve = sorted((e, v) for s in steps for e, v in by_number[s["trial"]].intermediate_values.items())
        axes[1].plot([e + 1 for e, _ in curve], [v for _, v in curve], color=line.get_color(), linewidth=1.2)
    dist = next((t.distributions.get(shown) for t in last.values() if shown in t.distributions), None)
    if getattr(dist, "log", False):
        axes[0].set_yscale("log")
    axes[0].set_ylabel(shown)
    axes[0].set_title(f"Population of {len(last)}: {shown} over epochs (each member's lineage)")
    axes[0].legend(fontsize=8, loc="best")
    axes[1].set_ylabel(metric)
    axes[1].set_xlabel("epochs trained")
    for ax in axes:
        ax.grid(alpha=0.3)
    return axes


def _labelled(ax: Any, ylabel: str, xlabel: str) -> Any:
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    return ax


def _per_objective(plot: Callable[..., Any], index: int, name: str) -> Callable[[optuna.Study], Any]:
    """One of Optuna's single-objective plots, of objective `index`, labelled with its name."""
    def draw(study: optuna.Study) -> Any:
        return plot(study, target=lambda t: float(t.values[index]), target_name=name)

    return draw


def figures(study: optuna.Study) -> tuple[dict[str, Any], dict[str, str]]:
    """Matplotlib figures by name, and why any plot could not be drawn."""
    _matplotlib()
    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, plot in _plots(study).items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
        except Exception as e:  # e.g. importances need two completed trials with varied params
            skipped[name] = f"{type(e).__name__}: {e}"
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flatten()[0].figure  # Axes or array of them
        fig.set_size_inches(10, 6)
        fig.tight_layout()
        out[name] = fig
    return out, skipped


def _matplotlib() -> None:
    """matplotlib (an extra: the core install has no plots), without a display, or one line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise HpoError("hpo report draws with matplotlib, which is not installed: pip install 'hpo[report]' "
                       "(or pip install matplotlib)") from None


def write_report(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Write <name>.png for each plot and summary.md; returns the files written."""
    _matplotlib()
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    figs, skipped = figures(study)
    written = []
    for name, fig in figs.items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    summary = out_dir / "summary.md"
    summary.write_text(markdown(study, [p.name for p in written], skipped))
    written.append(summary)
    return written


def markdown(study: optuna.Study, images: list[str], skipped: dict[str, str]) -> str:
    s = summarize(study)
    lines = [f"# Study {s.name}", ""]
    counts = ", ".join(f"{n} {k.lower()}" for k, n in sorted(s.counts.items()))
    lines += [f"- trials: {sum(s.counts.values())} ({counts or 'none'})", f"- metric: {s.metric} ({s.direction})"]
    if s.multi_objective:
        lines += ["", "## Pareto front", "", "Pruned and infeasible trials are never on it.", "", "```",
                  *render_front(s), "```"]
        if images:
            lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
        if skipped:
            lines += ["", "Not drawn:"] + [f"- {name}: {why}" for name, why in skipped.items()]
        return "\n".join(lines) + "\n"
    if s.best_number is not None:
        lines.append(f"- best trial: #{s.best_number}, {s.metric} = {fmt(s.best_value)}")
    if s.test:
        lines.append(f"- test {s.test['metric'].removeprefix('test_')} of the best model: {fmt(s.test['value'])}"
                     f" (scored once, on the held-out test split)")
        lines.append(f"- best model: `{s.test['model_path']}`")
    if s.best_params:
        lines += ["", "## Best parameters", "", "| parameter | value |", "| --- | --- |"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in s.best_params.items()]
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if done:
        done.sort(key=lambda t: t.value, reverse=s.direction == "maximize")  # type: ignore[arg-type, return-value]
        lines += ["", "## Top trials", "", "| # | value | epochs | seconds |", "| --- | --- | --- | --- |"]
        for t in done[:10]:
            secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
            lines.append(f"| {t.number} | {fmt(t.value)} | {len(t.intermediate_values)} | {fmt(secs)} |")
    lines += _population_lines(study)
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    if skipped:
        lines += ["", "Not drawn:"] + [f"- {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"


def _population_lines(study: optuna.Study) -> list[str]:
    """Each member's last segment, its value and its lineage (the trials its model went through)."""
    trials = study.get_trials(deepcopy=False)
    last = finals(trials)
    if not last:
        return []
    out = ["", "## Population", "", "| member | last trial | value | epochs | lineage (the trials its model trained in) |",
           "| --- | --- | --- | --- | --- |"]
    for member, t in sorted(last.items()):
        steps = schedule(trials, t.number)
        chain = " → ".join(f"#{s['trial']}" + (f" (from member {s['member']})" if s["member"] != member else "")
                           for s in steps)
        out.append(f"| {member} | #{t.number} | {fmt(t.value)} | {steps[-1]['epochs'][1]} | {chain} |")
    return out
