"""The split into a development pool, a test split and folds: index arrays made with numpy and
scikit-learn only, no torch, so a process that has not imported torch can make them (the head start
of `hpo run`, hpo.execution.headstart).

Test is carved first (or is the dataset's own test split) and is never seen by the search. The
rest is split into train/val by the spec's fractions, or into k stratified folds when
`data.cv_folds` is set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpo.data.sources import Source, load_source
from hpo.errors import DataError
from hpo.spec.schema import DataSpec


@dataclass(frozen=True)
class RawData:
    """Unscaled arrays: the development pool (train + val), the test split, and the folds."""

    x_dev: np.ndarray
    y_dev: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    folds: tuple[tuple[np.ndarray, np.ndarray], ...]  # (train indices, val indices) into dev
    n_outputs: int
    task: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_dev.shape[1:])


def split(source: Source, spec: DataSpec, seed: int) -> RawData:
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    classify = source.task == "classification"
    if source.n_train is not None and not spec.cv_folds:  # the user gave train and val apart
        assert source.x_test is not None and source.y_test is not None
        n = len(source.x)
        folds = ((np.arange(source.n_train), np.arange(source.n_train, n)),)
        return RawData(source.x, source.y, source.x_test, source.y_test, folds, source.n_outputs, source.task)
    try:
        if source.x_test is not None:
            x_dev, y_dev, x_test, y_test = source.x, source.y, source.x_test, source.y_test
        else:
            x_dev, x_test, y_dev, y_test = train_test_split(
                source.x, source.y, test_size=spec.split.test, random_state=seed,
                stratify=source.y if classify else None,
            )
        index = np.arange(len(x_dev))
        if spec.cv_folds:
            kind = StratifiedKFold if classify else KFold
            folds = tuple(kind(spec.cv_folds, shuffle=True, random_state=seed).split(x_dev, y_dev))
        else:
            val_share = spec.split.val / (spec.split.train + spec.split.val)
            tr, va = train_test_split(index, test_size=val_share, random_state=seed,
                                      stratify=y_dev if classify else None)
            folds = ((np.sort(tr), np.sort(va)),)
    except ValueError as e:
        raise DataError(f"data.split: cannot split {len(source.x)} samples this way ({e})") from None
    assert x_test is not None and y_test is not None
    return RawData(x_dev, y_dev, x_test, y_test, folds, source.n_outputs, source.task)


def load_raw(spec: DataSpec, seed: int) -> RawData:
    """Load and split a dataset; nothing is downloaded."""
    return split(load_source(spec, seed), spec, seed)
