"""Study files: what loads, and the one-line error each kind of mistake gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpo.errors import SpecError
from hpo.spec.loading import load_spec
from tests.conftest import SMALL, invoke, small_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_validate(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    assert any(p.tuned for p in spec.space)


def test_scientific_notation_is_a_number(write_spec) -> None:
    doc = small_spec()
    text = write_spec(doc).read_text().replace("0.0001", "1e-4").replace("0.1", "1e-1")
    assert "1e-4" in text
    spec = load_spec(write_spec(text))
    lr = spec.param("lr")
    assert lr is not None and lr.low == pytest.approx(1e-4) and lr.high == pytest.approx(0.1)


def test_defaults_follow_the_metric(write_spec) -> None:
    spec = load_spec(write_spec(small_spec(metric="val_loss")))
    assert spec.direction == "minimize"
    assert spec.sampler.name == "tpe" and spec.pruner.name == "median"


def test_list_shorthand_is_categorical(write_spec) -> None:
    spec = load_spec(write_spec(small_spec()))
    bs = spec.param("batch_size")
    assert bs is not None and bs.kind == "categorical" and bs.choices == (32, 64)


@pytest.mark.parametrize("execution", [{}, {"mode": "fused", "pad": True}, {"mode": "fused", "pad": False},
                                       {"mode": "fused", "pad": "auto"}])
def test_spec_round_trips_through_its_stored_form(write_spec, execution) -> None:
    from hpo.spec.loading import spec_from_mapping

    spec = load_spec(write_spec(small_spec(execution=execution)))
    again = spec_from_mapping(spec.to_dict(), "stored")
    assert again == spec


def test_fused_padding_follows_the_device_unless_set(write_spec) -> None:
    auto = load_spec(write_spec(small_spec(execution={"mode": "fused"}))).execution
    assert auto.pads("cuda") and not auto.pads("cpu")  # launch-bound GPU: padding is nearly free
    off = load_spec(write_spec(small_spec(execution={"mode": "fused", "pad": False}))).execution
    assert not off.pads("cuda") and not off.pads("cpu")


def _space(**params):
    return small_spec(space={"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}, **params})


# (id, document, expected text in the one-line error)
MALFORMED = [
    ("empty-file", "", "is empty"),
    ("not-a-mapping", "- a\n- b\n", "must be a mapping"),
    ("yaml-syntax", "name: [unclosed\n", "line"),
    ("missing-name", {k: v for k, v in SMALL.items() if k != "name"}, "name: is required"),
    ("missing-space", {k: v for k, v in SMALL.items() if k != "space"}, "space: is required"),
    ("unknown-top-key", small_spec(budjet={"n_trials": 3}), "budjet: unknown key; did you mean 'budget'?"),
    ("pad-not-bool", small_spec(execution={"mode": "fused", "pad": "yes"}), "execution.pad: must be true, false or auto"),
    ("unknown-param", _space(learning_rate=0.1), "space.learning_rate: unknown key"),
    ("param-typo-hint", _space(widht=32), "did you mean 'width'?"),
    ("empty-space", small_spec(space={}), "space: is empty"),
    ("all-fixed", small_spec(space={"lr": 0.01, "width": 32}), "every parameter is fixed"),
    ("low-gt-high", _space(width={"type": "int", "low": 64, "high": 8}), "space.width.low: must be < high"),
    ("log-low-zero", small_spec(space={"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}),
     "space.lr.low: must be > 0 when log is true"),
    ("negative-lr", small_spec(space={"lr": {"low": -0.1, "high": 0.1}}), "space.lr.low: must be > 0"),
    ("empty-choices", _space(optimizer={"type": "categorical", "choices": []}), "space.optimizer.choices: is empty"),
    ("unknown-optimizer", _space(optimizer=["adam", "adamax"]), "space.optimizer.choices[1]: unknown value 'adamax'"),
    ("unknown-scheduler", _space(scheduler="linear"), "space.scheduler: unknown value 'linear'"),
    ("step-not-dividing", _space(dropout={"type": "float", "low": 0.0, "high": 0.5, "step": 0.3}),
     "does not divide the range"),
    ("int-param-float-type", _space(depth={"type": "float", "low": 1, "high": 3}), "depth is an integer"),
    ("dropout-out-of-range", _space(dropout={"low": 0.0, "high": 1.5}), "space.dropout.high: must be in [0, 1)"),
    ("wrong-type-n-trials", small_spec(budget={"n_trials": "ten"}), "budget.n_trials: must be an integer"),
    ("zero-epochs", small_spec(budget={"epochs": 0}), "budget.epochs: must be >= 1"),
    ("bad-direction", small_spec(direction="maximize", metric="val_loss"), "direction: val_loss can only be minimized"),
    ("unknown-dataset", small_spec(data={"dataset": "mnist"}), "data.dataset: unknown value 'mnist'"),
    ("split-not-one", small_spec(data={"dataset": "digits", "split": {"train": 0.5, "val": 0.2, "test": 0.2}}),
     "data.split: fractions must add up to 1"),
    ("unknown-sampler", small_spec(sampler={"name": "bayes"}), "sampler.name: unknown value 'bayes'"),
    ("sampler-bad-option", small_spec(sampler={"name": "tpe", "n_startup": 3}),
     "sampler.n_startup: unknown option; did you mean 'n_startup_trials'?"),
    ("sampler-seed", small_spec(sampler={"name": "random", "seed": 1}), "sampler.seed: is set by hpo"),
    ("pruner-bad-option", small_spec(pruner={"name": "median", "warmup": 2}), "pruner.warmup: unknown option"),
    ("grid-continuous", small_spec(sampler={"name": "grid"}), "grid search needs choices or a step"),
    ("momentum-never-used", _space(optimizer="adam", momentum={"low": 0.8, "high": 0.99}),
     "space.momentum: is never used"),
    ("huge-width", _space(width=10_000_000), "space.width: must be <= 16384"),
    ("duplicate-key", "name: a\nname: b\n", "duplicate key 'name'"),
    ("bad-name", small_spec(name="my study!"), "name: must be 1-100 letters"),
]


@pytest.mark.parametrize("doc,expected", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_spec_one_line_error(write_spec, runner, tmp_path: Path, doc, expected: str) -> None:
    path = write_spec(doc)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert expected in str(err.value)
    assert str(err.value).startswith(str(path) + ": ")
    # Through the CLI: one line, non-zero, no traceback, and the storage is never created.
    db = tmp_path / "never.db"
    result = invoke(runner, "run", path, "--storage", f"sqlite:///{db}")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: {err.value}"]
    assert not db.exists()


def test_validate_command_reports_ok_and_errors(write_spec, runner) -> None:
    ok = invoke(runner, "validate", write_spec(small_spec()))
    assert ok.exit_code == 0 and "ok - study 'small'" in ok.output
    bad = invoke(runner, "validate", write_spec(small_spec(budget={"n_trials": -1}), "bad.yaml"))
    assert bad.exit_code == 1 and "budget.n_trials: must be >= 1" in bad.output


def test_missing_and_binary_files(runner, tmp_path: Path) -> None:
    missing = invoke(runner, "validate", tmp_path / "nope.yaml")
    assert missing.exit_code == 1 and "nope.yaml: no such file" in missing.output
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"\x80\x02\x00\x01binary")
    result = invoke(runner, "validate", binary)
    assert result.exit_code == 1 and "is a binary file" in result.output
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    result = invoke(runner, "validate", latin)
    assert result.exit_code == 1 and "is not UTF-8 text" in result.output
