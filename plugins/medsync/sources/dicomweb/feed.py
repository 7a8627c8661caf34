"""Orthanc's change feed (``changes: orthanc``), kept like a watermark.

Orthanc numbers its events (``/changes``: ``Seq``, ``Date`` to the second, UTC) and keeps them;
a window ``[since, until)`` of a run is read from the last *mark* dated before ``since``
(``medsync.change_feed_mark``: a sequence number and its event's date), so that nothing dated in
the window is before the start, and only what follows the mark is read:

- **marks**: every feed page read leaves the mark of its last event, and every full listing of
  the PACS (a full refresh, a snapshot) the mark of Orthanc's ``Last`` event before it lists, so
  the first incremental run after a full refresh reads from there, not Orthanc's whole history;
- **once per window**: a run's pulls (one task per level, in parallel, and their retries) share
  one read. The first to need the window's changes takes a transaction lock, reads them and keeps
  what they touched (``medsync.change_feed_read``: the studies, and the series with their study);
  the others wait for it and use that. A read is reused only when it was made after the window
  ended: nothing dated in the window can be added to the feed after that;
- **pruning**: marks older than any scheduled or manual window can start (the source's oldest
  watermark, minus the lookback and a day) are thinned to the newest of each UTC day, so a
  backfill of any past day still starts at most a day of events before its window; kept reads
  are dropped after two days (a run and its retries are over by then).

Deletions are in no Orthanc feed: they are found by the snapshot compare (``medsync.snapshot``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from medsync.errors import SourceApiError
from medsync.locks import lock_key
from medsync.schema import MEDSYNC_LOCK_CLASS

log = logging.getLogger(__name__)

ONE_SECOND = timedelta(seconds=1)
STUDY_EVENTS = {"NewStudy", "StableStudy", "UpdatedAttachment", "UpdatedMetadata"}
SERIES_EVENTS = {"NewSeries", "StableSeries"}
# No instance events: every new instance makes its series new or unstable, and Orthanc says
# StableSeries once it has had no new instance for StableAge seconds; reading the series' events
# saves one request per new instance.
PAST_UNTIL = timedelta(minutes=1)
"""A page whose last event is dated this much after the window's end ends the read (a backfill's
window is long past): Orthanc dates events in sequence order, give or take concurrent writers."""
KEEP_READS = timedelta(days=2)

Get = Callable[[str, str, dict[str, Any] | None], Any]
Resource = Callable[[str], dict[str, Any] | None]


@dataclass(frozen=True)
class Touched:
    """What the events of a window touched."""

    changes: int
    """Events dated in the window."""
    studies: list[str]
    """Orthanc ids of the studies changed, or holding a changed series: sorted, each once."""
    series: dict[str, dict[str, Any]]
    """Orthanc id of each changed series -> its study (``ParentStudy``) and ``SeriesInstanceUID``."""


def _date(change: dict[str, Any]) -> datetime:
    return datetime.strptime(str(change["Date"]), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)


class OrthancChangeFeed:
    """The feed of one Orthanc, read through the client's paced, retried ``get``."""

    def __init__(
        self,
        *,
        source: str,
        db: psycopg.Connection,
        url: str,
        get: Get,
        resource: Resource,
        batch: int,
        keep_before_watermark: timedelta,
    ) -> None:
        self.source = source
        self.db = db
        self.url = url
        self._get = get
        self._resource = resource
        self.batch = batch
        self.keep_before_watermark = keep_before_watermark

    # -- marks ------------------------------------------------------------------------------

    def _page(self, params: dict[str, Any]) -> dict[str, Any]:
        answer = self._get(self.url, "changes", params)
        if not isinstance(answer, dict) or not isinstance(answer.get("Changes"), list):
            raise SourceApiError(f"{self.source}: /changes: not Orthanc's change feed")
        return answer

    def _mark(self, change: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO medsync.change_feed_mark (source_system, seq, changed_at) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (self.source, int(change["Seq"]), _date(change)),
        )

    def mark_last(self) -> None:
        """Marks Orthanc's last event now: a full listing that starts after it holds everything up to it."""
        changes = self._page({"last": ""})["Changes"]
        if changes:
            self._mark(changes[-1])

    def _start(self, since: datetime) -> int:
        row = self.db.execute(
            "SELECT max(seq) FROM medsync.change_feed_mark WHERE source_system = %s AND changed_at < %s",
            (self.source, since),
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    # -- a window's changes ------------------------------------------------------------------

    def touched(self, since: datetime, until: datetime) -> Touched:
        """What the events dated in ``[since, until)`` touched, read from the feed once per window."""
        with self.db.transaction():
            self.db.execute(
                "SELECT pg_advisory_xact_lock(%s, %s)", (MEDSYNC_LOCK_CLASS, lock_key("change_feed", self.source))
            )
            kept = self.db.execute(
                "SELECT changes, studies, series FROM medsync.change_feed_read"
                " WHERE source_system = %s AND since = %s AND until = %s AND read_at >= until",
                (self.source, since, until),
            ).fetchone()
            if kept is not None:
                log.info("%s: the window's changes were read by another pull of it: %d", self.source, kept[0])
                return Touched(int(kept[0]), list(kept[1]), dict(kept[2]))
            touched = self._resolve(self._read(since, until))
            self.db.execute(
                "INSERT INTO medsync.change_feed_read (source_system, since, until, changes, studies, series)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (source_system, since, until) DO UPDATE"
                " SET changes = excluded.changes, studies = excluded.studies, series = excluded.series,"
                " read_at = now()",
                (self.source, since, until, touched.changes, touched.studies, Jsonb(touched.series)),
            )
            self._prune()
        return touched

    def _read(self, since: datetime, until: datetime) -> list[dict[str, Any]]:
        """The events dated in ``[since, until)``, read from the last mark before ``since``."""
        seq = start = self._start(since)
        found: list[dict[str, Any]] = []
        pages = 0
        while True:
            answer = self._page({"since": seq, "limit": self.batch})
            changes = answer["Changes"]
            pages += 1
            for change in changes:
                when = _date(change)
                # Orthanc dates events to the second: the event happened in [when, when + 1 s). Taken
                # when that second overlaps the window, so no event falls between two windows.
                if when < until and when + ONE_SECOND > since:
                    found.append(change)
            if changes:
                self._mark(changes[-1])
            seq = int(answer.get("Last", seq))
            if answer.get("Done", True) or not changes or _date(changes[-1]) >= until + PAST_UNTIL:
                break
        log.info("%s: /changes read from seq %d in %d pages: %d events in the window", self.source, start, pages,
                 len(found))  # fmt: skip
        return found

    def _resolve(self, changes: list[dict[str, Any]]) -> Touched:
        studies: set[str] = set()
        series: set[str] = set()
        for change in changes:
            kind, oid = change.get("ChangeType"), str(change.get("ID"))
            if kind in STUDY_EVENTS and change.get("ResourceType") == "Study":
                studies.add(oid)
            elif kind in SERIES_EVENTS:
                series.add(oid)
        series_info: dict[str, dict[str, Any]] = {}
        for oid in sorted(series):
            info = self._resource(f"/series/{oid}")
            if info is None:
                continue  # deleted since: the snapshot will find it gone
            series_info[oid] = {
                "ParentStudy": str(info["ParentStudy"]),
                "MainDicomTags": {"SeriesInstanceUID": info["MainDicomTags"]["SeriesInstanceUID"]},
            }
        studies |= {info["ParentStudy"] for info in series_info.values()}
        return Touched(len(changes), sorted(studies), series_info)

    # -- pruning -------------------------------------------------------------------------------

    def _prune(self) -> None:
        row = self.db.execute(
            "SELECT min(synced_until) FROM medsync.watermark WHERE source_system = %s", (self.source,)
        ).fetchone()
        if row is not None and row[0] is not None:
            cutoff = row[0] - self.keep_before_watermark
            thinned = self.db.execute(
                """
                DELETE FROM medsync.change_feed_mark m USING (
                    SELECT seq, row_number() OVER (PARTITION BY date_trunc('day', changed_at, 'UTC')
                                                   ORDER BY seq DESC) AS newest
                    FROM medsync.change_feed_mark WHERE source_system = %(src)s AND changed_at < %(cutoff)s
                ) old
                WHERE m.source_system = %(src)s AND m.seq = old.seq AND old.newest > 1
                """,
                {"src": self.source, "cutoff": cutoff},
            ).rowcount
            if thinned:
                log.info("%s: %d change feed marks before %s thinned to one a day", self.source, thinned,
                         cutoff.isoformat())  # fmt: skip
        self.db.execute(
            "DELETE FROM medsync.change_feed_read WHERE source_system = %s AND read_at < now() - %s",
            (self.source, KEEP_READS),
        )
