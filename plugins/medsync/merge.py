"""Set-based merge of one level's staging table into A's tables.

The rules are A's (``a-model.md``):

- a synced row is found by ``(source_system, source_key)`` and keeps its id for ever;
  a new row gets the application-issued UUIDv7 staged with the record;
- an older version never overwrites a newer one; on equal ``updated_at`` a tombstone
  wins over a live version; ``medsync.tombstone`` remembers the newest tombstone of
  every record, stored in A or not, so that no older version brings it back;
- a row is written only when something in it changes (content, parent, deletion,
  ``source_updated_at``): a re-sync with nothing new writes nothing;
- deletion flows down within the source: a deleted parent deletes its live children,
  a parent coming back revives the children deleted only because of it (not those
  with a tombstone of their own); rows of other sources are never touched;
- a live record whose parent is not in A waits in ``medsync.pending_<level>`` and is
  merged by a later run once the parent is there.

How it runs: one merge per source at a time (a session advisory lock, waited for up
to ``lock_timeout``). The staging rows and the level's pending rows are deduplicated
to the newest version per record, with its parent resolved, into an unlogged work
table (``medsync.merge_<source>_<level>_r<run>``, dropped at the end), then the work is
applied in batches of ``batch_size`` records, each batch one transaction that decides
every record against A's *current* rows, so a crashed merge re-run converges and never
regresses anything. Each batch also adds what it changed to the source's live counts
(``medsync.live_count``), in its transaction. The batches can be shared out among
several sessions (``sessions``): every key is in one batch only, so they never touch
the same rows.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from medsync import ledger, live_count
from medsync.errors import MergeError, SourceBehindError
from medsync.levels import SPECS, LevelSpec, spec, staged_columns
from medsync.locks import source_lock
from medsync.report import source_behind_message
from medsync.schema import A_SCHEMA, SCHEMA
from medsync.staging import staging_table, staging_table_name

log = logging.getLogger(__name__)

_I = sql.Identifier
Query = sql.SQL | sql.Composed
"""What a statement of the merge is once composed (psycopg executes both)."""

MERGE_TEMP_BUFFERS = "64MB"
MIN_SHARED_BATCH = 2_000
BUILD_WORK_MEM = "64MB"
"""Memory for each sort and hash of the statement that builds a merge's work table (once per merge)."""


@dataclass
class MergeCounts:
    candidates: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0
    deleted: int = 0
    undeleted: int = 0
    pending: int = 0
    tombstones_only: int = 0
    quarantine_resolved: int = 0
    batches: int = 0
    first_load_batches: int = 0
    """Batches decided without probing A: the level held no row or tombstone of the source."""
    sessions: int = 1
    seconds: float = 0.0
    build_seconds: float = 0.0
    """From the start to the first batch: mostly building the work table (dedupe, parents, batches)."""
    write_seconds: float = 0.0
    """Inserting and updating A's rows of the level, summed over sessions (the bulk of a large merge)."""
    early_chunks: int = 0
    """Staging chunks merged while the level was still pulled (``medsync.early_merge``), included above."""
    early_merges: int = 0
    """How many merges they took (one merge takes every chunk committed and waiting at the time)."""
    early_candidates: int = 0
    early_seconds: float = 0.0
    """What merging those chunks took, in the pull tasks (beside their pulling)."""
    cascaded: dict[str, Counter[str]] = field(default_factory=dict)

    _ADDED = ("inserted", "updated", "unchanged", "stale", "deleted", "undeleted", "pending", "tombstones_only",
              "quarantine_resolved", "batches", "first_load_batches", "write_seconds")  # fmt: skip

    def add(self, other: MergeCounts) -> None:
        """Adds another session's figures of the same merge (candidates and seconds are the merge's own)."""
        for name in self._ADDED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for level, c in other.cascaded.items():
            self.cascaded.setdefault(level, Counter()).update(c)

    def add_early(self, early: dict[str, Any], chunks: int) -> None:
        """Adds the figures of ``chunks`` chunks merged early in one merge (its ``as_dict``) to the level's."""
        self.add(MergeCounts(**{name: early[name] for name in self._ADDED},
                             cascaded={level: Counter(c) for level, c in early["cascaded"].items()}))  # fmt: skip
        self.candidates += early["candidates"]
        self.early_chunks += chunks
        self.early_merges += 1
        self.early_candidates += early["candidates"]
        self.early_seconds += early["seconds"]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k != "cascaded"}
        for name in ("seconds", "build_seconds", "write_seconds", "early_seconds"):
            out[name] = round(getattr(self, name), 6)  # a small level's writes take well under a millisecond
        out["cascaded"] = {level: dict(c) for level, c in self.cascaded.items()}
        return out


