"""The user's own data: `data: {dataset: module:function}` for hpo's own loop.

The function takes no arguments and returns either one set (hpo splits it with `split:`, as for
the built-in datasets, streamed or not), a dict `{"train": ..., "val": ..., "test": ...}` (`val`
may be left out: it is then carved from train by the split's fractions), or a tuple `(train,
val, test)`. A set is a map-style torch `Dataset` of
`(x, y)` pairs, or a pair `(X, y)` of tensors or NumPy arrays.

Data that fits `data.max_resident_mb` is gathered into tensors once and lives on the device, with
index batching (hpo's fast path); `(X, y)` arrays are in memory already and are always held so. Larger data is streamed: each epoch reads it through a
`DataLoader` with worker processes, pinned memory and non-blocking copies, as the Dataset returns
it (hpo's `scaling` applies to resident data only: normalise streamed data in the Dataset).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hpo.errors import DataError
from hpo.spec.schema import DataSpec

KEY = "data.dataset"
CPU_RESIDENT_MB = 2048.0


@dataclass(frozen=True)
class Stream:
    """A split too large for the device, read through a DataLoader each epoch."""

    dataset: Any  # a map-style torch Dataset of (x, y)
    workers: int
    pin: bool

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int, device: torch.device, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False,
                shard: tuple[int, int, int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`shard`: (rank, world size, seed, epoch) of a trial of several processes: this rank's
        part of the epoch, through a DistributedSampler."""
        from torch.utils.data import DataLoader, DistributedSampler

        sampler: DistributedSampler[Any] | None = None
        if shard is not None:
            rank, world, seed, epoch = shard
            sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
            sampler.set_epoch(epoch)
            shuffle = False
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                            sampler=sampler, num_workers=self.workers, pin_memory=self.pin, drop_last=drop_last,
                            persistent_workers=False)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass(frozen=True)
class UserData:
    """What a data function gave: numpy arrays to keep resident, or streams."""

    arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None  # part -> (X, y), when resident
    streams: dict[str, Stream] | None  # part -> stream, when too large for the device
    input_shape: tuple[int, ...]
    n_outputs: int
    task: str


def load_user_data(spec: DataSpec, device: torch.device, seed: int = 0) -> UserData:
    from hpo.data.seeding import seed_all
    from hpo.spec.user_code import load

    fn = load(spec.dataset, KEY)
    seed_all(seed)  # a function that draws (a random split, generated data) gives the same data every run
    try:
        out = fn()
    except Exception as e:
        raise DataError(f"{KEY}: {spec.dataset} raised {type(e).__name__}: {e}") from None
    parts = _parts(out, spec)
    first = _sample(parts[next(iter(parts))], next(iter(parts)), spec)
    budget = spec.max_resident_mb if spec.max_resident_mb is not None else _default_budget(device)
    size = sum(len(p) for p in parts.values()) * first[0].numel() * 4 / 2**20
    if size <= budget or all(isinstance(p, tuple) for p in parts.values()):
        # Resident: an item of shape (H, W) is an image of one channel, held as (1, H, W).
        input_shape = tuple(first[0].shape) if first[0].dim() != 2 else (1, *first[0].shape)
        arrays = {name: _gather(p, name, spec) for name, p in parts.items()}
        return UserData(arrays, None, input_shape, _outputs(arrays, spec.task), spec.task)
    if spec.cv_folds:
        raise DataError(f"data.cv_folds: the data ({size:.0f} MiB) is streamed, not held on the device; "
                        "cross-validation needs it resident (raise data.max_resident_mb)")
    n_out = _stream_classes(parts.get("train", parts.get("all"))) if spec.task == "classification" else 1
    parts = split_stream(parts, spec, seed)
    workers = spec.loader_workers if spec.loader_workers is not None else min(4, _cores())
    streams = {name: Stream(p, workers, device.type == "cuda") for name, p in parts.items()}
    _sample(parts["train"], "train", spec)
    # Streamed: batches are what the Dataset returns, so the model sees each item's own shape.
    return UserData(None, streams, tuple(first[0].shape), n_out, spec.task)


def split_stream(parts: dict[str, Any], spec: DataSpec, seed: int) -> dict[str, Any]:
    """train, val and test Datasets of streamed data: one set is split by `split:`'s fractions, a
    missing val is carved from train; by index (torch's Subset of the returned Dataset), stratified
    when the Dataset has `targets`, with the study's seed."""
    from sklearn.model_selection import train_test_split
    from torch.utils.data import Subset

    def cut(dataset: Any, index: np.ndarray, share: float, name: str) -> tuple[np.ndarray, np.ndarray]:
        targets = getattr(dataset, "targets", None)
        labels = np.asarray(targets)[index] if targets is not None and spec.task == "classification" else None
        try:
            keep, away = train_test_split(index, test_size=share, random_state=seed, stratify=labels)
        except ValueError as e:
            raise DataError(f"data.split: cannot split {name} ({len(index)} items) this way ({e})") from None
        return np.sort(keep), np.sort(away)

    out = dict(parts)
    base = out.pop("all", None)
    if base is not None:
        index, test = cut(base, np.arange(len(base)), spec.split.test, "the returned set")
        out["test"] = Subset(base, test.tolist())
    else:
        base = out["train"]
        index = np.arange(len(base))
    if "val" in out:
        out["train"] = Subset(base, index.tolist()) if len(index) < len(base) else base
    else:
        train, val = cut(base, index, spec.split.val / (spec.split.train + spec.split.val), "train")
        out["train"], out["val"] = Subset(base, train.tolist()), Subset(base, val.tolist())
    return out


