"""Every private Optuna and torch API hpo uses (all reached through hpo/_private.py) exists in the
installed versions: an Optuna or torch release that drops one fails here, by name, not deep inside
a study."""

from __future__ import annotations

import importlib
import importlib.util
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


@pytest.mark.parametrize("name", _private.TORCH_MODULES)
def test_each_private_torch_module_hpo_imports_exists(name: str) -> None:
    assert importlib.util.find_spec(name) is not None, f"torch {torch.__version__} has no module {name} (hpo/_private.py)"


def test_private_apis_are_reached_only_through_hpo_private() -> None:
    """Outside hpo/_private.py no module names an underscored attribute of Optuna or torch objects."""
    pattern = re.compile(r"\.(_storage|_study_id|_trial_id|_backend|_redis|_prefix|_cached_frozen_trial)\b|"
                         r"optuna\.[\w.]*\._\w+|"
                         r"torch\._fused|torch\._dynamo|from optuna\.[\w.]*\._\w+|import optuna\.[\w.]*\._\w+")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("_private.py", "proxy.py"):  # proxy.py's _backend is its own attribute
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and "self._backend" not in code:
                offenders.append(f"{path.relative_to(PACKAGE)}:{lineno}: {line.strip()}")
    assert not offenders, "private Optuna/torch API outside hpo/_private.py:\n" + "\n".join(offenders)


def _hpo_classes_on_optuna() -> list[type]:
    """Every class in hpo that subclasses an Optuna class."""
    import inspect
    import pkgutil

    import hpo

    found = []
    for info in pkgutil.walk_packages(hpo.__path__, "hpo."):
        if info.name.endswith("__main__"):
            continue  # runs the CLI
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra (Lightning) that is not installed
            continue
        found += [cls for cls in vars(module).values() if inspect.isclass(cls) and cls.__module__ == module.__name__
                  and any(b.__module__.startswith("optuna") for b in cls.__mro__[1:])]
    return found


def test_private_optuna_methods_hpo_overrides_or_calls_are_named_in_hpo_private() -> None:
    """A subclass that overrides or wraps a private Optuna method relies on it as much as a caller
    does (an Optuna release that renames it silently bypasses the override): each is listed in
    _private.OPTUNA_ATTRIBUTES under an Optuna class it comes from, and the class calls none
    directly (`self._x(...)`, `super()._x(...)`): those go through hpo/_private.py."""
    import inspect

    listed: dict[object, set[str]] = {}
    for owner, names in _private.OPTUNA_ATTRIBUTES.items():
        try:
            listed[_resolve(owner)] = set(names)
        except (ImportError, AttributeError):
            continue
    offenders = []
    for cls in _hpo_classes_on_optuna():
        bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("optuna")]
        own = {n for n in vars(cls) if n.startswith("_") and not n.startswith("__") and n != "_abc_impl"}
        for name in sorted(own):
            if any(hasattr(b, name) for b in bases) and not any(name in listed.get(b, ()) for b in bases):
                offenders.append(f"{cls.__name__} overrides {bases[0].__name__}.{name}")
        source = inspect.getsource(cls)
        for name in sorted(set(re.findall(r"(?:self|super\(\))\.(_[a-z]\w*)\(", source)) - own):
            if any(hasattr(b, name) for b in bases):
                offenders.append(f"{cls.__name__} calls {bases[0].__name__}.{name} directly")
    assert not offenders, "private Optuna methods not reached through hpo/_private.py: " + "; ".join(offenders)


@pytest.mark.parametrize("table", sorted(_private.OPTUNA_TABLES))
def test_each_optuna_table_and_column_hpo_reads_exists(table: str) -> None:
    """The read-only commands query Optuna's RDB schema directly; a release that renames a table or
    column fails here by name instead of as an SQL error in `hpo trials`."""
    from optuna.storages._rdb import models

    tables = models.BaseModel.metadata.tables
    assert table in tables, f"optuna {optuna.__version__} has no table {table}"
    columns = set(tables[table].columns.keys())
    missing = [c for c in _private.OPTUNA_TABLES[table] if c not in columns]
    assert not missing, f"optuna {optuna.__version__}'s {table} lacks {missing}"
