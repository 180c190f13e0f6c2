"""Every private Optuna and torch API hpo touches, in one place.

Optuna keeps a study's storage and ids, a trial's id, its RDB models and its heartbeat check
private; torch keeps the fused optimizer kernels private. hpo needs them (storage calls Optuna's
public API does not expose, one-statement batch writes, the fused CPU update), so each is reached
through this module, and tests/test_private_apis.py names every one and fails with a clear
message when an installed Optuna or torch lacks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the read-only commands reach Optuna's tables without optuna
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

# What this module relies on, by library: checked by tests/test_private_apis.py.
OPTUNA_ATTRIBUTES = {
    "optuna.Trial": ("_trial_id", "_cached_frozen_trial"),
    "optuna.trial.FrozenTrial": ("_trial_id",),
    "optuna.storages._CachedStorage": ("_backend",),
    "optuna.storages._heartbeat": ("is_heartbeat_enabled", "BaseHeartbeat"),
    "optuna.storages._cached_storage._CachedStorage": ("_get_stale_trial_ids", "_read_trials_from_remote_storage",
                                                       "_studies", "_lock"),
    "optuna.storages._cached_storage._StudyInfo": ("trials",),
    # Optuna's samplers read a study's trials through Study._get_trials (TrialsReader answers it).
    "optuna.Study": ("_storage", "_study_id", "_get_trials", "_thread_local", "_pop_waiting_trial_id"),
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
    # `hpo proxy` stops its server on Ctrl-C; run_grpc_proxy_server waits on one it never returns.
    "optuna.storages._grpc.server": ("make_server",),
    "optuna.study._frozen.FrozenStudy": ("_study_id",),
    "optuna.samplers._lazy_random_state": ("LazyRandomState",),
    # hpo's percentile pruning (hpo.runtime.pruning.percentile_prunes) takes the pruner's settings
    # and Optuna's own rules for a trial's best value and the steps it is checked at.
    "optuna.pruners.PercentilePruner": ("_percentile", "_n_startup_trials", "_n_warmup_steps", "_interval_steps",
                                        "_n_min_trials"),
    "optuna.pruners._percentile": ("_is_first_in_interval_step", "_get_best_intermediate_result_over_steps"),
}
DYNAMO_MODULE = "torch._dynamo"
TORCH_MODULES = (DYNAMO_MODULE,)
TORCH_FUNCTIONS = ("_fused_adam_", "_fused_adamw_", "_fused_adagrad_", "_fused_sgd_")


def grpc_proxy_server(storage: BaseStorage, host: str, port: int, thread_pool: Any) -> Any:
    """Optuna's gRPC storage proxy as a started `grpc.Server`, which the caller can stop: Optuna's
    run_grpc_proxy_server only waits on it, so on Ctrl-C its requests kept arriving at an exiting
    interpreter (a traceback, and an exit that waited on the connected workers)."""
    from optuna.storages._grpc.server import make_server

    server = make_server(storage, host, port, thread_pool)
    server.start()
    return server


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


def stale_trial_ids(storage: Any, study: int) -> list[int]:
    """The running trials of a study whose heartbeat stopped past the grace period (what Optuna's
    fail_stale_trials fails); none where the storage keeps no heartbeats."""
    from optuna.storages._heartbeat import BaseHeartbeat

    if not isinstance(storage, BaseHeartbeat) or not heartbeat_enabled(storage):
        return []
    return list(storage._get_stale_trial_ids(study))


def cached_trials(study: optuna.Study) -> dict[int, FrozenTrial] | None:
    """The trials of a study by number as Optuna's in-process cache holds them, brought up to date
    (one query for the trials new or unfinished since the last), without the sorted copy of every
    trial that get_trials makes; None where the storage has no such cache (journal, gRPC). The dict
    is the cache's own: read it, never change it."""
    storage: Any = study._storage
    if not hasattr(storage, "_read_trials_from_remote_storage"):
        return None
    storage._read_trials_from_remote_storage(study._study_id)
    with storage._lock:
        trials: dict[int, FrozenTrial] = storage._studies[study._study_id].trials
        return trials


