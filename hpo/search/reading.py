"""The read-only commands ask the database what they print: counts, the best row, a page of
trials. A study of 100,000 trials is never loaded whole, and optuna is not imported: `hpo
studies`, `hpo best` and `hpo trials` query Optuna's tables with SQL (read only; the schema is
reached through hpo._private) and stream what is long (every trial as CSV) a page at a time.
What SQL alone does not summarise (a study of several objectives or with constraints, a Redis
journal, a gRPC proxy) takes Optuna's own path (hpo.search.summary); on a small study both paths
print the same (tests/test_reading.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from hpo import _private as sql
from hpo.errors import HpoError, StorageError, UnreadableStudyError
from hpo.search.records import SPEC_ATTR, TEST_ATTR, StudyRow, StudyView, Summary, TrialRecord, stored_spec
from hpo.storage.keys import MODEL_FILE, RESUMES_ATTR, UID_ATTR, ArtifactFolder, study_folder

STATE_ORDER = ("COMPLETE", "PRUNED", "FAIL", "RESUMED", "RUNNING", "WAITING")
PAGE = 5000  # trials read at once when every one is listed: memory stays flat
DETAILS = 500  # trials whose values, parameters and reasons are asked for in one statement


def study_rows(conn: Any) -> list[StudyRow]:
    """Every study, as `hpo studies` lists it; one whose attributes cannot be decoded is listed
    with why (its counts come from the trials table, which holds no JSON)."""
    out = []
    for s in sql.sql_studies(conn):
        problem = _undecodable(conn, s["id"])
        if problem is not None:
            out.append(StudyRow(s["name"], problem=problem))
            continue
        best = (s["max"] if s["directions"] == ["maximize"] else s["min"]) if len(s["directions"]) == 1 else None
        out.append(StudyRow(s["name"], s["trials"], tuple(s["directions"]), best, s["created"]))
    return out


def _undecodable(conn: Any, study: int, why: bool = False) -> str | None:
    """Which of a study's attributes cannot be decoded; `why` adds the decoder's reason (a one-study
    error has room for it, a listing row does not)."""
    bad = []
    for system in (False, True):
        table = "study_system_attributes" if system else "study_user_attributes"
        for key, value in sql.sql_rows(conn, f"SELECT key, value_json FROM {table} WHERE study_id = :s", s=study):
            try:
                json.loads(value)
            except ValueError as e:
                reason = f" ({e})" if why else ""
                bad.append(f"its {'system' if system else 'user'} attribute {key!r} is not valid JSON{reason}")
    return "; ".join(bad) or None


def study_id(conn: Any, name: str, url: str) -> int:
    """The study's id; the one line `hpo` says when there is none."""
    from hpo.storage.urls import mask

    found = sql.sql_study_id(conn, name)
    if found is None:
        names = sql.sql_study_names(conn)
        hint = f"; studies there: {', '.join(names[:10])}" if names else "; it holds no studies"
        raise StorageError(f"no study named {name!r} in {mask(url)}{hint}")
    return found


