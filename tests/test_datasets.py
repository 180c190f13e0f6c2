"""Every data source with good and broken files, regression, k-fold CV and the CNN."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from hpo.data.sources import FASHION_DIR, FASHION_FILES
from hpo.data.splits import DataCache
from hpo.errors import DataError
from hpo.spec.loading import load_spec
from hpo.spec.params import Params
from hpo.spec.schema import DataSpec, SplitSpec
from hpo.training.models import build_model
from hpo.training.trainer import Trainer
from tests.conftest import REQUIRE_ALL, invoke, small_spec

CPU = torch.device("cpu")
HAVE_FASHION = all((FASHION_DIR / f).is_file() for f in FASHION_FILES.values())
# Under REQUIRE_ALL the tests run without the files and fail on them (CI installs the package).
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION and not REQUIRE_ALL,
    reason=f"Fashion-MNIST files not in {FASHION_DIR}: apt-get install dataset-fashion-mnist",
)


def fashion(n_train: int | None = None, path: str | None = None) -> DataSpec:
    return DataSpec("fashion_mnist", SplitSpec(0.9, 0.1, 0.0), n_train=n_train, path=path)


# ---- Fashion-MNIST ---------------------------------------------------------------------------


@needs_fashion
def test_fashion_mnist_real_files_and_its_own_test_split() -> None:
    cache = DataCache(fashion(), seed=0, device=CPU)
    d = cache.get("none")
    assert d.input_shape == (1, 28, 28) and d.n_outputs == 10
    assert (len(d.train), len(d.val), len(d.test)) == (54000, 6000, 10000)
    assert float(d.train.x.max()) <= 1.0 and float(d.train.x.min()) >= 0.0
    assert torch.bincount(d.test.y).tolist() == [1000] * 10  # the official, balanced test set


@needs_fashion
def test_fashion_subsample_is_stratified() -> None:
    d = DataCache(fashion(n_train=2000), seed=0, device=CPU).get("standard")
    assert len(d.train) + len(d.val) == 2000 and len(d.test) == 10000
    counts = torch.bincount(torch.cat([d.train.y, d.val.y]), minlength=10)
    assert counts.min() == counts.max() == 200


def test_fashion_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        DataCache(fashion(path=str(tmp_path)), seed=0, device=CPU)


def test_fashion_env_var_and_corrupt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FASHION_FILES.values():
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big"))  # truncated header
    monkeypatch.setenv("HPO_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="truncated header"):
        DataCache(fashion(), seed=0, device=CPU)


# ---- CSV -------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[list[object]]) -> Path:
    path.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def table(n: int = 90, seed: int = 0) -> list[list[object]]:
    rng = np.random.default_rng(seed)
    rows: list[list[object]] = [["size", "weight", "colour", "species"]]
    for i in range(n):
        species = ["cat", "dog", "fox"][i % 3]
        base = {"cat": 1.0, "dog": 3.0, "fox": 5.0}[species]
        rows.append([round(base + rng.normal(0, 0.3), 3), round(base * 2 + rng.normal(0, 0.3), 3),
                     ["red", "blue"][i % 2], species])
    return rows


def csv_spec(path: Path, **data: object) -> DataSpec:
    return DataSpec("csv", path=str(path), label=data.pop("label", "species"), **data)  # type: ignore[arg-type]


def test_csv_with_text_labels_and_a_categorical_column(tmp_path: Path) -> None:
    raw = DataCache(csv_spec(write_csv(tmp_path / "a.csv", table())), seed=0, device=CPU).raw
    assert raw.input_shape == (4,)  # size, weight, colour one-hot (blue, red)
    assert raw.n_outputs == 3 and raw.task == "classification"
    assert len(raw.x_dev) + len(raw.x_test) == 90


@pytest.mark.parametrize("mutate,message", [
    (lambda r: [row[:3] for row in r], "has no column 'species'"),
    (lambda r: r[:1] + [[1.0, "", "red", "cat"]] + r[2:], "column 'weight' has 1 missing values (first on line 2)"),
    (lambda r: r[:1] + [[1.0, 2.0, "red"]] + r[2:], "line 2 has 3 fields, the header has 4"),
    (lambda r: [r[0]] + [row[:3] + ["cat"] for row in r[1:]], "needs at least 2 classes"),
    (lambda r: [r[0]] + [row[:3] + [row[3]] for row in r[1:]] + [[1, 2, "red", "owl"]], "class 'owl' has only 1 sample"),
    (lambda r: r[:1], "too few to split"),
])
def test_broken_csv_files(tmp_path: Path, mutate, message: str) -> None:
    path = write_csv(tmp_path / "bad.csv", mutate(table()))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DataCache(csv_spec(path), seed=0, device=CPU)


def test_csv_categorical_refuse_and_encoding(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", table())
    with pytest.raises(DataError, match="column 'colour' is not numeric"):
        DataCache(csv_spec(path, categorical="refuse"), seed=0, device=CPU)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("a,b\n\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        DataCache(csv_spec(latin, label="b"), seed=0, device=CPU)


def test_csv_regression_end_to_end(write_spec, runner, storage_url, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3))
    y = x @ np.array([1.5, -2.0, 0.5]) + rng.normal(0, 0.1, 200)
    rows = [["a", "b", "c", "target"]] + [[*map(lambda v: round(v, 4), xi), round(yi, 4)] for xi, yi in zip(x, y)]
    write_csv(tmp_path / "reg.csv", rows)
    spec = small_spec(
        name="reg", metric="val_mse",
        data={"dataset": "csv", "path": "reg.csv", "label": "target", "task": "regression"},
        budget={"n_trials": 4, "epochs": 30},
        space={"lr": {"low": 3e-3, "high": 3e-2, "log": True}, "width": 32},
    )
    result = invoke(runner, "run", write_spec(spec), "--storage", storage_url)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="reg", storage=storage_url)
    assert study.direction.name == "MINIMIZE"
    assert study.best_value < 0.2  # standardized MSE: a near-linear target is learned well
    assert study.user_attrs["test"]["metric"] == "test_mse" and study.user_attrs["test"]["value"] < 0.3


def test_regression_metric_needs_regression_data(write_spec) -> None:
    from hpo.errors import SpecError

    with pytest.raises(SpecError, match="val_mse is a regression metric but the digits data is classification"):
        load_spec(write_spec(small_spec(metric="val_mse", data={"dataset": "digits"})))


# ---- NPZ -------------------------------------------------------------------------------------


def images(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright-left vs bright-right 8x8 images: easy for a CNN."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.random((n, 8, 8)).astype(np.float32) * 0.3
    for i in range(n):
        if y[i]:
            x[i, :, 4:] += 1.0
        else:
            x[i, :, :4] += 1.0
    return x, y


def test_npz_images_get_a_channel(tmp_path: Path) -> None:
    x, y = images()
    np.savez(tmp_path / "img.npz", X=x, y=y)
    raw = DataCache(DataSpec("npz", path=str(tmp_path / "img.npz")), seed=0, device=CPU, model="cnn").raw
    assert raw.input_shape == (1, 8, 8) and raw.n_outputs == 2


@pytest.mark.parametrize("arrays,message", [
    (lambda x, y: {"X": x, "y": y[:-1]}, "X has 120 rows but y has 119"),
    (lambda x, y: {"features": x, "y": y}, "must hold arrays 'X' and 'y'"),
    (lambda x, y: {"X": x, "y": y.reshape(-1, 1)}, "y has shape"),
    (lambda x, y: {"X": np.where(x > 1.2, np.nan, x), "y": y}, "NaN or infinite"),
    (lambda x, y: {"X": np.array([str(v) for v in x.reshape(-1)]).reshape(x.shape), "y": y}, "must be numeric"),
    (lambda x, y: {"X": np.array([object()] * len(y), dtype=object), "y": y}, "need pickle"),
    (lambda x, y: {"X": x, "y": y * 0.5}, "class labels must be integers"),
])
def test_broken_npz_files(tmp_path: Path, arrays, message: str) -> None:
    x, y = images()
    np.savez(tmp_path / "bad.npz", **arrays(x, y))
    with pytest.raises(DataError, match=message):
        DataCache(DataSpec("npz", path=str(tmp_path / "bad.npz")), seed=0, device=CPU)


def test_not_an_npz_and_cnn_on_tables(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a readable .npz file"):
        DataCache(DataSpec("npz", path=str(tmp_path / "junk.npz")), seed=0, device=CPU)
    np.savez(tmp_path / "tab.npz", X=np.random.rand(50, 4), y=np.arange(50) % 2)
    with pytest.raises(DataError, match="cnn needs images"):
        DataCache(DataSpec("npz", path=str(tmp_path / "tab.npz")), seed=0, device=CPU, model="cnn")


def test_relative_paths_resolve_against_the_study_file(write_spec, tmp_path: Path) -> None:
    x, y = images()
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "img.npz", X=x, y=y)
    spec = load_spec(write_spec(small_spec(data={"dataset": "npz", "path": "data/img.npz"})))
    assert spec.data.path == str(tmp_path / "data" / "img.npz")


# ---- CNN -------------------------------------------------------------------------------------


def test_cnn_learns_image_data(write_spec, runner, storage_url, tmp_path: Path) -> None:
    x, y = images(200)
    np.savez(tmp_path / "img.npz", X=x, y=y)
    spec = small_spec(
        name="cnn", model="cnn",
        data={"dataset": "npz", "path": "img.npz"},
        space={"lr": {"low": 3e-3, "high": 1e-2, "log": True}, "width": 8, "depth": 2,
               "pooling": ["max", "avg"], "kernel_size": 3, "norm": "batch", "residual": [False, True]},
        budget={"n_trials": 3, "epochs": 4},
    )
    assert invoke(runner, "run", write_spec(spec), "--storage", storage_url).exit_code == 0
    study = optuna.load_study(study_name="cnn", storage=storage_url)
    assert study.best_value > 0.9 and study.user_attrs["test"]["value"] > 0.9


@needs_fashion
def test_cnn_trains_on_fashion_mnist() -> None:
    cache = DataCache(fashion(n_train=3000), seed=0, device=CPU, model="cnn")
    d = cache.get("standard")
    p = Params(width=16, depth=2, lr=3e-3, batch_size=64, norm="batch")
    torch.manual_seed(0)
    t = Trainer(build_model("cnn", p, d.input_shape, d.n_outputs), p, d, 2, CPU, 0)
    assert t.fit()[-1].val["accuracy"] > 0.7


def test_cnn_is_refused_for_tabular_datasets(write_spec) -> None:
    from hpo.errors import SpecError

    with pytest.raises(SpecError, match="model: cnn needs image data; digits is tabular"):
        load_spec(write_spec(small_spec(model="cnn", data={"dataset": "digits"})))


# ---- k-fold cross-validation -------------------------------------------------------------------


def test_cv_folds_partition_the_development_pool() -> None:
    raw = DataCache(DataSpec("digits", cv_folds=4), seed=0, device=CPU).raw
    vals = np.concatenate([va for _, va in raw.folds])
    assert sorted(vals.tolist()) == list(range(len(raw.x_dev)))  # every sample validates once
    for tr, va in raw.folds:
        assert not set(tr) & set(va)


def test_cv_reports_the_mean_of_the_folds(write_spec, runner, storage_url) -> None:
    from hpo.runtime.trial import trial_seed
    from hpo.spec.loading import load_spec
    from hpo.spec.space import resolve
    from hpo.training.builtin import fold_seed

    path = write_spec(small_spec(
        name="cv", data={"dataset": "digits", "cv_folds": 3},
        budget={"n_trials": 3, "epochs": 3}, pruner={"name": "none"},
    ))
    assert invoke(runner, "run", path, "--storage", storage_url).exit_code == 0
    study = optuna.load_study(study_name="cv", storage=storage_url)
    trial = study.trials[1]
    assert trial.user_attrs["cv_folds"] == 3 and sorted(trial.intermediate_values) == [0, 1, 2]
    # Train the three fold models by hand with the trial's seeds: the reports are their mean.
    spec = load_spec(path)
    params = resolve(spec, trial.params)
    folds = DataCache(spec.data, spec.seed, CPU).folds(params.scaling)
    seed = trial_seed(spec.seed, trial.number)
    curves = []
    for k, d in enumerate(folds):
        torch.manual_seed(fold_seed(seed, k))
        t = Trainer(build_model("mlp", params, d.input_shape, d.n_outputs), params, d, 3, CPU, fold_seed(seed, k))
        curves.append([r.val["accuracy"] for r in t.fit()])
    means = [sum(c[e] for c in curves) / 3 for e in range(3)]
    assert [trial.intermediate_values[e] for e in range(3)] == pytest.approx(means, rel=1e-6)
    # The best model is the ensemble of its 3 fold models, scored once on the test split.
    import torch as _t

    bundle = _t.load(study.user_attrs["test"]["model_path"], weights_only=True)
    assert len(bundle["models"]) == 3 and bundle["trial"] == study.best_trial.number
