"""Every private Optuna and torch API hpo touches, in one place.

Optuna keeps a study's storage and ids, a trial's id, its RDB models and its heartbeat check
private; torch keeps the fused optimizer kernels private. hpo needs them (storage calls Optuna's
public API does not expose, one-statement batch writes, the fused CPU update), so each is reached
through this module, and tests/test_private_apis.py names every one and fails with a clear
message when an installed Optuna or torch lacks it.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.storages import BaseStorage

# What this module relies on, by library: checked by tests/test_private_apis.py.
OPTUNA_ATTRIBUTES = {
    "optuna.Study": ("_storage", "_study_id"),
    "optuna.Trial": ("_trial_id", "_cached_frozen_trial"),
    "optuna.trial.FrozenTrial": ("_trial_id",),
    "optuna.storages._CachedStorage": ("_backend",),
    "optuna.storages._heartbeat": ("is_heartbeat_enabled",),
    "optuna.storages._rdb.models": ("BaseModel", "TrialModel", "TrialUserAttributeModel",
                                    "TrialIntermediateValueModel", "StudyModel", "StudyUserAttributeModel",
                                    "StudySystemAttributeModel"),
    "optuna.storages._rdb.storage": ("_create_scoped_session",),
    # ResilientRDBStorage overrides the two private calls Optuna's cached storage makes on it, wraps
    # the private reads that cache and the heartbeat thread make (RDB_PRIVATE_DB_METHODS) in its
    # retries, and writes inside its own sessions with the *_without_commit helpers.
    "optuna.storages.RDBStorage": ("scoped_session", "engine", "grace_period", "_set_trial_param_without_commit",
                                   "_set_trial_attr_without_commit", "_set_trial_intermediate_value_without_commit",
                                   "_set_trial_param", "_create_new_trial", "_get_trials", "_get_best_trial_id",
                                   "_get_stale_trial_ids"),
    "optuna.storages.journal.JournalRedisBackend": ("_redis", "_prefix"),
    "optuna.study._frozen.FrozenStudy": ("_study_id",),
    "optuna.samplers._lazy_random_state": ("LazyRandomState",),
}
DYNAMO_MODULE = "torch._dynamo"
TORCH_MODULES = (DYNAMO_MODULE,)
TORCH_FUNCTIONS = ("_fused_adam_", "_fused_adamw_", "_fused_adagrad_", "_fused_sgd_")


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes (Optuna 5 has no public accessor)."""
    return study._storage


def study_id(study: Any) -> int:
    """A study's id (an optuna.Study or a FrozenStudy from get_all_studies())."""
    return int(study._study_id)


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    return trial._trial_id


def backend_of(storage: Any) -> Any:
    """The storage behind Optuna's in-process cache (_CachedStorage), or the storage itself."""
    return getattr(storage, "_backend", storage)


def redis_journal(backend: Any) -> tuple[Any, str]:
    """The redis-py client and key prefix of Optuna's JournalRedisBackend (None elsewhere)."""
    return getattr(backend, "_redis", None), str(getattr(backend, "_prefix", ""))


def heartbeat_enabled(storage: Any) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def rdb_session(storage: Any) -> Any:
    """A session of an RDB storage, committed on success and rolled back on error, as Optuna's own
    writes use."""
    from optuna.storages._rdb.storage import _create_scoped_session

    return _create_scoped_session(storage.scoped_session, True)


def study_names(storage: Any) -> list[tuple[int, str]]:
    """(id, name) of every study of an RDB storage, read from its table alone: a listing that
    survives a study whose attributes cannot be decoded. Empty for other storages."""
    from optuna.storages import RDBStorage

    backend = backend_of(storage)
    if not isinstance(backend, RDBStorage):
        return []
    models = rdb_models()
    with rdb_session(backend) as session:
        return [(int(i), str(n)) for i, n in session.query(models.StudyModel.study_id, models.StudyModel.study_name)
                .order_by(models.StudyModel.study_id)]


def undecodable_attrs(storage: Any, study: int) -> list[tuple[str, str, str]]:
    """The attributes of a study in an RDB storage whose stored JSON does not decode, as (user or
    system, key, why): what another tool or a bad migration wrote. Empty for other storages."""
    import json

    from optuna.storages import RDBStorage

    backend = backend_of(storage)
    if not isinstance(backend, RDBStorage):
        return []
    models = rdb_models()
    out = []
    with rdb_session(backend) as session:
        for kind, model in (("user", models.StudyUserAttributeModel), ("system", models.StudySystemAttributeModel)):
            for key, text in session.query(model.key, model.value_json).filter(model.study_id == study):
                try:
                    json.loads(text)
                except ValueError as e:
                    out.append((kind, str(key), str(e)))
    return out