class _Sql:
    """The statements of one level's merge, composed once with quoted identifiers.

    ``staged_rows`` is the relation of staged rows the merge takes (the staging table, or a
    subquery of some of its chunks, aliased); ``with_pending``: the level's pending records join them.
    """

    def __init__(
        self,
        s: LevelSpec,
        staged_rows: sql.Composable,
        work: sql.Identifier,
        parent_lookup: str,
        *,
        with_pending: bool = True,
    ) -> None:
        self.s = s
        self.staged_rows, self.work, self.with_pending = staged_rows, work, with_pending
        cols = s.column_names
        self.table = _I(A_SCHEMA, s.table)
        staged = ("source_key", "source_updated_at", "deleted", "new_id", *staged_columns(s.level))
        staged_list = sql.SQL(", ").join(map(_I, staged))
        self.pending = pending = _I(SCHEMA, f"pending_{s.level}")

        pending_part: Query = sql.SQL("")
        if s.parent_level and with_pending:
            pending_part = sql.SQL("UNION ALL SELECT {cols}, true FROM {pending} WHERE source_system = %(src)s").format(
                cols=staged_list, pending=pending
            )
        # The work: the newest version of each record, numbered in key order into batches, with
        # its parent resolved once for the whole merge (a hash join here; per batch, resolving
        # parents cost more than deciding against A).
        dedup = sql.SQL(
            """
            SELECT x.*, ((row_number() OVER (ORDER BY x.source_key)) - 1) / %(batch)s AS batch
            FROM (
                SELECT DISTINCT ON (source_key) *
                FROM (SELECT {cols}, false AS from_pending FROM {staged} {pending_part}) u
                ORDER BY source_key, source_updated_at DESC, deleted DESC, from_pending
            ) x
            """
        ).format(cols=staged_list, staged=staged_rows, pending_part=pending_part)
        if s.parent_level:
            parent = spec(s.parent_level)
            lookup = _I(parent_lookup)
            # Prefer the live parent when several rows share the lookup value (B's series_uid is
            # unique among live series only), then the newest. The keys come from the narrow
            # scans of staging and pending, not from the deduplicated rows (a second pass over them).
            pending_parents: Query = sql.SQL("")
            if with_pending:
                pending_parents = sql.SQL("UNION SELECT parent_key FROM {} WHERE source_system = %(src)s").format(
                    pending
                )
            self.build_work = sql.SQL(
                """
                CREATE UNLOGGED TABLE {work} AS
                SELECT d.*, par.id AS p_id, par.deleted_at AS p_deleted_at
                FROM ({dedup}) d
                LEFT JOIN (
                    SELECT DISTINCT ON (p.{lookup}) p.{lookup} AS parent_key, p.id, p.deleted_at
                    FROM {ptable} p
                    WHERE p.source_system = %(src)s
                      AND p.{lookup} IN (SELECT parent_key FROM {staged} WHERE NOT deleted {pending_parents})
                    ORDER BY p.{lookup}, (p.deleted_at IS NULL) DESC, p.source_updated_at DESC
                ) par ON par.parent_key = d.parent_key
                """
            ).format(
                work=work,
                dedup=dedup,
                lookup=lookup,
                ptable=_I(A_SCHEMA, parent.table),
                staged=staged_rows,
                pending_parents=pending_parents,
            )
            parent_cols: Query = sql.SQL("a.{fk} AS a_parent_id").format(fk=_I(s.parent_fk or ""))
        else:
            self.build_work = sql.SQL(
                "CREATE UNLOGGED TABLE {work} AS"
                " SELECT d.*, NULL::uuid AS p_id, NULL::timestamptz AS p_deleted_at FROM ({dedup}) d"
            ).format(work=work, dedup=dedup)
            parent_cols = sql.SQL("NULL::uuid AS a_parent_id")

        a_cols = sql.SQL(", ").join(sql.SQL("a.{c} AS {ac}").format(c=_I(c), ac=_I(f"a_{c}")) for c in cols)
        # A tombstone carries no content: the row keeps what it had.
        new_cols = sql.SQL(", ").join(
            sql.SQL("CASE WHEN x.own_deleted THEN x.{ac} ELSE x.{c} END AS {nc}").format(
                c=_I(c), ac=_I(f"a_{c}"), nc=_I(f"n_{c}")
            )
            for c in cols
        )
        decide = sql.SQL(
            """
            SELECT y.*,
                   CASE
                     WHEN y.stale THEN 'stale'
                     WHEN y.own_deleted AND y.a_id IS NULL THEN 'tombstone_only'
                     WHEN NOT y.own_deleted AND y.n_parent_id IS NULL AND {has_parent} THEN 'pending'
                     WHEN y.a_id IS NULL THEN 'insert'
                     WHEN ({a_tuple}, y.a_parent_id, y.a_deleted_at, y.a_version)
                          IS NOT DISTINCT FROM ({n_tuple}, y.n_parent_id, y.n_deleted_at, y.n_version)
                       THEN 'unchanged'
                     ELSE 'update'
                   END AS action
            FROM (
                SELECT x.*, {new_cols},
                       CASE WHEN x.own_deleted THEN x.a_parent_id ELSE x.p_id END AS n_parent_id,
                       CASE WHEN x.own_deleted THEN COALESCE(x.a_deleted_at, x.source_updated_at)
                            WHEN x.p_deleted_at IS NOT NULL THEN COALESCE(x.a_deleted_at, x.p_deleted_at)
                       END AS n_deleted_at,
                       GREATEST(x.a_version, x.source_updated_at) AS n_version
                FROM (
                    SELECT w.*, a.id AS a_id, a.deleted_at AS a_deleted_at, a.source_updated_at AS a_version,
                           {a_cols}, {parent_cols}, t.source_updated_at AS t_version,
                           COALESCE(w.source_updated_at < GREATEST(a.source_updated_at, t.source_updated_at),
                                    false) AS stale,
                           w.deleted OR COALESCE(t.source_updated_at >= w.source_updated_at, false) AS own_deleted
                    FROM {work} w {against_a}
                    WHERE w.batch = %(batch)s
                ) x
            ) y
            """
        )
        # One index probe per record, whatever the statistics say: a first load grows A's
        # table faster than ANALYZE runs, and a join planned on stale statistics scanned
        # the whole table for every batch. (source_system, source_key) is unique, so
        # LIMIT 1 changes no result; it only keeps the lookup a lookup. ``{only}`` limits
        # which records A is probed for.
        probes = sql.SQL(
            """
            LEFT JOIN LATERAL (
                SELECT * FROM {table} a0
                WHERE {only} a0.source_system = %(src)s AND a0.source_key = w.source_key
                LIMIT 1
            ) a ON true
            LEFT JOIN LATERAL (
                SELECT t0.source_updated_at FROM medsync.tombstone t0
                WHERE t0.source_system = %(src)s AND t0.level = %(level)s AND t0.source_key = w.source_key
                LIMIT 1
            ) t ON true
            """
        )
        probed = probes.format(table=self.table, only=sql.SQL(""))
        # A chunk merged while its level is pulled (a first load of it, medsync.early_merge) expects
        # its live records to be new to A: A is probed for its tombstones only. A live record that A
        # has after all (it changed while the level was pulled, so an earlier chunk brought it)
        # fails the batch's insert on A's unique key, and the batch is then decided with ``probed``.
        probed_for_tombstones = probes.format(table=self.table, only=sql.SQL("w.deleted AND"))
        # A level that holds no row and no tombstone of the source (a first load) has nothing to
        # probe: the same decisions with every probe empty, which is what these joins give.
        unprobed = sql.SQL("LEFT JOIN {table} a ON false LEFT JOIN medsync.tombstone t ON false").format(
            table=self.table
        )
        parts = {
            "has_parent": sql.SQL("true" if s.parent_level else "false"),
            "a_tuple": sql.SQL(", ").join(_I("y", f"a_{c}") for c in cols),
            "n_tuple": sql.SQL(", ").join(_I("y", f"n_{c}") for c in cols),
            "new_cols": new_cols,
            "a_cols": a_cols,
            "parent_cols": parent_cols,
            "work": work,
        }
        self.decide_select = decide.format(against_a=probed, **parts)
        self.decide = sql.SQL("INSERT INTO merge_decided {}").format(self.decide_select)
        self.decide_expecting_new = sql.SQL("INSERT INTO merge_decided {}").format(
            decide.format(against_a=probed_for_tombstones, **parts)
        )
        self.create_decided = sql.SQL("CREATE TEMP TABLE merge_decided AS {} WITH NO DATA").format(self.decide_select)
        # A batch's statements read its decisions from the session's merge_decided, filled by
        # ``decide``; a first-load batch reads them straight from the work table instead (no
        # probe into A, and no pass writing and reading merge_decided). Unprobed, the decisions
        # read nothing but the work table, so each statement of the batch sees the same ones,
        # before and after the batch's own inserts. A statement added to a batch must read them
        # through ``_BatchSql`` (``{decided}``), not from merge_decided, which a first load leaves empty.
        self.probed = _BatchSql(s, self.table, sql.SQL("merge_decided d"))
        self.first_load = _BatchSql(s, self.table, sql.SQL("({}) d").format(decide.format(against_a=unprobed, **parts)))