def ask_new(study: optuna.Study) -> optuna.Trial:
    """`Study.ask()` where no trial is waiting (the caller knows: hpo.storage.ledger): a new trial,
    without Optuna's look for a waiting one, which filters every trial of the study
    (`_pop_waiting_trial_id`: 17 ms at 100,000 trials on SQLite). The rest is ask()'s own."""
    import optuna

    study._thread_local.cached_all_trials = None  # what ask() resets: the trials are read again
    return optuna.Trial(study, study._storage.create_new_trial(study._study_id))


class TrialsReader:
    """A view of a study that Optuna's samplers read: they ask `study._get_trials(...)`, which it
    answers with its own `get_trials` (hpo.storage.ledger.History)."""

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        raise NotImplementedError

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        return self.get_trials(deepcopy=deepcopy, states=states)


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


@dataclass(frozen=True)
class PercentileSettings:
    """What an optuna.pruners.PercentilePruner (a MedianPruner too) was made with."""

    percentile: float
    n_startup_trials: int
    n_warmup_steps: int
    interval_steps: int
    n_min_trials: int


def percentile_settings(pruner: Any) -> PercentileSettings:
    """A percentile pruner's settings, which Optuna keeps private."""
    return PercentileSettings(pruner._percentile, pruner._n_startup_trials, pruner._n_warmup_steps,
                              pruner._interval_steps, pruner._n_min_trials)


def checked_at(step: int, trial: FrozenTrial, settings: PercentileSettings) -> bool:
    """Whether a percentile pruner judges `trial` at `step` (past the warm-up, first in its interval)."""
    from optuna.pruners import _percentile

    return step >= settings.n_warmup_steps and bool(_percentile._is_first_in_interval_step(
        step, trial.intermediate_values.keys(), settings.n_warmup_steps, settings.interval_steps))


def best_reported(trial: FrozenTrial, maximize: bool) -> float:
    """A trial's best intermediate value, as a percentile pruner reads it (nan when all are nan)."""
    from optuna.pruners import _percentile
    from optuna.study import StudyDirection

    direction = StudyDirection.MAXIMIZE if maximize else StudyDirection.MINIMIZE
    return float(_percentile._get_best_intermediate_result_over_steps(trial, direction))


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
    import optuna
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


# ---- Optuna's RDB tables, read directly ---------------------------------------------------------
# The read-only commands (hpo.search.reading) ask the database what they print, a study of
# 100,000 trials never loaded whole, and without importing optuna. Optuna's schema is its own:
# tests/test_private_apis.py checks these tables and columns against Optuna's models.
OPTUNA_TABLES: dict[str, tuple[str, ...]] = {
    "studies": ("study_id", "study_name"),
    "study_directions": ("study_id", "objective", "direction"),
    "study_user_attributes": ("study_id", "key", "value_json"),
    "study_system_attributes": ("study_id", "key", "value_json"),
    "trials": ("trial_id", "number", "study_id", "state", "datetime_start", "datetime_complete"),
    "trial_values": ("trial_id", "objective", "value", "value_type"),
    "trial_params": ("param_id", "trial_id", "param_name", "param_value", "distribution_json"),
    "trial_intermediate_values": ("trial_id", "step"),
    "trial_user_attributes": ("trial_id", "key", "value_json"),
    "trial_system_attributes": ("trial_id", "key", "value_json"),
}
METRIC_NAMES_ATTR = "study:metric_names"  # Optuna's study system attr of its objectives' names
ARTIFACT_ATTR_PREFIX = "artifacts:"  # Optuna's trial and study system attrs of uploaded artifacts


