"""What a trial's code prints, kept per trial.

While a trial runs, Python's `sys.stdout` and `sys.stderr` write to the terminal as before and to
a log file of that trial in the study's artifact folder (`<uid>-trial<N>.log`, so `hpo logs
--follow` can read it from any machine that shares the folder); a traceback that failed the trial
goes to the log only, and so does how the trial ended when it printed anything. A trial that
printed nothing keeps no log. When the trial ends the log is uploaded to Optuna's artifact store as the
trial's `log.txt` (the dashboard lists it) and the live file removed. When several workers share
a terminal, each line they print starts with `[trial N] `.

What is written to the file descriptors directly (a C extension, a subprocess) bypasses Python's
streams and is not kept; a DataLoader's loader processes print through the streams they inherit,
so theirs is.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, cast

import optuna

from hpo.errors import DiskFullError
from hpo.storage.artifacts import Artifacts
from hpo.storage.urls import reason

LOG_LIMIT = 10 * 2**20  # bytes kept per trial; past it the terminal still shows what is printed


class _Tee:
    """A text stream that writes to the original stream (each line prefixed) and to the log."""

    def __init__(self, original: TextIO, log: _Log, prefix: str) -> None:
        self.original, self.log, self.prefix = original, log, prefix
        self.at_line_start = True

    def write(self, text: str) -> int:
        if not text:
            return 0
        self.log.write(text)
        if self.prefix:
            out = []
            for piece in text.splitlines(keepends=True):
                if self.at_line_start:
                    out.append(self.prefix)
                out.append(piece)
                self.at_line_start = piece.endswith("\n")
            text_out = "".join(out)
        else:
            text_out = text
        self.original.write(text_out)
        return len(text)

    def flush(self) -> None:
        self.original.flush()

    def isatty(self) -> bool:
        return self.original.isatty()

    def fileno(self) -> int:
        return self.original.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer...: the original's
        return getattr(self.original, name)


class _Log:
    """The trial's log file, opened at the first write (a trial that prints nothing costs no file
    I/O), appended and flushed at every write (loader processes share it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: TextIO | None = None
        self.size = 0
        self.lock = threading.Lock()
        self.done = False  # closed, full, or the folder refused the file

    def write(self, text: str) -> None:
        with self.lock:
            if self.done:
                return
            if self.size + len(text) > LOG_LIMIT:
                text = f"\n[hpo: the log of this trial stops here, at {LOG_LIMIT // 2**20} MiB]\n"
                self.done = True
            try:
                if self.file is None:
                    self.file = self.path.open("a", encoding="utf-8", errors="replace")
                self.file.write(text)
                self.file.flush()
            except OSError:  # an unwritable folder is reported where checkpoints are written
                self.done = True
                return
            self.size += len(text)

    def has_content(self) -> bool:
        """Something was written, here or by a loader process forked from here."""
        return self.size > 0 or (self.path.is_file() and self.path.stat().st_size > 0)

    def close(self) -> None:
        with self.lock:
            self.done = True
            if self.file is not None:
                self.file.close()


class TrialOutput:
    """`with TrialOutput(artifacts, trial, label):` keeps what the trial prints; `note()` adds to
    the log only (a traceback); `finish()` uploads the log to the trial while it still runs."""

    def __init__(self, artifacts: Artifacts, trial: optuna.Trial, label: bool,
                 warn: Callable[[str], None] = lambda text: None) -> None:
        self.artifacts, self.trial, self.label, self.warn = artifacts, trial, label, warn
        self.path = artifacts.log_path(trial.number)
        self.log: _Log | None = None
        self.saved: tuple[TextIO, TextIO] | None = None
        self.showwarning: Any = None

    def __enter__(self) -> TrialOutput:
        self.log = _Log(self.path)
        prefix = f"[trial {self.trial.number}] " if self.label else ""
        self.saved = sys.stdout, sys.stderr
        sys.stdout = cast(TextIO, _Tee(sys.stdout, self.log, prefix))
        sys.stderr = cast(TextIO, _Tee(sys.stderr, self.log, prefix))
        # Warnings are shown on the trial's stderr whoever set up their display (a test runner
        # that collects them, a logging setup): the trial's log is where they are looked for.
        self.showwarning = warnings.showwarning
        warnings.showwarning = _show_warning
        return self

    def note(self, text: str) -> None:
        """Add to the log only (a traceback): not shown on the terminal."""
        if self.log is not None:
            self.log.write(text if text.endswith("\n") else text + "\n")

    def footnote(self, text: str) -> None:
        """How the trial ended, added to a log that has something in it: a trial that printed
        nothing keeps no log (no file, no storage write), its reason is in its attributes."""
        if self.log is not None and self.log.has_content():
            self.note(text)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish()

    def finish(self) -> None:
        """Stop keeping what is printed and upload the log: before the trial is told its state
        (Optuna refuses attributes on a finished trial). Once; the exit does it if not done."""
        if self.saved is not None:
            for stream in self.saved:
                stream.flush()
            sys.stdout, sys.stderr = self.saved
            warnings.showwarning = self.showwarning
            self.saved = None
        if self.log is None:
            return
        log, self.log = self.log, None
        log.close()
        try:
            if not log.has_content():
                return
            self.artifacts.upload_log(self.trial, self.path)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # taken over by another worker: the trial is not this worker's to write to
        except KeyError:
            pass  # the study was deleted under the trial (`hpo delete`): nobody can ask for its log
        except DiskFullError:
            raise  # the trial is queued and the run stops, saying where space is missing; the file stays
        except Exception as e:  # a storage hiccup must not cost the trial its ending: the file stays
            self.warn(f"hpo: the log of trial {self.trial.number} stays at {self.path} (not uploaded: {reason(e)})")
            return
        self.path.unlink(missing_ok=True)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def keep_rank_output(path: Path, prefix: str) -> None:
    """In another process of a multi-process trial: what it prints goes to the terminal with
    `prefix` and to the trial's log file, which rank 0 uploads at the trial's end."""
    log = _Log(path)
    sys.stdout = cast(TextIO, _Tee(sys.stdout, log, prefix))
    sys.stderr = cast(TextIO, _Tee(sys.stderr, log, prefix))
    warnings.showwarning = _show_warning