class _BatchSql:
    """The statements that apply one batch's decisions, read from ``decided`` (a relation aliased ``d``)."""

    def __init__(self, s: LevelSpec, table: sql.Identifier, decided: sql.Composable) -> None:
        cols = s.column_names
        staged = ("source_key", "source_updated_at", "deleted", "new_id", *staged_columns(s.level))
        pending = _I(SCHEMA, f"pending_{s.level}")
        self.pending_clear: Query | None = None
        self.pending_keep: Query | None = None

        fk = [_I(s.parent_fk)] if s.parent_fk else []
        insert_cols = [_I("id"), _I("source_system"), _I("source_key"), *fk, *map(_I, cols)]
        insert_cols += [_I("source_updated_at"), _I("deleted_at"), _I("created_at"), _I("updated_at")]
        insert_vals = [sql.SQL("new_id"), sql.SQL("%(src)s"), _I("source_key")]
        insert_vals += [sql.SQL("n_parent_id")] if s.parent_fk else []
        insert_vals += [_I(f"n_{c}") for c in cols]
        insert_vals += [sql.SQL("n_version"), sql.SQL("n_deleted_at"), sql.SQL("now()"), sql.SQL("now()")]
        self.insert = sql.SQL(
            "INSERT INTO {table} ({cols}) SELECT {vals} FROM {decided} WHERE action = 'insert'"
        ).format(
            table=table, cols=sql.SQL(", ").join(insert_cols), vals=sql.SQL(", ").join(insert_vals), decided=decided
        )

        sets: list[Query] = [sql.SQL("{c} = d.{nc}").format(c=_I(c), nc=_I(f"n_{c}")) for c in cols]
        if s.parent_fk:
            sets.append(sql.SQL("{fk} = d.n_parent_id").format(fk=_I(s.parent_fk)))
        sets += [
            sql.SQL("source_updated_at = d.n_version"),
            sql.SQL("deleted_at = d.n_deleted_at"),
            sql.SQL("updated_at = now()"),
        ]
        self.update = sql.SQL(
            "UPDATE {table} a SET {sets} FROM {decided} WHERE d.action = 'update' AND a.id = d.a_id"
        ).format(table=table, sets=sql.SQL(", ").join(sets), decided=decided)

        if s.parent_level:
            pcols = sql.SQL(", ").join(map(_I, ("source_system", *staged)))
            pvals = sql.SQL(", ").join([sql.SQL("%(src)s"), *map(_I, staged)])
            pupdate = sql.SQL(", ").join(sql.SQL("{c} = excluded.{c}").format(c=_I(c)) for c in staged)
            self.pending_clear = sql.SQL(
                "DELETE FROM {p} pe USING {decided} WHERE pe.source_system = %(src)s"
                " AND pe.source_key = d.source_key AND d.action <> 'pending'"
            ).format(p=pending, decided=decided)
            self.pending_keep = sql.SQL(
                "INSERT INTO {p} ({cols}) SELECT {vals} FROM {decided} WHERE action = 'pending'"
                " ON CONFLICT (source_system, source_key) DO UPDATE SET {upd}"
            ).format(p=pending, cols=pcols, vals=pvals, upd=pupdate, decided=decided)
        self.count_actions = sql.SQL(_COUNT_ACTIONS).format(decided=decided)
        self.tombstones_remember = sql.SQL(_TOMBSTONES_REMEMBER).format(decided=decided)
        self.tombstones_forget = sql.SQL(_TOMBSTONES_FORGET).format(decided=decided)
        self.quarantine_resolve = sql.SQL(_QUARANTINE_RESOLVE_BATCH).format(decided=decided)
        self.flipped = sql.SQL(_FLIPPED_FROM_BATCH).format(decided=decided)


_DROP_SESSION_TABLES = "DROP TABLE IF EXISTS merge_decided, merge_flipped, merge_flipped_next, merge_cascade"

_TOMBSTONES_REMEMBER = """
INSERT INTO medsync.tombstone AS t (source_system, level, source_key, source_updated_at)
SELECT %(src)s, %(level)s, source_key, source_updated_at FROM {decided}
WHERE action <> 'stale' AND own_deleted
ON CONFLICT (source_system, level, source_key) DO UPDATE SET source_updated_at = excluded.source_updated_at
WHERE t.source_updated_at < excluded.source_updated_at
"""