def _default_budget(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 4 / 2**20
    return CPU_RESIDENT_MB


def _cores() -> int:
    import os

    return max(1, (os.cpu_count() or 1))


def _parts(out: Any, spec: DataSpec) -> dict[str, Any]:
    if isinstance(out, (tuple, list)) and len(out) in (2, 3) and all(_is_set(v) for v in out):
        if len(out) == 2:
            raise DataError(f"{KEY}: {spec.dataset} returned 2 sets (train, val); hpo also needs a test set, "
                            "scored once on the best model: return (train, val, test), or one set for hpo to split")
        out = dict(zip(("train", "val", "test"), out))
    if isinstance(out, Mapping):
        unknown = set(out) - {"train", "val", "test"}
        if unknown or "train" not in out:
            raise DataError(f"{KEY}: {spec.dataset} returned a dict with keys {sorted(map(str, out))}; "
                            "expected train, val (optional) and test")
        if "test" not in out:
            raise DataError(f"{KEY}: {spec.dataset} returned no test set; return train, val and test, or one "
                            "set for hpo to split")
        parts = {k: _set(v, k, spec) for k, v in out.items()}
        return parts
    return {"all": _set(out, "the returned set", spec)}


def _is_set(value: Any) -> bool:
    """A torch Dataset, or a pair (X, y) of arrays: one of several sets returned as a tuple (an
    (X, y) pair itself holds arrays, not sets)."""
    from torch.utils.data import Dataset

    if isinstance(value, Dataset):
        return True
    return isinstance(value, tuple) and len(value) == 2 and all(
        isinstance(v, (np.ndarray, torch.Tensor)) for v in value)


def _set(value: Any, name: str, spec: DataSpec) -> Any:
    if isinstance(value, tuple) and len(value) == 2:
        x, y = (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in value)
        if x.dtype == object or y.dtype == object:
            raise DataError(f"{KEY}: {name}: X and y must be numeric arrays")
        if len(x) != len(y):
            raise DataError(f"{KEY}: {name}: X has {len(x)} rows but y has {len(y)}")
        return (x, y)
    if hasattr(value, "__getitem__") and hasattr(value, "__len__"):
        if len(value) == 0:
            raise DataError(f"{KEY}: {name} is empty")
        return value
    raise DataError(f"{KEY}: {spec.dataset} returned a {type(value).__name__} for {name}; expected a torch "
                    "Dataset of (x, y) or a pair (X, y) of arrays or tensors")


def _sample(part: Any, name: str, spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    item = (part[0][0], part[1][0]) if isinstance(part, tuple) else part[0]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DataError(f"{KEY}: {name}[0] is a {type(item).__name__}; a Dataset must return (x, y) pairs")
    x, y = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in item)
    if not x.is_floating_point() and x.dtype not in (torch.uint8, torch.int64, torch.int32):
        raise DataError(f"{KEY}: {name}[0]: x is {x.dtype}; expected numbers")
    if y.numel() != 1:
        raise DataError(f"{KEY}: {name}[0]: y has shape {tuple(y.shape)}; expected one label or target per item")
    if spec.task == "classification" and y.is_floating_point() and float(y) != int(float(y)):
        raise DataError(f"{KEY}: {name}[0]: y is {float(y)}, not a class number (set data.task: regression)")
    return x, y


def _gather(part: Any, name: str, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(part, tuple):
        x, y = part
    else:
        pairs = [part[i] for i in range(len(part))]
        x = np.stack([np.asarray(p[0]) for p in pairs])
        y = np.asarray([np.asarray(p[1]).item() for p in pairs])
    x = x.astype(np.float32)
    if x.ndim == 3:  # N x H x W images: one channel
        x = x[:, None]
    y = y.astype(np.int64) if spec.task == "classification" else y.astype(np.float32)
    if spec.task == "classification" and y.min() < 0:
        raise DataError(f"{KEY}: {name}: class labels must be 0..K-1, found {y.min()}")
    return x, y.reshape(-1)


def _outputs(arrays: dict[str, tuple[np.ndarray, np.ndarray]], task: str) -> int:
    if task == "regression":
        return 1
    return int(max(y.max() for _, y in arrays.values())) + 1


def _stream_classes(dataset: Any) -> int:
    """The number of classes of a streamed Dataset: from its `classes` attribute, else its labels."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return int(torch.as_tensor(targets).max()) + 1
    raise DataError(f"{KEY}: a streamed classification Dataset needs a `classes` list or a `targets` "
                    "tensor, so hpo knows the number of classes without reading all of it")
