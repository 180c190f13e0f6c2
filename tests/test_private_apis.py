"""Every private Optuna and torch API hpo uses (all reached through hpo/_private.py) exists in the
installed versions: an Optuna or torch release that drops one fails here, by name, not deep inside
a study."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import optuna
import pytest
import torch

from hpo import _private

PACKAGE = Path(__file__).resolve().parents[1] / "hpo"


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("owner", sorted(_private.OPTUNA_ATTRIBUTES))
def test_each_private_optuna_api_hpo_uses_exists(owner: str) -> None:
    try:
        obj = _resolve(owner)
    except (ImportError, AttributeError):
        pytest.fail(f"optuna {optuna.__version__} has no {owner}, which hpo/_private.py relies on")
    for name in _private.OPTUNA_ATTRIBUTES[owner]:
        if isinstance(obj, type):  # instance attributes: set in __init__ (or declared on the class)
            source = Path(importlib.import_module(obj.__module__).__file__ or "").read_text()
            found = hasattr(obj, name) or f"self.{name}" in source
        else:
            found = hasattr(obj, name)
        assert found, f"optuna {optuna.__version__}: {owner} has no {name}, which hpo/_private.py relies on"


@pytest.mark.parametrize("name", _private.TORCH_FUNCTIONS)
def test_each_private_torch_api_hpo_uses_exists(name: str) -> None:
    assert callable(getattr(torch, name, None)), f"torch {torch.__version__} has no torch.{name} (hpo/_private.py)"


def test_private_apis_are_reached_only_through_hpo_private() -> None:
    """Outside hpo/_private.py no module names an underscored attribute of Optuna or torch objects."""
    pattern = re.compile(r"\.(_storage|_study_id|_trial_id|_backend|_redis|_prefix|_cached_frozen_trial)\b|"
                         r"optuna\.[\w.]*\._\w+|"
                         r"torch\._fused|from optuna\.[\w.]*\._\w+|import optuna\.[\w.]*\._\w+")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("_private.py", "proxy.py"):  # proxy.py's _backend is its own attribute
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and "self._backend" not in code:
                offenders.append(f"{path.relative_to(PACKAGE)}:{lineno}: {line.strip()}")
    assert not offenders, "private Optuna/torch API outside hpo/_private.py:\n" + "\n".join(offenders)