_TOMBSTONES_FORGET = """
DELETE FROM medsync.tombstone t USING {decided}
WHERE t.source_system = %(src)s AND t.level = %(level)s AND t.source_key = d.source_key
  AND d.action <> 'stale' AND NOT d.own_deleted
"""

# A quarantined version is settled once a version at least as new got past validation.
_QUARANTINE_RESOLVE_BATCH = """
UPDATE medsync.quarantine q SET resolved_at = now(), resolved_run_id = %(run)s, updated_at = now()
FROM {decided}
WHERE q.source_system = %(src)s AND q.level = %(level)s AND q.source_key = d.source_key
  AND q.resolved_at IS NULL
  AND (q.source_updated_at IS NULL OR q.source_updated_at <= d.source_updated_at)
"""

# Per action: records, deletions, undeletions, and the tombstones the batch must remember or forget
# (so that statements with nothing to do are not run: most batches only insert, or change nothing).
_COUNT_ACTIONS = """
SELECT action, count(*),
       count(*) FILTER (WHERE a_deleted_at IS NULL AND n_deleted_at IS NOT NULL),
       count(*) FILTER (WHERE a_deleted_at IS NOT NULL AND n_deleted_at IS NULL),
       count(*) FILTER (WHERE own_deleted),
       count(*) FILTER (WHERE NOT own_deleted AND t_version IS NOT NULL)
FROM {decided} GROUP BY action
"""

_FLIPPED_FROM_BATCH = """
INSERT INTO merge_flipped (id, deleted_at)
SELECT a_id, n_deleted_at FROM {decided}
WHERE action = 'update' AND (a_deleted_at IS NULL) <> (n_deleted_at IS NULL)
"""


@functools.cache  # composed once per level, like the batch statements, not for every batch that flips rows
def _cascade_statements(child: LevelSpec) -> tuple[sql.Composed, sql.Composed]:
    """Finding, then flipping, the children of the rows in ``merge_flipped`` (one level down).

    Deleted parent: live children follow it. Parent back: children deleted without a
    tombstone of their own come back. Only rows of the same source are touched.

    Both statements are shaped so that no plan can scan the child table, whatever A's
    statistics say (a bulk load leaves them far behind, and a planner that trusted them
    scanned all instances for every batch, to touch a few hundred): the children are found
    through the FK index, one probe per flipped parent (a LATERAL subquery behind OFFSET 0
    cannot be flattened into a join), and updated by primary key (no hash or merge join).
    """
    table, fk = _I(A_SCHEMA, child.table), _I(child.parent_fk or "")
    find = sql.SQL(
        """
        INSERT INTO merge_cascade (id, deleted_at)
        SELECT c.id, f.deleted_at
        FROM merge_flipped f
        CROSS JOIN LATERAL (
            SELECT c0.id, c0.source_system, c0.source_key, c0.deleted_at FROM {table} c0 WHERE c0.{fk} = f.id
            OFFSET 0
        ) c
        WHERE c.source_system = %(src)s
          AND ((f.deleted_at IS NOT NULL AND c.deleted_at IS NULL)
            OR (f.deleted_at IS NULL AND c.deleted_at IS NOT NULL AND NOT EXISTS (
                  SELECT 1 FROM medsync.tombstone t
                  WHERE t.source_system = c.source_system AND t.level = %(child)s AND t.source_key = c.source_key)))
        """
    ).format(table=table, fk=fk)
    flip = sql.SQL(
        """
        WITH changed AS (
            UPDATE {table} c SET deleted_at = m.deleted_at, updated_at = now()
            FROM merge_cascade m
            WHERE c.id = m.id AND (c.deleted_at IS NULL) = (m.deleted_at IS NOT NULL)
            RETURNING c.id, c.deleted_at
        )
        INSERT INTO merge_flipped_next (id, deleted_at) SELECT id, deleted_at FROM changed
        """
    ).format(table=table)
    return find, flip


def _cascade(conn: psycopg.Connection, source: str, level: str, counts: MergeCounts, live: Counter[str]) -> None:
    child_level = spec(level).child_level
    while child_level is not None:
        if conn.execute("SELECT NOT EXISTS (SELECT 1 FROM merge_flipped)").fetchone() == (True,):
            return
        child = spec(child_level)
        find, flip = _cascade_statements(child)
        params = {"src": source, "child": child_level}
        conn.execute("ANALYZE merge_flipped")
        conn.execute(find, params)
        conn.execute("ANALYZE merge_cascade")
        # By primary key, one probe per child: for a few thousand children the planner still
        # preferred a hash join over a scan of the whole child table (0.15 s at 300,000
        # instances against 0.06 s, and growing with A).
        conn.execute("SET LOCAL enable_hashjoin = off")
        conn.execute("SET LOCAL enable_mergejoin = off")
        conn.execute(flip, params)
        conn.execute("RESET enable_hashjoin")
        conn.execute("RESET enable_mergejoin")
        conn.execute("TRUNCATE merge_cascade")
        deleted, undeleted = conn.execute(
            "SELECT count(*) FILTER (WHERE deleted_at IS NOT NULL), count(*) FILTER (WHERE deleted_at IS NULL)"
            " FROM merge_flipped_next"
        ).fetchone() or (0, 0)
        bucket = counts.cascaded.setdefault(child_level, Counter())
        bucket["deleted"] += deleted
        bucket["undeleted"] += undeleted
        live[child_level] += undeleted - deleted
        conn.execute("TRUNCATE merge_flipped")
        conn.execute("INSERT INTO merge_flipped SELECT * FROM merge_flipped_next")
        conn.execute("TRUNCATE merge_flipped_next")
        child_level = child.child_level
    conn.execute("TRUNCATE merge_flipped")


def work_table(source: str, level: str, run_id: int, *, early: bool = False) -> sql.Identifier:
    """The merge's scratch table in medsync's schema: the records to decide, with their parents, in batches.

    ``early``: the table of a chunk merged while the level is still pulled (one at a time per
    source: they hold the source lock).
    """
    return _I(SCHEMA, f"merge_{source}_{level}_r{run_id}{'_early' if early else ''}")


