"""A run's report: what each level pulled and merged, and how A compares with the source.

Per level: pulled, inserted, updated, unchanged, deleted (own tombstones and deletes
flowing down from parents), quarantined (open entries), pending, A's live rows, the
source's live count (``/counts``, taken now) and the difference. For a window run the
difference also holds whatever the source changed outside the window.

A's live rows come from ``medsync.live_count``, which the merges keep, so a window run's
report costs what the run changed. A full refresh counts A's rows exactly instead (a
scan of each table), keeps that count, shows any drift of the kept one, and fails when a
difference is not explained by open quarantine, pending records, rows A keeps deleted
because their parent is deleted (a-model.md) and changes the source made after the
window's end.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from medsync import live_count
from medsync.config import LEVELS
from medsync.errors import ReconciliationError, SourceBehindError
from medsync.levels import spec
from medsync.schema import SCHEMA
from medsync.sources.base import SourceClient
from medsync.windows import FULL_REFRESH

log = logging.getLogger(__name__)

COLUMNS = (
    "pulled", "inserted", "updated", "unchanged", "deleted", "older_than_a", "quarantined", "pending",
    "a_live", "source_live", "difference",
)  # fmt: skip
"""``older_than_a``: records the source sent in a version older than the one A (or its tombstone
memory) holds. The merge never applies them; a few come from races with late commits, many mean
the source went back in time (a replica restored from an older backup)."""


def source_behind_message(source: str, older: dict[str, int]) -> str:
    """What on-call reads when the source serves older versions than A holds."""
    total = sum(older.values())
    per_level = ", ".join(f"{level} {n}" for level, n in older.items() if n)
    return (
        f"source {source} is behind A: it served {total} records in versions older than A holds ({per_level}). "
        "The source went back in time (a replica restored from an older backup, a failover to a lagging one?). "
        "A kept its newer rows; ask the source's team which copy is current before syncing again"
    )


def _sum_slices(pull_counts: dict[str, Any], key: str) -> int:
    return sum(int(s.get(key, 0)) for s in pull_counts.values() if isinstance(s, dict))


def build_report(
    conn: psycopg.Connection,
    client: SourceClient,
    source: str,
    run_id: int,
    *,
    lock_timeout_seconds: int = 1800,
) -> dict[str, Any]:
    """The run's figures per level; ``lock_timeout_seconds`` bounds the wait for an exact count."""
    from medsync import ledger

    run = ledger.get_run(conn, run_id)
    kind = run.run_type
    rows = conn.execute(
        "SELECT level, since, until, pull_counts, merge_counts FROM medsync.sync_run_level WHERE run_id = %s",
        (run_id,),
    ).fetchall()
    by_level = {r[0]: r for r in rows}
    cascaded: dict[str, int] = dict.fromkeys(LEVELS, 0)
    for _, _, _, _, merge_counts in rows:
        for child, c in (merge_counts.get("cascaded") or {}).items():
            cascaded[child] = cascaded.get(child, 0) + int(c.get("deleted", 0))
    exact: dict[str, live_count.ExactCount] = {}
    kept = live_count.read(conn, source)
    missing = tuple(level for level in LEVELS if level not in kept)
    if kind == FULL_REFRESH or missing:
        exact = live_count.recount(
            conn, source, lock_timeout_seconds=lock_timeout_seconds, levels=LEVELS if kind == FULL_REFRESH else missing
        )
        kept.update({level: e.live for level, e in exact.items()})
        for level, e in exact.items():
            if e.drift:
                log.warning(
                    "%s: the kept count of A's live rows was %d, A has %d (rows changed outside medsync?); "
                    "counted again",
                    level, e.kept, e.live,
                )  # fmt: skip
    source_counts = client.counts()
    levels: dict[str, Any] = {}
    for level in LEVELS:
        if level not in by_level:
            continue
        _, since, until, pull_counts, merge_counts = by_level[level]
        quarantined = conn.execute(
            "SELECT count(*) FROM medsync.quarantine WHERE source_system = %s AND level = %s AND resolved_at IS NULL",
            (source, level),
        ).fetchone()
        pending: tuple[Any, ...] | None = (0, None)
        if spec(level).parent_level:
            pending = conn.execute(
                sql.SQL(
                    "SELECT count(*), extract(epoch FROM now() - min(pending_since)) / 86400"
                    " FROM {} WHERE source_system = %s"
                ).format(sql.Identifier(SCHEMA, f"pending_{level}")),
                (source,),
            ).fetchone()
        source_live = None if source_counts is None else int(source_counts[level])
        a_live_n = kept[level]
        levels[level] = {
            "window": [since.isoformat(), until.isoformat()],
            "pulled": _sum_slices(pull_counts, "records"),
            "quarantine_retried": _sum_slices(pull_counts, "quarantine_retried"),
            "newly_quarantined": _sum_slices(pull_counts, "quarantined"),
            "inserted": int(merge_counts.get("inserted", 0)),
            "updated": int(merge_counts.get("updated", 0)),
            "unchanged": int(merge_counts.get("unchanged", 0)),
            "stale": int(merge_counts.get("stale", 0)),
            "older_than_a": int(merge_counts.get("stale", 0)),
            "deleted": int(merge_counts.get("deleted", 0)) + cascaded.get(level, 0),
            "quarantined": int(quarantined[0]) if quarantined else 0,
            "pending": int(pending[0]) if pending else 0,
            "oldest_pending_days": round(float(pending[1]), 2) if pending and pending[1] is not None else None,
            "a_live": a_live_n,
            "source_live": source_live,
            "difference": None if source_live is None else a_live_n - source_live,
        }
        if level in exact:
            # Live in the source but deleted in A because a parent is: A's rule, not a loss.
            levels[level]["deleted_with_parent"] = exact[level].deleted_with_parent
            levels[level]["live_count_drift"] = exact[level].drift
    dry_run = bool(run.options.get("dry_run"))
    if kind == FULL_REFRESH and not dry_run:
        now = datetime.now(UTC)
        for level, figures in levels.items():
            until = datetime.fromisoformat(figures["window"][1])
            # Records the source changed after the window closed explain up to one difference each.
            figures["changed_after_window"] = sum(
                len(page.items) for page in client.iter_pages(level, until, now) if not page.deletions
            )
    return {"source": source, "run_id": run_id, "dag_run_id": run.dag_run_id, "kind": kind, "dry_run": dry_run,
            "options": run.options, "levels": levels}  # fmt: skip


