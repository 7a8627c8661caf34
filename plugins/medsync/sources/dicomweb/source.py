"""Protocol ``dicomweb`` behind the source interface (``medsync.sources.base``).

Imports nothing heavy at module level: configs are loaded (and this module imported) while
DAG files are parsed.
"""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

from medsync.mapping import Mapping
from medsync.sources.base import (
    Buckets,
    DeletionMode,
    FileMirror,
    ParentLink,
    RecordParser,
    RequestLimiter,
    Source,
    SourceClient,
)
from medsync.sources.dicomweb.spec import ChangeFeed, DicomwebApi, FilesMode


class DicomwebSource(Source):
    """A PACS: studies, series and instances keyed and linked by their DICOM UIDs."""

    protocol = "dicomweb"
    api_model = DicomwebApi
    api: DicomwebApi

    def parent_link(self, level: str) -> ParentLink:
        # A study's parent key is its subject's key; a series names its study, an instance its
        # series, by UID, and those UIDs are the parents' own source keys.
        return ParentLink()

    def keys_identify_patients(self, level: str) -> bool:
        # A subject's key is the PatientID (with its issuer): the hospital's MRN (docs/dicomweb-mapping.md).
        return level == "subject"

    def deletion_mode(self, level: str) -> DeletionMode:
        # No PACS says what it deleted (Orthanc's /changes lists no deletions): compare listings.
        return DeletionMode.SNAPSHOT

    @property
    def has_counts(self) -> bool:
        return self.api.changes is ChangeFeed.ORTHANC

    @property
    def max_page_size(self) -> int | None:
        return self.api.max_page_size

    @property
    def file_mirror(self) -> FileMirror | None:
        if self.api.files is not FilesMode.MIRROR:
            return None
        return FileMirror(workers=self.api.mirror_workers, part_bytes=self.api.multipart_threshold_mb * 1024 * 1024)

    @property
    def key_prefix(self) -> str:
        return self.api.key_prefix.strip("/") or self.cfg.name

    def parser(self, mapping: Mapping, buckets: Buckets) -> RecordParser:
        from medsync.sources.dicomweb.records import DicomwebRecordParser

        return DicomwebRecordParser(
            mapping, bucket=buckets.default, key_prefix=self.key_prefix, zone=ZoneInfo(self.api.timezone)
        )

    def connect(self, limiter: RequestLimiter | None = None) -> SourceClient:
        """The PACS's session, paced by ``limiter`` or else by a token bucket of ``rate_limit_per_second``.

        The client's session on A's database (versions, change feed) has the config's
        ``database`` bounds, as every task's own session does.
        """
        from medsync.hooks.a_database import ADatabaseHook
        from medsync.sources.dicomweb.client import DicomwebClient
        from medsync.sources.dicomweb.hook import DicomwebHook
        from medsync.sources.rate_limit import TokenBucket

        hook = DicomwebHook(
            self.cfg.connections.api_conn_id,
            max_attempts=self.cfg.max_attempts,
            max_backoff_seconds=self.cfg.max_backoff_seconds,
            timeout=self.cfg.request_timeout_seconds,
            limiter=limiter if limiter is not None else TokenBucket(self.cfg.rate_limit_per_second),
        )
        session, base_url, timeout = hook.session()
        db = ADatabaseHook.for_source(self.cfg).get_conn()
        return DicomwebClient(
            source=self.cfg.name,
            api=self.api,
            session=session,
            base_url=base_url,
            db=db,
            page_size=self.cfg.page_size,
            timeout=timeout,
            # Scheduled and manual windows start no earlier than the oldest watermark minus the
            # lookback; a day more for a manual run's interval. Older marks are thinned (feed.py).
            keep_marks_before_watermark=timedelta(minutes=self.cfg.lookback_minutes) + timedelta(days=1),
        )
