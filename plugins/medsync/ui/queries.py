"""What the medsync page shows, read from A's database.

Every query reads a primary key, a unique key, an index of ``0010_ui.sql`` or a kept
count (``medsync.live_count``): nothing scans ``imaging.*``, whose tables are A's and large
(``tests/test_ui_queries.py`` proves it with EXPLAIN). Nothing returns record contents:
runs and their figures, watermarks, quarantine reasons and source keys, pending keys and
their parents' keys, and for a search A's ids, keys and versions. Payloads, names, MRNs and
birth dates stay in the database. A source key that identifies a patient (a PACS's subject
keys are PatientIDs, i.e. MRNs: ``Source.keys_identify_patients``) is returned masked
(``medsync.ui.masked_keys``), wherever it appears: a quarantine's keys, a pending child's
parent, a search's answer.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from medsync.config import LEVELS, get_source_config
from medsync.levels import spec
from medsync.sources import open_source
from medsync.sources.base import Source
from medsync.ui.masked_keys import mask_patient_key

RUN_FIGURES = ("pulled", "inserted", "updated", "unchanged", "deleted", "quarantined", "pending", "difference")
"""Per level and run, as the run's report names them (``medsync.report``)."""
PENDING_AGES: tuple[tuple[str, timedelta | None], ...] = (
    ("under 1 h", timedelta(hours=1)),
    ("1 h to 1 day", timedelta(days=1)),
    ("1 to 7 days", timedelta(days=7)),
    ("over 7 days", None),
)
"""Buckets of how long pending children have waited, youngest first."""
MAX_SEARCH_TERM = 200
QUARANTINE_GROUPS = 100
SAMPLE_KEYS = 5
NEVER_SEEN = "never seen"
"""A search's answer for a source key that no source the user may read ever sent."""
NOT_FOUND = "not found"
"""A search's answer for a UUID that is no A row of the sources the user may read (whether or not A has
it), nor any of their keys."""


def _source(name: str) -> Source:
    return open_source(get_source_config(name))


def _shown_key(source: Source, level: str, key: str) -> str:
    """``key`` as the page may show it: masked when ``level``'s keys identify patients."""
    return mask_patient_key(source.cfg.name, level, key) if source.keys_identify_patients(level) else key


def found(result: dict[str, Any]) -> bool:
    """Whether a search's answer is a record (not a miss)."""
    return result["states"] not in ([NEVER_SEEN], [NOT_FOUND])


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _level_figures(level: dict[str, Any], reported: dict[str, Any] | None) -> dict[str, Any]:
    """A level's figures: the report's when the run got that far, else what pull and merge counted."""
    window = [level["since"], level["until"]]
    if reported:
        figures = {name: reported.get(name) for name in RUN_FIGURES}
        return {"window": reported.get("window", window), **figures}
    pull = [s for s in (level.get("pull") or {}).values() if isinstance(s, dict)]
    merge = level.get("merge") or {}
    has_merge = bool(merge)
    return {
        "window": window,
        "pulled": sum(int(s.get("records", 0)) for s in pull) if pull else None,
        "inserted": merge.get("inserted") if has_merge else None,
        "updated": merge.get("updated") if has_merge else None,
        "unchanged": merge.get("unchanged") if has_merge else None,
        "deleted": merge.get("deleted") if has_merge else None,
        "quarantined": sum(int(s.get("quarantined", 0)) for s in pull) if pull else None,
        "pending": merge.get("pending") if has_merge else None,
        "difference": None,
    }


def recent_runs(conn: psycopg.Connection, source: str, limit: int = 20) -> list[dict[str, Any]]:
    """The source's last ``limit`` runs, newest first, each with its figures per level."""
    rows = conn.execute(
        "SELECT r.id, r.dag_run_id, r.run_type, r.status, r.started_at, r.finished_at,"
        " r.report -> 'levels', r.report -> 'files',"
        " (SELECT jsonb_object_agg(l.level, jsonb_build_object('since', l.since, 'until', l.until,"
        "   'pull', l.pull_counts, 'merge', l.merge_counts))"
        "  FROM medsync.sync_run_level l WHERE l.run_id = r.id)"
        " FROM medsync.sync_run r WHERE r.source_system = %s ORDER BY r.started_at DESC LIMIT %s",
        (source, limit),
    ).fetchall()
    runs = []
    for run_id, dag_run_id, kind, status, started, finished, report_levels, files, run_levels in rows:
        reported, levels = report_levels or {}, run_levels or {}
        figures = {lv: _level_figures(levels[lv], reported.get(lv)) for lv in LEVELS if lv in levels}
        sinces = [levels[lv]["since"] for lv in levels]
        untils = [levels[lv]["until"] for lv in levels]
        runs.append(
            {
                "run_id": run_id,
                "dag_run_id": dag_run_id,
                "kind": kind,
                "status": status,
                "started_at": _iso(started),
                "finished_at": _iso(finished),
                "duration_seconds": (finished - started).total_seconds() if finished else None,
                # ISO strings of one offset sort as times do.
                "window": [min(sinces), max(untils)] if sinces else None,
                "levels": figures,
                "files": files,
            }
        )
    return runs


