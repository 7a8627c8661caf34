"""Protocol ``rest`` behind the source interface: a REST source described by its config's ``api:`` section.

Imported while DAG files are parsed (``medsync.sources.open_source``): only the spec and the base
interface at module level; the record parser, the client and the Airflow hook are imported by the
methods that need them, inside tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from medsync.sources.base import Buckets, DeletionMode, ParentLink, RecordParser, RequestLimiter, Source, SourceClient
from medsync.sources.rest.spec import FeedDeletions, NoDeletions, RestApi

if TYPE_CHECKING:
    from medsync.mapping import Mapping


class RestSource(Source):
    """A source whose API the ``api:`` section (:class:`~medsync.sources.rest.spec.RestApi`) describes."""

    protocol: ClassVar[str] = "rest"
    api_model = RestApi
    api: RestApi

    def parent_link(self, level: str) -> ParentLink:
        """The parent column the level's ``parent.by`` names (``source_key`` unless a UID column)."""
        parent = self.api.levels[level].parent
        return ParentLink(parent.by) if parent is not None else ParentLink()

    def deletion_mode(self, level: str) -> DeletionMode:
        """``flag``/``deleted_at``: tombstones in the lists; ``feed``: a deletion feed; ``none``: never."""
        deletions = self.api.deletions
        if isinstance(deletions, FeedDeletions):
            return DeletionMode.FEED
        if isinstance(deletions, NoDeletions):
            return DeletionMode.NONE
        return DeletionMode.INLINE

    def keys_identify_patients(self, level: str) -> bool:
        """What the level's ``key`` says (``identifies_patient``); B's and C's keys are their own ids."""
        return self.api.level_key(level).identifies_patient

    @property
    def has_counts(self) -> bool:
        return self.api.counts is not None

    @property
    def max_page_size(self) -> int | None:
        return self.api.limits.max_page_size

    def parser(self, mapping: Mapping, buckets: Buckets) -> RecordParser:
        from medsync.sources.rest.records import RestRecordParser

        return RestRecordParser(self.api, mapping, buckets)

    def connect(self, limiter: RequestLimiter | None = None) -> SourceClient:
        from medsync.sources.rest.hook import RestSourceHook

        return RestSourceHook.from_source(self.cfg, self.api, limiter).get_conn()