def drop_work_tables(conn: psycopg.Connection, source: str, run_id: int) -> None:
    """Drops what a merge of the run left behind (it drops its own tables unless its process died)."""
    tables = sql.SQL(", ").join(
        work_table(source, level, run_id, early=early) for level in SPECS for early in (False, True)
    )
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(tables))


@dataclass(frozen=True)
class Chunks:
    """Committed staging chunks ``first`` to ``last`` of a pull's slice (``medsync.early_merge``)."""

    slice: int
    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


def _staged_rows(stage: sql.Identifier, *, chunks: Chunks | None, leave_out_merged: bool) -> sql.Composable:
    """The relation of staged rows a merge takes: all, some chunks, or all but the chunks merged early."""
    if chunks is not None:
        return sql.SQL(
            "(SELECT * FROM {} WHERE slice = %(slice)s AND chunk BETWEEN %(first_chunk)s AND %(last_chunk)s) staged"
        ).format(stage)
    if leave_out_merged:
        return sql.SQL(
            "(SELECT * FROM {} s WHERE NOT EXISTS (SELECT 1 FROM medsync.early_merge_chunk m"
            " WHERE m.run_id = %(run)s AND m.level = %(level)s AND m.slice = s.slice"
            " AND s.chunk BETWEEN m.first_chunk AND m.last_chunk)) staged"
        ).format(stage)
    return stage


def merge_level(
    conn: psycopg.Connection,
    *,
    source: str,
    level: str,
    run_id: int,
    batch_size: int = 20_000,
    lock_timeout_seconds: int = 1800,
    sessions: int = 1,
    connect: Callable[[], psycopg.Connection] | None = None,
    parent_lookup: str = "source_key",
    child_lookup: str = "source_key",
    chunks: Chunks | None = None,
    refuse_older_than_a: bool = False,
) -> MergeCounts:
    """Merges this run's staging table (and the level's pending records) into A.

    ``chunks``: merge only those committed chunks of the staging table, while the level is still
    pulled (``medsync.early_merge``), without the pending records; they are then recorded as
    merged, with the merge's counts. Without it, the merge leaves out the chunks merged early
    and adds their counts to its own.

    ``refuse_older_than_a`` (a full refresh): when any record is older than what A holds of it
    (the source went back in time), raises ``SourceBehindError`` with how many, before any
    batch writes, so that none of the level's rows changes, not even those the source has newer.

    ``parent_lookup`` is the column of the parent's table that a staged ``parent_key`` matches
    (the source's ``ParentLink``: ``source_key``, or a UID column such as ``series_uid``).
    ``child_lookup`` is the same for the child level (its records name this level's rows by it):
    when it is a UID column, children linked to a deleted row of this level follow the live row
    that took over their UID (:func:`_follow_new_parents`).

    ``conn`` must be in autocommit mode and used by nothing else meanwhile: the source
    lock and the temporary tables belong to its session. With ``sessions`` > 1 and a
    ``connect`` that opens more such connections, the batches are shared out among that
    many sessions, each on a thread of its own: a batch holds each record once and the
    records' keys are unique in the work table, so concurrent batches touch disjoint rows.
    """
    started = time.monotonic()
    s = spec(level)
    stage = staging_table(source, level, run_id)
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{SCHEMA}.{staging_table_name(source, level, run_id)}",)
    ).fetchone()
    if exists != (True,):
        raise MergeError(
            f"staging table for {source}/{level} of run {run_id} is missing "
            "(the database restarted, or the pull did not run): clear the pull task to re-run it"
        )
    work = work_table(source, level, run_id, early=chunks is not None)
    if parent_lookup not in ("source_key", *(spec(s.parent_level).column_names if s.parent_level else ())):
        raise MergeError(f"{level}: parents cannot be looked up by {parent_lookup!r}")
    if child_lookup not in ("source_key", *(s.column_names if s.child_level else ())):
        raise MergeError(f"{level}: its children cannot look it up by {child_lookup!r}")
    params: dict[str, Any] = {"src": source, "level": level, "run": run_id}
    if chunks is not None:
        params.update(slice=chunks.slice, first_chunk=chunks.first, last_chunk=chunks.last)
    counts = MergeCounts()
    with source_lock(conn, source, lock_timeout_seconds):
        early = ledger.merged_early(conn, run_id, level) if chunks is None else []
        q = _Sql(
            s, _staged_rows(stage, chunks=chunks, leave_out_merged=bool(early)), work, parent_lookup,
            with_pending=chunks is None,
        )  # fmt: skip
        try:
            batches = _build_work(conn, q, params, _rows_per_batch(conn, q, params, batch_size, sessions), counts)
            if refuse_older_than_a and (older := _older_than_a(conn, q, params)):
                raise SourceBehindError(source_behind_message(source, {level: older}))
            counts.build_seconds = time.monotonic() - started
            more = [connect] * (min(sessions, batches) - 1) if connect is not None else []
            _run_batches(conn, q, params, more=more, batches=batches, counts=counts, expecting_new=chunks is not None)
            if chunks is not None:
                counts.seconds = time.monotonic() - started
                ledger.record_merged_chunks(conn, run_id, level, chunks=(chunks.slice, chunks.first, chunks.last),
                                            counts=counts.as_dict())  # fmt: skip
                return counts
            if child_lookup != "source_key" and batches:
                # After every batch committed: a UID's old and new rows may sit in batches of
                # different sessions, and neither session sees the other's row before it commits.
                with conn.transaction():
                    _follow_new_parents(conn, q, params, child_lookup, counts)
            with conn.transaction():
                counts.quarantine_resolved += _resolve_superseded_quarantine(conn, s, params)
        finally:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(work))
    for figures, merged_chunks in early:
        counts.add_early(figures, merged_chunks)
    counts.seconds = time.monotonic() - started
    log.info(
        "merged %s: %d candidates in %d batches (%d sessions): %d inserted, %d updated (%d deleted, %d undeleted), "
        "%d unchanged, %d stale, %d pending, %d tombstones of unstored records, cascaded %s in %.1fs "
        "(work table %.1fs, writing A's rows %.1f session-s)",
        level, counts.candidates, counts.batches, counts.sessions, counts.inserted, counts.updated, counts.deleted,
        counts.undeleted, counts.unchanged, counts.stale, counts.pending, counts.tombstones_only,
        {k: dict(v) for k, v in counts.cascaded.items()}, counts.seconds, counts.build_seconds, counts.write_seconds,
    )  # fmt: skip
    return counts


