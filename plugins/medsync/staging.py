"""Pulling one level of a source into a staging table with COPY.

Each run has one staging table per level, ``medsync.stage_<source>_<level>_r<run id>``,
UNLOGGED (it is scratch: a crash loses it and the pull is simply re-run) and created
LIKE the level's template. A pull (or one time slice of it) streams the source's
pages, validates and maps each record, and COPYs the good ones; records that cannot be
stored go to ``medsync.quarantine`` with their reason. Memory is bounded by one page
and one commit chunk, whatever the window holds. A re-run first deletes its own slice's
rows, so it is idempotent.

The first slice also retries the level's open quarantine against the current mapping:
what validates now is staged like any record; the merge then resolves the entry.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from uuid_utils import uuid7

from medsync import ledger
from medsync.errors import RunParamsError
from medsync.levels import STAGE_FIXED_COLUMNS, staged_columns
from medsync.schema import MEDSYNC_LOCK_CLASS, SCHEMA
from medsync.sources.base import RawPage, RecordParser, RecordRejected, StagedRecord
from medsync.windows import Window

log = logging.getLogger(__name__)

QUARANTINE_RETRY_CHUNK = 1000
READ_AHEAD_PAGES = 2
"""Pages fetched ahead of the one being staged (memory: this many pages more)."""
READ_AHEAD_SWITCH_SECONDS = 0.0005
"""The interpreter's thread switch interval while pages are read ahead (Python's default: 5 ms).

The thread fetching the next page gives up the GIL at every socket read and must get it back
from the thread staging the previous page, which hands it over only once per switch interval.
At 5 ms, the reads of one page wait longer than the source takes to serve it, so fetching and
staging take turns instead of overlapping: a 1M-instance pull alone took 14.9 s at 5 ms and
11.2 s at 0.5 ms, against 9.1-9.8 s for the floor's fetch and COPY (docs/benchmarks.md)."""

T = TypeVar("T")


PROGRESS_SECONDS = 30.0
"""A long pull logs a progress line at least this often (on-call can tell a slow pull from a stuck one)."""


def staging_table_name(source: str, level: str, run_id: int) -> str:
    return f"stage_{source}_{level}_r{run_id}"


def staging_table(source: str, level: str, run_id: int) -> sql.Identifier:
    return sql.Identifier(SCHEMA, staging_table_name(source, level, run_id))


@dataclass
class PullCounts:
    pages: int = 0
    records: int = 0
    staged: int = 0
    tombstones: int = 0
    quarantined: int = 0
    quarantine_retried: int = 0
    quarantine_still_held: int = 0
    seconds: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "reasons"}
        out["seconds"] = round(self.seconds, 3)
        # Reasons are grouped by their field and rule only: never by value.
        out["reasons"] = dict(self.reasons.most_common(20))
        return out


def _reason_class(reason: str) -> str:
    """The reason without any value it quotes, for logs and counts."""
    head = reason.split(";", 1)[0].split("'", 1)[0]
    return head.split(" (", 1)[0].strip()[:80]


def ensure_staging_table(conn: psycopg.Connection, source: str, level: str, run_id: int) -> sql.Identifier:
    """Creates this run's staging table for the level once, however many slices race to do it."""
    table = staging_table(source, level, run_id)
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
            (MEDSYNC_LOCK_CLASS, f"stage:{source}:{level}:{run_id}"),
        )
        conn.execute(
            sql.SQL("CREATE UNLOGGED TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS)").format(
                table, sql.Identifier(SCHEMA, f"stage_{level}")
            )
        )
    return table


def _start_slice(
    conn: psycopg.Connection, source: str, level: str, run_id: int, slice_index: int, *, index_chunks: bool
) -> None:
    """Empties a slice for a new pull of it (its chunks are numbered anew, so the record of those
    merged early goes too), and with ``index_chunks`` indexes the staging table by (slice, chunk)."""
    table = staging_table(source, level, run_id)
    conn.execute(sql.SQL("DELETE FROM {} WHERE slice = %s").format(table), (slice_index,))
    ledger.forget_merged_chunks(conn, run_id, level, slice_index)
    if index_chunks:
        name = sql.Identifier(f"{staging_table_name(source, level, run_id)}_chunk")
        conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (slice, chunk)").format(name, table))