def _attrs(conn: Any, sid: int, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        return sql.sql_study_attrs(conn, sid), sql.sql_study_attrs(conn, sid, system=True)
    except ValueError:
        raise UnreadableStudyError(f"study {name!r} cannot be read: {_undecodable(conn, sid, why=True)}; it was written by "
                                   "something other than hpo", name) from None


def simple(conn: Any, sid: int, name: str) -> bool:
    """Whether SQL alone summarises the study: one objective and no constraints (Optuna's own path
    decides feasibility and Pareto fronts)."""
    user, _ = _attrs(conn, sid, name)
    return len(sql.sql_directions(conn, sid)) == 1 and not (user.get(SPEC_ATTR) or {}).get("constraints")


def state_counts(conn: Any, sid: int) -> dict[str, int]:
    """Trials by state as a person reads them (hpo.search.budget.state_counts, from SQL): a failed
    trial that a retry resumes is RESUMED."""
    counts = sql.sql_state_counts(conn, sid)
    if counts.get("FAIL"):
        resumed = {int(n) for n in sql.sql_trial_system_values(conn, sid, RESUMES_ATTR) if isinstance(n, int)}
        if resumed and (n := len(resumed & set(sql.sql_numbers(conn, sid, "FAIL")))):
            counts["RESUMED"] = n
            counts["FAIL"] -= n
            if not counts["FAIL"]:
                del counts["FAIL"]
    return {k: counts[k] for k in STATE_ORDER if counts.get(k)}


def summary(conn: Any, sid: int, name: str) -> Summary:
    """A study of one objective and no constraints summarised from SQL, as summarize() would from
    the Optuna study (counts, the best trial, its parameters, the test record)."""
    user, system = _attrs(conn, sid, name)
    spec = user.get(SPEC_ATTR) or {}
    direction = sql.sql_directions(conn, sid)[0]
    metric = (system.get(sql.METRIC_NAMES_ATTR) or [spec.get("metric", "value")])[0]
    best = sql.sql_best(conn, sid, direction == "maximize")
    params = sql.sql_params(conn, [best[0]])[best[0]] if best is not None else {}
    return Summary(name=name, direction=direction, metric=metric, counts=state_counts(conn, sid),
                   best_number=best[1] if best else None, best_value=best[2] if best else None,
                   best_params=params, test=user.get(TEST_ATTR),
                   n_trials_budget=(spec.get("budget") or {}).get("n_trials"), objectives=((metric, direction),))


def trial_model(conn: Any, sid: int, number: int) -> str | None:
    """The artifact id of trial `number`'s final state (model.pt), if it kept one."""
    found = sql.sql_trial(conn, sid, number)
    if found is None:
        return None
    metas = [m for m in sql.sql_artifacts(conn, found[0]) if m.get("filename") == MODEL_FILE]
    return str(metas[-1]["artifact_id"]) if metas else None


def trial_records(conn: Any, sid: int, *, limit: int | None = None, state: str | None = None,
                  sort: str = "number", maximize: bool = True,
                  first: int = 0) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """The parameter names, and `hpo trials`' rows one by one (number, state, value, epochs,
    seconds, reason, params_*), read a page at a time: `state` keeps one state (RESUMED and FAIL
    told apart), `sort` is "number" (from trial `first` on) or "value" (the best first), `limit`
    stops early. With a limit the rows are read first and the names are those they hold (the
    whole study's names are a scan of every parameter row); without one, every name the study
    used, and the rows stream."""
    resumed = {int(n) for n in sql.sql_trial_system_values(conn, sid, RESUMES_ATTR) if isinstance(n, int)}
    wanted = state.upper() if state else None
    states = ["FAIL"] if wanted in ("FAIL", "RESUMED") else [wanted] if wanted else None
    order = "number" if sort == "number" else ("value_desc" if maximize else "value_asc")

    def rows() -> Iterator[dict[str, Any]]:
        given, after = 0, -1  # the id of the last trial listed
        while limit is None or given < limit:
            size = PAGE if limit is None else min(PAGE, limit - given)
            # Sorted by value the database orders them all at once (ids and values only: a limit is
            # what makes that worth asking for); by number, a page at a time.
            page = sql.sql_trials(conn, sid, states, order, size if order == "number" else limit, after, first)
            if not page:
                return
            for start in range(0, len(page), DETAILS):
                for row in _details(page[start:start + DETAILS]):
                    if wanted in ("FAIL", "RESUMED") and row["state"] != wanted:
                        continue
                    yield row
                    given += 1
                    if limit is not None and given >= limit:
                        return
            if order != "number":
                return
            after = page[-1][0]

    def _details(part: list[tuple[int, int, str, Any, Any, float | None]]) -> Iterator[dict[str, Any]]:
        ids = [p[0] for p in part]
        values, epochs = sql.sql_values(conn, ids), sql.sql_epochs(conn, ids)
        reasons, params = sql.sql_trial_attrs(conn, ids, "reason"), sql.sql_params(conn, ids)
        for tid, number, st, start, end, _ in part:
            vals = values[tid]
            yield {"number": number, "state": "RESUMED" if st == "FAIL" and number in resumed else st,
                   "value": vals[0] if len(vals) == 1 else (vals or None), "epochs": epochs[tid],
                   "seconds": round((end - start).total_seconds(), 2) if end and start else None,
                   "reason": reasons.get(tid, ""), "params": params[tid]}

    if limit is None:
        names = sql.sql_param_names(conn, sid)
        return names, (_with_columns(row, names) for row in rows())
    kept = list(rows())
    names = shown_names(row["params"] for row in kept)
    return names, iter([_with_columns(row, names) for row in kept])


def shown_names(params: Iterable[Mapping[str, Any]]) -> list[str]:
    """The parameter columns of a listing: every name its rows hold, sorted."""
    return sorted({k for p in params for k in p})


def _with_columns(row: dict[str, Any], names: list[str]) -> dict[str, Any]:
    params = row.pop("params")
    return {**row, **{f"params_{k}": params.get(k) for k in names}}


def curves(conn: Any, sid: int, numbers: list[int]) -> dict[int, dict[int, float]]:
    """The reported values (step -> value) of the trials numbered `numbers`."""
    out = {}
    for number in numbers:
        if (found := sql.sql_trial(conn, sid, number)) is not None:
            out[number] = sql.sql_reported(conn, found[0])
    return out


def trial_record(conn: Any, sid: int, name: str, number: int) -> TrialRecord:
    """Trial `number` whole, read alone; the one line `hpo` says when the study has no such trial."""
    found = sql.sql_trial(conn, sid, number)
    if found is None:
        n = sum(sql.sql_state_counts(conn, sid).values())
        raise HpoError(f"study {name} has no trial {number} ({f'trials 0-{n - 1}' if n else 'no trials yet'})")
    tid, state, start, complete = found
    values = sql.sql_values(conn, [tid])[tid]
    try:
        user, system = sql.sql_all_trial_attrs(conn, tid), sql.sql_all_trial_attrs(conn, tid, system=True)
    except ValueError:
        raise UnreadableStudyError(f"trial {number} of study {name!r} cannot be read: one of its attributes is not "
                                   "valid JSON; it was written by something other than hpo", name) from None
    return TrialRecord(number=number, state=state, values=values or None, start=start, complete=complete,
                       params=sql.sql_params(conn, [tid])[tid], reported=sql.sql_reported(conn, tid),
                       user_attrs=user, system_attrs=system,
                       artifacts=tuple((str(m.get("filename")), str(m["artifact_id"])) for m in sql.sql_artifacts(conn, tid)))


class SqlTrials:
    """A study's trials read one at a time from its tables, with what showing them needs of the
    study (hpo.ui.trial_view.TrialSource)."""

    def __init__(self, conn: Any, name: str, url: str, artifacts: str | None) -> None:
        from hpo.spec.schema import StudySpec

        self.conn, self.sid = conn, study_id(conn, name, url)
        user, system = _attrs(conn, self.sid, name)
        path, self.note = study_folder(artifacts, url, system)  # the note: as a worker would say it
        uid = system.get(UID_ATTR)
        self.view = StudyView(name, StudySpec.stored_metric(stored_spec(user, name)),
                              list(system.get(sql.METRIC_NAMES_ATTR) or []),
                              ArtifactFolder(path, uid if isinstance(uid, str) else None))

    def trial(self, number: int) -> TrialRecord:
        try:
            return trial_record(self.conn, self.sid, self.view.name, number)
        finally:
            self.conn.rollback()  # the next read sees what was written since (`hpo logs --follow`)
