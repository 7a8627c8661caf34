"""A's live rows per source and level, kept up to date by the merges.

Counting a level's rows in A is a scan of its table (about a second per million rows
here); a report that counted for every run would cost what A holds, not what the run
changed. Instead every merge batch adds what it changed (rows inserted live, deleted,
brought back, and the children its cascade flipped) to ``medsync.live_count`` in the
same transaction as the rows, under the source's lock. The figure is exact as long as
only medsync writes the source's rows, which is A's rule (a-model.md).

A level's row is created by an exact count (``ensure``, from ``prepare``: instant on an
empty A); every full refresh counts again (``recount``) and its report shows any drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from psycopg import sql

from medsync.config import LEVELS
from medsync.levels import spec
from medsync.locks import source_lock
from medsync.schema import A_SCHEMA


@dataclass(frozen=True)
class ExactCount:
    live: int
    deleted_with_parent: int
    """Rows deleted in A with no tombstone of their own: deleted because a parent is (a-model.md)."""
    kept: int | None
    """What ``medsync.live_count`` held before this count (None: nothing yet)."""

    @property
    def drift(self) -> int:
        return 0 if self.kept is None else self.kept - self.live


def read(conn: psycopg.Connection, source: str) -> dict[str, int]:
    """The kept live counts of the source's levels (levels never counted are missing)."""
    rows = conn.execute("SELECT level, live FROM medsync.live_count WHERE source_system = %s", (source,))
    return {level: int(live) for level, live in rows}


def add(conn: psycopg.Connection, source: str, changes: Mapping[str, int]) -> None:
    """Adds a batch's changes of live rows per level. Call inside the batch's transaction."""
    for level, change in changes.items():
        if change:
            conn.execute(
                "UPDATE medsync.live_count SET live = live + %s, updated_at = now()"
                " WHERE source_system = %s AND level = %s",
                (change, source, level),
            )


def _count(conn: psycopg.Connection, source: str, level: str) -> tuple[int, int]:
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE a.deleted_at IS NULL),"
            " count(*) FILTER (WHERE a.deleted_at IS NOT NULL AND NOT EXISTS ("
            "   SELECT 1 FROM medsync.tombstone t WHERE t.source_system = a.source_system"
            "   AND t.level = %s AND t.source_key = a.source_key))"
            " FROM {} a WHERE a.source_system = %s"
        ).format(sql.Identifier(A_SCHEMA, spec(level).table)),
        (level, source),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def recount(
    conn: psycopg.Connection, source: str, *, lock_timeout_seconds: int, levels: tuple[str, ...] = LEVELS
) -> dict[str, ExactCount]:
    """Counts the levels' rows exactly (a scan of each table) and keeps the live counts.

    Holds the source's lock meanwhile, so no merge adds to a count being replaced.
    ``conn`` must be in autocommit mode.
    """
    out: dict[str, ExactCount] = {}
    with source_lock(conn, source, lock_timeout_seconds), conn.transaction():
        kept = read(conn, source)
        for level in levels:
            live, deleted_with_parent = _count(conn, source, level)
            conn.execute(
                "INSERT INTO medsync.live_count (source_system, level, live, counted_at) VALUES (%s, %s, %s, now())"
                " ON CONFLICT (source_system, level) DO UPDATE"
                " SET live = excluded.live, counted_at = now(), updated_at = now()",
                (source, level, live),
            )
            out[level] = ExactCount(live, deleted_with_parent, kept.get(level))
    return out


def ensure(conn: psycopg.Connection, source: str, *, lock_timeout_seconds: int) -> None:
    """Creates the missing levels' counts by counting them (once per source and level)."""
    missing = tuple(level for level in LEVELS if level not in read(conn, source))
    if missing:
        recount(conn, source, lock_timeout_seconds=lock_timeout_seconds, levels=missing)
