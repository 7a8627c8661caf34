"""Copies the files of a source that has no bucket A can read (a PACS) into A's own bucket.

After the instance merge, :func:`mirror_instance_files` copies the file of every live instance of
the source whose copy in A's bucket is not known to be current, from the source
(``SourceClient.iter_file``) to the row's ``storage_bucket``/``storage_key``, which for such a
source are A's bucket and a key made from the UIDs: the one presign path then serves A's copy
with A's identity. ``medsync.mirrored_file`` records each copy made (location, the instance's
version, size, SHA-256): an instance without a record there, or with one for another location or
an older version, is a candidate. So a file that could not be copied, or whose run failed, is
copied by a later run, not only by the run that changed its instance.

Candidates are read in batches of ``batch_size`` (keyset on the source key), never all at once.
Per file:

- streamed: the source's chunks go to a spooled temporary file (memory up to ``SPOOL_BYTES``,
  disk beyond), hashed (SHA-256) and counted on the way;
- skipped when A's copy already has that size and checksum (``x-amz-meta-sha256``): a record
  lost or a copy made by a run that failed before recording it uploads nothing again;
- uploaded with boto3's managed transfer: multipart above ``part_bytes``;
- retried (tenacity) on transient failures of the source or of S3; a file that still cannot be
  had is counted as failed with the instance's id (never a name or UID) and the reason class,
  and stays a candidate for the next run.

Files are copied ``workers`` at a time (``concurrent.futures``). Sources with a bucket of their
own (B, C) have no ``file_mirror`` and are never copied.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from medsync.errors import MedsyncError, SourceApiError, SourceUnavailableError, StorageError
from medsync.sources.base import FileMirror, SourceClient

if TYPE_CHECKING:
    from datetime import datetime
    from uuid import UUID

    import psycopg

log = logging.getLogger(__name__)

SPOOL_BYTES = 8 * 1024 * 1024
CHECKSUM_KEY = "sha256"
MAX_EXAMPLES = 5

BATCH_SIZE = 500
"""Candidates read and copied per batch: memory and the pool's queue hold one batch."""

# Live instances of the source whose current file A is not known to hold, in source-key order
# after the last key of the previous batch (the unique index on (source_system, source_key)).
_CANDIDATES = """
SELECT i.id, st.study_uid, se.series_uid, i.sop_instance_uid, i.storage_bucket, i.storage_key, i.content_type,
       i.source_updated_at, i.source_key
FROM imaging.instance i
JOIN imaging.sequence se ON se.id = i.sequence_id
JOIN imaging.study st ON st.id = se.study_id
LEFT JOIN medsync.mirrored_file m ON m.instance_id = i.id
WHERE i.source_system = %(source)s AND i.deleted_at IS NULL AND i.source_key > %(after)s
  AND (m.instance_id IS NULL OR m.storage_bucket <> i.storage_bucket OR m.storage_key <> i.storage_key
       OR m.source_version IS DISTINCT FROM i.source_updated_at)
ORDER BY i.source_key
LIMIT %(limit)s
"""


class _Candidate(NamedTuple):
    """An instance whose copy in A's bucket is missing or outdated (a row of ``_CANDIDATES``)."""

    id: UUID
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    storage_bucket: str
    storage_key: str
    content_type: str | None
    source_updated_at: datetime
    source_key: str


_RECORD = """
INSERT INTO medsync.mirrored_file
    (instance_id, source_system, storage_bucket, storage_key, source_version, size_bytes, sha256)
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::bigint[], %s::text[])
ON CONFLICT (instance_id) DO UPDATE SET
    source_system = excluded.source_system, storage_bucket = excluded.storage_bucket,
    storage_key = excluded.storage_key, source_version = excluded.source_version,
    size_bytes = excluded.size_bytes, sha256 = excluded.sha256, mirrored_at = now()
"""


class _Transient(MedsyncError):
    """A failure worth another attempt (the source or S3 could not answer now)."""


@dataclass
class MirrorResult:
    candidates: int = 0
    copied: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    """A's instance ids of files that could not be copied (at most 5)."""

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("reasons", "examples")}
        out["seconds"] = round(self.seconds, 3)
        out["reasons"] = dict(self.reasons)
        out["examples"] = list(self.examples)
        return out

    def summary(self) -> str:
        return (
            f"mirrored {self.copied} of {self.candidates} files ({self.bytes_copied} bytes), "
            f"{self.skipped} already in A's bucket, {self.failed} failed in {self.seconds:.1f}s"
        )


