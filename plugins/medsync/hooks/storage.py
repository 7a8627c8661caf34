"""Presigned GET URLs for instance files, from the bucket of the instance's source.

Every row of ``imaging.instance`` locates its file with ``storage_bucket`` + ``storage_key``.
Files stay where their source keeps them: B's images in B's bucket, A's own in A's bucket.
One code path serves all sources; what differs per source is configuration:

- a synced source (``'b'``, ...): ``storage`` of ``include/sources/<name>.yaml``;
- A itself (``'a'``): ``storage`` of ``include/storage/a.yaml``, which also holds the presign
  policy (default and maximum expiry) for every URL A hands out.

Each source's ``StorageConfig`` names the AWS connection (the identity the bucket owner
granted ``s3:GetObject``), the bucket and the further allowed buckets. Bucket names differ
per environment: the Airflow Variables named by ``bucket_variable`` and
``allowed_buckets_variable`` override them, read when a hook first needs them (never at
import). Region and endpoint come from the AWS connection (extra ``region_name``,
``endpoint_url``); the hook always signs with SigV4, whatever the connection says.

Entry points:

- :class:`InstanceFileHook`: one source's identity: ``presign(bucket, key)``, ``head_status``;
- :func:`presign_instance`: one instance id of A's tables -> URL, or ``StorageError``;
- :func:`presign_instances`, :func:`presign_sequence`: many at once, one query, one client per
  source; result :class:`PresignBatch` (URLs and refusals with reasons).

Nothing here logs a secret key, a signed URL or an object key: logs carry counts, sources,
buckets and instance ids only.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from psycopg.rows import tuple_row
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medsync.config import StorageConfig, get_source_config, include_dir, load_yaml_model
from medsync.errors import MedsyncError, StorageError

if TYPE_CHECKING:
    import psycopg
    from botocore.client import BaseClient

log = logging.getLogger(__name__)

A_SOURCE = "a"
"""``source_system`` of A's own rows."""

SIGV4_MAX_EXPIRES_SECONDS = 7 * 24 * 3600
"""SigV4 query signatures cannot live longer than this (AWS limit)."""

MAX_KEY_BYTES = 1024
"""S3's limit on an object key's UTF-8 length."""

HeadStatus = Literal["ok", "missing", "denied", "error"]


# --- configuration ---------------------------------------------------------------------------


class PresignPolicy(BaseModel):
    """How long presigned URLs live: ``presign`` in ``include/storage/a.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_expires_seconds: int = Field(default=300, gt=0)
    """Lifetime of a URL when the caller does not ask for one."""
    max_expires_seconds: int = Field(default=3600, gt=0, le=SIGV4_MAX_EXPIRES_SECONDS)
    """No caller may ask for a longer lifetime."""

    @model_validator(mode="after")
    def _default_within_cap(self) -> PresignPolicy:
        if self.default_expires_seconds > self.max_expires_seconds:
            raise ValueError("default_expires_seconds must not exceed max_expires_seconds")
        return self

    def expiry(self, expires_in: int | None) -> int:
        """The lifetime to sign with: ``expires_in`` checked against the cap, or the default.

        :raises StorageError: ``expires_in`` is not a whole number of seconds in ``1..max``.
        """
        if expires_in is None:
            return self.default_expires_seconds
        # bool is an int in Python; True seconds is a caller bug, not a lifetime.
        if isinstance(expires_in, bool) or not isinstance(expires_in, int):
            raise StorageError(f"expiry must be a whole number of seconds, got {type(expires_in).__name__}")
        if expires_in <= 0:
            raise StorageError(f"expiry must be positive, got {expires_in} s")
        if expires_in > self.max_expires_seconds:
            raise StorageError(
                f"expiry {expires_in} s is over the cap of {self.max_expires_seconds} s "
                "(presign.max_expires_seconds in include/storage/a.yaml)"
            )
        return expires_in


class AStorageFile(BaseModel):
    """``include/storage/a.yaml``: A's own bucket, and the presign policy for all sources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    storage: StorageConfig
    presign: PresignPolicy = PresignPolicy()


def a_storage_path() -> Path:
    return include_dir() / "storage" / "a.yaml"


def load_a_storage(path: Path | None = None) -> AStorageFile:
    """Reads and validates ``include/storage/a.yaml``; errors name the file and the field."""
    return load_yaml_model(path or a_storage_path(), AStorageFile, "A's storage config")


