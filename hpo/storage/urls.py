"""Storage URLs as a person gives and reads them: which storage a command uses, the URL with its
password masked, the SQLite file behind it, and a driver's error as one line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from hpo.errors import SettingError, StorageError, is_proxy_failure

DEFAULT_STORAGE = "sqlite:///hpo.db"
ENV_STORAGE = "HPO_STORAGE"


def resolve_url(url: str | None) -> str:
    """--storage, else $HPO_STORAGE, else the embedded SQLite file. A blank value is a mistake
    (an unset variable in a script, say), not a request for the default."""
    if url is not None and not url.strip():
        raise SettingError("storage", "is empty; give a storage URL, or leave it out for sqlite:///hpo.db")
    env = os.environ.get(ENV_STORAGE)
    if url is None and env is not None and not env.strip():
        raise StorageError(f"{ENV_STORAGE} is set but empty; unset it for sqlite:///hpo.db, or give a storage URL")
    resolved = url or env or DEFAULT_STORAGE
    scheme, _, rest = resolved.partition("://")
    if scheme.split("+")[0].lower() in ("postgresql", "mysql", "mariadb") and not rest.strip("/"):
        raise StorageError(f"{resolved} names no server or database; write {scheme}://USER@HOST/DATABASE")
    return resolved


def mask(url: str) -> str:
    """The URL with any password replaced by ***, for messages, logs and the dashboard, and a
    relative SQLite file's absolute path beside it. Parsed by
    hand, not by a URL library: the credentials run to the *last* '@' (a password with an
    unencoded '@' must not show its tail), and `password=` in the query is masked too."""
    if "://" not in url:
        return url
    if (db := sqlite_path(url)) is not None and not url.startswith("sqlite:////"):
        return f"{url} ({db})"  # a relative file: where it is (runs from another folder use another file)
    scheme, rest = url.split("://", 1)
    if "@" in rest:
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            rest = f"{creds.split(':', 1)[0]}:***@{host}"
    return re.sub(r"(?i)([?&](?:password|passwd|pwd)=)[^&]*", r"\1***", f"{scheme}://{rest}")


def scrub(text: str, url: str) -> str:
    """A driver's message with every piece of the URL's password masked: a password with an
    unencoded '@' is split by the driver, which may quote the tail as a host name."""
    rest = url.split("://", 1)[-1]
    if "@" in rest and ":" in rest.rsplit("@", 1)[0]:
        password = rest.rsplit("@", 1)[0].split(":", 1)[1]
        for piece in sorted({password, *password.split("@")}, key=len, reverse=True):
            if len(piece) >= 2:
                text = text.replace(piece, "***")
    return text


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite URL, or None for other URLs and in-memory SQLite: resolved, so a
    file reached through a symlink or `..` is known as itself (its one-writer and budget locks)."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database).expanduser().resolve()


def reason(e: BaseException) -> str:
    """One line describing a storage failure, for users."""
    if is_proxy_failure(e):
        return proxy_line(e)
    while getattr(e, "__cause__", None) is not None and not getattr(e, "orig", None):
        e = e.__cause__  # type: ignore[assignment]
    return driver_line(e)


def proxy_line(e: Any) -> str:
    """A failed call to `hpo proxy` (a grpc.RpcError): gone, or an error on its side."""
    code = e.code().name
    if code in ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"):
        return f"the storage proxy did not answer ({code}); is hpo proxy still running?"
    details = (e.details() or "").strip().splitlines()
    return f"the storage proxy answered {code}" + (f": {details[0]}" if details else "")


def driver_line(e: BaseException) -> str:
    """The first meaningful line of a driver error, without SQL or URLs."""
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(e).__name__
    if "Can't load plugin" in line:
        return f"unknown database kind ({line.split(':')[-1].strip()})"
    if "Could not parse" in line:
        return "not a valid storage URL (expected e.g. sqlite:///hpo.db or postgresql://user@host/db)"
    return line
