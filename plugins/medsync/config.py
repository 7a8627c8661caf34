"""Source configs: one YAML file per source in ``include/sources/``, one DAG per file.

A source config says everything that differs between sources and environments
except secrets: connection ids, schedule, paging and batch sizes, the bucket its
files live in. Secrets live in Airflow connections. Values that differ per
environment (the bucket) name an Airflow Variable that overrides them at run time,
so the same file serves dev, staging and prod.

This module is imported while DAG files are parsed: it reads local files only and
imports nothing heavy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Annotated, Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medsync.errors import ConfigError

LEVELS: tuple[str, ...] = ("subject", "study", "sequence", "instance")
"""A's hierarchy, parents first. Every per-level name in medsync uses these words."""

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_M = TypeVar("_M", bound=BaseModel)


def include_dir() -> Path:
    """The ``include/`` folder: ``$MEDSYNC_INCLUDE_DIR`` if set, else the one beside ``plugins/``."""
    return Path(os.environ.get("MEDSYNC_INCLUDE_DIR", _PROJECT_ROOT / "include"))


def _iana_time_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone") from None
    return value


IanaTimeZone = Annotated[str, AfterValidator(_iana_time_zone)]
"""A time zone name of the IANA database (``Asia/Seoul``), checked when a config is read."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleConfig(_Strict):
    cron: str = "0 0,12 * * *"
    timezone: IanaTimeZone = "Asia/Seoul"
    start_date: date = date(2026, 1, 1)

    @field_validator("cron")
    @classmethod
    def _cron_is_valid(cls, value: str) -> str:
        from croniter import croniter  # Airflow's own cron parser, light to import

        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a cron expression")
        return value


class ConnectionsConfig(_Strict):
    api_conn_id: str
    db_conn_id: str = "medsync_a_db"


class StorageConfig(_Strict):
    """Where the source keeps its files, and who may read them."""

    aws_conn_id: str
    bucket: str = Field(min_length=3)
    bucket_variable: str | None = None
    """Airflow Variable whose value, when set, replaces ``bucket`` (per environment)."""
    allowed_buckets: tuple[str, ...] = ()
    """Further buckets that presigning accepts for this source (e.g. a bucket being migrated from)."""
    allowed_buckets_variable: str | None = None
    """Airflow Variable holding a comma-separated list that replaces ``allowed_buckets``."""

    def resolve_bucket(self, get_variable: Callable[[str], str | None]) -> str:
        """The bucket for this environment; ``get_variable`` returns a Variable or None."""
        if self.bucket_variable:
            value = get_variable(self.bucket_variable)
            if value and value.strip():
                return value.strip()
        return self.bucket

    def resolve_allowed_buckets(self, get_variable: Callable[[str], str | None]) -> frozenset[str]:
        """Every bucket presigning may sign for: the resolved bucket plus the allowed ones."""
        extra: tuple[str, ...] = self.allowed_buckets
        if self.allowed_buckets_variable:
            value = get_variable(self.allowed_buckets_variable)
            if value is not None:
                extra = tuple(b.strip() for b in value.split(",") if b.strip())
        return frozenset((self.resolve_bucket(get_variable), *extra))


class FileCheckConfig(_Strict):
    """After a merge, HEAD a sample of new or changed instances' files with the source's identity."""

    enabled: bool = True
    sample_size: int = Field(default=20, ge=0)
    max_failures: int = Field(default=0, ge=0)
    """The run fails when more sampled files than this are not readable (missing, denied, refused, errors)."""


class SnapshotConfig(_Strict):
    """How often a source without tombstones (``DeletionMode.SNAPSHOT``) lists a level whole to find deletions."""

    on_full_refresh: bool = True
    """Every full refresh compares (it lists everything anyway)."""
    every_hours: float | None = Field(default=24.0, gt=0)
    """Otherwise, a run compares when the level's last snapshot of a succeeded run is older than this
    (None: only full refreshes)."""
    max_delete_share: float = Field(default=0.5, gt=0, le=1)
    """A snapshot that would delete more than this share of a level's live rows fails the pull instead
    (a truncated listing looks like a purge); 1 turns the guard off."""
    max_delete_floor: int = Field(default=100, ge=0)
    """A snapshot may always delete up to this many rows of a level, whatever the share (small sources)."""


class TaskTimeoutsConfig(_Strict):
    """Each task's ``execution_timeout``, in minutes: a task that hangs fails (and is retried)."""

    prepare_minutes: float = Field(default=30, gt=0)
    pull_minutes: float = Field(default=360, gt=0)
    """A whole level's window: a full refresh of millions of records at the source's rate limit."""
    merge_minutes: float = Field(default=240, gt=0)
    check_files_minutes: float = Field(default=30, gt=0)
    mirror_files_minutes: float = Field(default=240, gt=0)
    """Copying files into A's bucket (``files: mirror`` sources): a first load copies every file."""
    report_minutes: float = Field(default=60, gt=0)
    finish_minutes: float = Field(default=15, gt=0)


