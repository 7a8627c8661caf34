"""Every error medsync raises on purpose is a ``MedsyncError``.

On-call reads these messages in task logs: each one says what is wrong and, where
it can, what to do. None of them carries record contents or secrets.
"""

from __future__ import annotations


class MedsyncError(Exception):
    """Base class of medsync's own errors."""


class ConfigError(MedsyncError):
    """A source config or mapping file is invalid, or names something that does not exist."""


class SchemaError(MedsyncError):
    """A's tables are missing or differ from the contract, or medsync's schema is inconsistent."""


class MappingError(ConfigError):
    """A mapping file maps to a value that A's tables would reject."""


class SourceApiError(MedsyncError):
    """The source's API answered in a way that retrying will not fix (e.g. 401, 400)."""


class SourceUnavailableError(SourceApiError):
    """The source's API kept failing transiently (5xx, 429, dropped connections) past the retry budget."""


class MergeError(MedsyncError):
    """A merge could not run (lock not obtained, staging missing or incomplete)."""


class ReconciliationError(MedsyncError):
    """After a full refresh, A and the source differ by more than quarantine, pending and late changes explain."""


class StorageError(MedsyncError):
    """A presigned URL cannot be issued: unknown or deleted instance, bucket not allowed, bad key, ..."""