def changes_per_run(conn: psycopg.Connection, source: str, since: datetime) -> list[dict[str, Any]]:
    """Per run started since ``since``, oldest first: the rows it inserted, updated and deleted in A."""
    rows = conn.execute(
        "SELECT r.id, r.dag_run_id, r.run_type, r.status, r.started_at, l.merge_counts"
        " FROM medsync.sync_run r JOIN medsync.sync_run_level l ON l.run_id = r.id"
        " WHERE r.source_system = %s AND r.started_at >= %s ORDER BY r.started_at, r.id",
        (source, since),
    ).fetchall()
    out: dict[int, dict[str, Any]] = {}
    for run_id, dag_run_id, kind, status, started, merge_counts in rows:
        run = out.setdefault(
            run_id,
            {"run_id": run_id, "dag_run_id": dag_run_id, "kind": kind, "status": status,
             "started_at": _iso(started), "inserted": 0, "updated": 0, "deleted": 0},
        )  # fmt: skip
        merge = merge_counts or {}
        run["inserted"] += int(merge.get("inserted", 0))
        run["updated"] += int(merge.get("updated", 0)) + int(merge.get("undeleted", 0))
        # A parent's delete flows down: its children's rows were deleted by this run too.
        cascaded = sum(int(c.get("deleted", 0)) for c in (merge.get("cascaded") or {}).values())
        run["deleted"] += int(merge.get("deleted", 0)) + cascaded
    return list(out.values())


def watermarks(conn: psycopg.Connection, source: str) -> dict[str, dict[str, Any]]:
    rows = conn.execute(
        "SELECT level, synced_until, run_id, updated_at FROM medsync.watermark WHERE source_system = %s", (source,)
    ).fetchall()
    return {lv: {"synced_until": _iso(until), "run_id": run, "updated_at": _iso(at)} for lv, until, run, at in rows}


def live_counts(conn: psycopg.Connection, source: str) -> dict[str, dict[str, Any]]:
    """A's live rows per level as the merges keep them (no count of A's tables)."""
    rows = conn.execute(
        "SELECT level, live, counted_at, updated_at FROM medsync.live_count WHERE source_system = %s", (source,)
    ).fetchall()
    return {lv: {"live": live, "counted_at": _iso(c), "updated_at": _iso(u)} for lv, live, c, u in rows}


def quarantine_groups(conn: psycopg.Connection, source: str) -> list[dict[str, Any]]:
    """The open quarantine by level and reason: count, oldest and newest, the oldest few keys."""
    rows = conn.execute(
        "SELECT g.level, g.reason, g.n, g.oldest, g.newest, g.last_seen,"
        " ARRAY(SELECT q.source_key FROM medsync.quarantine q"
        "  WHERE q.source_system = %(src)s AND q.level = g.level AND q.reason = g.reason AND q.resolved_at IS NULL"
        "  ORDER BY q.created_at LIMIT %(sample)s)"
        " FROM (SELECT level, reason, count(*) AS n, min(created_at) AS oldest, max(created_at) AS newest,"
        "   max(updated_at) AS last_seen"
        "  FROM medsync.quarantine WHERE source_system = %(src)s AND resolved_at IS NULL"
        "  GROUP BY level, reason) g"
        " ORDER BY g.n DESC, g.level, g.reason LIMIT %(groups)s",
        {"src": source, "sample": SAMPLE_KEYS, "groups": QUARANTINE_GROUPS},
    ).fetchall()
    order = {lv: i for i, lv in enumerate(LEVELS)}
    src = _source(source)
    groups = [
        {"level": lv, "reason": reason, "count": n, "oldest": _iso(oldest), "newest": _iso(newest),
         "last_seen": _iso(seen), "sample_keys": [_shown_key(src, lv, k) for k in keys]}
        for lv, reason, n, oldest, newest, seen, keys in rows
    ]  # fmt: skip
    return sorted(groups, key=lambda g: (order.get(g["level"], 99), -g["count"], g["reason"]))


