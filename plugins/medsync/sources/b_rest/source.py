"""Protocol ``b_rest`` behind the source interface (until B is described as data by ``rest``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from medsync.mapping import Mapping
from medsync.sources.b_rest import RESOURCES
from medsync.sources.base import (
    Buckets,
    DeletionMode,
    ParentLink,
    RawPage,
    RecordParser,
    RecordRejected,
    RequestLimiter,
    Source,
    SourceClient,
    StagedRecord,
)


class BRestApi(BaseModel):
    """B's protocol has no settings of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Parser:
    def __init__(self, mapping: Mapping, bucket: str) -> None:
        from medsync.sources.b_rest.records import RecordParser as BParser

        self._parser = BParser(mapping, bucket)

    def parse(self, level: str, raw: object) -> StagedRecord:
        return self._parser.parse(level, raw)

    def parse_page(self, level: str, page: RawPage) -> Iterable[StagedRecord | RecordRejected]:
        parse = self._parser.parse
        for raw in page.items:
            try:
                yield parse(level, raw)
            except RecordRejected as rejected:
                yield rejected


class _Client(SourceClient):
    def __init__(self, client: object, page_size: int) -> None:
        self._client = client
        self._page_size = page_size

    def iter_pages(self, level: str, since: datetime, until: datetime) -> Iterator[RawPage]:
        for page in self._client.iter_pages(RESOURCES[level], since, until, page_size=self._page_size):  # type: ignore[attr-defined]
            yield RawPage(page)

    def counts(self) -> dict[str, int] | None:
        raw = self._client.counts()  # type: ignore[attr-defined]
        return {level: int(raw[resource]) for level, resource in RESOURCES.items()}

    def close(self) -> None:
        self._client.close()  # type: ignore[attr-defined]


class BRestSource(Source):
    protocol = "b_rest"
    api_model = BRestApi

    def parent_link(self, level: str) -> ParentLink:
        # B links an image to its series by SeriesInstanceUID, not by the series' id.
        return ParentLink("series_uid") if level == "instance" else ParentLink()

    def deletion_mode(self, level: str) -> DeletionMode:
        return DeletionMode.INLINE

    @property
    def has_counts(self) -> bool:
        return True

    @property
    def max_page_size(self) -> int | None:
        return 1000

    def parser(self, mapping: Mapping, buckets: Buckets) -> RecordParser:
        return _Parser(mapping, buckets.default)

    def connect(self, limiter: RequestLimiter | None = None) -> SourceClient:
        from medsync.hooks.source_api import SourceApiHook

        return _Client(SourceApiHook.from_source_config(self.cfg).get_conn(limiter), self.cfg.page_size)
