"""Study files -> StudySpec: read (size, encoding), parsed by a safe YAML loader, validated
(hpo/spec/validate.py). Errors name the file and the key path
(`studies/x.yaml: space.lr.low: must be > 0 when log is true`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hpo.errors import SpecError
from hpo.spec.schema import StudySpec
from hpo.spec.validate import Validator

MAX_SPEC_BYTES = 1 << 20  # a study file is a page of YAML; anything larger is a mistake or an attack


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float and refuses duplicate keys.

    PyYAML follows YAML 1.1, where a float needs a dot, so `lr: 1e-5` would silently become a
    string; a duplicated key would silently keep the last value.
    """


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def read_as_hpo_would(doc: Any) -> Any:
    """A document another YAML loader produced (PyYAML's `safe_load` leaves `1e-4` as text), with
    such text read as the number a study file gives: a dict passed to `hpo.run` means the same as
    the file it came from."""
    if isinstance(doc, Mapping):
        return {k: read_as_hpo_would(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [read_as_hpo_would(v) for v in doc]
    if isinstance(doc, str) and _EXPONENT_FLOAT.match(doc):
        return float(doc.replace("_", ""))
    return doc


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be plain values", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{source}: {where}: {problem}") from None
    except RecursionError:
        raise SpecError(f"{source}: the document is nested too deeply") from None


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file."""
    return spec_from_mapping(read_spec_document(Path(path)), str(path))


def read_spec_document(path: Path) -> Any:
    """A study file's YAML document, read with hpo's loader; every way it cannot be read is one line."""
    source = str(path)
    try:
        if path.is_dir():
            raise SpecError(f"{source}: is a directory, not a study file")
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{source}: file is {size} bytes; a study file must be under 1 MiB")
        raw = path.read_bytes()
    except FileNotFoundError:
        from hpo.spec.starter import builtin_studies, builtin_study

        if (builtin := builtin_study(source)) is not None:  # `hpo run quickstart`: a study that ships with hpo
            return read_spec_document(builtin)
        raise SpecError(f"{source}: no such file (built-in studies: {', '.join(builtin_studies())}; "
                        "or write a starter with hpo init)") from None
    except PermissionError:
        raise SpecError(f"{source}: permission denied") from None
    if b"\0" in raw:
        raise SpecError(f"{source}: is a binary file, not YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{source}: is not UTF-8 text (bad byte at offset {e.start})") from None
    return parse_yaml(text, source)


def spec_from_mapping(doc: Any, source: str) -> StudySpec:
    """Validate an already-parsed document (a file, or a spec stored in a study)."""
    return Validator(source).study(doc)