def _rows_per_batch(conn: psycopg.Connection, q: _Sql, params: dict[str, Any], batch_size: int, sessions: int) -> int:
    """``batch_size``, or less so that a merge of a few batches' worth still keeps every session busy.

    Counted before deduplication (an upper bound); below ``MIN_SHARED_BATCH`` records a
    batch is not split, as a session costs more to start than it would save.
    """
    if sessions <= 1:
        return batch_size
    pending: Query = sql.SQL("")
    if q.s.parent_level and q.with_pending:
        pending = sql.SQL(" + (SELECT count(*) FROM {} WHERE source_system = %(src)s)").format(q.pending)
    row = conn.execute(sql.SQL("SELECT (SELECT count(*) FROM {}){}").format(q.staged_rows, pending), params).fetchone()
    records = int(row[0]) if row else 0
    return min(batch_size, max(MIN_SHARED_BATCH, -(-records // sessions)))


def _hash_joins_in_memory(conn: psycopg.Connection) -> None:
    """For the rest of the transaction: the work table's joins as hash joins, in memory."""
    # One statement sorts and hashes the whole load: at the default 4 MB it spilled to disk.
    conn.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(BUILD_WORK_MEM)))
    # Unanalysed staging makes the planner expect ~200 deduplicated records, and a nested
    # loop over the parents then costs records x parents; the joins here are hash joins.
    conn.execute("SET LOCAL enable_nestloop = off")


def _build_work(conn: psycopg.Connection, q: _Sql, params: dict[str, Any], batch_size: int, counts: MergeCounts) -> int:
    """The work table (deduplicated, parents resolved, numbered in batches); returns the number of batches."""
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(q.work))
    with conn.transaction():
        _hash_joins_in_memory(conn)
        # Its row count is the number of records; they are numbered 0.. in key order, so the
        # batches are that many over batch_size (no count of the table afterwards).
        counts.candidates = conn.execute(q.build_work, {**params, "batch": batch_size}).rowcount
        conn.execute(sql.SQL("CREATE INDEX ON {} (batch)").format(q.work))
        # The batch column's statistics are all the batch statements' plans need; the sample of
        # every column cost 0.2 s more at 300,000 records.
        conn.execute(sql.SQL("ANALYZE {} (batch)").format(q.work))
    return -(-counts.candidates // batch_size)


def _run_batches(
    conn: psycopg.Connection,
    q: _Sql,
    params: dict[str, Any],
    *,
    more: list[Callable[[], psycopg.Connection]],
    batches: int,
    counts: MergeCounts,
    expecting_new: bool = False,
) -> None:
    """Applies every batch, on ``conn`` and on one more session per ``more`` (threads).

    A failed batch stops the others after their current batch; what committed stays (a
    re-run decides against A's current rows and converges) and the first error is raised.
    ``expecting_new``: each batch is first decided expecting its live records to be new to A
    (``_Sql.decide_expecting_new``), and decided again with every probe if one is not.
    """
    pending_rows = q.s.parent_level is not None and _has_pending_rows(conn, q, params["src"])
    first_load = holds_nothing_of_the_source(conn, params["src"], q.s.level)
    todo = iter(range(batches))
    take = threading.Lock()
    stop = threading.Event()
    errors: list[Exception] = []
    per_session = [MergeCounts() for _ in range(1 + len(more))]

    def work(session: psycopg.Connection, mine: MergeCounts) -> None:
        _open_session(session, q, params)
        try:
            while not stop.is_set():
                with take:
                    batch = next(todo, None)
                if batch is None:
                    return
                batch_params = {**params, "batch": batch}
                attempt = MergeCounts()
                try:
                    with session.transaction():
                        _merge_batch(session, q, batch_params, attempt, pending_rows=pending_rows,
                                     first_load=first_load, expecting_new=expecting_new and not first_load)  # fmt: skip
                except psycopg.errors.UniqueViolation:
                    if not expecting_new or first_load:
                        raise
                    # A live record A had after all (it changed while its level was pulled): the
                    # batch rolled back; decided again against everything A holds.
                    attempt = MergeCounts()
                    with session.transaction():
                        _merge_batch(session, q, batch_params, attempt, pending_rows=pending_rows, first_load=False)
                mine.add(attempt)
                mine.batches += 1
        finally:
            _close_session(session)

    def work_elsewhere(connect: Callable[[], psycopg.Connection], mine: MergeCounts) -> None:
        try:
            with connect() as session:
                work(session, mine)
        except Exception as exc:  # noqa: BLE001  (handed to the calling thread, which raises it)
            errors.append(exc)
            stop.set()

    threads = [
        threading.Thread(target=work_elsewhere, args=(c, mine), name=f"merge-{q.s.level}-{i + 1}", daemon=True)
        for i, (c, mine) in enumerate(zip(more, per_session[1:], strict=True))
    ]
    for thread in threads:
        thread.start()
    try:
        work(conn, per_session[0])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for mine in per_session:
            counts.add(mine)
        counts.sessions = len(per_session)
    if errors:
        raise errors[0]


def _open_session(conn: psycopg.Connection, q: _Sql, params: dict[str, Any]) -> None:
    """Session settings and the per-batch temporary tables of one merge session."""
    # The batch statements are many and short: compiling them (JIT) cost more than it saved.
    conn.execute("SET jit = off")
    _use_larger_temp_buffers(conn)
    conn.execute(_DROP_SESSION_TABLES)
    with conn.transaction():
        conn.execute(q.create_decided, {**params, "batch": -1})
        conn.execute("CREATE TEMP TABLE merge_flipped (id uuid, deleted_at timestamptz)")
        conn.execute("CREATE TEMP TABLE merge_flipped_next (id uuid, deleted_at timestamptz)")
        conn.execute("CREATE TEMP TABLE merge_cascade (id uuid, deleted_at timestamptz)")


def _close_session(conn: psycopg.Connection) -> None:
    if not conn.closed:
        conn.execute(_DROP_SESSION_TABLES)
        conn.execute("RESET jit")


def _decide(
    conn: psycopg.Connection,
    q: _Sql,
    params: dict[str, Any],
    counts: MergeCounts,
    *,
    first_load: bool,
    expecting_new: bool = False,
) -> _BatchSql:
    """The batch's statements, reading its decisions: stored in ``merge_decided`` first, unless a first load.

    ``expecting_new``: A is probed for the batch's tombstones only (see ``_Sql.decide_expecting_new``).
    """
    if first_load:
        counts.first_load_batches += 1
        return q.first_load
    conn.execute("TRUNCATE merge_decided")
    conn.execute(q.decide_expecting_new if expecting_new else q.decide, params)
    return q.probed


def _merge_batch(
    conn: psycopg.Connection,
    q: _Sql,
    params: dict[str, Any],
    counts: MergeCounts,
    *,
    pending_rows: bool,
    first_load: bool,
    expecting_new: bool = False,
) -> None:
    """Decides one batch against A's current rows and applies it.

    Each statement after the decision runs only when the batch's counts say it has rows to
    touch; ``pending_rows`` says whether the level's pending table held rows of the source
    when the merge began (only this merge, under the source lock, adds to it meanwhile).
    ``first_load``: the level held no row and no tombstone of the source when the merge began,
    so no probe can find one (only this merge writes them, and only its own batches' keys);
    the decisions are then read from the work table as they are needed, not stored first.
    ``expecting_new``: see ``_Sql.decide_expecting_new`` (the caller redoes the batch without it
    when A's unique key refuses an insert).
    """
    b = _decide(conn, q, params, counts, first_load=first_load, expecting_new=expecting_new)
    batch: Counter[str] = Counter()
    live: Counter[str] = Counter()  # the change of A's live rows, per level (medsync.live_count)
    level = q.s.level
    remember = forget = flipped = 0
    for action, n, became_deleted, came_back, own_deleted, tombstoned in conn.execute(b.count_actions, params):
        batch[action] += n
        if action == "insert":
            counts.deleted += became_deleted
            live[level] += n - became_deleted
        elif action == "update":
            counts.deleted += became_deleted
            counts.undeleted += came_back
            live[level] += came_back - became_deleted
            flipped += became_deleted + came_back
        if action != "stale":
            remember += own_deleted
            forget += tombstoned
    counts.inserted += batch["insert"]
    counts.updated += batch["update"]
    counts.unchanged += batch["unchanged"]
    counts.stale += batch["stale"]
    counts.pending += batch["pending"]
    counts.tombstones_only += batch["tombstone_only"]
    if batch["insert"] or batch["update"]:
        counts.write_seconds += _write_rows(conn, b, params, insert=batch["insert"] > 0, update=batch["update"] > 0)
    if remember:
        conn.execute(b.tombstones_remember, params)
    if forget:
        conn.execute(b.tombstones_forget, params)
    if b.pending_clear is not None and b.pending_keep is not None:
        if pending_rows:
            conn.execute(b.pending_clear, params)
        if batch["pending"]:
            conn.execute(b.pending_keep, params)
    cur = conn.execute(b.quarantine_resolve, params)
    counts.quarantine_resolved += cur.rowcount
    if flipped:
        conn.execute(b.flipped, params)
        _cascade(conn, params["src"], level, counts, live)
    live_count.add(conn, params["src"], live)


def _follow_new_parents(
    conn: psycopg.Connection, q: _Sql, params: dict[str, Any], child_lookup: str, counts: MergeCounts
) -> None:
    """Re-points children linked to a deleted row of this level to the live row that took over its UID.

    A child names its parent by a UID (``child_lookup``, B's images by ``series_uid``), and the
    parent a UID resolves to is the live row with it, then the newest (as in the merge's own parent
    lookup). When a UID of this merge's records now resolves to a live row, the source's children
    still linked to a deleted row with that UID move to it, without waiting for them to change.
    A moved child comes back to life unless it has a tombstone of its own (it was deleted only
    because of its old parent: a-model.md's cascade rule), and its own children follow it.
    Writes nothing when no child needs to move, so a re-run changes nothing.
    """
    s = q.s
    child = spec(s.child_level or "")
    uid, table, ctable, fk = _I(child_lookup), q.table, _I(A_SCHEMA, child.table), _I(child.parent_fk or "")
    conn.execute(
        "CREATE TEMP TABLE merge_followed (id uuid, parent_id uuid, was_deleted boolean, deleted_at timestamptz)"
        " ON COMMIT DROP"
    )
    conn.execute(
        sql.SQL(
            """
            INSERT INTO merge_followed (id, parent_id, was_deleted, deleted_at)
            SELECT c.id, lp.id, c.deleted_at IS NOT NULL,
                   CASE WHEN EXISTS (SELECT 1 FROM medsync.tombstone t WHERE t.source_system = c.source_system
                                       AND t.level = %(child)s AND t.source_key = c.source_key)
                        THEN c.deleted_at END
            FROM (
                SELECT DISTINCT ON (p.{uid}) p.{uid} AS uid, p.id, p.deleted_at
                FROM {table} p
                WHERE p.source_system = %(src)s
                  -- The UIDs of this merge's records as A has them now (a tombstone carries none).
                  AND p.{uid} IN (SELECT a.{uid} FROM {work} w JOIN {table} a
                                  ON a.source_system = %(src)s AND a.source_key = w.source_key)
                ORDER BY p.{uid}, (p.deleted_at IS NULL) DESC, p.source_updated_at DESC
            ) lp
            JOIN {table} old ON old.source_system = %(src)s AND old.{uid} = lp.uid
                             AND old.deleted_at IS NOT NULL AND old.id <> lp.id
            JOIN {ctable} c ON c.{fk} = old.id AND c.source_system = %(src)s
            WHERE lp.deleted_at IS NULL
            """
        ).format(uid=uid, table=table, work=q.work, ctable=ctable, fk=fk),
        {**params, "child": child.level},
    )
    moved, came_back = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE was_deleted AND deleted_at IS NULL) FROM merge_followed"
    ).fetchone() or (0, 0)
    if not moved:
        return
    conn.execute(
        sql.SQL(
            "UPDATE {ctable} c SET {fk} = f.parent_id, deleted_at = f.deleted_at, updated_at = now()"
            " FROM merge_followed f WHERE c.id = f.id"
        ).format(ctable=ctable, fk=fk)
    )
    bucket = counts.cascaded.setdefault(child.level, Counter())
    bucket["moved"] += moved
    bucket["undeleted"] += came_back
    live: Counter[str] = Counter({child.level: came_back})
    if came_back and child.child_level is not None:
        conn.execute(_DROP_SESSION_TABLES)
        conn.execute("CREATE TEMP TABLE merge_flipped (id uuid, deleted_at timestamptz) ON COMMIT DROP")
        conn.execute("CREATE TEMP TABLE merge_flipped_next (id uuid, deleted_at timestamptz) ON COMMIT DROP")
        conn.execute("CREATE TEMP TABLE merge_cascade (id uuid, deleted_at timestamptz) ON COMMIT DROP")
        conn.execute(
            "INSERT INTO merge_flipped SELECT id, deleted_at FROM merge_followed"
            " WHERE was_deleted AND deleted_at IS NULL"
        )
        _cascade(conn, params["src"], child.level, counts, live)
    live_count.add(conn, params["src"], live)
    log.info("%s: %d %s rows followed their UID to its live %s (%d back to life)",
             s.level, moved, child.level, s.level, came_back)  # fmt: skip


