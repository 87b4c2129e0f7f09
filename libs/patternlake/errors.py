"""The one exception type for errors a user can cause.

Bad input files, missing columns, bad configuration, missing tables: these raise
`PatternlakeError` with a message that says what is wrong and what to do. The CLI prints
the message on one line and exits with status 2. Bugs raise ordinary exceptions.
"""

from __future__ import annotations


class PatternlakeError(Exception):
    """An error caused by input, configuration or the state of the lake, not by a bug."""


class ConfigError(PatternlakeError):
    """A configuration key or value is wrong; the message names the key's path."""


class TableNotFoundError(PatternlakeError):
    """A table was read before anything wrote it."""


class VersionNotFoundError(PatternlakeError):
    """A table version was read that does not exist (never written, or its log and files
    were removed: ``forget-user`` and ``expire_history`` end time travel to older versions)."""


class SchemaMismatchError(PatternlakeError):
    """Data does not fit a table's schema (a column's type differs)."""


class ConcurrentCommitError(PatternlakeError):
    """Another writer committed a conflicting change to the same table first; nothing of
    this operation was committed. The lake retries it (``Lake``); raised to the caller when
    conflicts go on past the retry deadline."""


class RegistryError(PatternlakeError):
    """The model registry (MLflow tracking store) could not answer: missing where a stage
    only reads it, locked, unreachable, refused. The message names the operation and the
    tracking URI. "Not registered yet" is not this error: the registry answers None."""


class SkippedStepError(PatternlakeError):
    """``run --strict``: a pipeline step would have been skipped (score without a registered
    teacher, ingest without ``--input``); the message names the step and the reason."""


class UndeclaredTableError(RuntimeError):
    """A stage touched a lake table its declaration (``<package>/stage.py``) does not name
    among its inputs or outputs: a bug in the stage or its declaration, not a user error."""
