"""The bodies of a source DAG's tasks, callable with or without Airflow's scheduler.

Each function takes the source's name and ids, opens what it needs through the hooks
(so connections come from Airflow: the metadata database, a secrets backend or
``AIRFLOW_CONN_*`` variables), and returns a small JSON-able dict for XCom. Data
moves only through A's database; every function is safe to re-run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from medsync.config import LEVELS, SourceConfig, get_source_config
from medsync.errors import MedsyncError
from medsync.mapping import load_mapping
from medsync.sources import open_source
from medsync.sources.base import Buckets, RecordParser
from medsync.windows import RunFacts, Window, advances_watermark, plan_window, sync_kind

log = logging.getLogger(__name__)

STAGING_RETENTION = timedelta(days=3)


def get_variable(name: str) -> str | None:
    """An Airflow Variable at run time, or None. ``AIRFLOW_VAR_<NAME>`` wins, as in Airflow."""
    env = os.environ.get(f"AIRFLOW_VAR_{name.upper()}")
    if env is not None:
        return env
    from airflow.sdk import Variable

    try:
        value = Variable.get(name, default=None)
        return None if value is None else str(value)
    except (KeyError, RuntimeError, ImportError) as exc:
        # Outside a task (benchmarks, the support CLI) there may be no way to ask Airflow.
        log.debug("variable %s not readable here (%s); using the config's default", name, type(exc).__name__)
        return None


def connect_a(cfg: SourceConfig) -> psycopg.Connection:
    from medsync.hooks.a_database import ADatabaseHook

    return ADatabaseHook(cfg.connections.db_conn_id).get_conn()


def buckets(cfg: SourceConfig, variable: Callable[[str], str | None] = get_variable) -> Buckets:
    """The source's buckets in this environment (Variables override the config)."""
    return Buckets(cfg.storage.resolve_bucket(variable), cfg.storage.resolve_allowed_buckets(variable))


def record_parser(cfg: SourceConfig, variable: Callable[[str], str | None] = get_variable) -> RecordParser:
    return open_source(cfg).parser(load_mapping(cfg.mapping_path), buckets(cfg, variable))


def prepare(source: str, *, dag_run_id: str, facts: RunFacts) -> dict[str, Any]:
    """Migrates medsync's schema, checks A's tables and the mapping, registers the run, plans windows."""
    from medsync import live_count, merge, schema, staging

    cfg = get_source_config(source)
    mapping = load_mapping(cfg.mapping_path)
    record_parser(cfg)  # refuses a mapping that does not feed every column the protocol maps
    kind = sync_kind(facts)
    with connect_a(cfg) as conn:
        schema.migrate(conn)
        schema.check_a_tables(conn)
        schema.check_mapping(conn, mapping)
        live_count.ensure(conn, source, lock_timeout_seconds=cfg.lock_timeout_seconds)
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO medsync.sync_run (source_system, dag_run_id, run_type) VALUES (%s, %s, %s)"
                " ON CONFLICT (source_system, dag_run_id) DO UPDATE"
                " SET run_type = excluded.run_type, status = 'running', finished_at = NULL, report = NULL"
                " RETURNING id",
                (source, dag_run_id, kind),
            ).fetchone()
            assert row is not None
            run_id = int(row[0])
            marks: dict[str, datetime] = dict(
                conn.execute(
                    "SELECT level, synced_until FROM medsync.watermark WHERE source_system = %s", (source,)
                ).fetchall()
            )
            windows: dict[str, list[str]] = {}
            for level in LEVELS:
                window = plan_window(facts, marks.get(level), timedelta(minutes=cfg.lookback_minutes))
                conn.execute(
                    "INSERT INTO medsync.sync_run_level (run_id, level, since, until) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (run_id, level) DO UPDATE SET since = excluded.since, until = excluded.until,"
                    " pull_counts = '{}', merge_counts = '{}'",
                    (run_id, level, window.since, window.until),
                )
                windows[level] = [window.since.isoformat(), window.until.isoformat()]
        # Staging of runs that ended (or were abandoned long ago) is scratch: drop it.
        stale_runs = conn.execute(
            "SELECT id FROM medsync.sync_run WHERE source_system = %s AND id <> %s"
            " AND (status <> 'running' OR started_at < now() - %s)",
            (source, run_id, STAGING_RETENTION),
        ).fetchall()
        for (old_run,) in stale_runs:
            staging.drop_staging_tables(conn, source, old_run)
            merge.drop_work_tables(conn, source, old_run)
    log.info("run %d of %s (%s): windows %s", run_id, source, kind, windows)
    return {"run_id": run_id, "kind": kind, "windows": windows}


def level_window(conn: psycopg.Connection, run_id: int, level: str) -> Window:
    row = conn.execute(
        "SELECT since, until FROM medsync.sync_run_level WHERE run_id = %s AND level = %s", (run_id, level)
    ).fetchone()
    if row is None:
        raise MedsyncError(f"run {run_id} has no window for {level}: re-run prepare")
    return Window(row[0], row[1])


