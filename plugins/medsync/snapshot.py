"""Deletions by snapshot compare, for sources that never say what they deleted (``DeletionMode.SNAPSHOT``).

When a level's snapshot is due (:func:`due`), its pull lists the level whole
(``SourceClient.iter_listing``) into the run's staging table, and :func:`stage_tombstones` then
adds a tombstone to the same staging table for every record of the source that A holds and the
listing no longer has. The ordinary merge applies them: soft delete, cascade to the children,
tombstone memory, and a record that is listed again later comes back with a newer version
(``a-model.md``). Protocol-agnostic: it knows only A's tables, the staging table and the
quarantine.

What is compared, per level: A's rows of the source that have no tombstone of their own (live
rows, and rows deleted only because a parent is, so that a parent coming back does not revive
children that are gone too), minus the records the listing staged, minus the records held back
in the quarantine (they are in the source; they were just not storable). The tombstones carry
the time of the compare as their version.

Cadence (``SourceConfig.snapshot``): every full refresh (``on_full_refresh``), and otherwise when
the level's last snapshot in a succeeded run is older than ``every_hours``.

Guard: a listing much shorter than A's rows is more often a broken listing (a server that caps
its page size without saying so, an outage answering empty pages) than a purge. A compare that
would delete more than ``max_delete_share`` of the level's live rows, and more than
``max_delete_floor`` rows, stages nothing and fails the pull with a permanent
:class:`~medsync.errors.SnapshotGuardError` saying what to check.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from medsync.config import SourceConfig
from medsync.errors import SnapshotGuardError
from medsync.levels import spec
from medsync.schema import A_SCHEMA
from medsync.staging import staging_table
from medsync.windows import FULL_REFRESH

log = logging.getLogger(__name__)

_LAST_SNAPSHOT = """
SELECT max(s.taken_at) FROM medsync.snapshot_run s JOIN medsync.sync_run r ON r.id = s.run_id
WHERE s.source_system = %s AND s.level = %s AND r.status = 'succeeded'
"""


def due(conn: psycopg.Connection, cfg: SourceConfig, level: str, run_id: int) -> bool:
    """Whether this run's pull of ``level`` lists it whole and compares (see the cadence above)."""
    row = conn.execute("SELECT run_type FROM medsync.sync_run WHERE id = %s", (run_id,)).fetchone()
    if row is not None and row[0] == FULL_REFRESH:
        return cfg.snapshot.on_full_refresh
    if cfg.snapshot.every_hours is None:
        return False
    last = conn.execute(_LAST_SNAPSHOT, (cfg.name, level)).fetchone()
    if last is None or last[0] is None:
        return True
    current = conn.execute("SELECT now() - %s::timestamptz", (last[0],)).fetchone()
    return current is not None and current[0] >= timedelta(hours=cfg.snapshot.every_hours)


def stage_tombstones(
    conn: psycopg.Connection,
    *,
    source: str,
    level: str,
    run_id: int,
    slice_index: int,
    listed: int,
    max_delete_share: float = 0.5,
    max_delete_floor: int = 100,
) -> dict[str, Any]:
    """Stages a tombstone for each record of ``source`` A holds at ``level`` that the listing did not stage.

    Call it after the level's full listing was staged (the same run, table and slice), with
    ``listed`` the records the listing had. Records the snapshot of this run. Returns figures
    for the pull's counts. Raises ``SnapshotGuardError`` (and stages nothing) past the guard.
    """
    started = time.monotonic()
    stage = staging_table(source, level, run_id)
    params = {"src": source, "level": level, "slice": slice_index}
    with conn.transaction():
        conn.execute(sql.SQL("ANALYZE {}").format(stage))
        tombstones = conn.execute(
            sql.SQL(
                """
                INSERT INTO {stage} (source_key, source_updated_at, deleted, new_id, slice)
                SELECT a.source_key, statement_timestamp(), true, gen_random_uuid(), %(slice)s
                FROM {table} a
                WHERE a.source_system = %(src)s
                  AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.source_key = a.source_key)
                  AND NOT EXISTS (SELECT 1 FROM medsync.tombstone t WHERE t.source_system = %(src)s
                                  AND t.level = %(level)s AND t.source_key = a.source_key)
                  AND NOT EXISTS (SELECT 1 FROM medsync.quarantine q WHERE q.source_system = %(src)s
                                  AND q.level = %(level)s AND q.source_key = a.source_key
                                  AND q.resolved_at IS NULL)
                """
            ).format(stage=stage, table=sql.Identifier(A_SCHEMA, spec(level).table)),
            params,
        ).rowcount
        if tombstones > max_delete_floor:
            _guard(conn, source, level, tombstones=tombstones, listed=listed, share=max_delete_share,
                   floor=max_delete_floor)  # fmt: skip
        seconds = time.monotonic() - started
        conn.execute(
            "INSERT INTO medsync.snapshot_run (run_id, source_system, level, listed, tombstones, seconds)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (run_id, level) DO UPDATE"
            " SET taken_at = now(), listed = excluded.listed, tombstones = excluded.tombstones,"
            " seconds = excluded.seconds",
            (run_id, source, level, listed, tombstones, seconds),
        )
    log.info("snapshot of %s %s: %d listed, %d gone (tombstones staged) in %.2fs", source, level, listed,
             tombstones, seconds)  # fmt: skip
    return {"listed": listed, "tombstones": tombstones, "seconds": round(seconds, 3)}


def _guard(
    conn: psycopg.Connection, source: str, level: str, *, tombstones: int, listed: int, share: float, floor: int
) -> None:
    """Raises (rolling back the tombstones) when they are more than ``share`` of the level's live rows."""
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE source_system = %s AND deleted_at IS NULL").format(
            sql.Identifier(A_SCHEMA, spec(level).table)
        ),
        (source,),
    ).fetchone()
    live = int(row[0]) if row else 0
    if tombstones <= share * live:
        return
    log.error("snapshot of %s %s refused: %d listed, %d of %d live rows would be deleted", source, level, listed,
              tombstones, live)  # fmt: skip
    raise SnapshotGuardError(
        f"{source} {level}: the snapshot would delete {tombstones} of A's {live} live rows "
        f"({tombstones / max(live, 1):.0%}; the listing had {listed} records), more than "
        f"snapshot.max_delete_share {share:g} and snapshot.max_delete_floor {floor} allow: nothing was deleted. "
        "A listing this short is usually a broken one: a server capping its page size below page_size "
        "(set api.max_page_size), or an outage answering empty pages. Check the source and run again; if the "
        "records are really gone, raise snapshot.max_delete_share in the source's config for one run."
    )
