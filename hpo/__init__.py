"""hpo: hyperparameter optimization for PyTorch on Optuna.

Describe a study in YAML, run it with `hpo run`, watch it with `hpo dashboard`, add workers with
`hpo worker`. Your own training code gets an `hpo.Trial` (see hpo.runtime.trial); `hpo.run()` runs a
study from Python. Names are imported on first use, so `import hpo` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Trial": "hpo.runtime.trial",
    "TrialPruned": "hpo.runtime.trial",
    "run": "hpo.api",
    "RunResult": "hpo.api",
    "load_best": "hpo.api",
    "BestState": "hpo.search.export",
    "load_spec": "hpo.spec.loading",
    "StudySpec": "hpo.spec.schema",
    "HpoError": "hpo.errors",
    "SpecError": "hpo.errors",
    "StorageError": "hpo.errors",
    "DataError": "hpo.errors",
    "UserCodeError": "hpo.spec.user_code",
    "open_existing": "hpo.search.study",
    "open_for_spec": "hpo.search.study",
    "finalize": "hpo.search.results",
    "summarize": "hpo.search.summary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
