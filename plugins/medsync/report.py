"""A run's report: what each level pulled and merged, and how A compares with the source.

Per level: pulled, inserted, updated, unchanged, deleted (own tombstones and deletes
flowing down from parents), quarantined (open entries), pending, A's live rows, the
source's live count (``/counts``, taken now) and the difference. For a window run the
difference also holds whatever the source changed outside the window. After a full
refresh, a difference that open quarantine, pending records, rows A keeps deleted
because their parent is deleted (a-model.md) and changes the source made after the
window's end do not explain fails the run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
from psycopg import sql

from medsync.config import LEVELS
from medsync.errors import ReconciliationError
from medsync.levels import spec
from medsync.schema import A_SCHEMA, SCHEMA
from medsync.windows import FULL_REFRESH

COLUMNS = (
    "pulled", "inserted", "updated", "unchanged", "deleted", "quarantined", "pending",
    "a_live", "source_live", "difference",
)  # fmt: skip


class CountingClient(Protocol):
    def counts(self) -> dict[str, Any]: ...

    def iter_pages(
        self, resource: str, since: datetime, until: datetime, *, page_size: int, include_deleted: bool = True
    ) -> Any: ...


def _sum_slices(pull_counts: dict[str, Any], key: str) -> int:
    return sum(int(s.get(key, 0)) for s in pull_counts.values() if isinstance(s, dict))


def build_report(
    conn: psycopg.Connection,
    client: CountingClient,
    resources: dict[str, str],
    source: str,
    run_id: int,
) -> dict[str, Any]:
    run = conn.execute("SELECT run_type, started_at FROM medsync.sync_run WHERE id = %s", (run_id,)).fetchone()
    if run is None:
        raise ReconciliationError(f"run {run_id} is unknown")
    kind = run[0]
    rows = conn.execute(
        "SELECT level, since, until, pull_counts, merge_counts FROM medsync.sync_run_level WHERE run_id = %s",
        (run_id,),
    ).fetchall()
    by_level = {r[0]: r for r in rows}
    cascaded: dict[str, int] = dict.fromkeys(LEVELS, 0)
    for _, _, _, _, merge_counts in rows:
        for child, c in (merge_counts.get("cascaded") or {}).items():
            cascaded[child] = cascaded.get(child, 0) + int(c.get("deleted", 0))
    source_counts = client.counts()
    levels: dict[str, Any] = {}
    for level in LEVELS:
        if level not in by_level:
            continue
        _, since, until, pull_counts, merge_counts = by_level[level]
        table = sql.Identifier(A_SCHEMA, spec(level).table)
        a_live = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE source_system = %s AND deleted_at IS NULL").format(table),
            (source,),
        ).fetchone()
        # Live in the source but deleted in A because a parent is: A's rule, not a loss.
        under_deleted_parent = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {} a WHERE a.source_system = %s AND a.deleted_at IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM medsync.tombstone t WHERE t.source_system = a.source_system"
                " AND t.level = %s AND t.source_key = a.source_key)"
            ).format(table),
            (source, level),
        ).fetchone()
        quarantined = conn.execute(
            "SELECT count(*) FROM medsync.quarantine WHERE source_system = %s AND level = %s AND resolved_at IS NULL",
            (source, level),
        ).fetchone()
        pending = (0,)
        if spec(level).parent_level:
            pending = conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE source_system = %s").format(
                    sql.Identifier(SCHEMA, f"pending_{level}")
                ),
                (source,),
            ).fetchone()
        source_live = int(source_counts[resources[level]])
        a_live_n = int(a_live[0]) if a_live else 0
        levels[level] = {
            "window": [since.isoformat(), until.isoformat()],
            "pulled": _sum_slices(pull_counts, "records"),
            "quarantine_retried": _sum_slices(pull_counts, "quarantine_retried"),
            "newly_quarantined": _sum_slices(pull_counts, "quarantined"),
            "inserted": int(merge_counts.get("inserted", 0)),
            "updated": int(merge_counts.get("updated", 0)),
            "unchanged": int(merge_counts.get("unchanged", 0)),
            "stale": int(merge_counts.get("stale", 0)),
            "deleted": int(merge_counts.get("deleted", 0)) + cascaded.get(level, 0),
            "quarantined": int(quarantined[0]) if quarantined else 0,
            "pending": int(pending[0]) if pending else 0,
            "deleted_with_parent": int(under_deleted_parent[0]) if under_deleted_parent else 0,
            "a_live": a_live_n,
            "source_live": source_live,
            "difference": a_live_n - source_live,
        }
    if kind == FULL_REFRESH:
        now = datetime.now(UTC)
        for level, figures in levels.items():
            until = datetime.fromisoformat(figures["window"][1])
            # Records the source changed after the window closed explain up to one difference each.
            figures["changed_after_window"] = sum(
                len(page) for page in client.iter_pages(resources[level], until, now, page_size=1000)
            )
    return {"source": source, "run_id": run_id, "kind": kind, "levels": levels}


def check_full_refresh(report: dict[str, Any]) -> None:
    if report["kind"] != FULL_REFRESH:
        return
    problems = []
    for level, f in report["levels"].items():
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
    lines = [[level, *(str(f[c]) for c in COLUMNS)] for level, f in levels]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    out = [f"source {report['source']}, run {report['run_id']} ({report['kind']})", fmt.format(*header)]
    out += [fmt.format(*r) for r in lines]
    files = report.get("files")
    if files:
        out.append(
            "files: checked {checked} of {candidates} new or changed instances: {ok} readable, "
            "{missing} missing, {denied} denied, {refused} refused, {errors} errors".format(**files)
        )
    return "\n".join(out)