def sql_rows(conn: Any, query: str, **params: Any) -> list[Any]:
    from sqlalchemy import bindparam, text

    statement = text(query)
    for name, value in params.items():
        if isinstance(value, (list, tuple, set)):
            statement = statement.bindparams(bindparam(name, expanding=True))
    return list(conn.execute(statement, params))


def sql_studies(conn: Any) -> list[dict[str, Any]]:
    """Every study: id, name, trials, directions, the best finite value of its first objective
    among complete trials (as the direction goes), and the first trial's start."""
    studies = {sid: {"id": sid, "name": name, "trials": 0, "directions": [], "max": None, "min": None,
                     "created": None} for sid, name in sql_rows(conn, "SELECT study_id, study_name FROM studies "
                                                                   "ORDER BY study_id")}
    for sid, direction in sql_rows(conn, "SELECT study_id, direction FROM study_directions ORDER BY study_id, objective"):
        studies[sid]["directions"].append(str(direction).lower())
    for sid, n, created in sql_rows(conn, "SELECT study_id, COUNT(*), MIN(datetime_start) FROM trials GROUP BY study_id"):
        studies[sid].update(trials=int(n), created=_when(created))
    for sid, high, low in sql_rows(conn, "SELECT t.study_id, MAX(v.value), MIN(v.value) FROM trials t JOIN trial_values v "
                                      "ON v.trial_id = t.trial_id WHERE t.state = 'COMPLETE' AND v.objective = 0 AND "
                                      "v.value_type = 'FINITE' GROUP BY t.study_id"):
        studies[sid].update(max=high, min=low)
    return list(studies.values())


def sql_study_id(conn: Any, name: str) -> int | None:
    found = sql_rows(conn, "SELECT study_id FROM studies WHERE study_name = :name", name=name)
    return int(found[0][0]) if found else None


def sql_study_names(conn: Any) -> list[str]:
    return [str(n) for (n,) in sql_rows(conn, "SELECT study_name FROM studies ORDER BY study_id")]


def sql_directions(conn: Any, study: int) -> list[str]:
    return [str(d).lower() for (d,) in sql_rows(conn, "SELECT direction FROM study_directions WHERE study_id = :s "
                                                   "ORDER BY objective", s=study)]


def sql_study_attrs(conn: Any, study: int, system: bool = False) -> dict[str, Any]:
    """A study's user (or system) attributes, decoded; ValueError for one that is not JSON."""
    import json

    table = "study_system_attributes" if system else "study_user_attributes"
    return {str(k): json.loads(v) for k, v in sql_rows(conn, f"SELECT key, value_json FROM {table} WHERE study_id = :s "
                                                          "ORDER BY key", s=study)}


def sql_state_counts(conn: Any, study: int) -> dict[str, int]:
    return {str(state): int(n) for state, n in sql_rows(conn, "SELECT state, COUNT(*) FROM trials WHERE study_id = :s "
                                                          "GROUP BY state", s=study)}


def sql_trial_system_values(conn: Any, study: int, key: str) -> list[Any]:
    """The value of trial system attribute `key` on every trial of the study that has it."""
    import json

    return [json.loads(v) for (v,) in sql_rows(conn, "SELECT a.value_json FROM trial_system_attributes a JOIN trials t "
                                                 "ON t.trial_id = a.trial_id WHERE t.study_id = :s AND a.key = :k",
                                            s=study, k=key)]


def sql_numbers(conn: Any, study: int, state: str) -> list[int]:
    return [int(n) for (n,) in sql_rows(conn, "SELECT number FROM trials WHERE study_id = :s AND state = :st",
                                     s=study, st=state)]


