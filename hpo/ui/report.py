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
from optuna.trial import TrialState

from hpo.errors import HpoError
from hpo.search.summary import SPEC_ATTR, objective_names, summarize
from hpo.ui.progress import fmt, render_front


def _plots(study: optuna.Study) -> dict[str, Callable[[optuna.Study], Any]]:
    from optuna.visualization import matplotlib as vis

    if len(study.directions) == 1:
        metric = (study.metric_names or [str((study.user_attrs.get(SPEC_ATTR) or {}).get("metric", "value"))])[0]
        return {  # every axis says which metric it shows, not "Objective Value"
            "history": lambda s: vis.plot_optimization_history(s, target_name=metric),
            "learning_curves": lambda s: _labelled(vis.plot_intermediate_values(s), f"{metric} (reported each epoch)",
                                                   "epoch"),
            "importances": lambda s: _labelled(vis.plot_param_importances(s, target_name=metric), "parameter",
                                               f"importance for {metric}"),
            "parallel_coordinate": lambda s: vis.plot_parallel_coordinate(s, target_name=metric),
        }
    # Several objectives: the front, then each objective's history and importances by name.
    names = objective_names(study, study.user_attrs.get(SPEC_ATTR) or {})
    plots: dict[str, Callable[[optuna.Study], Any]] = {}
    if len(names) in (2, 3):
        plots["pareto_front"] = lambda s: vis.plot_pareto_front(s, target_names=names)
    for i, name in enumerate(names):
        plots[f"history_{name}"] = _per_objective(vis.plot_optimization_history, i, name)
        plots[f"importances_{name}"] = _per_objective(vis.plot_param_importances, i, name)
    plots["learning_curves"] = vis.plot_intermediate_values
    return plots


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
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    if skipped:
        lines += ["", "Not drawn:"] + [f"- {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"