def pull(source: str, level: str, run_id: int, slice_index: int = 0, slices: int = 1) -> dict[str, Any]:
    """Streams one level (one time slice of it) from the source into this run's staging table."""
    from medsync import staging

    cfg = get_source_config(source)
    parser = record_parser(cfg)
    with open_source(cfg).connect() as client, connect_a(cfg) as conn:
        window = staging.window_slice(level_window(conn, run_id, level), slices, slice_index)
        counts = staging.pull_level(
            conn,
            source=source,
            level=level,
            run_id=run_id,
            pages=client.iter_pages(level, window.since, window.until),
            parser=parser,
            slice_index=slice_index,
            retry_quarantine=slice_index == 0,
            commit_rows=cfg.staging_commit_rows,
        ).as_dict()
        conn.execute(
            "UPDATE medsync.sync_run_level SET pull_counts = pull_counts || jsonb_build_object(%s::text, %s::jsonb)"
            " WHERE run_id = %s AND level = %s",
            (f"slice_{slice_index}", Jsonb(counts), run_id, level),
        )
    return {"level": level, "slice": slice_index, "staged": counts["staged"], "quarantined": counts["quarantined"]}


def merge(source: str, level: str, run_id: int) -> dict[str, Any]:
    """Merges this run's staging (and pending records) of one level into A's table."""
    from medsync.merge import merge_level

    cfg = get_source_config(source)
    parent_lookup = open_source(cfg).parent_link(level).column if level != LEVELS[0] else "source_key"
    with connect_a(cfg) as conn:
        counts = merge_level(
            conn,
            source=source,
            level=level,
            parent_lookup=parent_lookup,
            run_id=run_id,
            batch_size=cfg.merge_batch_size,
            lock_timeout_seconds=cfg.lock_timeout_seconds,
            sessions=cfg.merge_sessions,
            connect=lambda: connect_a(cfg),
        ).as_dict()
        conn.execute(
            "UPDATE medsync.sync_run_level SET merge_counts = %s WHERE run_id = %s AND level = %s",
            (Jsonb(counts), run_id, level),
        )
    figures = ("inserted", "updated", "unchanged", "pending", "sessions", "build_seconds", "write_seconds")
    return {"level": level, **{k: counts[k] for k in figures}}


def report(source: str, run_id: int) -> dict[str, Any]:
    """Compares A with the source's counts and records the run's figures; fails an unexplained full refresh."""
    from medsync.report import COLUMNS, build_report, check_full_refresh, format_report

    cfg = get_source_config(source)
    with open_source(cfg).connect() as client, connect_a(cfg) as conn:
        result = build_report(
            conn,
            client,
            source,
            run_id,
            lock_timeout_seconds=cfg.lock_timeout_seconds,
        )
        # check_files already put its figures under "files"; keep them beside the levels.
        row = conn.execute(
            "UPDATE medsync.sync_run SET report = coalesce(report, '{}'::jsonb) || %s WHERE id = %s RETURNING report",
            (Jsonb(result), run_id),
        ).fetchone()
        result = row[0] if row else result
    log.info("sync report for %s run %d:\n%s", source, run_id, format_report(result))
    check_full_refresh(result)
    figures = {level: {c: f[c] for c in COLUMNS} for level, f in result["levels"].items()}
    return {"run_id": run_id, "kind": result["kind"], "levels": figures}


def finish(source: str, run_id: int) -> dict[str, Any]:
    """Marks the run succeeded, advances the watermarks it may advance, drops its staging tables."""
    from medsync import merge, staging

    cfg = get_source_config(source)
    with connect_a(cfg) as conn:
        with conn.transaction():
            row = conn.execute("SELECT run_type FROM medsync.sync_run WHERE id = %s", (run_id,)).fetchone()
            if row is None:
                raise MedsyncError(f"run {run_id} is unknown")
            advanced = advances_watermark(row[0])
            if advanced:
                conn.execute(
                    "INSERT INTO medsync.watermark (source_system, level, synced_until, run_id)"
                    " SELECT %s, level, until, run_id FROM medsync.sync_run_level WHERE run_id = %s"
                    " ON CONFLICT (source_system, level) DO UPDATE"
                    " SET synced_until = excluded.synced_until, run_id = excluded.run_id, updated_at = now()"
                    " WHERE medsync.watermark.synced_until < excluded.synced_until",
                    (source, run_id),
                )
            conn.execute(
                "UPDATE medsync.sync_run SET status = 'succeeded', finished_at = now() WHERE id = %s", (run_id,)
            )
        staging.drop_staging_tables(conn, source, run_id)
        merge.drop_work_tables(conn, source, run_id)
    return {"run_id": run_id, "watermark_advanced": advanced}


def check_files(source: str, run_id: int) -> dict[str, Any]:
    """HEADs a sample of the instances this run inserted or changed, with the source's AWS identity."""
    from medsync.errors import StorageError
    from medsync.files import check_instance_files

    cfg = get_source_config(source)
    if not cfg.file_check.enabled or cfg.file_check.sample_size == 0:
        return {"checked": 0, "skipped": True}
    with connect_a(cfg) as conn:
        row = conn.execute("SELECT started_at FROM medsync.sync_run WHERE id = %s", (run_id,)).fetchone()
        if row is None:
            raise MedsyncError(f"run {run_id} is unknown")
        result = check_instance_files(conn, cfg, changed_since=row[0], sample_size=cfg.file_check.sample_size)
        figures = result.as_dict()
        conn.execute(
            "UPDATE medsync.sync_run"
            " SET report = coalesce(report, '{}'::jsonb) || jsonb_build_object('files', %s::jsonb) WHERE id = %s",
            (Jsonb(figures), run_id),
        )
    log.info("file check for %s run %d: %s", source, run_id, result.summary())
    if result.failed(cfg.file_check.max_failures):
        raise StorageError(
            f"{source}: {result.summary()}: more sampled files unreadable than the allowed "
            f"{cfg.file_check.max_failures}: check the bucket and the IAM grant of {cfg.storage.aws_conn_id}"
        )
    return {k: v for k, v in figures.items() if k != "examples"}
