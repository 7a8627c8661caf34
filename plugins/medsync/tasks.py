"""The bodies of a source DAG's tasks, callable with or without Airflow's scheduler.

Each function takes the source's name and ids, opens what it needs through the hooks
(so connections come from Airflow: the metadata database, a secrets backend or
``AIRFLOW_CONN_*`` variables), and returns a small JSON-able dict for XCom. Data
moves only through A's database; every function is safe to re-run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import psycopg

from medsync import ledger
from medsync.config import LEVELS, SourceConfig, get_source_config
from medsync.errors import RunParamsError
from medsync.mapping import load_mapping
from medsync.request_limit import DatabaseRequestLimiter
from medsync.sources import open_source
from medsync.sources.base import Buckets, DeletionMode, RecordParser
from medsync.windows import FULL_REFRESH, REPAIR, RunFacts, advances_watermark, plan_window, sync_kind

log = logging.getLogger(__name__)


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

    return ADatabaseHook.for_source(cfg).get_conn()


def request_limiter(cfg: SourceConfig) -> DatabaseRequestLimiter:
    """The source's request limit for every task of every run together (kept in A's database)."""
    return DatabaseRequestLimiter(lambda: connect_a(cfg), cfg.name, cfg.rate_limit_per_second)


def buckets(cfg: SourceConfig, variable: Callable[[str], str | None] = get_variable) -> Buckets:
    """The source's buckets in this environment (Variables override the config)."""
    return Buckets(cfg.storage.resolve_bucket(variable), cfg.storage.resolve_allowed_buckets(variable))


def record_parser(cfg: SourceConfig, variable: Callable[[str], str | None] = get_variable) -> RecordParser:
    return open_source(cfg).parser(load_mapping(cfg.mapping_path), buckets(cfg, variable))


def run_options(levels: Iterable[str] | None = None, dry_run: bool = False) -> dict[str, Any]:
    """The run's repair options as the ledger keeps them; refuses an unknown or empty level list."""
    chosen = list(LEVELS) if levels is None else list(levels)
    unknown = sorted(set(chosen) - set(LEVELS))
    if unknown or not chosen:
        raise RunParamsError(f"levels must be a non-empty subset of {', '.join(LEVELS)}; got {chosen}")
    return {"levels": [level for level in LEVELS if level in chosen], "dry_run": bool(dry_run)}