def _pending_table(level: str) -> sql.Identifier:
    return sql.Identifier("medsync", f"pending_{level}")


def pending_summary(conn: psycopg.Connection, source: str, now: datetime) -> dict[str, dict[str, Any]]:
    """Per child level: how many wait for their parent, since when (age buckets), the longest waiting."""
    out: dict[str, dict[str, Any]] = {}
    src = _source(source)
    bounds = [now - age for _, age in PENDING_AGES if age is not None]
    buckets = sql.SQL(", ").join([sql.SQL("count(*) FILTER (WHERE pending_since >= %s)")] * len(bounds))
    for level in LEVELS:
        parent = spec(level).parent_level
        if parent is None:
            continue
        table = _pending_table(level)
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), min(pending_since), max(pending_since), {} FROM {} WHERE source_system = %s"
            ).format(buckets, table),
            (*bounds, source),
        ).fetchone()
        assert row is not None
        total, oldest, newest, *younger = row
        # Cumulative counts (waiting less than 1 h, 1 day, 7 days) -> counts per bucket.
        cumulative = [*younger, total]
        ages = {name: cumulative[i] - (cumulative[i - 1] if i else 0) for i, (name, _) in enumerate(PENDING_AGES)}
        longest = conn.execute(
            sql.SQL(
                "SELECT source_key, parent_key, pending_since FROM {} WHERE source_system = %s"
                " ORDER BY pending_since LIMIT %s"
            ).format(table),
            (source, SAMPLE_KEYS),
        ).fetchall()
        out[level] = {
            "count": total,
            "parent_level": parent,
            "parent_key_is": src.parent_link(level).column,
            "oldest": _iso(oldest),
            "newest": _iso(newest),
            "ages": ages,
            "longest_waiting": [
                {
                    "source_key": _shown_key(src, level, k),
                    "parent_key": _shown_key(src, parent, p),
                    "pending_since": _iso(since),
                }
                for k, p, since in longest
            ],
        }
    return out


def last_file_check(conn: psycopg.Connection, source: str) -> dict[str, Any] | None:
    """The newest run's file check (``report.files``), with the run it belongs to."""
    row = conn.execute(
        "SELECT id, dag_run_id, started_at, report -> 'files' FROM medsync.sync_run"
        " WHERE source_system = %s AND report ? 'files' ORDER BY started_at DESC LIMIT 1",
        (source,),
    ).fetchone()
    if row is None:
        return None
    run_id, dag_run_id, started, files = row
    return {"run_id": run_id, "dag_run_id": dag_run_id, "started_at": _iso(started), **files}


def overview(conn: psycopg.Connection, source: str, now: datetime, weeks: int = 4, runs: int = 20) -> dict[str, Any]:
    """Everything the page shows for one source."""
    return {
        "source": source,
        "runs": recent_runs(conn, source, runs),
        "changes": changes_per_run(conn, source, now - timedelta(weeks=weeks)),
        "watermarks": watermarks(conn, source),
        "live_counts": live_counts(conn, source),
        "quarantine": quarantine_groups(conn, source),
        "pending": pending_summary(conn, source, now),
        "file_check": last_file_check(conn, source),
    }


# ------------------------------------------------------------------------------------------------
# Where a record stands.
# ------------------------------------------------------------------------------------------------
def _stored_by_key(conn: psycopg.Connection, source: str, level: str, key: str) -> dict[str, Any] | None:
    row = conn.execute(
        sql.SQL(
            "SELECT id, source_updated_at, deleted_at, created_at, updated_at FROM {}"
            " WHERE source_system = %s AND source_key = %s"
        ).format(sql.Identifier("imaging", spec(level).table)),
        (source, key),
    ).fetchone()
    if row is None:
        return None
    a_id, version, deleted, created, updated = row
    return {"a_id": str(a_id), "source_updated_at": _iso(version), "deleted_at": _iso(deleted),
            "created_at": _iso(created), "updated_at": _iso(updated)}  # fmt: skip


def record_state(conn: psycopg.Connection, source: str, level: str, key: str) -> dict[str, Any]:
    """Where one record of ``source`` stands: stored (A's id, versions), quarantined, pending, tombstoned.

    The answer shows keys that identify patients masked, ``key`` itself included.
    """
    return _record_state(conn, _source(source), level, key)


