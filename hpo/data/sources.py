"""Dataset sources: bundled (digits, diabetes), generated (synthetic), Fashion-MNIST's IDX files,
and the user's own CSV or NPZ. Nothing is downloaded; every problem with a file is a DataError
that says what is wrong and how to fix it.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpo.errors import DataError
from hpo.spec.schema import DataSpec

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # the Debian package dataset-fashion-mnist
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
ENV_DATA_DIR = "HPO_DATA_DIR"


@dataclass(frozen=True)
class Source:
    """Unsplit arrays; `x_test` is set only when the dataset brings its own test split."""

    x: np.ndarray
    y: np.ndarray
    task: str
    n_outputs: int
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    n_train: int | None = None  # the first n_train rows of x are train, the rest val (user data)


def load_source(spec: DataSpec, seed: int) -> Source:
    loaders = {
        "digits": _digits,
        "synthetic": _synthetic,
        "diabetes": _diabetes,
        "fashion_mnist": _fashion_mnist,
        "csv": _csv,
        "npz": _npz,
    }
    return loaders[spec.dataset](spec, seed)


def _digits(spec: DataSpec, seed: int) -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return Source(bunch.data.astype(np.float32), bunch.target.astype(np.int64), "classification", 10)


def _diabetes(spec: DataSpec, seed: int) -> Source:
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    return Source(bunch.data.astype(np.float32), bunch.target.astype(np.float32), "regression", 1)


def _synthetic(spec: DataSpec, seed: int) -> Source:
    from sklearn.datasets import make_classification

    n_redundant = min(2, spec.n_features - spec.n_informative)
    clusters = 2 if spec.n_classes * 2 <= 2**spec.n_informative else 1
    x, y = make_classification(
        n_samples=spec.n_samples,
        n_features=spec.n_features,
        n_informative=spec.n_informative,
        n_redundant=n_redundant,
        n_classes=spec.n_classes,
        n_clusters_per_class=clusters,
        random_state=seed,
    )
    return Source(x.astype(np.float32), y.astype(np.int64), "classification", spec.n_classes)


# ---- Fashion-MNIST ---------------------------------------------------------------------------


def fashion_dir(spec: DataSpec) -> Path:
    """data.path, else $HPO_DATA_DIR, else the Debian package's folder."""
    if spec.path:
        return Path(spec.path)
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR])
    return FASHION_DIR


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise DataError(f"{path}: expected {math.prod(shape)} values for shape {shape}, found {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _fashion_mnist(spec: DataSpec, seed: int) -> Source:
    folder = fashion_dir(spec)
    missing = [name for name in FASHION_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}): install it with "
            "`apt-get install dataset-fashion-mnist`, or set data.path or HPO_DATA_DIR to a folder "
            "holding the four IDX .gz files"
        )
    arrays = {key: read_idx(folder / name) for key, name in FASHION_FILES.items()}
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{folder}: {part} images {x.shape} and labels {y.shape} do not match")
    x_train, y_train = arrays["x_train"], arrays["y_train"].astype(np.int64)
    if spec.n_train is not None and spec.n_train < len(x_train):
        from sklearn.model_selection import train_test_split

        x_train, _, y_train, _ = train_test_split(
            x_train, y_train, train_size=spec.n_train, random_state=seed, stratify=y_train
        )
    # 0..255 bytes -> 0..1 floats, one channel: N x 1 x 28 x 28.
    x_train = (x_train.astype(np.float32) / 255.0)[:, None]
    x_test = (arrays["x_test"].astype(np.float32) / 255.0)[:, None]
    return Source(x_train, y_train, "classification", 10, x_test, arrays["y_test"].astype(np.int64))


# ---- the user's own files --------------------------------------------------------------------


def _user_file(spec: DataSpec, suffixes: tuple[str, ...]) -> Path:
    assert spec.path is not None
    path = Path(spec.path)
    if path.is_dir():
        raise DataError(f"data.path: {path} is a directory, not a {'/'.join(suffixes)} file")
    if not path.is_file():
        raise DataError(f"data.path: {path} does not exist")
    if not path.name.lower().endswith(suffixes):
        # A data file is named for what it is; an error about any other file (/etc/shadow, named in a
        # crafted spec) could otherwise show its first line in the message.
        raise DataError(f"data.path: {path} is not a {' or '.join(suffixes)} file")
    return path


