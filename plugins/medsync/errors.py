"""Every error medsync raises on purpose is a ``MedsyncError``.

On-call reads these messages in task logs and alerts: each one says what is wrong and,
where it can, what to do. None of them carries record contents or secrets.

Each class says whether it is ``permanent``: retrying the task cannot fix it (a bad config,
a refused key, a reconciliation that failed), so the task fails at once instead of sitting
out its retries (``medsync.failures.fail_fast``). Transient ones (the source kept failing
with 5xx/429, a lock not obtained) are left to Airflow's retries.
"""

from __future__ import annotations

from typing import ClassVar


class MedsyncError(Exception):
    """Base class of medsync's own errors."""

    permanent: ClassVar[bool] = False
    """True when a retry of the task cannot succeed without someone changing something."""


class ConfigError(MedsyncError):
    """A source config or mapping file is invalid, or names something that does not exist."""

    permanent = True


class RunParamsError(ConfigError):
    """A run's params (the trigger form's conf) ask for something medsync cannot do."""

    permanent = True


class SchemaError(MedsyncError):
    """A's tables are missing or differ from the contract, or medsync's schema is inconsistent."""

    permanent = True


class MappingError(ConfigError):
    """A mapping file maps to a value that A's tables would reject."""

    permanent = True


class SourceApiError(MedsyncError):
    """The source's API answered in a way that retrying will not fix (e.g. 401, 400, a contract violation)."""

    permanent = True


class SourceUnavailableError(SourceApiError):
    """The source's API kept failing transiently (5xx, 429, dropped connections) past the retry budget."""

    permanent = False


class MergeError(MedsyncError):
    """A merge could not run (lock not obtained, staging missing or incomplete)."""

    permanent = False


class ReconciliationError(MedsyncError):
    """After a full refresh, A and the source differ by more than quarantine, pending and late changes explain."""

    permanent = True


class SourceBehindError(ReconciliationError):
    """The source serves older versions of records than A holds: it went back in time (a restored replica)."""

    permanent = True


class SnapshotGuardError(MedsyncError):
    """A snapshot compare would delete more of A's rows than ``snapshot.max_delete_share`` allows.

    A listing that short is more likely a broken listing (a server capping its page size, an
    outage answering empty pages) than a real purge: someone has to look before A deletes.
    """

    permanent = True


class StorageError(MedsyncError):
    """A presigned URL cannot be issued, or the run's sampled files are not readable with the source's identity."""

    permanent = True


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying the task that raised ``exc`` cannot succeed.

    medsync's own errors say it themselves. Anything else is left to Airflow's retries:
    PostgreSQL's dropped connections, connect and statement timeouts, lock timeouts,
    serialization failures and deadlocks are transient, and a bug is retried as Airflow would.
    """
    return isinstance(exc, MedsyncError) and exc.permanent