def _column_types(conn: psycopg.Connection, table: sql.Identifier, columns: Iterable[str]) -> list[int]:
    """Type OIDs of a staging table's ``columns``, in that order."""
    found: dict[str, int] = dict(
        conn.execute(
            "SELECT attname, atttypid::int FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table.as_string(conn),),
        ).fetchall()
    )
    return [found[c] for c in columns]


def _binary_copy(conn: psycopg.Connection, table: sql.Identifier, level: str) -> tuple[sql.Composed, list[int]]:
    """The COPY statement of a level's staging rows, and the column types it needs.

    Binary COPY: about half the client CPU per row of text COPY (no text formatting of dates,
    numbers and UUIDs), which is a good part of a pull's CPU. It needs the column types.
    """
    names = (*STAGE_FIXED_COLUMNS, *staged_columns(level))
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        table, sql.SQL(", ").join(map(sql.Identifier, names))
    )
    return statement, _column_types(conn, table, names)


def drop_staging_tables(conn: psycopg.Connection, source: str, run_id: int) -> None:
    """Drops the run's staging tables in one statement: all of them or, if it fails, none."""
    from medsync.config import LEVELS

    tables = sql.SQL(", ").join(staging_table(source, level, run_id) for level in LEVELS)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(tables))


class _Quarantine:
    """Collects held-back records of one commit chunk and writes them in one statement."""

    def __init__(self, source: str, level: str, run_id: int) -> None:
        self.source, self.level, self.run_id = source, level, run_id
        self.rows: list[dict[str, Any]] = []

    def add(self, rejected: RecordRejected, raw: object) -> None:
        if rejected.payload is not None:
            raw = rejected.payload
        self.rows.append(
            {
                "source_key": rejected.source_key,
                "source_updated_at": rejected.updated_at.isoformat() if rejected.updated_at else None,
                "reason": rejected.reason,
                "payload": raw if isinstance(raw, dict | list) else {"value": raw},
            }
        )

    def flush(self, conn: psycopg.Connection) -> None:
        if not self.rows:
            return
        # One statement per chunk; a record seen twice in a chunk keeps its newest version.
        conn.execute(
            """
            INSERT INTO medsync.quarantine AS q
                (source_system, level, source_key, source_updated_at, reason, payload, first_run_id, last_run_id)
            SELECT DISTINCT ON (r.source_key) %(source)s, %(level)s, r.source_key, r.source_updated_at,
                   r.reason, r.payload, %(run)s, %(run)s
            FROM jsonb_to_recordset(%(rows)s::jsonb)
                 AS r(source_key text, source_updated_at timestamptz, reason text, payload jsonb)
            ORDER BY r.source_key, r.source_updated_at DESC NULLS LAST
            ON CONFLICT (source_system, level, source_key) DO UPDATE
            SET source_updated_at = excluded.source_updated_at, reason = excluded.reason,
                payload = excluded.payload, last_run_id = excluded.last_run_id,
                attempts = q.attempts + 1, updated_at = now(), resolved_at = NULL, resolved_run_id = NULL
            WHERE q.source_updated_at IS NULL OR excluded.source_updated_at IS NULL
               OR excluded.source_updated_at >= q.source_updated_at
            """,
            {"source": self.source, "level": self.level, "run": self.run_id, "rows": json.dumps(self.rows)},
        )
        self.rows.clear()


