"""User code named in a study file: `module:function` (importable) or `file.py:function`.

A reference is checked for form when the spec is validated and imported only when something is
about to run it (`hpo run`, `hpo worker`, `hpo validate`), so commands that only read a study
(`hpo best`, `hpo trials`) work on a machine that lacks the user's package. Every way an import
can fail is one line naming the spec key and, for a syntax error, the file and line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from hpo.errors import HpoError

_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class UserCodeError(HpoError):
    """User code cannot be imported, or used the trial API wrongly: one line saying what and where."""


def check_reference(text: Any) -> str | None:
    """Why `text` is not a well-formed reference, or None."""
    if not isinstance(text, str) or text.count(":") != 1:
        return "must be module:function or path/to/file.py:function"
    where, name = text.split(":")
    if not _NAME_RE.match(name):
        return f"{name!r} is not a Python name (expected module:function or file.py:function)"
    if where.endswith(".py"):
        return None
    if not _MODULE_RE.match(where):
        return f"{where!r} is neither a module name nor a .py file"
    return None


def absolute_reference(text: str, spec_file: str) -> str:
    """A file reference made absolute, relative to the study file's folder (modules stay as they are)."""
    where, name = text.split(":")
    if not where.endswith(".py"):
        return text
    path = Path(where).expanduser()
    if not path.is_absolute() and Path(spec_file).is_file():
        path = Path(spec_file).resolve().parent / path
    return f"{path}:{name}"


_cache: dict[str, Callable[..., Any]] = {}


def register(reference: str, function: Callable[..., Any]) -> None:
    """`reference` names this very object (a function of `__main__` or a notebook handed to
    hpo.run): it, not a re-import, runs here and in the workers forked from here."""
    _cache[reference] = _given[reference] = function


_given: dict[str, Callable[..., Any]] = {}


def registered(reference: str) -> Callable[..., Any] | None:
    """The function object `register` was given for `reference`, if any: another process of a
    multi-process trial gets it pickled (by reference), not imported by name."""
    return _given.get(reference)
# Folders put on sys.path for a study file's modules; local worker processes get them on PYTHONPATH.
ADDED_PATHS: list[str] = []


def load(reference: str, key: str) -> Callable[..., Any]:
    """Import the callable a spec key names; UserCodeError says why it cannot be had."""
    if reference in _cache:
        return _cache[reference]
    where, name = reference.split(":")
    try:
        module = _import_file(Path(where)) if where.endswith(".py") else importlib.import_module(where)
    except UserCodeError:
        raise
    except SyntaxError as e:
        raise UserCodeError(f"{key}: {e.filename}, line {e.lineno}: {e.msg}") from None
    except ModuleNotFoundError as e:
        missing = e.name or where
        hint = " (install the package, or add its folder to PYTHONPATH)" if missing == where.split(".")[0] else ""
        raise UserCodeError(f"{key}: cannot import {where!r}: no module named {missing!r}{hint}") from None
    except Exception as e:
        raise UserCodeError(f"{key}: importing {where!r} failed: {type(e).__name__}: {e}{_where(e)}") from None
    target: Any = module
    for part in name.split("."):
        if not hasattr(target, part):
            raise UserCodeError(f"{key}: {where!r} has no {name!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserCodeError(f"{key}: {reference} is a {type(target).__name__}, not a function")
    _cache[reference] = target
    return cast(Callable[..., Any], target)


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise UserCodeError(f"no such file {path}")
    # A stable module name per file, so a retried import (a second study in one process) reuses it
    # and pickling by reference (DataLoader workers) finds it. Its folder goes on sys.path, as when
    # running it as a script, so it can import its neighbours.
    name = "hpo_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserCodeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _where(e: BaseException) -> str:
    """The user's own frame an exception came from, as ' (file:line)'."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "importlib" not in f.filename]
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def load_references(spec: Any) -> None:
    """Import every piece of user code a spec names, so a missing module or a typo is one line
    before anything runs or is written (a worker that cannot import them takes no trial).

    A module beside the study file is found as if run from there (the file's folder goes on
    sys.path, as a script's does); a worker joining from the stored spec finds it installed or on
    PYTHONPATH."""
    source = Path(getattr(spec, "source", ""))
    if source.suffix in (".yaml", ".yml") and source.is_file():
        folder = str(source.resolve().parent)
        if folder not in sys.path:
            sys.path.append(folder)
            ADDED_PATHS.append(folder)
    for key, ref in (("train", spec.train), ("test", spec.test), ("model", spec.model),
                     ("data.dataset", spec.data.dataset if spec.data is not None else None)):
        if ref is not None and ":" in ref:
            load(ref, key)
