"""The one interface every source protocol implements, and the record types they share.

A *protocol* is a way of talking to a source (``rest``: any REST API described in YAML;
``dicomweb``: a PACS). A *source* is one configured instance of a protocol
(``include/sources/<name>.yaml``). The generic modules (``staging``, ``merge``, ``report``,
``tasks``, ``hooks``, ``config``) know only what is in this module: they ask
:func:`medsync.sources.open_source` for a :class:`Source` and never import a protocol's
package. A new protocol is a subpackage of ``medsync.sources`` with a :class:`Source`
subclass, registered by name in ``medsync.sources``; it touches no generic module.

The flow of one level's pull, as the generic code runs it::

    source = open_source(cfg)                       # validates cfg.api with the protocol's model
    parser = source.parser(mapping, buckets)        # once per task: compiled converters, lookups
    with source.connect(limiter) as client:         # one HTTP session, the connection's secret
        for page in client.iter_pages(level, since, until):
            for outcome in parser.parse_page(level, page):
                ...                                 # StagedRecord -> COPY, RecordRejected -> quarantine

Nothing heavy is imported here: config and the DAG factory import this module at parse time.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    from medsync.config import SourceConfig
    from medsync.mapping import Mapping


class DeletionMode(StrEnum):
    """How a source tells medsync that a record was deleted."""

    INLINE = "inline"
    """Tombstones come in the level's own listing (a ``deleted`` flag, or a non-null ``deleted_at``)."""
    FEED = "feed"
    """A separate deletions feed; the level's pull reads it for the same window and stages its items."""
    SNAPSHOT = "snapshot"
    """No tombstones anywhere: a full listing of the level is compared with A's live rows."""
    NONE = "none"
    """The source never says: rows are never deleted by the sync."""


@dataclass(frozen=True, slots=True)
class ParentLink:
    """How a child record names its parent: the column of the parent's A table its ``parent_key`` matches.

    ``"source_key"`` (the default) when a record carries its parent's own key (C's files carry their
    acquisition's uuid); a UID column such as ``"series_uid"`` when it names the parent by a DICOM
    UID (B's images, a PACS). When several of the source's parent rows share a UID, the live one
    wins, then the newest.
    """

    column: str = "source_key"


@dataclass(frozen=True, slots=True)
class Buckets:
    """The buckets a source's instances may live in, resolved for this environment."""

    default: str
    """The source's configured bucket: an instance whose record names no bucket is in it."""
    allowed: frozenset[str]
    """Every bucket a record may name (``default`` included); any other holds the record back."""


@dataclass(frozen=True, slots=True)
class RawPage:
    """One page of a level's listing, as the source sent it (JSON-decoded, not validated)."""

    items: Sequence[Any]
    deletions: bool = False
    """The items are deletion-feed items of this level (``DeletionMode.FEED``), not records."""
    others: int = 0
    """A deletion-feed page: how many of its items were of other levels (or of no level), left out."""


@dataclass(frozen=True, slots=True)
class StagedRecord:
    """A record (or tombstone) ready for the staging table."""

    source_key: str
    updated_at: datetime
    """The version: the source's modification time of this version (aware)."""
    deleted: bool
    values: tuple[Any, ...]
    """In ``medsync.levels.staged_columns(level)`` order (``parent_key`` first for child levels);
    empty for a tombstone."""


@dataclass(frozen=True, slots=True)
class FileMirror:
    """How a source whose files A must copy (a PACS has no bucket A can read) has them copied."""

    workers: int
    """Files copied at once (threads)."""
    part_bytes: int
    """Files larger than this are uploaded to A's bucket in parts of this size (S3 multipart)."""


