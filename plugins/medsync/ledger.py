"""The run ledger: ``medsync.sync_run``, ``medsync.sync_run_level`` and ``medsync.watermark``.

Every read and write of a run's state goes through here, so that what a run is (running,
succeeded, failed with its reason), the windows it syncs, what each step counted and how
far each level is synced are decided in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from medsync.errors import MedsyncError
from medsync.windows import Window

log = logging.getLogger(__name__)

RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"
MESSAGE_LIMIT = 2000
"""Characters of an error message kept: enough to say what happened, never a page of output."""


@dataclass(frozen=True)
class Run:
    id: int
    source: str
    dag_run_id: str
    run_type: str
    started_at: datetime
    status: str
    options: dict[str, Any]


_RUN_COLUMNS = "id, source_system, dag_run_id, run_type, started_at, status, options"


def _run_of(row: tuple[Any, ...]) -> Run:
    """A ``Run`` from a row of ``_RUN_COLUMNS``."""
    return Run(int(row[0]), row[1], row[2], row[3], row[4], row[5], dict(row[6] or {}))


def register_run(
    conn: psycopg.Connection,
    source: str,
    dag_run_id: str,
    kind: str,
    *,
    windows: Mapping[str, Window],
    options: Mapping[str, Any] | None = None,
) -> int:
    """Registers (or, for a re-run of prepare, resets) a run and its levels' windows; returns its id."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO medsync.sync_run (source_system, dag_run_id, run_type, options) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (source_system, dag_run_id) DO UPDATE"
            " SET run_type = excluded.run_type, options = excluded.options, status = 'running', finished_at = NULL,"
            " report = NULL, failed_task = NULL, error_class = NULL, error_message = NULL"
            " RETURNING id",
            (source, dag_run_id, kind, Jsonb(dict(options or {}))),
        ).fetchone()
        assert row is not None
        run_id = int(row[0])
        conn.execute("DELETE FROM medsync.sync_run_level WHERE run_id = %s", (run_id,))
        for level, window in windows.items():
            conn.execute(
                "INSERT INTO medsync.sync_run_level (run_id, level, since, until) VALUES (%s, %s, %s, %s)",
                (run_id, level, window.since, window.until),
            )
    return run_id


def watermarks(conn: psycopg.Connection, source: str) -> dict[str, datetime]:
    rows = conn.execute(
        "SELECT level, synced_until FROM medsync.watermark WHERE source_system = %s", (source,)
    ).fetchall()
    return {str(level): until for level, until in rows}


def get_run(conn: psycopg.Connection, run_id: int) -> Run:
    row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM medsync.sync_run WHERE id = %s", (run_id,)).fetchone()
    if row is None:
        raise MedsyncError(f"run {run_id} is unknown")
    return _run_of(row)


def find_run(conn: psycopg.Connection, source: str, dag_run_id: str) -> Run | None:
    row = conn.execute(
        f"SELECT {_RUN_COLUMNS} FROM medsync.sync_run WHERE source_system = %s AND dag_run_id = %s",
        (source, dag_run_id),
    ).fetchone()
    return None if row is None else _run_of(row)


def level_window(conn: psycopg.Connection, run_id: int, level: str) -> Window | None:
    """The level's window in this run, or None when the run does not sync the level."""
    row = conn.execute(
        "SELECT since, until FROM medsync.sync_run_level WHERE run_id = %s AND level = %s", (run_id, level)
    ).fetchone()
    return None if row is None else Window(row[0], row[1])


def record_pull(conn: psycopg.Connection, run_id: int, level: str, slice_index: int, counts: dict[str, Any]) -> None:
    conn.execute(
        "UPDATE medsync.sync_run_level SET pull_counts = pull_counts || jsonb_build_object(%s::text, %s::jsonb)"
        " WHERE run_id = %s AND level = %s",
        (f"slice_{slice_index}", Jsonb(counts), run_id, level),
    )


