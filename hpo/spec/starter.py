"""Starting points: the study files that ship with hpo (`hpo run quickstart`), and the commented
starter study, with a training function if asked, that `hpo init` writes into a folder."""

from __future__ import annotations

import re
from pathlib import Path

from hpo.errors import HpoError

_PACKAGE = Path(__file__).resolve().parents[1]
STUDIES = _PACKAGE / "studies"  # the built-in studies (the repository's studies/ is this folder)
STARTER = _PACKAGE / "starter"


def builtin_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES.glob("*.yaml"))


def builtin_study(name: str) -> Path | None:
    """The built-in study `name` (or `name.yaml`), when `name` is no more than that."""
    if "/" in name or "\\" in name:
        return None
    path = STUDIES / (name if name.endswith(".yaml") else f"{name}.yaml")
    return path if path.is_file() else None


def write_starter(target: Path, *, train: bool = False, example: str | None = None,
                  force: bool = False) -> list[Path]:
    """Write a starter study to `target` (and train.py beside it with `train`), or a copy of the
    built-in study `example`; returns the files written. Nothing is overwritten unless `force`."""
    if example is not None:
        source = builtin_study(example)
        if source is None:
            raise HpoError(f"no built-in study named {example!r}; there are: {', '.join(builtin_studies())}")
        files = {target: source.read_text()}
    else:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", target.resolve().parent.name).strip("-.") or "my-study"
        text = (STARTER / ("study_train.yaml" if train else "study.yaml")).read_text()
        files = {target: text.replace("name: NAME", f"name: {name}").replace("hpo best NAME", f"hpo best {name}")}
        if train:
            files[target.with_name("train.py")] = (STARTER / "train.py").read_text()
    if not force and (taken := [str(p) for p in files if p.exists()]):
        raise HpoError(f"{', '.join(taken)} already exists; choose another file name or remove it")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