def prepare(
    source: str,
    *,
    dag_run_id: str,
    facts: RunFacts,
    levels: Iterable[str] | None = None,
    dry_run: bool = False,
    airflow_run_state: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """Migrates medsync's schema, checks A's tables and the mapping, registers the run, plans windows.

    ``levels`` limits the run to some levels (parents are still looked up in A by the merge);
    ``dry_run`` stages and decides but writes nothing to A. ``airflow_run_state`` answers
    Airflow's state of another run of this DAG (None: unknown), so that a run the ledger
    still calls running, but that Airflow has ended (its process was killed before any
    callback ran), is marked failed and its staging dropped now.
    """
    from medsync import live_count, merge, schema, staging

    cfg = get_source_config(source)
    mapping = load_mapping(cfg.mapping_path)
    record_parser(cfg)  # refuses a mapping that does not feed every column the protocol maps
    kind = sync_kind(facts)
    options = run_options(levels, dry_run)
    if kind == REPAIR:
        options.update(since=facts.since.isoformat() if facts.since else None,
                       until=facts.until.isoformat() if facts.until else None)  # fmt: skip
    with connect_a(cfg) as conn:
        schema.migrate(conn)
        schema.check_a_tables(conn)
        schema.check_mapping(conn, mapping)
        live_count.ensure(conn, source, lock_timeout_seconds=cfg.lock_timeout_seconds)
        marks = ledger.watermarks(conn, source)
        lookback = timedelta(minutes=cfg.lookback_minutes)
        planned = {level: plan_window(facts, marks.get(level), lookback) for level in options["levels"]}
        run_id = ledger.register_run(conn, source, dag_run_id, kind, windows=planned, options=options)
        windows = {level: [w.since.isoformat(), w.until.isoformat()] for level, w in planned.items()}
        for old_run, old_dag_run_id, status in ledger.other_runs(conn, source, run_id):
            if status == ledger.RUNNING:
                state = airflow_run_state(old_dag_run_id) if airflow_run_state else "running"
                if state not in (None, "success", "failed"):
                    continue  # still running (a backfill beside this run): its staging is its own
                ledger.fail(
                    conn, source, old_dag_run_id, task_id=None, error_class="RunEnded",
                    message=f"Airflow ended the run ({state or 'no longer known'}) before medsync heard why "
                    "(its task process was killed?): see the run's task logs",
                )  # fmt: skip
                log.warning("run %d (%s) was still running in the ledger; Airflow says %s: marked failed",
                            old_run, old_dag_run_id, state)  # fmt: skip
            # Staging of runs that ended is scratch: drop it.
            staging.drop_staging_tables(conn, source, old_run)
            merge.drop_work_tables(conn, source, old_run)
    log.info("run %d of %s (%s, %s): windows %s", run_id, source, kind, options, windows)
    return {"run_id": run_id, "kind": kind, "windows": windows, **options}


def pull(source: str, level: str, run_id: int, slice_index: int = 0, slices: int = 1) -> dict[str, Any]:
    """Streams one level (one time slice of it) from the source into this run's staging table.

    A first load of the instances is also merged chunk by chunk meanwhile (``medsync.early_merge``).
    """
    from medsync import early_merge, snapshot, staging

    cfg = get_source_config(source)
    parser = record_parser(cfg)
    with connect_a(cfg) as conn:
        level_window = ledger.level_window(conn, run_id, level)
        if level_window is None:
            log.info("run %d does not sync %s (levels chosen in the trigger form): nothing to pull", run_id, level)
            return {"level": level, "slice": slice_index, "skipped": True, "staged": 0, "quarantined": 0}
        window = staging.window_slice(level_window, slices, slice_index)
        run = ledger.get_run(conn, run_id)
        full_refresh = run.run_type == FULL_REFRESH
        src = open_source(cfg)
        merger = None
        if early_merge.applies(conn, enabled=cfg.merge_while_pulling, source=source, level=level, slices=slices,
                               dry_run=bool(run.options.get("dry_run"))):  # fmt: skip
            merger = early_merge.EarlyMerger(
                connect=lambda: connect_a(cfg), source=source, level=level, run_id=run_id, slice_index=slice_index,
                batch_size=cfg.merge_batch_size, lock_timeout_seconds=cfg.lock_timeout_seconds,
                parent_lookup=src.parent_link(level).column, sessions=cfg.merge_sessions,
            )  # fmt: skip
        # A source without tombstones: when its snapshot is due, the first slice lists the level whole.
        snapshot_now = (
            src.deletion_mode(level) is DeletionMode.SNAPSHOT
            and slice_index == 0
            and snapshot.due(conn, cfg, level, run_id)
        )
        with (
            request_limiter(cfg) as limiter,
            src.connect(limiter) as client,
            merger if merger is not None else nullcontext(),
        ):
            # A full refresh pulls about what the source's counts say (one request), so its progress
            # lines can say what is left; a window's share of them is unknown.
            source_counts = client.counts() if full_refresh else None
            expected = int(source_counts[level]) // slices if source_counts and level in source_counts else None
            counts = staging.pull_level(
                conn,
                source=source,
                level=level,
                run_id=run_id,
                pages=client.iter_listing(level)
                if snapshot_now
                else client.iter_pages(level, window.since, window.until),
                parser=parser,
                slice_index=slice_index,
                retry_quarantine=slice_index == 0,
                commit_rows=cfg.staging_commit_rows,
                expected_records=expected,
                chunk_committed=merger.committed if merger is not None else None,
            ).as_dict()
        if merger is not None:
            counts["merged_while_pulling"] = merger.figures.as_dict()
        if snapshot_now:
            counts["snapshot"] = snapshot.stage_tombstones(
                conn,
                source=source,
                level=level,
                run_id=run_id,
                slice_index=slice_index,
                listed=counts["records"],
                max_delete_share=cfg.snapshot.max_delete_share,
                max_delete_floor=cfg.snapshot.max_delete_floor,
            )
        ledger.record_pull(conn, run_id, level, slice_index, counts)
    return {"level": level, "slice": slice_index, "staged": counts["staged"], "quarantined": counts["quarantined"]}


def merge(source: str, level: str, run_id: int) -> dict[str, Any]:
    """Merges this run's staging (and pending records) of one level into A's table.

    A dry run decides every record exactly as a merge would, inside one transaction that is
    rolled back: it reports what would be inserted, updated and deleted and writes nothing.
    A full refresh fails at a level whose source served versions older than A holds (the source
    went back in time) before writing any of the level's rows (``SourceBehindError``).
    """
    from medsync.levels import spec
    from medsync.merge import merge_level

    cfg = get_source_config(source)
    source_of = open_source(cfg)
    parent_lookup = source_of.parent_link(level).column if level != LEVELS[0] else "source_key"
    child_level = spec(level).child_level
    child_lookup = source_of.parent_link(child_level).column if child_level is not None else "source_key"
    with connect_a(cfg) as conn:
        run = ledger.get_run(conn, run_id)
        if ledger.level_window(conn, run_id, level) is None:
            log.info("run %d does not sync %s (levels chosen in the trigger form): nothing to merge", run_id, level)
            return {"level": level, "skipped": True}
        dry_run = bool(run.options.get("dry_run"))
        with conn.transaction(force_rollback=True) if dry_run else nullcontext():
            counts = merge_level(
                conn,
                source=source,
                level=level,
                parent_lookup=parent_lookup,
                child_lookup=child_lookup,
                run_id=run_id,
                batch_size=cfg.merge_batch_size,
                lock_timeout_seconds=cfg.lock_timeout_seconds,
                # A dry run's batches are savepoints of one transaction, on one session.
                sessions=1 if dry_run else cfg.merge_sessions,
                connect=None if dry_run else (lambda: connect_a(cfg)),
                refuse_older_than_a=run.run_type == FULL_REFRESH,
            ).as_dict()
        counts["dry_run"] = dry_run
        ledger.record_merge(conn, run_id, level, counts)
    if dry_run:
        log.info("dry run %d: %s would insert %d, update %d, delete %d (nothing written)",
                 run_id, level, counts["inserted"], counts["updated"], counts["deleted"])  # fmt: skip
    figures = ("inserted", "updated", "unchanged", "stale", "pending", "sessions", "build_seconds", "write_seconds")
    return {"level": level, "dry_run": dry_run, **{k: counts[k] for k in figures}}


def report(source: str, run_id: int) -> dict[str, Any]:
    """Compares A with the source's counts and records the run's figures; fails an unexplained full refresh."""
    from medsync.report import COLUMNS, build_report, check_full_refresh, format_report

    cfg = get_source_config(source)
    with (
        request_limiter(cfg) as limiter,
        open_source(cfg).connect(limiter) as client,
        connect_a(cfg) as conn,
    ):
        result = build_report(
            conn,
            client,
            source,
            run_id,
            lock_timeout_seconds=cfg.lock_timeout_seconds,
        )
        # check_files already put its figures under "files"; keep them beside the levels.
        result = ledger.add_to_report(conn, run_id, result)
    log.info("sync report for %s run %d:\n%s", source, run_id, format_report(result))
    # A run that fails its check alerts as failed (its callback), never as "succeeded, but".
    check_full_refresh(result)
    alert_on_report(cfg, result)
    figures = {level: {c: f.get(c) for c in COLUMNS} for level, f in result["levels"].items()}
    return {"run_id": run_id, "kind": result["kind"], "dry_run": bool(result.get("dry_run")), "levels": figures,
            }  # fmt: skip


def alert_on_report(cfg: SourceConfig, result: dict[str, Any]) -> list[str]:
    """Tells someone, once per run, when the report crosses the source's thresholds (``alerts.thresholds``);
    returns the findings.

    The ledger records that the alert went out, after sending it: a report task that runs again
    (a retry, or cleared) sends no second one, unless the record itself failed.
    """
    from medsync import alerts

    findings = alerts.report_findings(result, cfg.alerts.thresholds)
    if not findings:
        return findings
    run_id = int(result["run_id"])
    log.warning("report of run %d crosses thresholds: %s", run_id, "; ".join(findings))
    with connect_a(cfg) as conn:
        if ledger.report_alerted(conn, run_id):
            log.info("the report alert of run %d went out already: not sent again", run_id)
            return findings
        alerts.send(cfg.alerts, alerts.report_alert(cfg, result, findings))
        ledger.record_report_alert(conn, run_id)
    return findings


def finish(source: str, run_id: int) -> dict[str, Any]:
    """Marks the run succeeded, advances the watermarks it may advance, drops its staging tables."""
    from medsync import merge, staging

    cfg = get_source_config(source)
    with connect_a(cfg) as conn:
        run = ledger.get_run(conn, run_id)
        advanced = advances_watermark(run.run_type) and not run.options.get("dry_run")
        ledger.succeed(conn, source, run_id, advance_watermarks=advanced)
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
        run = ledger.get_run(conn, run_id)
        if run.options.get("dry_run"):
            return {"checked": 0, "skipped": True}  # a dry run changed no instance
        result = check_instance_files(conn, cfg, changed_since=run.started_at, sample_size=cfg.file_check.sample_size)
        figures = result.as_dict()
        ledger.add_to_report(conn, run_id, {"files": figures})
    log.info("file check for %s run %d: %s", source, run_id, result.summary())
    if result.failed(cfg.file_check.max_failures):
        raise StorageError(
            f"{source}: {result.summary()}: more sampled files unreadable than the allowed "
            f"{cfg.file_check.max_failures}: check the bucket and the IAM grant of {cfg.storage.aws_conn_id}"
        )
    return {k: v for k, v in figures.items() if k != "examples"}


def mirror_files(source: str, run_id: int) -> dict[str, Any]:
    """Copies into A's bucket the files of the source's live instances whose copy is missing or outdated.

    Not only this run's changes: a file an earlier run failed to copy is retried (``medsync.mirror``).
    The figures go to the run's report (``mirror``); the task fails when more files than
    ``file_check.max_failures`` could not be copied.
    """
    from medsync.errors import StorageError
    from medsync.hooks.storage import InstanceFileHook
    from medsync.mirror import mirror_instance_files

    cfg = get_source_config(source)
    src = open_source(cfg)
    settings = src.file_mirror
    if settings is None:
        return {"mirrored": 0, "skipped": True}
    hook = InstanceFileHook(source, storage=cfg.storage)
    # The copies are requests to the source like the pulls': the same run-wide limit paces them.
    with request_limiter(cfg) as limiter, src.connect(limiter) as client, connect_a(cfg) as conn:
        run = ledger.get_run(conn, run_id)
        if run.options.get("dry_run"):
            return {"mirrored": 0, "skipped": True}  # a dry run changed no instance
        result = mirror_instance_files(
            conn,
            source=source,
            client=client,
            s3=hook.get_conn(),
            settings=settings,
            check_location=hook.check_location,
            attempts=cfg.max_attempts,
        )
        ledger.add_to_report(conn, run_id, {"mirror": result.as_dict()})
    if result.failed > cfg.file_check.max_failures:
        raise StorageError(
            f"{source}: {result.summary()}: more files could not be copied than the allowed "
            f"{cfg.file_check.max_failures} (instance ids in the run's report, medsync.sync_run.report->'mirror')"
        )
    return {k: v for k, v in result.as_dict().items() if k != "examples"}
