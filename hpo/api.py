"""`hpo.run()`: a study from Python (a script or a notebook), the same run as `hpo run`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpo.search.summary import FrontTrial, Summary, summarize


@dataclass(frozen=True)
class RunResult:
    summary: Summary  # counts, best trial (or Pareto front), its parameters and test score
    stopped: str  # why the run ended ("study budget of 30 trials reached", ...)

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
    storage: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    device: str = "auto",
    artifacts: str | None = None,
    quiet: bool = False,
    checkpoint_interval: float = 2.0,
) -> RunResult:
    """Create or resume the study in `spec` (a file, or the same keys as a dict) and run it here.

    `train` passes the training function as an object (a notebook's `def train(trial)`); the spec
    then needs no `train:` key. Workers in other processes import the function by the reference
    stored in the study, so a function defined in a notebook runs here only.
    """
    from hpo.errors import HpoError
    from hpo.execution.launch import prepare, run_here
    from hpo.runtime import stopping
    from hpo.search.failures import advice
    from hpo.search.study import choose_device, open_for_spec
    from hpo.spec.schema import load_spec, spec_from_mapping
    from hpo.spec.user_code import _cache
    from hpo.storage.backends import Heartbeat, open_storage, resolve_url, sole_writer

    if isinstance(spec, Mapping):
        doc = dict(spec)
        if train is not None:
            doc.setdefault("train", f"{train.__module__}:{train.__qualname__}")
        loaded = spec_from_mapping(doc, "<spec>")
    else:
        loaded = load_spec(spec)
        if train is not None and loaded.train is None:
            raise ValueError("train= needs a spec with train: (or pass the spec as a dict)")
    if train is not None:
        assert loaded.train is not None
        _cache[loaded.train] = train  # this object, not a re-import, runs here
    if n_trials is not None:
        loaded = loaded.with_budget(n_trials=n_trials)
    dev = choose_device(device)
    data = prepare(loaded, dev)
    url = resolve_url(storage)
    with sole_writer(url, loaded.name):
        handle = open_for_spec(loaded, open_storage(url, create=True, heartbeat=Heartbeat()), url, artifacts)
        with stopping.handling():  # Ctrl-C (a notebook's interrupt) queues the trial in flight
            outcome = run_here(handle, dev, data, timeout=timeout, n_trials=None, quiet=quiet, storage_url=url,
                               checkpoint_interval=checkpoint_interval)
    if outcome.failure is not None:
        raise HpoError(f"study {loaded.name} stopped on failures: {outcome.failure.reason}; "
                       f"{advice(loaded.name)}")
    return RunResult(summarize(handle.study), outcome.stopped)


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
    from hpo.storage.backends import open_storage, resolve_url

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