class DatabaseConfig(_Strict):
    """Bounds of every PostgreSQL session a task opens on A's database."""

    connect_timeout_seconds: int = Field(default=10, ge=1)
    statement_timeout_seconds: int = Field(default=7200, ge=1)
    """No single statement runs longer (a full refresh's largest merge statement included)."""


class EmailAlertConfig(_Strict):
    """E-mail through the smtp provider's ``SmtpNotifier`` (host, port, login in the connection)."""

    smtp_conn_id: str
    to: tuple[str, ...] = Field(min_length=1)
    from_email: str | None = None
    """Defaults to the connection's ``from_email`` extra."""


class WebhookAlertConfig(_Strict):
    """An HTTP POST of a JSON document (``HttpHook``): the connection's host is the URL's base."""

    http_conn_id: str
    endpoint: str = ""
    timeout_seconds: float = Field(default=10, gt=0)


class SlackAlertConfig(_Strict):
    """Slack through the slack provider's ``SlackWebhookNotifier`` (only where that provider is installed)."""

    slack_webhook_conn_id: str

    @model_validator(mode="after")
    def _provider_installed(self) -> SlackAlertConfig:
        from importlib.util import find_spec

        if find_spec("airflow.providers.slack") is None:
            raise ValueError("apache-airflow-providers-slack is not installed here: remove alerts.slack")
        return self


class AlertThresholds(_Strict):
    """When a run's report alerts, although the run succeeded. ``null`` turns one off."""

    quarantined: int | None = Field(default=1, ge=1)
    """Records newly held back by this run, all levels together."""
    pending_older_than_days: float | None = Field(default=3, gt=0)
    """Records waiting for their parent for longer than this."""
    file_check_failures: int | None = Field(default=1, ge=1)
    """Sampled files not readable with the source's identity."""
    reconciliation_drift: int | None = Field(default=1, ge=1)
    """A full refresh found A's kept live count off by at least this many rows (rows changed outside medsync)."""
    older_than_a: int | None = Field(default=1, ge=1)
    """Records the source served in a version older than A holds (the source went back in time?)."""


class AlertsConfig(_Strict):
    """Who is told, through Airflow notifiers. Only connection ids here: addresses and keys are in them."""

    email: EmailAlertConfig | None = None
    webhook: WebhookAlertConfig | None = None
    slack: SlackAlertConfig | None = None
    on_failure: bool = True
    thresholds: AlertThresholds = AlertThresholds()
    ui_base_url: str | None = None
    """The Airflow UI's address, for links in alerts; defaults to what Airflow says (``[api] base_url``)."""