def storage_config_for(source: str) -> StorageConfig:
    """The ``StorageConfig`` of a ``source_system``: ``'a'`` or a synced source's name.

    :raises ConfigError: no config for that source, or the file is invalid.
    """
    if source == A_SOURCE:
        return load_a_storage().storage
    return get_source_config(source).storage


def airflow_variable(name: str) -> str | None:
    """An Airflow Variable's value, or None when it is not set (read at call time)."""
    # Imported here: airflow.sdk is slow to import and this module must not read
    # Variables at import time (DAG parsing, tests that set them later).
    from airflow.sdk import Variable

    value = Variable.get(name, default=None)
    return None if value is None else str(value)


# --- validation ------------------------------------------------------------------------------


def key_problem(key: object) -> str | None:
    """Why ``key`` is not a plain object key (None when it is one).

    A key must be non-empty text without a leading ``/``, without empty, ``.`` or ``..``
    segments, and at most 1024 bytes. Such keys cannot address anything outside the object
    they name, and the same file has exactly one key (A's contract: no leading ``/``).
    """
    if not isinstance(key, str) or not key:
        return "the storage key is empty"
    if key.startswith("/"):
        return "the storage key starts with '/'"
    if "\x00" in key:
        return "the storage key contains a NUL character"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"the storage key is longer than {MAX_KEY_BYTES} bytes"
    return _segment_problem(key.split("/"))


def _segment_problem(segments: list[str]) -> str | None:
    for segment in segments:
        if segment == "":
            return "the storage key has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"the storage key has a '{segment}' segment"
    return None


# --- the hook --------------------------------------------------------------------------------