def check_full_refresh(report: dict[str, Any]) -> None:
    if report["kind"] != FULL_REFRESH or report.get("dry_run"):
        return  # a dry run wrote nothing: A is not expected to match the source
    older = {level: int(f.get("older_than_a") or 0) for level, f in report["levels"].items()}
    if any(older.values()):
        raise SourceBehindError(source_behind_message(report["source"], older))
    problems = []
    for level, f in report["levels"].items():
        if f["difference"] is None:
            continue  # the source has no counts: reported as not checked
        explained = f["quarantined"] + f["pending"] + f["deleted_with_parent"] + f.get("changed_after_window", 0)
        if abs(f["difference"]) > explained:
            problems.append(
                f"{level}: A has {f['a_live']} live rows, the source {f['source_live']} "
                f"(difference {f['difference']}, at most {explained} explained by quarantine, "
                "pending records, rows deleted with their parent and later changes)"
            )
    if problems:
        raise ReconciliationError("full refresh does not reconcile: " + "; ".join(problems))


def format_report(report: dict[str, Any]) -> str:
    header = ["level", *COLUMNS]
    # Stored as jsonb, which does not keep key order: list levels parents first again.
    levels = [(level, report["levels"][level]) for level in LEVELS if level in report["levels"]]
    lines = [[level, *("-" if f.get(c) is None else str(f[c]) for c in COLUMNS)] for level, f in levels]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    title = f"source {report['source']}, run {report['run_id']} ({report['kind']})"
    if report.get("dry_run"):
        title += ": DRY RUN, nothing was written to A; inserted/updated/deleted are what a sync would do"
    out = [title, fmt.format(*header)]
    out += [fmt.format(*r) for r in lines]
    if any(f["source_live"] is None for _, f in levels):
        out.append("source_live -: the source gives no counts, so A's live rows could not be checked against it")
    files = report.get("files")
    if files:
        out.append(
            "files: checked {checked} of {candidates} new or changed instances: {ok} readable, "
            "{missing} missing, {denied} denied, {refused} refused, {errors} errors".format(**files)
        )
    mirror = report.get("mirror")
    if mirror:
        out.append(
            "mirror: {copied} files copied into A's bucket ({bytes_copied} bytes), {skipped} already there, "
            "{failed} failed, of {candidates} instances whose copy was missing or outdated".format(**mirror)
        )
    return "\n".join(out)
