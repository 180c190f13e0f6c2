"""optuna-dashboard over an hpo storage, with the study's artifact store attached.

The server is optuna-dashboard's own WSGI app on a threaded wsgiref server (what its CLI runs),
bound to 127.0.0.1 unless asked otherwise. It reads the same storage the workers write, so a study
running in another process shows up live; on SQLite the file is in WAL mode, so these reads never
lock out the writers (optuna-dashboard#545). Beside it, at /hpo/, hpo's own study summaries,
which open at any size (hpo.ui.summary_page).
"""

from __future__ import annotations

import logging
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from optuna.storages import BaseStorage

from hpo._private import study_id
from hpo.errors import HpoError
from hpo.storage.artifacts import open_store
from hpo.storage.keys import ARTIFACTS_ATTR, resolve_artifact_path
from hpo.ui.summary_page import summary_app

_log = logging.getLogger("hpo.ui.dashboard")


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        _log.debug(format, *args)


def artifact_folder(storage: BaseStorage, storage_url: str, cli_value: str | None) -> Path:
    """--artifacts, else $HPO_ARTIFACTS, else the folder the newest study recorded, else default."""
    recorded = None
    for study in reversed(storage.get_all_studies()):
        recorded = storage.get_study_system_attrs(study_id(study)).get(ARTIFACTS_ATTR)
        if recorded:
            break
    return resolve_artifact_path(cli_value, storage_url, recorded)


def make_server_for(storage: BaseStorage, url: str, artifacts: Path, host: str, port: int) -> WSGIServer:
    """optuna-dashboard, with hpo's study summaries at /hpo/ (hpo.ui.summary_page: they open at any size)."""
    from optuna_dashboard import wsgi

    app = summary_app(url, wsgi(storage, artifact_store=open_store(artifacts)))
    try:
        return make_server(host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    except OSError as e:
        raise HpoError(f"cannot serve the dashboard on {host}:{port}: {e.strerror}") from None