class InstanceFileHook(S3Hook):
    """Reads and presigns instance files with one source's AWS identity.

    ``InstanceFileHook("b")`` takes everything from ``include/sources/b.yaml`` (``storage``);
    ``InstanceFileHook("a")`` from ``include/storage/a.yaml``. The AWS connection
    (``storage.aws_conn_id``, e.g. ``medsync_b_aws``) gives credentials or a role, the region
    (extra ``region_name``) and, for S3-compatible servers, the endpoint (extra ``endpoint_url``).
    The hook forces SigV4 signing and connect/read timeouts on top of the connection's
    ``config_kwargs``; other ``config_kwargs`` (addressing style, retries, ...) still apply.

    What a caller must know:

    - :meth:`presign` signs only for the source's allowed buckets (its bucket, per-environment
      Variable first, plus ``allowed_buckets``) and plain keys (:func:`key_problem`); it raises
      :class:`StorageError` for anything else and never returns None.
    - Presigning is local computation: it proves nothing about the object's existence. Use
      :meth:`head_status` to check a file.
    - The connection must exist: a missing connection raises ``StorageError`` rather than
      silently falling back to the worker's own AWS identity.
    - Variables are read once per hook instance, on first use; make a new hook to see changes.
    """

    conn_name_attr = "aws_conn_id"
    default_conn_name = "medsync_a_aws"
    conn_type = "aws"
    hook_name = "medsync instance files (S3)"

    def __init__(
        self,
        source: str = A_SOURCE,
        *,
        storage: StorageConfig | None = None,
        policy: PresignPolicy | None = None,
        aws_conn_id: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        get_variable: Callable[[str], str | None] | None = None,
    ) -> None:
        """
        :param source: ``source_system`` whose identity and buckets to use (``'a'`` for A's own).
        :param storage: the source's storage config; default: read from its config file.
        :param policy: expiry default and cap; default: ``presign`` of ``include/storage/a.yaml``.
        :param aws_conn_id: overrides ``storage.aws_conn_id`` (tests, support tooling).
        :param connect_timeout: seconds; bounds every call the client makes (HEAD).
        :param read_timeout: seconds; idem.
        :param get_variable: reads an Airflow Variable (None when unset); default: ``Variable.get``.
        :raises ConfigError: the source has no (valid) config.
        """
        self.source_name = source
        self.storage = storage if storage is not None else storage_config_for(source)
        self.policy = policy if policy is not None else load_a_storage().presign
        self._get_variable = get_variable or airflow_variable
        self._timeouts = (connect_timeout, read_timeout)
        super().__init__(aws_conn_id=aws_conn_id or self.storage.aws_conn_id)

    # -- connection ------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The connection's botocore config with SigV4 and timeouts forced.

        With a custom ``endpoint_url`` botocore would otherwise sign S3 URLs with SigV2
        (``AWSAccessKeyId=...&Signature=...``), which AWS no longer accepts in most regions.
        """
        connect_timeout, read_timeout = self._timeouts
        forced = Config(signature_version="s3v4", connect_timeout=connect_timeout, read_timeout=read_timeout)
        return super().config.merge(forced)

    def get_conn(self) -> BaseClient:
        """The boto3 S3 client for this source's identity (cached per hook).

        :raises StorageError: the AWS connection does not exist.
        """
        # AwsBaseHook logs a warning and falls back to boto3's default credential chain when
        # the connection is missing: that would sign with whatever identity the worker has.
        if self.conn_config.conn_id != self.aws_conn_id:
            raise StorageError(
                f"AWS connection {self.aws_conn_id!r} for source {self.source_name!r} not found: "
                f"create it (e.g. AIRFLOW_CONN_{str(self.aws_conn_id).upper()})"
            )
        return super().get_conn()

    # -- configuration resolved per environment ---------------------------------------------

    @cached_property
    def bucket(self) -> str:
        """The source's bucket in this environment (``bucket_variable`` when set)."""
        return self.storage.resolve_bucket(self._get_variable)

    @cached_property
    def allowed_buckets(self) -> frozenset[str]:
        """Every bucket this hook signs for: :attr:`bucket` plus ``allowed_buckets`` (or its Variable)."""
        return self.storage.resolve_allowed_buckets(self._get_variable)

    def check_location(self, bucket: str, key: str) -> None:
        """Raises :class:`StorageError` unless ``bucket`` is allowed and ``key`` is a plain key."""
        if bucket not in self.allowed_buckets:
            allowed = ", ".join(sorted(self.allowed_buckets))
            raise StorageError(f"bucket {bucket!r} is not allowed for source {self.source_name!r} (allowed: {allowed})")
        problem = key_problem(key)
        if problem:
            raise StorageError(problem)

    # -- operations -------------------------------------------------------------------------

    def presign(self, bucket: str, key: str, expires_in: int | None = None) -> str:
        """A presigned GET URL (SigV4) for ``s3://bucket/key``.

        :param expires_in: seconds the URL stays valid; default ``policy.default_expires_seconds``
            (300), at most ``policy.max_expires_seconds``.
        :raises StorageError: bucket not allowed, bad key, bad expiry, missing connection or
            credentials, or signing failed. Never returns None.
        """
        seconds = self.policy.expiry(expires_in)
        self.check_location(bucket, key)
        self.get_conn()  # the connection check, before S3Hook swallows errors
        try:
            url = self.generate_presigned_url(
                "get_object", params={"Bucket": bucket, "Key": key}, expires_in=seconds, http_method="GET"
            )
        except BotoCoreError as exc:  # e.g. NoCredentialsError: the connection gives no keys
            raise StorageError(
                f"cannot sign for source {self.source_name!r} with connection {self.aws_conn_id!r}: "
                f"{type(exc).__name__}"
            ) from exc
        # S3Hook.generate_presigned_url returns None on a ClientError (it logs the message).
        if not url:
            raise StorageError(f"signing failed for source {self.source_name!r} bucket {bucket!r}")
        if "X-Amz-Signature=" not in url:  # a SigV2 or unsigned URL must never leave this hook
            raise StorageError(f"signing for source {self.source_name!r} did not produce a SigV4 URL")
        return url

    def head_status(self, bucket: str, key: str) -> HeadStatus:
        """HEADs ``s3://bucket/key`` with this identity: ``ok``, ``missing``, ``denied`` or ``error``.

        ``missing`` is a 404. On AWS an identity without ``s3:ListBucket`` gets 403 for a missing
        object, so ``denied`` may also mean missing there. ``error`` is anything else (5xx after
        botocore's retries, timeouts, connection failures).

        :raises StorageError: the location is refused (:meth:`check_location`) or the
            connection does not exist; these never reach the network.
        """
        self.check_location(bucket, key)
        client = self.get_conn()
        try:
            client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if status == 404 or code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                return "missing"
            if status == 403 or code in ("403", "AccessDenied", "Forbidden"):
                return "denied"
            log.warning("HEAD in bucket %s for source %s failed: %s %s", bucket, self.source_name, status, code)
            return "error"
        except BotoCoreError as exc:
            log.warning("HEAD in bucket %s for source %s failed: %s", bucket, self.source_name, type(exc).__name__)
            return "error"
        return "ok"