class RecordRejected(ValueError):
    """A record that cannot be stored as it is: quarantined with ``reason``, retried every run.

    ``reason`` names fields and rules, never values (it is logged as counts by reason).
    ``payload`` is what the quarantine keeps and later hands back to :meth:`RecordParser.parse`;
    None means the raw item itself.
    """

    def __init__(
        self, reason: str, source_key: str, updated_at: datetime | None, payload: object | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.source_key = source_key
        self.updated_at = updated_at
        self.payload = payload


def synthetic_key(raw: object) -> str:
    """A stable key for a record whose own key is unusable, so that it can still be quarantined."""
    body = json.dumps(raw, sort_keys=True, default=str).encode()
    return "?sha256:" + hashlib.sha256(body).hexdigest()[:32]


class RecordParser(Protocol):
    """Validates a source's raw items and maps them onto A's columns (vocabulary included)."""

    def parse_page(self, level: str, page: RawPage) -> Iterable[StagedRecord | RecordRejected]:
        """Every item of ``page`` as a staged record or the reason it is held back, in page order.

        Never raises for a bad item: one bad record never stops the rest.
        """
        ...

    def parse(self, level: str, raw: object) -> StagedRecord:
        """One item (a quarantine payload being retried); raises :class:`RecordRejected`."""
        ...


class RequestLimiter(Protocol):
    """Paces requests to a source; shared by every client of a run when the limit is the source's."""

    def acquire(self) -> float:
        """Blocks until a request may be sent; returns the seconds waited."""
        ...


class SourceClient(ABC):
    """An open connection to a source's API. Not thread-safe unless the protocol says so."""

    @abstractmethod
    def iter_pages(self, level: str, since: datetime, until: datetime) -> Iterator[RawPage]:
        """Every record of ``level`` whose version lies in ``[since, until)``, one page at a time.

        With ``DeletionMode.INLINE`` tombstones are among the records; with ``FEED`` the deletion
        items of the level in the window follow as pages with ``deletions=True``. A record may be
        yielded more than once (the source's paging restarted, or it changed while paging): the
        merge keeps its newest version. Only a bounded number of pages is held at a time. Raises
        ``SourceApiError`` (permanent) or ``SourceUnavailableError`` (transient).
        """

    def iter_deletions(self, level: str, since: datetime, until: datetime) -> Iterator[RawPage]:
        """The deletion feed's items of ``level`` in ``[since, until)`` (``DeletionMode.FEED``), one
        ``RawPage(deletions=True)`` per page of the feed with items (``others`` counting those of
        other levels), as :meth:`iter_pages` yields them after the records; nothing without a feed.
        ``make check-source`` samples the feed's first page with it."""
        return iter(())

    def iter_listing(self, level: str) -> Iterator[RawPage]:
        """Every live record of ``level`` now (``DeletionMode.SNAPSHOT``); default: the whole time line."""
        return self.iter_pages(level, datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))

    def counts(self) -> dict[str, int] | None:
        """Live records per level now (``{"subject": n, ...}``), or None when the source has no counts."""
        return None

    def iter_file(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Iterator[bytes]:
        """The bytes of one instance's file, in chunks (``Source.file_mirror`` sources only).

        Raises ``SourceApiError`` when the source does not have it, ``SourceUnavailableError`` when
        it cannot answer now.
        """
        raise NotImplementedError(f"{type(self).__name__} does not serve files")

    def close(self) -> None:  # noqa: B027 - a client without resources need not override it
        """Releases the client's connections."""

    def __enter__(self) -> SourceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Source(ABC):
    """One configured source of one protocol. Built by :func:`medsync.sources.open_source`.

    Subclasses set ``api_model`` (the pydantic model of the config's ``api:`` section; unknown keys
    refused) and implement the abstract methods. ``self.api`` is the validated section.
    """

    protocol: ClassVar[str]
    api_model: ClassVar[type[BaseModel]]

    def __init__(self, cfg: SourceConfig, api: BaseModel) -> None:
        self.cfg = cfg
        self.api = api
        largest = self.max_page_size
        if largest is not None and cfg.page_size > largest:
            from medsync.errors import ConfigError

            raise ConfigError(
                f"source {cfg.name}: page_size {cfg.page_size} is above the source's largest page {largest}"
            )

    @abstractmethod
    def parent_link(self, level: str) -> ParentLink:
        """How records of ``level`` (a child level) name their parent."""

    @abstractmethod
    def deletion_mode(self, level: str) -> DeletionMode:
        """How deletions of ``level`` are learned."""

    def keys_identify_patients(self, level: str) -> bool:
        """Whether ``level``'s source keys identify a patient outside this source (an MRN, a DICOM PatientID).

        Such keys are PHI: what people see (the medsync page) and logs show them masked, never as
        they are. False by default: a source's own opaque ids (B's ``pat_...``, C's uuids) name
        nobody outside it, and UIDs of studies, series and instances are not patient identifiers.
        """
        return False

    @property
    def has_counts(self) -> bool:
        """Whether :meth:`SourceClient.counts` answers (reports say what they could not check)."""
        return False

    @property
    def file_mirror(self) -> FileMirror | None:
        """Set when A keeps its own copy of the source's files (``medsync.mirror``): B and C have buckets."""
        return None

    @property
    def max_page_size(self) -> int | None:
        """The largest page the source serves, when it has one (``page_size`` is checked against it)."""
        return None

    @abstractmethod
    def parser(self, mapping: Mapping, buckets: Buckets) -> RecordParser:
        """A parser for this source's records with ``mapping`` (the vocabulary) and ``buckets``.

        Raises ``MappingError`` when the mapping does not feed a column the source maps through it.
        """

    @abstractmethod
    def connect(self, limiter: RequestLimiter | None = None) -> SourceClient:
        """Opens the source's API through its Airflow connection (``cfg.connections.api_conn_id``).

        ``limiter`` paces every request when given (a run-wide limit); otherwise the client paces
        itself at ``cfg.rate_limit_per_second``. Raises ``ConfigError`` for a missing or unusable
        connection.
        """
