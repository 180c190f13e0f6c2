"""One multi-row upsert into a trial's child table (its reports, its attributes) in the dialect's
own statement, where Optuna's API writes one row per query: PostgreSQL and SQLite >= 3.24 `ON
CONFLICT DO UPDATE`, MySQL/MariaDB `ON DUPLICATE KEY UPDATE`, row by row elsewhere."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from hpo._private import rdb_models


def upsert(storage: Any, session: Any, table: Any, rows: list[dict[str, Any]], keys: list[Any],
           one_by_one: Callable[[Any], None]) -> None:
    """Write `rows` in `session` (the caller commits), after the check Optuna's own writes make:
    every trial exists and is still running (a KeyError or UpdateFinishedTrialError otherwise)."""
    from sqlalchemy import select
    from sqlalchemy.dialects import mysql, postgresql, sqlite

    dialect = storage.engine.name
    ids = sorted({r["trial_id"] for r in rows})
    update = [c for c in rows[0] if c not in {k.key for k in keys}]
    trials = rdb_models().TrialModel
    found = select(trials.trial_id, trials.state).where(trials.trial_id.in_(ids))
    states: dict[int, Any] = dict(session.execute(found).all())
    for trial_id in ids:
        if trial_id not in states:
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        storage.check_trial_is_updatable(trial_id, states[trial_id])
    if dialect == "postgresql" or (dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24)):
        ins = (postgresql if dialect == "postgresql" else sqlite).insert(table).values(rows)
        session.execute(ins.on_conflict_do_update(index_elements=keys, set_={c: ins.excluded[c] for c in update}))
    elif dialect == "mysql":
        my = mysql.insert(table).values(rows)
        session.execute(my.on_duplicate_key_update({c: my.inserted[c] for c in update}))
    else:
        one_by_one(session)