def sql_best(conn: Any, study: int, maximize: bool) -> tuple[int, int, float] | None:
    """(trial id, number, value) of the best complete trial on the first objective, ranked as
    Optuna ranks it (infinities by their sign), the first of a tie."""
    rank = ("CASE v.value_type WHEN 'INF_NEG' THEN -1 WHEN 'FINITE' THEN 0 ELSE 1 END")
    way = "DESC" if maximize else "ASC"
    found = sql_rows(conn, f"SELECT t.trial_id, t.number, v.value, v.value_type FROM trials t JOIN trial_values v ON "
                        f"v.trial_id = t.trial_id WHERE t.study_id = :s AND t.state = 'COMPLETE' AND v.objective = 0 "
                        f"ORDER BY {rank} {way}, v.value {way}, t.trial_id LIMIT 1", s=study)
    if not found:
        return None
    tid, number, value, kind = found[0]
    return int(tid), int(number), _value(value, kind)


def _value(value: Any, kind: Any) -> float:
    return {"INF_POS": float("inf"), "INF_NEG": float("-inf")}.get(str(kind), float(value) if value is not None
                                                                    else float("nan"))


def _when(value: Any) -> Any:
    """A time as a datetime (SQLite gives text)."""
    from datetime import datetime

    return datetime.fromisoformat(value) if isinstance(value, str) else value


def sql_params(conn: Any, trials: list[int]) -> dict[int, dict[str, Any]]:
    """Each trial's parameters, in the order it took them, decoded as Optuna does (a choice by its
    index among the distribution's choices)."""
    import json

    out: dict[int, dict[str, Any]] = {t: {} for t in trials}
    if not trials:
        return out
    for tid, name, value, dist in sql_rows(conn, "SELECT trial_id, param_name, param_value, distribution_json FROM "
                                              "trial_params WHERE trial_id IN :ids ORDER BY param_id", ids=trials):
        spec = json.loads(dist)
        kind, attrs = str(spec.get("name", "")), spec.get("attributes", {})
        if "Categorical" in kind:
            decoded: Any = attrs["choices"][int(value)]
        elif "Int" in kind:
            decoded = int(value)
        else:
            decoded = float(value)
        out[int(tid)][str(name)] = decoded
    return out


def sql_param_names(conn: Any, study: int) -> list[str]:
    return sorted(str(n) for (n,) in sql_rows(conn, "SELECT DISTINCT p.param_name FROM trial_params p JOIN trials t ON "
                                                 "t.trial_id = p.trial_id WHERE t.study_id = :s", s=study))


def sql_trials(conn: Any, study: int, states: list[str] | None, order: str, limit: int | None,
               after: int = -1, first: int = 0) -> list[tuple[int, int, str, Any, Any, float | None]]:
    """A page of a study's trials: (id, number, state, start, complete, first value); `order` is
    "number" (trials numbered `first` on, after the trial whose id is `after`), "value_desc" or
    "value_asc" (complete trials with a value first). In number order the page is walked by id,
    the order Optuna lists trials in (a trial's number counts the study's trials of smaller id):
    the primary key's index gives a page of a 100,000-trial study at once, where ordering by the
    unindexed number sorted every trial (84 ms on PostgreSQL)."""
    where = "t.study_id = :s" + (" AND t.state IN :states" if states else "")
    params: dict[str, Any] = {"s": study, **({"states": states} if states else {})}
    if order == "number":
        where += " AND t.trial_id > :after AND t.number >= :first"
        params.update(after=after, first=first)
        by = "t.trial_id"
    else:
        way = "DESC" if order == "value_desc" else "ASC"
        by = f"CASE WHEN v.value IS NULL THEN 1 ELSE 0 END, v.value {way}, t.number"
    query = (f"SELECT t.trial_id, t.number, t.state, t.datetime_start, t.datetime_complete, v.value, v.value_type "
             f"FROM trials t LEFT JOIN trial_values v ON v.trial_id = t.trial_id AND v.objective = 0 WHERE {where} "
             f"ORDER BY {by}" + (" LIMIT :limit" if limit is not None else ""))
    if limit is not None:
        params["limit"] = limit
    return [(int(tid), int(n), str(st), _when(a), _when(b), _value(v, k) if k is not None else None)
            for tid, n, st, a, b, v, k in sql_rows(conn, query, **params)]