def _use_larger_temp_buffers(conn: psycopg.Connection) -> None:
    """Keeps a batch's temporary tables in memory.

    PostgreSQL's default (8 MB) is smaller than one batch of decisions (about 14 MB for
    20,000 instances), so every batch wrote its work tables out and read them back. The
    memory is taken only as used, for this session.
    """
    try:
        conn.execute(sql.SQL("SET temp_buffers = {}").format(sql.Literal(MERGE_TEMP_BUFFERS)))
    except psycopg.errors.InvalidParameterValue:
        # This session used temporary tables already; the setting is fixed for its lifetime.
        log.debug("temp_buffers left as they are: the session used temporary tables before the merge")


def _write_rows(conn: psycopg.Connection, q: _BatchSql, params: dict[str, Any], *, insert: bool, update: bool) -> float:
    """Inserts and updates the batch's rows in A's table; returns the seconds it took (``write_seconds``)."""
    started = time.monotonic()
    if insert:
        conn.execute(q.insert, params)
    if update:
        conn.execute(q.update, params)
    return time.monotonic() - started


def holds_nothing_of_the_source(conn: psycopg.Connection, source: str, level: str) -> bool:
    """No row of the source in the level's table and no tombstone of its level: a first load."""
    row = conn.execute(
        sql.SQL(
            "SELECT NOT EXISTS (SELECT 1 FROM {} WHERE source_system = %(src)s)"
            " AND NOT EXISTS (SELECT 1 FROM medsync.tombstone WHERE source_system = %(src)s AND level = %(level)s)"
        ).format(_I(A_SCHEMA, spec(level).table)),
        {"src": source, "level": level},
    ).fetchone()
    return row == (True,)


