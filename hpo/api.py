"""`hpo.run()`: a study from Python (a script or a notebook), the same run as `hpo run`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpo.search.records import FrontTrial, Summary
from hpo.search.summary import summarize


@dataclass(frozen=True)
class RunResult:
    summary: Summary  # counts, best trial (or Pareto front), its parameters and test score
    stopped: str  # why the run ended ("study budget of 30 trials reached", "Interrupted (SIGINT): ...")
    study_name: str = ""
    storage: str = ""
    artifacts: str | None = None
    # Set when a stop ended the run before its budget (its trials in flight are queued and resume on
    # the next run): "SIGINT" (Ctrl-C, a notebook's interrupt), "SIGTERM", or "hpo stop".
    interrupted: str | None = None

    def load_best(self, trial: int | None = None) -> Any:
        """The best model (or with several objectives, front member `trial`): see hpo.load_best."""
        return load_best(self.study_name, storage=self.storage, artifacts=self.artifacts, trial=trial)

    @property
    def front(self) -> tuple[FrontTrial, ...]:
        """With several objectives: the Pareto front (values, parameters, test score of each)."""
        return self.summary.front

    @property
    def best_value(self) -> float | None:
        return self.summary.best_value

    @property
    def best_params(self) -> dict[str, Any]:
        return self.summary.best_params

    @property
    def test(self) -> dict[str, Any] | None:
        return self.summary.test


def run(
    spec: str | Path | Mapping[str, Any],
    *,
    train: Callable[..., Any] | None = None,
    test: Callable[..., Any] | None = None,
    model: Callable[..., Any] | None = None,
    data: Callable[..., Any] | None = None,
    storage: str | None = None,
    workers: int | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    device: str = "auto",
    artifacts: str | None = None,
    quiet: bool = False,
    checkpoint_interval: float = 2.0,
) -> RunResult:
    """Create or resume the study in `spec` (a file, or the same keys as a dict, as any YAML loader
    reads them) and run it as `hpo run` does: one local worker process per CPU core unless
    `workers` (else $HPO_WORKERS) or the spec's `execution.workers` says otherwise, progress on stderr unless `quiet`,
    then the best model scored once.

    A stop (Ctrl-C or a notebook's interrupt, SIGTERM, `hpo stop` from another shell) while trials
    run is not an exception: every trial in flight is queued to resume, and the result says so
    (`interrupted`, `stopped`); the next call resumes the study. Mistakes raise `hpo.HpoError`.

    `train`, `test`, `model` and `data` take function objects (or put them in the dict under
    `train`, `test`, `model`, `data.dataset`), also ones defined in `__main__` or a notebook: the
    local workers are forked from this process and run these very objects. Workers elsewhere
    (`hpo worker`) import the function by the `module:function` stored in the study, so a function
    of `__main__` runs here only.
    """
    from hpo.errors import HpoError
    from hpo.execution.headstart import head_start
    from hpo.storage.urls import resolve_url

    loaded = _spec_with_functions(spec, {"train": train, "test": test, "model": model, "data.dataset": data})
    if n_trials is not None:
        loaded = loaded.with_budget(n_trials=n_trials)
    url = resolve_url(storage)
    with head_start(loaded, url) as ahead:
        from hpo.execution.launch import (  # imports torch: after the head start forks
            RunOptions,
            run_ending,
            run_study,
        )
        from hpo.runtime import stopping

        options = RunOptions(url, workers if workers is not None else _env_workers(), None, device, timeout,
                             quiet=quiet, checkpoint_interval=checkpoint_interval, artifacts=artifacts)
        with _optuna_quiet(), stopping.handling():  # Ctrl-C (a notebook's interrupt) queues the trials in flight
            handle, outcome, n_workers = run_study(loaded, options, ahead)
    ending = run_ending(outcome, loaded.name, n_workers)  # as `hpo run` ends it
    if ending.error:
        raise HpoError(ending.message)
    return RunResult(summarize(handle.study), outcome.stopped, handle.study.study_name, options.storage_url,
                     artifacts, ending.stopped)


_FUNCTION_KEYS = ("train", "test", "model", "data.dataset")


def _env_workers() -> int | None:
    """$HPO_WORKERS, as `hpo run --workers` reads it."""
    import os

    from hpo.errors import SettingError

    text = os.environ.get("HPO_WORKERS", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise SettingError("HPO_WORKERS", f"must be a whole number of workers >= 1, not {text!r}")
    return int(text)


def _spec_with_functions(spec: str | Path | Mapping[str, Any], functions: Mapping[str, Callable[..., Any] | None]
                         ) -> Any:
    """The spec, its function keys given as objects (arguments, or values in a dict) replaced by
    their `module:function` and the objects kept for this process and its forked workers."""
    from hpo.errors import SpecError
    from hpo.spec.loading import (
        read_as_hpo_would,
        read_spec_document,
        spec_from_mapping,
    )
    from hpo.spec.user_code import register

    if isinstance(spec, Mapping):
        doc, source = read_as_hpo_would(dict(spec)), "<spec>"
    else:
        doc, source = read_spec_document(Path(spec)), str(spec)
    if not isinstance(doc, dict):
        return spec_from_mapping(doc, source)  # says what is wrong with it
    for key in _FUNCTION_KEYS:
        parent, name = (doc, key) if "." not in key else (doc.setdefault("data", {}), key.split(".")[1])
        given = functions.get(key)
        value = given if given is not None else (parent.get(name) if isinstance(parent, dict) else None)
        if not callable(value):
            continue
        qualname = getattr(value, "__qualname__", "")
        if not qualname.isidentifier():
            raise SpecError(f"{source}: {key}: {qualname or type(value).__name__} is not a function defined at the "
                            "top of a module or notebook cell; define it with def at the top level")
        reference = f"{value.__module__}:{qualname}"
        parent[name] = reference
        register(reference, value)
    if doc.get("data") == {}:
        del doc["data"]
    return spec_from_mapping(doc, source)


class _optuna_quiet:
    """Optuna's INFO lines (a trial finished, ...) are not printed: hpo prints its own progress.
    Its level is put back after the run."""

    def __enter__(self) -> None:
        import optuna

        self.level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        import optuna

        optuna.logging.set_verbosity(self.level)


def load_best(study: str | Path, *, storage: str | None = None, artifacts: str | None = None,
              trial: int | None = None) -> Any:
    """The best model of a study, or of a file `hpo export` wrote (`study` ending in .pt).

    hpo's own loop and model factories: the trained `nn.Module`, in eval mode on the CPU, taking
    raw inputs (the input scaling it was trained with is part of it; with cross-validation the
    ensemble of its fold models). A `train:` study: an `hpo.BestState` with the best trial's
    parameters and what its last `save_checkpoint()` saved. With several objectives `trial=`
    chooses a member of the Pareto front.
    """
    from hpo.search.export import exported, model_from, read_export
    from hpo.search.study import open_existing
    from hpo.spec.user_code import load_references
    from hpo.storage.backends import open_storage
    from hpo.storage.urls import resolve_url

    path = Path(study).expanduser()
    if path.suffix == ".pt" and path.is_file():
        export = read_export(path)
    else:
        url = resolve_url(storage)
        handle = open_existing(str(study), open_storage(url, create=False, heartbeat=None), url, artifacts)
        if handle.spec.train is None:
            load_references(handle.spec)  # a model factory is imported with a one-line error
        export = exported(handle, trial)
    return model_from(export)