def sql_values(conn: Any, trials: list[int]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {t: [] for t in trials}
    if trials:
        for tid, _, value, kind in sql_rows(conn, "SELECT trial_id, objective, value, value_type FROM trial_values WHERE "
                                               "trial_id IN :ids ORDER BY trial_id, objective", ids=trials):
            out[int(tid)].append(_value(value, kind))
    return out


def sql_epochs(conn: Any, trials: list[int]) -> dict[int, int]:
    out = dict.fromkeys(trials, 0)
    if trials:
        for tid, n in sql_rows(conn, "SELECT trial_id, COUNT(*) FROM trial_intermediate_values WHERE trial_id IN :ids "
                                  "GROUP BY trial_id", ids=trials):
            out[int(tid)] = int(n)
    return out


def sql_trial_attrs(conn: Any, trials: list[int], key: str, system: bool = False) -> dict[int, Any]:
    """Trial attribute `key` (user, or system) of each trial that has it, decoded."""
    import json

    table = "trial_system_attributes" if system else "trial_user_attributes"
    out: dict[int, Any] = {}
    if trials:
        for tid, value in sql_rows(conn, f"SELECT trial_id, value_json FROM {table} WHERE key = :k AND trial_id IN :ids",
                                k=key, ids=trials):
            out[int(tid)] = json.loads(value)
    return out


def sql_artifacts(conn: Any, trial: int) -> list[dict[str, Any]]:
    """The artifacts uploaded to a trial (Optuna's metadata: artifact_id, filename, ...), oldest first."""
    import json

    out = []
    for (v,) in sql_rows(conn, "SELECT value_json FROM trial_system_attributes WHERE trial_id = :t AND key LIKE :p "
                            "ORDER BY trial_system_attribute_id", t=trial, p=f"{ARTIFACT_ATTR_PREFIX}%"):
        meta = json.loads(v)
        out.append(json.loads(meta) if isinstance(meta, str) else meta)  # Optuna stores it as JSON text
    return out


def sql_trial(conn: Any, study: int, number: int) -> tuple[int, str, Any, Any] | None:
    """(trial id, state, start, complete) of trial `number`, or None."""
    found = sql_rows(conn, "SELECT trial_id, state, datetime_start, datetime_complete FROM trials WHERE study_id = :s "
                           "AND number = :n", s=study, n=number)
    if not found:
        return None
    tid, state, start, complete = found[0]
    return int(tid), str(state), _when(start), _when(complete)


def sql_history(conn: Any, study: int) -> list[tuple[int, float]]:
    """(number, first value) of every complete trial, by number: the study's history in two columns."""
    rows = sql_rows(conn, "SELECT t.number, v.value, v.value_type FROM trials t JOIN trial_values v ON v.trial_id = "
                          "t.trial_id WHERE t.study_id = :s AND t.state = 'COMPLETE' AND v.objective = 0 ORDER BY t.number",
                    s=study)
    return [(int(number), _value(value, kind)) for number, value, kind in rows]


def sql_reported(conn: Any, trial: int) -> dict[int, float]:
    """A trial's intermediate values (step -> value), infinities and NaN as Optuna gives them."""
    rows = sql_rows(conn, "SELECT step, intermediate_value, intermediate_value_type FROM trial_intermediate_values "
                          "WHERE trial_id = :t ORDER BY step", t=trial)
    return {int(step): _value(value, kind) for step, value, kind in rows}


def sql_all_trial_attrs(conn: Any, trial: int, system: bool = False) -> dict[str, Any]:
    """Every user (or system) attribute of one trial, decoded; Optuna's artifact records left out."""
    import json

    table = "trial_system_attributes" if system else "trial_user_attributes"
    return {str(k): json.loads(v) for k, v in sql_rows(conn, f"SELECT key, value_json FROM {table} WHERE trial_id = :t "
                                                          f"ORDER BY {table[:-1]}_id", t=trial)
            if not str(k).startswith(ARTIFACT_ATTR_PREFIX)}