def _older_than_a(conn: psycopg.Connection, q: _Sql, params: dict[str, Any]) -> int:
    """Records of the work table older than A's row or tombstone of them: the ones the batches
    would decide ``stale`` (the same comparison), counted before any batch runs."""
    if holds_nothing_of_the_source(conn, params["src"], q.s.level):
        return 0  # a first load: nothing in A to be older than
    with conn.transaction():
        # A full refresh compares every record: joined whole (hash joins, one pass over the source's
        # rows of A), not probed record by record (about 5 s for a million records against 1 s).
        _hash_joins_in_memory(conn)
        row = conn.execute(
            sql.SQL(
                """
                SELECT count(*) FROM {work} w
                LEFT JOIN {table} a ON a.source_system = %(src)s AND a.source_key = w.source_key
                LEFT JOIN medsync.tombstone t
                       ON t.source_system = %(src)s AND t.level = %(level)s AND t.source_key = w.source_key
                WHERE w.source_updated_at < GREATEST(a.source_updated_at, t.source_updated_at)
                """
            ).format(work=q.work, table=q.table),
            params,
        ).fetchone()
    return int(row[0]) if row else 0


def _has_pending_rows(conn: psycopg.Connection, q: _Sql, source: str) -> bool:
    row = conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE source_system = %s)").format(q.pending),
        (source,),
    ).fetchone()
    return row == (True,)


def _resolve_superseded_quarantine(conn: psycopg.Connection, s: LevelSpec, params: dict[str, Any]) -> int:
    """Held-back versions older than what A (or the tombstone memory) already has are settled."""
    cur = conn.execute(
        sql.SQL(
            """
            UPDATE medsync.quarantine q SET resolved_at = now(), resolved_run_id = %(run)s, updated_at = now()
            WHERE q.source_system = %(src)s AND q.level = %(level)s AND q.resolved_at IS NULL
              AND q.source_updated_at IS NOT NULL
              AND (EXISTS (SELECT 1 FROM {table} a WHERE a.source_system = q.source_system
                             AND a.source_key = q.source_key AND a.source_updated_at >= q.source_updated_at)
                OR EXISTS (SELECT 1 FROM medsync.tombstone t WHERE t.source_system = q.source_system
                             AND t.level = q.level AND t.source_key = q.source_key
                             AND t.source_updated_at >= q.source_updated_at))
            """
        ).format(table=_I(A_SCHEMA, s.table)),
        params,
    )
    return cur.rowcount