def microsecond_times_on_mysql() -> None:
    """Optuna's tables declare their times as DateTime, which MySQL and MariaDB store to the whole
    second (a trial's start and end, its heartbeat): tables created after this call store them to
    the microsecond there, as PostgreSQL and SQLite do. Tables that exist keep their columns."""
    from sqlalchemy import DateTime
    from sqlalchemy.dialects import mysql

    for table in rdb_models().BaseModel.metadata.tables.values():
        for column in table.columns:
            if type(column.type) is DateTime:
                column.type = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def rdb_models() -> Any:
    """Optuna's SQLAlchemy models (tables) of the RDB storage, for one-statement batch writes."""
    from optuna.storages._rdb import models

    return models


def fused_kernel(name: str) -> Any:
    """torch's fused optimizer kernel `name` (e.g. "_fused_adam_"), what torch.optim's fused=True runs."""
    import torch

    return getattr(torch, name)


def import_dynamo() -> None:
    """Import torch._dynamo, which every torch optimizer's constructor imports on its first call
    (torch._disable_dynamo): about 2 s on a slow core. Imported once in the process that forks the
    workers, they share it instead of each paying it during its first trial."""
    import importlib

    importlib.import_module(DYNAMO_MODULE)


def reported_values(trial: optuna.Trial) -> dict[int, float]:
    """The intermediate values an optuna.Trial holds for itself: report() checks a step against
    it, and a batch write of reports has to keep it current."""
    values: dict[int, float] = trial._cached_frozen_trial.intermediate_values
    return values


# RDBStorage's private methods that touch the database, called by Optuna's cached storage and the
# heartbeat thread: ResilientRDBStorage retries them as it does the public ones.
RDB_PRIVATE_DB_METHODS = ("_get_trials", "_get_best_trial_id", "_get_stale_trial_ids")


def rdb_set_trial_param(storage: Any, *args: Any) -> None:
    """RDBStorage's own `_set_trial_param` (what Optuna's cached storage calls), for a subclass
    that overrides it."""
    from optuna.storages import RDBStorage

    RDBStorage._set_trial_param(storage, *args)


def rdb_create_new_trial(storage: Any, *args: Any) -> Any:
    """RDBStorage's own `_create_new_trial` (what Optuna's cached storage calls), for a subclass
    that overrides it."""
    from optuna.storages import RDBStorage

    return RDBStorage._create_new_trial(storage, *args)


def set_attr_without_commit(storage: Any, session: Any, *args: Any) -> None:
    """RDBStorage's user/system attribute write inside a session the caller commits."""
    storage._set_trial_attr_without_commit(session, *args)


def set_intermediate_value_without_commit(storage: Any, session: Any, *args: Any) -> None:
    """RDBStorage's report write inside a session the caller commits."""
    storage._set_trial_intermediate_value_without_commit(session, *args)


def set_param_without_commit(storage: Any, session: Any, *args: Any) -> None:
    """RDBStorage's own parameter write (checks included) inside a session the caller commits, so
    a trial's parameters go in one transaction."""
    storage._set_trial_param_without_commit(session, *args)


def reseed_sampler(sampler: Any, seed: list[int]) -> None:
    """Seed every random stream of an Optuna sampler (and of the samplers it holds: TPE's random
    sampler for start-up trials, GP's independent one) from `seed`, in place. Optuna's samplers
    keep their streams in private LazyRandomState attributes, shared with their helpers (NSGA-II's
    crossover), so they are reseeded, never replaced. A QMC sampler's own scrambling seed is left
    alone: its sequence is shared by the whole study and indexed in the storage."""
    import numpy as np
    from optuna.samplers._lazy_random_state import LazyRandomState

    seen: set[int] = set()

    def visit(obj: Any, path: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for name, value in sorted(vars(obj).items()):
            if isinstance(value, LazyRandomState):
                if id(value) not in seen:
                    seen.add(id(value))
                    entropy = [*seed, *(ord(c) for c in f"{path}.{name}")]
                    value.rng.seed(np.random.SeedSequence(entropy).generate_state(2))
            elif isinstance(value, optuna.samplers.BaseSampler):
                visit(value, f"{path}.{name}")

    visit(sampler, "")
