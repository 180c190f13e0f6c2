"""The project's own errors.

Library code raises these; only the CLI turns them into one-line messages. Anything else that
escapes is a bug in hpo, not a user mistake, and is allowed to show a traceback.
"""

from __future__ import annotations


class HpoError(Exception):
    """Something the user can fix: the message says what and how."""


class SpecError(HpoError):
    """A study file (or a spec stored in a study) is invalid."""


class StorageError(HpoError):
    """The storage cannot be reached, or does not hold what was asked for."""


class DataError(HpoError):
    """A dataset cannot be loaded or does not have the expected shape."""


class TrialError(HpoError):
    """One trial failed for a reason worth recording; the study goes on."""