def record_merge(conn: psycopg.Connection, run_id: int, level: str, counts: dict[str, Any]) -> None:
    conn.execute(
        "UPDATE medsync.sync_run_level SET merge_counts = %s WHERE run_id = %s AND level = %s",
        (Jsonb(counts), run_id, level),
    )


def level_merged(conn: psycopg.Connection, run_id: int, level: str) -> bool:
    """Whether the run's merge of ``level`` is done (a level the run does not sync counts as done)."""
    row = conn.execute(
        # merge_counts is '{}' until the merge records its counts.
        "SELECT merge_counts <> '{}' FROM medsync.sync_run_level WHERE run_id = %s AND level = %s",
        (run_id, level),
    ).fetchone()
    return row is None or bool(row[0])


def record_merged_chunks(
    conn: psycopg.Connection, run_id: int, level: str, *, chunks: tuple[int, int, int], counts: dict[str, Any]
) -> None:
    """Records ``chunks`` (slice, first, last) as merged while pulled, with their merge's counts
    (after its batches committed: chunks whose merge died before this are simply merged again by
    the merge task, which converges)."""
    conn.execute(
        "INSERT INTO medsync.early_merge_chunk (run_id, level, slice, first_chunk, last_chunk, counts)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (run_id, level, *chunks, Jsonb(counts)),
    )


def merged_early(conn: psycopg.Connection, run_id: int, level: str) -> list[tuple[dict[str, Any], int]]:
    """The counts of each early merge of the level in this run, with how many chunks it took."""
    rows = conn.execute(
        "SELECT counts, last_chunk - first_chunk + 1 FROM medsync.early_merge_chunk"
        " WHERE run_id = %s AND level = %s ORDER BY slice, first_chunk",
        (run_id, level),
    ).fetchall()
    return [(dict(row[0]), int(row[1])) for row in rows]


def forget_merged_chunks(conn: psycopg.Connection, run_id: int, level: str, slice_index: int) -> None:
    """Forgets which chunks of a slice were merged early: a new pull of the slice numbers them anew.

    Their rows stay in A (the merge task decides the re-pulled rows against them, as always).
    """
    conn.execute(
        "DELETE FROM medsync.early_merge_chunk WHERE run_id = %s AND level = %s AND slice = %s",
        (run_id, level, slice_index),
    )


def add_to_report(conn: psycopg.Connection, run_id: int, part: dict[str, Any]) -> dict[str, Any]:
    """Merges ``part`` into the run's report (top-level keys) and returns the whole report."""
    row = conn.execute(
        "UPDATE medsync.sync_run SET report = coalesce(report, '{}'::jsonb) || %s WHERE id = %s RETURNING report",
        (Jsonb(part), run_id),
    ).fetchone()
    return dict(row[0]) if row else part


def report_alerted(conn: psycopg.Connection, run_id: int) -> bool:
    """Whether the run's report alert went out already (a report task that runs again sends none)."""
    row = conn.execute("SELECT report_alerted_at IS NOT NULL FROM medsync.sync_run WHERE id = %s", (run_id,)).fetchone()
    return row == (True,)


def record_report_alert(conn: psycopg.Connection, run_id: int) -> None:
    conn.execute("UPDATE medsync.sync_run SET report_alerted_at = now() WHERE id = %s", (run_id,))


def succeed(conn: psycopg.Connection, source: str, run_id: int, *, advance_watermarks: bool) -> None:
    """Marks the run succeeded and, when it may, moves each level's watermark to the run's ``until``
    (never backwards), in one transaction."""
    with conn.transaction():
        if advance_watermarks:
            conn.execute(
                "INSERT INTO medsync.watermark (source_system, level, synced_until, run_id)"
                " SELECT %s, level, until, run_id FROM medsync.sync_run_level WHERE run_id = %s"
                " ON CONFLICT (source_system, level) DO UPDATE"
                " SET synced_until = excluded.synced_until, run_id = excluded.run_id, updated_at = now()"
                " WHERE medsync.watermark.synced_until < excluded.synced_until",
                (source, run_id),
            )
        conn.execute("UPDATE medsync.sync_run SET status = 'succeeded', finished_at = now() WHERE id = %s", (run_id,))