# --- many instances at once ------------------------------------------------------------------


class SourceHooks:
    """One :class:`InstanceFileHook` per ``source_system``, made on first use and then reused.

    Pass one to several ``presign_*`` calls to reuse clients; pass ``hooks`` to supply some
    ready-made (tests, or a hook with another connection id).
    """

    def __init__(
        self,
        *,
        policy: PresignPolicy | None = None,
        hooks: Mapping[str, InstanceFileHook] | None = None,
    ) -> None:
        self.policy = policy if policy is not None else load_a_storage().presign
        self._hooks: dict[str, InstanceFileHook] = dict(hooks or {})

    def __getitem__(self, source: str) -> InstanceFileHook:
        """The hook of ``source``; :raises ConfigError: when the source has no config."""
        if source not in self._hooks:
            self._hooks[source] = InstanceFileHook(source, policy=self.policy)
        return self._hooks[source]

    @property
    def sources(self) -> tuple[str, ...]:
        """The sources whose hook (and so whose one S3 client) has been made, sorted."""
        return tuple(sorted(self._hooks))


@dataclass(frozen=True)
class PresignBatch:
    """What a batch presign gives: URLs, and the instances refused with the reason for each.

    Every requested id is in exactly one of the two dicts (ids as :class:`uuid.UUID`; a
    request that is not a UUID is refused under the text it was given). Both keep the
    order of the request (for a sequence: instance_number, then id).
    """

    urls: dict[uuid.UUID, str] = field(default_factory=dict)
    refused: dict[uuid.UUID | str, str] = field(default_factory=dict)

    def raise_for_refused(self) -> None:
        """Raises :class:`StorageError` listing the refusals, if any."""
        if self.refused:
            raise StorageError("; ".join(self.refused.values()))


_INSTANCES_SQL = """
SELECT id, source_system, storage_bucket, storage_key, deleted_at
FROM imaging.instance
WHERE id = ANY(%s)
"""

# One round trip: the sequence row (even when it has no instances) with its live instances.
_SEQUENCE_SQL = """
SELECT s.deleted_at, i.id, i.source_system, i.storage_bucket, i.storage_key
FROM imaging.sequence AS s
LEFT JOIN imaging.instance AS i ON i.sequence_id = s.id AND i.deleted_at IS NULL
WHERE s.id = %s
ORDER BY i.instance_number NULLS LAST, i.id
"""


@dataclass(frozen=True)
class _Row:
    id: uuid.UUID
    source: str
    bucket: str
    key: str


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID | None:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _sign_rows(rows: Iterable[_Row], seconds: int, hooks: SourceHooks, batch: PresignBatch) -> None:
    """Signs each row with its source's hook; refusals go to ``batch.refused``."""
    by_source: dict[str, list[_Row]] = {}
    for row in rows:
        by_source.setdefault(row.source, []).append(row)
    for source, source_rows in by_source.items():
        try:
            hook: InstanceFileHook | None = hooks[source]
            problem = ""
        except MedsyncError as exc:  # no config for that source: every row of it is refused
            hook, problem = None, str(exc)
        for row in source_rows:
            if hook is None:
                batch.refused[row.id] = f"instance {row.id}: no storage config for source {source!r}: {problem}"
                continue
            try:
                batch.urls[row.id] = hook.presign(row.bucket, row.key, seconds)
            except StorageError as exc:
                batch.refused[row.id] = f"instance {row.id}: {exc}"


def _reorder(batch: PresignBatch, order: list[uuid.UUID | str]) -> PresignBatch:
    urls = {i: batch.urls[i] for i in order if isinstance(i, uuid.UUID) and i in batch.urls}
    refused = {i: batch.refused[i] for i in order if i in batch.refused}
    return PresignBatch(urls=urls, refused=refused)


