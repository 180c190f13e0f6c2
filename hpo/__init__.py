"""hpo: hyperparameter optimization for PyTorch on Optuna.

Describe a study in YAML, run it with `hpo run`, watch it with `hpo dashboard`, add workers with
`hpo worker`. The library API below is what the CLI itself uses.
"""

from hpo.errors import DataError, HpoError, SpecError, StorageError
from hpo.results import finalize, summarize
from hpo.spec import StudySpec, load_spec
from hpo.study import open_existing, open_for_spec
from hpo.worker import run_worker

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "HpoError",
    "SpecError",
    "StorageError",
    "StudySpec",
    "finalize",
    "load_spec",
    "open_existing",
    "open_for_spec",
    "run_worker",
    "summarize",
]