def _record_state(conn: psycopg.Connection, src: Source, level: str, key: str) -> dict[str, Any]:
    source = src.cfg.name
    stored = _stored_by_key(conn, source, level, key)
    q = conn.execute(
        "SELECT reason, source_updated_at, attempts, created_at, updated_at, resolved_at FROM medsync.quarantine"
        " WHERE source_system = %s AND level = %s AND source_key = %s",
        (source, level, key),
    ).fetchone()
    quarantine = None
    if q is not None:
        reason, version, attempts, created, updated, resolved = q
        quarantine = {"reason": reason, "source_updated_at": _iso(version), "attempts": attempts,
                      "since": _iso(created), "last_seen": _iso(updated), "resolved_at": _iso(resolved)}  # fmt: skip
    pending: dict[str, Any] | None = None
    parent_level = spec(level).parent_level
    if parent_level is not None:
        p = conn.execute(
            sql.SQL(
                "SELECT parent_key, source_updated_at, pending_since FROM {}"
                " WHERE source_system = %s AND source_key = %s"
            ).format(_pending_table(level)),
            (source, key),
        ).fetchone()
        if p is not None:
            parent_key, version, since = p
            parent_column = src.parent_link(level).column
            pending = {"parent_level": parent_level, "parent_key_is": parent_column,
                       "parent_key": _shown_key(src, parent_level, parent_key), "source_updated_at": _iso(version),
                       "since": _iso(since)}  # fmt: skip
            if parent_column == "source_key":
                # The parent's own standing says why it is not in A (quarantined, pending, or not seen yet).
                pending["parent"] = {k: v for k, v in _record_state(conn, src, parent_level, parent_key).items()
                                     if k in ("states", "quarantine", "stored")}  # fmt: skip
    t = conn.execute(
        "SELECT source_updated_at FROM medsync.tombstone WHERE source_system = %s AND level = %s AND source_key = %s",
        (source, level, key),
    ).fetchone()
    states = []
    if stored:
        states.append("deleted in A" if stored["deleted_at"] else "stored")
    if quarantine and not quarantine["resolved_at"]:
        states.append("quarantined")
    if pending:
        states.append("pending")
    if not states:
        states.append("tombstone only" if t else NEVER_SEEN)
    return {
        "source": source,
        "level": level,
        "source_key": _shown_key(src, level, key),
        "states": states,
        "stored": stored,
        "quarantine": quarantine,
        "pending": pending,
        "tombstone": {"source_updated_at": _iso(t[0])} if t else None,
    }


def _by_a_id(conn: psycopg.Connection, a_id: uuid.UUID) -> tuple[str, str, str | None] | None:
    """(level, source_system, source_key) of A's row with this id, at any level."""
    for level in LEVELS:
        row = conn.execute(
            sql.SQL("SELECT source_system, source_key FROM {} WHERE id = %s").format(
                sql.Identifier("imaging", spec(level).table)
            ),
            (a_id,),
        ).fetchone()
        if row is not None:
            return level, row[0], row[1]
    return None


def search(conn: psycopg.Connection, sources: list[str], term: str) -> list[dict[str, Any]]:
    """Where the record with this source key, or A's row with this id, stands, in each of ``sources``.

    A key is looked up at every level of every source given; an id finds A's row at any level,
    shown only when its source is one of ``sources``, and a UUID that finds none is looked up as
    a key. A miss is ``never seen`` (a key none of them ever sent) or ``not found`` (a UUID that is neither),
    whether A has no such row or it is another source's or A's own: a user learns nothing of
    what they may not read, not even that it exists. A miss does not repeat the term, which
    may be a patient's MRN.
    """
    term = term.strip()[:MAX_SEARCH_TERM]
    if not term:
        return []
    try:
        a_id = uuid.UUID(term)
    except ValueError:
        a_id = None
    if a_id is not None:
        level, source, key = _by_a_id(conn, a_id) or (None, None, None)
        if level is not None and source in sources and key is not None:
            return [record_state(conn, source, level, key)]
    # Not A's id of a record the user may read: a source key, maybe a UUID (C's keys are UUIDs).
    results = [_record_state(conn, src, level, term) for src in map(_source, sources) for level in LEVELS]
    hits = [r for r in results if found(r)]
    return hits or [{"sources": sources, "states": [NOT_FOUND if a_id is not None else NEVER_SEEN]}]