def _same_copy(s3: Any, bucket: str, key: str, size: int, checksum: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            return False
        raise
    return int(head.get("ContentLength", -1)) == size and head.get("Metadata", {}).get(CHECKSUM_KEY) == checksum


@dataclass(frozen=True)
class _Copied:
    outcome: str
    """"copied" or "skipped" (A's copy was already this file)."""
    size: int
    checksum: str


def _copy_one(client: SourceClient, s3: Any, row: _Candidate, settings: FileMirror, attempts: int) -> _Copied:
    """Copies one file. Raises SourceApiError/StorageError when it cannot."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    study_uid, series_uid, sop_uid = row.study_uid, row.series_uid, row.sop_instance_uid
    bucket, key, content_type = row.storage_bucket, row.storage_key, row.content_type
    transfer = TransferConfig(multipart_threshold=settings.part_bytes, multipart_chunksize=settings.part_bytes)

    @retry(
        retry=retry_if_exception_type(_Transient),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.5, max=30),
        reraise=True,
    )
    def attempt() -> _Copied:
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            digest, size = hashlib.sha256(), 0
            try:
                for chunk in client.iter_file(study_uid, series_uid, sop_uid):
                    digest.update(chunk)
                    size += len(chunk)
                    spool.write(chunk)
            except SourceUnavailableError as exc:
                raise _Transient(str(exc)) from exc
            checksum = digest.hexdigest()
            try:
                if _same_copy(s3, bucket, key, size, checksum):
                    return _Copied("skipped", size, checksum)
                spool.seek(0)
                s3.upload_fileobj(
                    spool,
                    bucket,
                    key,
                    ExtraArgs={
                        "ContentType": content_type or "application/dicom",
                        "Metadata": {CHECKSUM_KEY: checksum},
                    },
                    Config=transfer,
                )
            except (BotoCoreError, ClientError) as exc:
                raise _Transient(f"S3: {type(exc).__name__}") from exc
            return _Copied("copied", size, checksum)

    try:
        return attempt()
    except _Transient as exc:
        raise StorageError(str(exc)) from None


def mirror_instance_files(
    conn: psycopg.Connection,
    *,
    source: str,
    client: SourceClient,
    s3: Any,
    settings: FileMirror,
    check_location: Any,
    attempts: int = 4,
    batch_size: int = BATCH_SIZE,
) -> MirrorResult:
    """Copies into A's bucket the file of every live instance of ``source`` not known to be there.

    ``s3`` is a boto3 S3 client with A's identity; ``check_location(bucket, key)`` raises
    ``StorageError`` for a location A would not presign (it is then counted as failed). Each
    batch's copies are recorded in ``medsync.mirrored_file`` as soon as the batch is done, so a
    task killed midway keeps what it copied.
    """
    from psycopg.rows import class_row

    started = time.monotonic()
    result = MirrorResult()

    def one(row: _Candidate) -> _Copied:
        check_location(row.storage_bucket, row.storage_key)
        return _copy_one(client, s3, row, settings, attempts)

    after = ""
    with ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="medsync-mirror") as pool:
        while True:
            with conn.cursor(row_factory=class_row(_Candidate)) as cur:
                rows = cur.execute(_CANDIDATES, {"source": source, "after": after, "limit": batch_size}).fetchall()
            if not rows:
                break
            after = rows[-1].source_key
            result.candidates += len(rows)
            done: list[tuple[_Candidate, _Copied]] = []
            futures = {pool.submit(one, row): row for row in rows}
            for future in as_completed(futures):
                row = futures[future]
                try:
                    copied = future.result()
                except (SourceApiError, SourceUnavailableError, StorageError) as exc:
                    result.failed += 1
                    result.reasons[type(exc).__name__ + ": " + str(exc).split(": ")[-1][:60]] += 1
                    if len(result.examples) < MAX_EXAMPLES:
                        result.examples.append(str(row.id))
                    continue
                done.append((row, copied))
                if copied.outcome == "copied":
                    result.copied += 1
                    result.bytes_copied += copied.size
                else:
                    result.skipped += 1
            _record(conn, source, done)
            if len(rows) < batch_size:
                break
    result.seconds = time.monotonic() - started
    log.info("%s: %s", source, result.summary())
    return result


def _record(conn: psycopg.Connection, source: str, done: list[tuple[_Candidate, _Copied]]) -> None:
    """Records the batch's files A now holds (one statement)."""
    if not done:
        return
    conn.execute(
        _RECORD,
        (
            [row.id for row, _ in done],
            [source] * len(done),
            [row.storage_bucket for row, _ in done],
            [row.storage_key for row, _ in done],
            [row.source_updated_at for row, _ in done],
            [copied.size for _, copied in done],
            [copied.checksum for _, copied in done],
        ),
    )