class _SwitchInterval:
    """The process's thread switch interval (``sys.setswitchinterval``), shortened to
    ``READ_AHEAD_SWITCH_SECONDS`` while any read-ahead runs. It is one setting for the whole
    process: read-aheads that overlap share it, and the last to end restores what was there
    before the first began (each restoring its own would leave it short for good)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._before = 0.0

    @contextmanager
    def shortened(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._before = sys.getswitchinterval()
                sys.setswitchinterval(min(self._before, READ_AHEAD_SWITCH_SECONDS))
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    sys.setswitchinterval(self._before)


_SWITCH_INTERVAL = _SwitchInterval()


def read_ahead(items: Iterable[T], depth: int = READ_AHEAD_PAGES) -> Iterator[T]:
    """Yields ``items`` while a background thread already produces the next ``depth`` of them.

    A page of the source is mostly waiting for the source to answer; validating and COPYing
    the previous page meanwhile keeps the source and this process busy at once, instead of in
    turn. An exception of the producer is raised here, where its item would have come. When
    the caller stops early, the thread stops after the item it is producing (and closes
    ``items`` if it is a generator).

    While the thread runs, the process's thread switch interval is
    ``READ_AHEAD_SWITCH_SECONDS`` (``_SwitchInterval``).
    """
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(("item", item)):
                    break
            else:
                put(("end", None))
        except Exception as exc:  # noqa: BLE001 (not swallowed: the consumer raises it)
            put(("error", exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name="medsync-read-ahead", daemon=True)
    with _SWITCH_INTERVAL.shortened():
        producer.start()
        try:
            while True:
                kind, value = handoff.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            producer.join()


def _open_quarantine(conn: psycopg.Connection, source: str, level: str) -> Iterator[list[object]]:
    """The payloads of a level's open quarantine, a chunk at a time (keyset paging).

    Each chunk is read before it is handed on, so the caller may COPY it on the same connection
    (no query may run while a COPY is open).
    """
    after = ""
    while chunk := conn.execute(
        "SELECT source_key, payload FROM medsync.quarantine"
        " WHERE source_system = %s AND level = %s AND resolved_at IS NULL AND source_key > %s"
        " ORDER BY source_key LIMIT %s",
        (source, level, after, QUARANTINE_RETRY_CHUNK),
    ).fetchall():
        after = chunk[-1][0]
        yield [payload for _, payload in chunk]


def _parse_each(
    parser: RecordParser, level: str, payloads: list[object]
) -> Iterator[tuple[object, StagedRecord | RecordRejected]]:
    """Quarantine payloads paired with what the parser makes of them now."""
    for payload in payloads:
        try:
            yield payload, parser.parse(level, payload)
        except RecordRejected as rejected:
            yield payload, rejected


def pull_level(
    conn: psycopg.Connection,
    *,
    source: str,
    level: str,
    run_id: int,
    pages: Iterable[RawPage],
    parser: RecordParser,
    slice_index: int = 0,
    retry_quarantine: bool = True,
    commit_rows: int = 50_000,
    new_id: Callable[[], Any] = uuid7,
    expected_records: int | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
    chunk_committed: Callable[[int], None] | None = None,
) -> PullCounts:
    """Stages one level (or one slice of it) for a run; returns what it counted.

    ``pages`` yields the source client's pages (``SourceClient.iter_pages``); a thread reads it
    ahead (``read_ahead``), so the source prepares the next page while this one is staged.
    ``conn`` must be in autocommit mode: this function commits every ``commit_rows`` staged
    rows so that no transaction stays open for a whole window. ``new_id`` makes the id a
    record gets if it is new to A: a UUID object (binary COPY), by default a UUIDv7.

    A long pull logs its progress every ``progress_seconds``, from a timer thread, so also while
    it waits for the source (retries, ``Retry-After``, the request limiter): records and pages so
    far, the rate, and, given ``expected_records`` (what the source's counts say the window
    holds), about how many records and seconds are left.

    Each commit is a chunk of the slice, numbered from 1 in the staged rows' ``chunk`` column,
    so an earlier pull's record of the slice's chunks merged early is forgotten first.
    ``chunk_committed`` is told each chunk's number once it is committed (merging while
    pulling, ``medsync.early_merge``); the staging table is then indexed by (slice, chunk) before
    any row is staged: each chunk merged while the table grows is read without a scan (a cost that
    grows with the square of the load), and an index kept as rows arrive costs far less than one
    built afterwards (chunks' keys only grow: it only ever appends).
    """
    started = time.monotonic()
    counts = PullCounts()
    table = ensure_staging_table(conn, source, level, run_id)
    copy_sql, types = _binary_copy(conn, table, level)
    tombstone_tail = (None,) * len(staged_columns(level))
    quarantine = _Quarantine(source, level, run_id)
    chunk_numbers = itertools.count(1)

    _start_slice(conn, source, level, run_id, slice_index, index_chunks=chunk_committed is not None)

    def stage(stream: Iterator[tuple[object, StagedRecord | RecordRejected]], from_quarantine: bool) -> None:
        exhausted = False
        while not exhausted:
            chunk = next(chunk_numbers)
            # One transaction per chunk: COPY rows and the chunk's quarantine commit together.
            with conn.transaction():
                with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                    copy.set_types(types)
                    in_chunk = 0
                    for raw, rec in stream:
                        in_chunk += 1
                        if isinstance(rec, RecordRejected):
                            counts.reasons[_reason_class(rec.reason)] += 1
                            if from_quarantine:
                                counts.quarantine_still_held += 1
                            else:
                                counts.quarantined += 1
                            quarantine.add(rec, raw)
                        else:
                            tail = tombstone_tail if rec.deleted else rec.values
                            copy.write_row(
                                (rec.source_key, rec.updated_at, rec.deleted, new_id(), slice_index, chunk, *tail)
                            )
                            counts.staged += 1
                            counts.tombstones += rec.deleted
                        if in_chunk >= commit_rows:
                            break
                    else:
                        exhausted = True
                quarantine.flush(conn)
            if chunk_committed is not None and in_chunk:
                chunk_committed(chunk)

    def source_records(progress: Progress) -> Iterator[tuple[object, StagedRecord | RecordRejected]]:
        for page in read_ahead(pages):
            counts.pages += 1
            counts.records += len(page.items)
            progress.page(counts.records, counts.pages)
            # parse_page answers once per item, in page order: zip pairs each with its raw item.
            yield from zip(page.items, parser.parse_page(level, page), strict=True)

    if retry_quarantine:
        # Before the source's pages, so that what this pull quarantines is not retried at once.
        for payloads in _open_quarantine(conn, source, level):
            counts.quarantine_retried += len(payloads)
            stage(_parse_each(parser, level, payloads), from_quarantine=True)
    with Progress(level, slice_index, expected_records, progress_seconds) as progress:
        stage(source_records(progress), from_quarantine=False)
    counts.seconds = time.monotonic() - started
    log.info(
        "pulled %s slice %d: %d pages, %d records, %d staged (%d tombstones), %d quarantined, "
        "%d quarantined retried (%d still held) in %.1fs",
        level, slice_index, counts.pages, counts.records, counts.staged, counts.tombstones,
        counts.quarantined, counts.quarantine_retried, counts.quarantine_still_held, counts.seconds,
    )  # fmt: skip
    return counts


class Progress:
    """Logs a pull's progress every ``every`` seconds from a timer thread, while in its ``with``.

    The thread keeps the time, not the pages: a pull that waits for a page (retries, a source's
    ``Retry-After``, the request limiter, a slow source) still says how far it is and how long
    it has waited, so on-call can tell a slow pull from a stuck one. ``page`` only notes the counts.
    """

    def __init__(self, level: str, slice_index: int, expected: int | None, every: float) -> None:
        self.what = f"{level} slice {slice_index}"
        self.expected, self.every = expected, every
        self.started = self.last_page_at = time.monotonic()
        self.seen = (0, 0)
        """(records, pages) so far: one tuple, replaced whole, so the thread reads a consistent pair."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._log_until_stopped, name=f"medsync-progress-{level}", daemon=True)

    def __enter__(self) -> Progress:
        self.started = self.last_page_at = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def page(self, records: int, pages: int) -> None:
        self.seen = (records, pages)
        self.last_page_at = time.monotonic()

    def _log_until_stopped(self) -> None:
        while not self._stop.wait(self.every):
            records, pages = self.seen
            now = time.monotonic()
            log.info("%s", self.line(records, pages, now - self.started, now - self.last_page_at))

    def line(self, records: int, pages: int, seconds: float, since_page: float = 0.0) -> str:
        """Counts and rate only, what is left where the source has counts, and a wait for the next page."""
        rate = records / seconds if seconds > 0 else 0.0
        line = f"pulling {self.what}: {records} records in {pages} pages after {seconds:.0f}s ({rate:.0f}/s)"
        if self.expected is not None and self.expected > 0:
            left = max(self.expected - records, 0)
            eta = f", about {left / rate:.0f}s" if rate > 0 else ""
            line += f"; about {left} of {self.expected} records left{eta}"
        if since_page >= self.every:
            line += f"; waiting {since_page:.0f}s for the next page (the source, its retries or the request limit)"
        return line


def window_slice(window: Window, slices: int, index: int) -> Window:
    parts = window.slices(slices)
    if not 0 <= index < len(parts):
        # A window shorter than its slice count (microseconds) splits into fewer slices.
        raise RunParamsError(
            f"slice {index} of window [{window.since.isoformat()}, {window.until.isoformat()}), "
            f"which splits into {len(parts)} slices"
        )
    return parts[index]