def _labels(raw: np.ndarray, task: str, where: str) -> tuple[np.ndarray, int, tuple[str, ...]]:
    """Classification labels -> 0..K-1 (sorted); regression targets -> float32."""
    if task == "regression":
        try:
            y = raw.astype(np.float64)
        except ValueError:
            raise DataError(f"{where}: regression targets must be numbers") from None
        if not np.all(np.isfinite(y)):
            raise DataError(f"{where}: targets contain NaN or infinite values")
        return y.astype(np.float32), 1, ()
    values = raw.tolist()
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
            raise DataError(f"{where}: class labels must be integers or names, not fractional numbers")
        values = raw.astype(np.int64).tolist()
    classes = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    if len(classes) < 2:
        raise DataError(f"{where}: needs at least 2 classes, found {len(classes)}")
    if len(classes) > 10_000:
        raise DataError(f"{where}: {len(classes)} distinct labels; is this a regression target? set data.task: regression")
    index = {c: i for i, c in enumerate(classes)}
    counts = np.bincount([index[v] for v in values], minlength=len(classes))
    if counts.min() < 2:
        rare = classes[int(counts.argmin())]
        raise DataError(f"{where}: class {rare!r} has only {int(counts.min())} sample; every class needs at least 2")
    return np.array([index[v] for v in values], dtype=np.int64), len(classes), tuple(map(str, classes))


def _csv(spec: DataSpec, seed: int) -> Source:
    path = _user_file(spec, (".csv",))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise DataError(f"data.path: {path} is not UTF-8 text") from None
    except csv.Error as e:
        raise DataError(f"data.path: {path}: {e}") from None
    if not rows or not rows[0]:
        raise DataError(f"data.path: {path} is empty")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if spec.label not in header:
        raise DataError(f"data.label: {path} has no column {spec.label!r} (columns: {', '.join(header[:20])})")
    if len(body) < 4:
        raise DataError(f"data.path: {path} has {len(body)} data rows; too few to split")
    for i, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"data.path: {path} line {i} has {len(row)} fields, the header has {len(header)}")
    columns = list(zip(*body))
    label_at = header.index(spec.label)
    features: list[np.ndarray] = []
    for j, (name, column) in enumerate(zip(header, columns)):
        if j == label_at:
            continue
        blanks = [i for i, v in enumerate(column) if v.strip() == "" or v.strip().lower() in ("na", "nan", "null")]
        if blanks:
            raise DataError(
                f"data.path: column {name!r} has {len(blanks)} missing values (first on line {blanks[0] + 2}); "
                "fill or drop them first"
            )
        try:
            features.append(np.array([float(v) for v in column], dtype=np.float32)[:, None])
        except ValueError:
            if spec.categorical == "refuse":
                raise DataError(
                    f"data.path: column {name!r} is not numeric; encode it, or set data.categorical: onehot"
                ) from None
            levels = sorted(set(v.strip() for v in column))
            if len(levels) > 100:
                raise DataError(f"data.path: column {name!r} has {len(levels)} text values; too many to one-hot encode")
            onehot = np.zeros((len(column), len(levels)), dtype=np.float32)
            for i, v in enumerate(column):
                onehot[i, levels.index(v.strip())] = 1.0
            features.append(onehot)
    if not features:
        raise DataError(f"data.path: {path} has no feature columns besides the label")
    x = np.concatenate(features, axis=1)
    if not np.all(np.isfinite(x)):
        raise DataError(f"data.path: {path} has infinite values")
    raw = [v.strip() for v in columns[label_at]]
    labels = np.array([int(float(v)) for v in raw]) if all(map(_is_int, raw)) else np.array(raw)
    y, n_out, classes = _labels(labels, spec.task, f"data.label {spec.label!r}")
    return Source(x, y, spec.task, n_out, classes=classes)


def _is_int(text: str) -> bool:
    try:
        return float(text) == int(float(text))
    except (ValueError, OverflowError):
        return False


def _npz(spec: DataSpec, seed: int) -> Source:
    path = _user_file(spec, (".npz",))
    with open(path, "rb") as f:
        if f.read(2) != b"PK":  # an .npz is a zip archive
            raise DataError(f"data.path: {path} is not a readable .npz file (save it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:  # no pickles: a data file runs no code
            keys = set(archive.files)
            if not {"X", "y"} <= keys:
                raise DataError(f"data.path: {path} must hold arrays 'X' and 'y' (it holds {', '.join(sorted(keys)) or 'nothing'})")
            x, y = archive["X"], archive["y"]
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"data.path: {path} holds objects that need pickle; save plain arrays ({e})") from None
    except Exception as e:
        raise DataError(f"data.path: {path} is not a readable .npz file ({type(e).__name__})") from None
    if x.dtype.kind not in "biuf":
        raise DataError(f"data.path: X has dtype {x.dtype}; it must be numeric")
    if x.ndim not in (2, 3, 4):
        raise DataError(f"data.path: X has shape {x.shape}; expected N x F, N x H x W or N x C x H x W")
    if y.ndim != 1:
        raise DataError(f"data.path: y has shape {y.shape}; expected one label per row (N,)")
    if len(x) != len(y):
        raise DataError(f"data.path: X has {len(x)} rows but y has {len(y)}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError("data.path: X has NaN or infinite values")
    if x.ndim == 3:
        x = x[:, None]  # N x H x W images -> one channel
    y_fixed, n_out, classes = _labels(y, spec.task, "data.path: y")
    return Source(x, y_fixed, spec.task, n_out, classes=classes)