def _log_batch(what: str, batch: PresignBatch, seconds: int) -> None:
    log.info(
        "presigned %d URL(s) for %s (expiry %d s), refused %d: %s",
        len(batch.urls),
        what,
        seconds,
        len(batch.refused),
        ", ".join(str(i) for i in batch.refused) or "-",
    )


def presign_instances(
    conn: psycopg.Connection[Any],
    instance_ids: Iterable[uuid.UUID | str],
    *,
    expires_in: int | None = None,
    hooks: SourceHooks | None = None,
) -> PresignBatch:
    """Presigned GET URLs for many instances of A's tables: one query, one client per source.

    Refusals do not raise: an id that is not a UUID, not in ``imaging.instance``, deleted, or
    whose bucket/key its source's config refuses is in ``refused`` with the reason.

    :param conn: a psycopg 3 connection to A's database (e.g. ``PostgresHook.get_conn()``);
        one SELECT runs on it, in the caller's transaction.
    :param expires_in: seconds; default and cap from ``include/storage/a.yaml``.
    :raises StorageError: ``expires_in`` is refused (nothing is looked up then).
    """
    hooks = hooks or SourceHooks()
    seconds = hooks.policy.expiry(expires_in)
    order: list[uuid.UUID | str] = []
    batch = PresignBatch()
    for raw in instance_ids:
        parsed = _as_uuid(raw)
        item: uuid.UUID | str = parsed if parsed is not None else str(raw)
        if item in order:
            continue
        order.append(item)
        if parsed is None:
            batch.refused[item] = f"{str(raw)!r} is not an instance id (a UUID)"
    wanted = [i for i in order if isinstance(i, uuid.UUID)]
    rows: list[_Row] = []
    if wanted:
        with conn.cursor(row_factory=tuple_row) as cur:
            cur.execute(_INSTANCES_SQL, (wanted,))
            found = cur.fetchall()
        seen: set[uuid.UUID] = set()
        for id_, source, bucket, key, deleted_at in found:
            seen.add(id_)
            if deleted_at is not None:
                batch.refused[id_] = f"instance {id_} is deleted"
            else:
                rows.append(_Row(id_, source, bucket, key))
        for id_ in wanted:
            if id_ not in seen:
                batch.refused[id_] = f"instance {id_} does not exist"
    _sign_rows(rows, seconds, hooks, batch)
    result = _reorder(batch, order)
    _log_batch(f"{len(order)} instance(s)", result, seconds)
    return result


def presign_instance(
    conn: psycopg.Connection[Any],
    instance_id: uuid.UUID | str,
    *,
    expires_in: int | None = None,
    hooks: SourceHooks | None = None,
) -> str:
    """The presigned GET URL of one instance, signed with its source's identity.

    :raises StorageError: unknown or deleted instance, bucket not allowed for its source,
        bad key, bad expiry; the message says which. Never returns None.
    """
    batch = presign_instances(conn, [instance_id], expires_in=expires_in, hooks=hooks)
    batch.raise_for_refused()
    return next(iter(batch.urls.values()))


def presign_sequence(
    conn: psycopg.Connection[Any],
    sequence_id: uuid.UUID | str,
    *,
    expires_in: int | None = None,
    hooks: SourceHooks | None = None,
) -> PresignBatch:
    """Presigned GET URLs for every live instance of a sequence, in instance_number order.

    One query. Deleted instances are left out (users never see them); the live ones that
    cannot be signed are in ``refused``.

    :raises StorageError: the sequence does not exist or is deleted, or ``expires_in`` is refused.
    """
    hooks = hooks or SourceHooks()
    seconds = hooks.policy.expiry(expires_in)
    seq_id = _as_uuid(sequence_id)
    if seq_id is None:
        raise StorageError(f"{str(sequence_id)!r} is not a sequence id (a UUID)")
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(_SEQUENCE_SQL, (seq_id,))
        found = cur.fetchall()
    if not found:
        raise StorageError(f"sequence {seq_id} does not exist")
    if found[0][0] is not None:
        raise StorageError(f"sequence {seq_id} is deleted")
    rows = [_Row(id_, source, bucket, key) for _, id_, source, bucket, key in found if id_ is not None]
    batch = PresignBatch()
    _sign_rows(rows, seconds, hooks, batch)
    result = _reorder(batch, [r.id for r in rows])
    _log_batch(f"sequence {seq_id}", result, seconds)
    return result