class SourceConfig(_Strict):
    """One source's settings, as written in ``include/sources/<name>.yaml``."""

    name: str
    """The source's name in A: ``source_system`` of every row this source writes."""
    protocol: str
    """Which protocol speaks to the source (``medsync.sources.known_protocols()``: ``rest``, ``dicomweb``)."""
    api: dict[str, Any] = Field(default_factory=dict)
    """The protocol's own section (endpoints, paging, fields, ...), validated by the protocol's model."""
    description: str = ""
    owner: str = "data-engineering"
    tags: tuple[str, ...] = ()
    mapping_file: str | None = None
    """File in ``include/mappings/``; defaults to ``<name>.yaml``."""
    connections: ConnectionsConfig
    storage: StorageConfig
    schedule: ScheduleConfig = ScheduleConfig()
    lookback_minutes: int = Field(default=10, ge=0)
    """Each window starts this much earlier, to catch records committed late with an older timestamp."""
    page_size: int = Field(default=500, ge=1)
    """Records per request; at most the source's own largest page (``api`` says it)."""
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=6, ge=1)
    """Attempts per API request before a transient failure fails the task (Airflow then retries it)."""
    max_backoff_seconds: float = Field(default=60.0, gt=0)
    rate_limit_per_second: float = Field(default=15.0, gt=0)
    """Requests per second to the source in all: every task of every run together (``medsync.request_limit``)."""
    staging_commit_rows: int = Field(default=50_000, ge=1)
    """A pull commits its staging rows this often, so no transaction stays open for a whole window."""
    merge_batch_size: int = Field(default=20_000, ge=1)
    """Records merged per transaction into A's (large, replicated) tables."""
    merge_sessions: int = Field(default=1, ge=1, le=8)
    """Database sessions a merge applies its batches over, in parallel (each one a backend of A's database)."""
    instance_slices: int = Field(default=1, ge=1, le=32)
    """The instance pull is split into this many parallel tasks, each a time slice of the window."""
    merge_while_pulling: bool = True
    """A first load of the instances is merged chunk by chunk while it is pulled (``medsync.early_merge``)."""
    lock_timeout_seconds: int = Field(default=1800, ge=1)
    """How long a merge waits for another run of the same source to finish merging."""
    retries: int = Field(default=3, ge=0)
    retry_delay_minutes: float = Field(default=2.0, gt=0)
    max_retry_delay_minutes: float = Field(default=30.0, gt=0)
    file_check: FileCheckConfig = FileCheckConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    """Used only by sources whose deletions are found by a snapshot compare (``medsync.snapshot``)."""
    task_timeouts: TaskTimeoutsConfig = TaskTimeoutsConfig()
    database: DatabaseConfig = DatabaseConfig()
    alerts: AlertsConfig = AlertsConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_source_system(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,15}", value):
            raise ValueError("must be 1-16 lowercase letters, digits or '_', starting with a letter")
        if value == "a":
            raise ValueError("'a' is service A's own source_system and cannot be synced")
        return value

    @field_validator("protocol")
    @classmethod
    def _protocol_is_known(cls, value: str) -> str:
        from medsync.sources import known_protocols

        if value not in known_protocols():
            raise ValueError(f"unknown protocol {value!r}; known: {', '.join(known_protocols())}")
        return value

    @model_validator(mode="after")
    def _timeouts_agree(self) -> SourceConfig:
        # A merge waits up to lock_timeout_seconds for another run: its statement and its task must outlast that.
        if self.database.statement_timeout_seconds <= self.lock_timeout_seconds:
            raise ValueError("database.statement_timeout_seconds must be larger than lock_timeout_seconds")
        if self.task_timeouts.merge_minutes * 60 <= self.lock_timeout_seconds:
            raise ValueError("task_timeouts.merge_minutes must be longer than lock_timeout_seconds")
        return self

    @model_validator(mode="after")
    def _mapping_default(self) -> SourceConfig:
        if self.mapping_file is None:
            object.__setattr__(self, "mapping_file", f"{self.name}.yaml")
        return self

    @property
    def dag_id(self) -> str:
        return f"medsync_{self.name}"

    @property
    def mapping_path(self) -> Path:
        return include_dir() / "mappings" / str(self.mapping_file)


def sources_dir() -> Path:
    return include_dir() / "sources"


_ABSENT: Any = object()


def key_path(loc: tuple[int | str, ...], document: object) -> str:
    """A pydantic error location as the key path the YAML's author sees (``paging.cursor``).

    pydantic puts labels of its own into a location: the tag of a tagged union
    (``paging.link_header.cursor``) and, under a value, the member of a plain union it tried
    (``retry_statuses.0.int``). Neither is a key of the document, so the location is walked along
    the document: an element naming the ``type`` of the object it is in, or anything past a
    scalar value, is left out. Keys the document lacks (a required key) are kept.
    """
    node: Any = document
    parts: list[str] = []
    for element in loc:
        if isinstance(node, dict):
            if element in node:
                node = node[element]
            elif node.get("type") == element:
                continue  # a tagged union's tag
            else:
                node = _ABSENT
        elif isinstance(node, list) and type(element) is int and 0 <= element < len(node):
            node = node[element]
        elif node is not _ABSENT:
            continue  # under a scalar: a plain union's member label
        parts.append(str(element))
    return ".".join(parts)


_YamlLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: Path) -> Any:
    """A YAML file's data, as ``yaml.safe_load`` reads it.

    With libyaml's parser when PyYAML was built with it: about ten times faster than the pure
    Python one, and every task reads its source's config and mapping (60 ms of a small pull).
    """
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)  # noqa: S506 (a safe loader)


def load_yaml_model(path: Path, model: type[_M], what: str) -> _M:
    """Reads a YAML file into a pydantic model; every error names the file and the field."""
    try:
        raw = read_yaml(path)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {what} is a YAML mapping")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{key_path(e['loc'], raw)}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from exc


def load_source_config(path: Path) -> SourceConfig:
    """Reads and validates one source config; errors name the file and the field."""
    from medsync.sources import open_source

    config = load_yaml_model(path, SourceConfig, "a source config")
    if path.stem != config.name:
        raise ConfigError(f"{path}: file name must be the source name ({config.name}.yaml)")
    open_source(config, str(path))  # the protocol's own section, and settings it bounds
    return config


def load_source_configs(directory: Path | None = None) -> list[SourceConfig]:
    """Every source config in ``include/sources/``, sorted by name."""
    directory = directory or sources_dir()
    return [load_source_config(p) for p in sorted(directory.glob("*.yaml"))]


def get_source_config(name: str) -> SourceConfig:
    path = sources_dir() / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no source config {path}")
    return load_source_config(path)
