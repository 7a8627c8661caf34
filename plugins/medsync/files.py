"""Sync-time reachability check: can A read the files of the instances a run wrote?

After a source's instance merge, :func:`check_instance_files` takes a random sample of that
source's live instances written since the run started (``imaging.instance.updated_at``), and
HEADs each file with the source's AWS identity (the one A uses to presign). The result
counts what it found and keeps a few example locations per kind, for the run's report;
:meth:`FileCheckResult.failed` decides whether the run fails (``file_check.max_failures``).

Kinds of outcome per sampled instance:

- ``ok``: HEAD answered 200;
- ``missing``: 404 (no such key or bucket);
- ``denied``: 403 (the identity B granted cannot read it; on AWS also a missing key when
  the identity lacks ``s3:ListBucket``);
- ``refused``: never requested: the row's bucket is not allowed for the source, or its key
  is not a plain key (A would refuse to presign it, so users cannot open it either);
- ``error``: anything else (5xx after botocore's retries, timeouts, connection failures).

Every kind except ``ok`` counts as a failure: each is a file users cannot open now.

This module imports nothing heavy at import time (DAG files may import it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from medsync.errors import StorageError

if TYPE_CHECKING:
    import psycopg

    from medsync.config import SourceConfig
    from medsync.hooks.storage import InstanceFileHook

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5
"""Example locations kept per kind of failure."""

FAILURE_KINDS: tuple[str, ...] = ("missing", "denied", "refused", "error")

# Instances written since the run's start; random() is fine for the few rows one run writes.
# count(*) OVER () is computed before LIMIT: how many instances the sample was drawn from.
_SAMPLE_SQL = """
SELECT id, storage_bucket, storage_key, count(*) OVER () AS candidates
FROM imaging.instance
WHERE source_system = %s
  AND deleted_at IS NULL
  AND updated_at >= %s
ORDER BY random()
LIMIT %s
"""


@dataclass
class FileCheckResult:
    """Counts of one reachability check, and up to 5 example ``s3://bucket/key`` per failure kind."""

    source: str
    changed_since: datetime
    candidates: int = 0
    """Live instances of the source written since ``changed_since`` (the sampled population)."""
    checked: int = 0
    """Instances sampled; each is in exactly one of ok/missing/denied/refused/errors."""
    ok: int = 0
    missing: int = 0
    denied: int = 0
    refused: int = 0
    errors: int = 0
    examples: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in FAILURE_KINDS})
    """Per failure kind (``missing``, ``denied``, ``refused``, ``error``): up to 5 locations."""

    @property
    def failures(self) -> int:
        """Sampled files users cannot open now: missing + denied + refused + errors."""
        return self.missing + self.denied + self.refused + self.errors

    def failed(self, max_failures: int) -> bool:
        """True when more sampled files than ``max_failures`` failed (``file_check.max_failures``)."""
        return self.failures > max_failures

    def record(self, kind: str, bucket: str, key: str) -> None:
        """Counts one outcome (``ok`` or a failure kind) and keeps its location as an example."""
        self.checked += 1
        if kind == "ok":
            self.ok += 1
            return
        attr = "errors" if kind == "error" else kind
        setattr(self, attr, getattr(self, attr) + 1)
        examples = self.examples.setdefault(kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(f"s3://{bucket}/{key}")

    def summary(self) -> str:
        """One line for logs: counts only, no keys."""
        return (
            f"file check for source {self.source!r}: checked {self.checked} of {self.candidates}, "
            f"ok {self.ok}, missing {self.missing}, denied {self.denied}, "
            f"refused {self.refused}, errors {self.errors}"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the run's report (and XCom)."""
        return {
            "source": self.source,
            "changed_since": self.changed_since.isoformat(),
            "candidates": self.candidates,
            "checked": self.checked,
            "ok": self.ok,
            "missing": self.missing,
            "denied": self.denied,
            "refused": self.refused,
            "errors": self.errors,
            "failures": self.failures,
            "examples": {k: list(v) for k, v in self.examples.items()},
        }


def check_instance_files(
    conn: psycopg.Connection[Any],
    source_cfg: SourceConfig,
    *,
    changed_since: datetime,
    sample_size: int,
    hook: InstanceFileHook | None = None,
) -> FileCheckResult:
    """HEADs the files of a random sample of the source's instances written since ``changed_since``.

    Samples ``imaging.instance`` rows with ``source_system = source_cfg.name``, ``deleted_at IS
    NULL`` and ``updated_at >= changed_since`` (one query), then one HEAD per row with the
    source's identity (``InstanceFileHook(source_cfg.name)``: connection, allowlist and
    timeouts of its ``storage`` config). It never raises for a file; decide with
    ``result.failed(source_cfg.file_check.max_failures)``.

    :param conn: psycopg 3 connection to A's database; one SELECT in the caller's transaction.
    :param changed_since: timezone-aware; typically the start of the run (before its merge).
    :param sample_size: at most this many instances; 0 checks nothing (no query either).
    :param hook: the source's hook (tests, reuse); default: made from ``source_cfg.storage``.
    :raises StorageError: naive ``changed_since``, negative ``sample_size``, or the source's AWS
        connection does not exist.
    """
    if changed_since.tzinfo is None or changed_since.utcoffset() is None:
        # A naive datetime would be read in the session's time zone: silently wrong windows.
        raise StorageError("changed_since must be timezone-aware")
    if sample_size < 0:
        raise StorageError(f"sample_size must be >= 0, got {sample_size}")
    result = FileCheckResult(source=source_cfg.name, changed_since=changed_since)
    if sample_size == 0:
        log.info("file check for source %r skipped: sample size 0", source_cfg.name)
        return result

    from psycopg.rows import tuple_row

    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(_SAMPLE_SQL, (source_cfg.name, changed_since, sample_size))
        rows = cur.fetchall()
    if not rows:
        log.info("file check for source %r: no instances written since %s", source_cfg.name, changed_since)
        return result
    result.candidates = int(rows[0][3])

    if hook is None:
        from medsync.hooks.storage import InstanceFileHook

        hook = InstanceFileHook(source_cfg.name, storage=source_cfg.storage)
    hook.get_conn()  # a missing connection is a configuration error, not a file failure

    for _id, bucket, key, _ in rows:
        try:
            kind: str = hook.head_status(bucket, key)
        except StorageError:  # bucket not allowed or key not plain: A would not presign it
            kind = "refused"
        result.record(kind, bucket, key)

    # Counts only in the log: the example locations go to the run's report.
    log.info("%s", result.summary())
    return result