@dataclass(frozen=True)
class Failed:
    run: Run
    first: bool
    """True when this call recorded the run's reason (the first failure heard of): alert once."""


def fail(
    conn: psycopg.Connection,
    source: str,
    dag_run_id: str,
    *,
    task_id: str | None,
    error_class: str,
    message: str,
    run_type: str = "unknown",
) -> Failed | None:
    """Marks the run failed with its reason. The first reason recorded is kept: it is the cause,
    what follows (the run failing because a task did) is its consequence. A run that succeeded
    stays succeeded (None is returned).

    A run prepare never registered (its params, the mapping or A's tables were refused first)
    is recorded now, failed, as ``run_type`` (what the caller can tell of it), so that the
    ledger shows every failed run with its reason."""
    unreasoned = (
        "SELECT error_class IS NULL FROM medsync.sync_run WHERE source_system = %s AND dag_run_id = %s FOR UPDATE"
    )
    with conn.transaction():
        before = conn.execute(unreasoned, (source, dag_run_id)).fetchone()
        if before is None:
            inserted = conn.execute(
                "INSERT INTO medsync.sync_run (source_system, dag_run_id, run_type, status, finished_at,"
                " failed_task, error_class, error_message) VALUES (%s, %s, %s, 'failed', now(), %s, %s, %s)"
                f" ON CONFLICT (source_system, dag_run_id) DO NOTHING RETURNING {_RUN_COLUMNS}",
                (source, dag_run_id, run_type, task_id, error_class, message[:MESSAGE_LIMIT]),
            ).fetchone()
            if inserted is not None:
                return Failed(_run_of(inserted), first=True)
            # Another callback recorded the run meanwhile: it is failed below like any other.
            before = conn.execute(unreasoned, (source, dag_run_id)).fetchone()
            assert before is not None
        row = conn.execute(
            "UPDATE medsync.sync_run SET status = 'failed', finished_at = coalesce(finished_at, now()),"
            " failed_task = CASE WHEN error_class IS NULL THEN %s ELSE failed_task END,"
            " error_message = CASE WHEN error_class IS NULL THEN %s ELSE error_message END,"
            " error_class = coalesce(error_class, %s)"
            " WHERE source_system = %s AND dag_run_id = %s AND status <> 'succeeded'"
            f" RETURNING {_RUN_COLUMNS}",
            (task_id, message[:MESSAGE_LIMIT], error_class, source, dag_run_id),
        ).fetchone()
    if row is None:
        return None
    return Failed(_run_of(row), first=bool(before[0]))


def failure(conn: psycopg.Connection, run_id: int) -> dict[str, Any]:
    """What the ledger says about a run's end: status, failed task, error class and message."""
    row = conn.execute(
        "SELECT status, failed_task, error_class, error_message, finished_at FROM medsync.sync_run WHERE id = %s",
        (run_id,),
    ).fetchone()
    if row is None:
        raise MedsyncError(f"run {run_id} is unknown")
    return {"status": row[0], "failed_task": row[1], "error_class": row[2], "error_message": row[3],
            "finished_at": row[4]}  # fmt: skip


def other_runs(conn: psycopg.Connection, source: str, run_id: int) -> list[tuple[int, str, str]]:
    """Every other run of the source whose staging may still exist: (id, dag_run_id, status)."""
    rows = conn.execute(
        "SELECT id, dag_run_id, status FROM medsync.sync_run WHERE source_system = %s AND id <> %s ORDER BY id",
        (source, run_id),
    ).fetchall()
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]
