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
to the newest version per record into a session-temporary work table, parents are
resolved once, then the work is applied in batches of ``batch_size`` records, each
batch one transaction that decides every record against A's *current* rows, so a
crashed merge re-run converges and never regresses anything.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from medsync.errors import MergeError
from medsync.levels import LevelSpec, spec, staged_columns
from medsync.schema import A_SCHEMA, MEDSYNC_LOCK_CLASS, SCHEMA
from medsync.staging import staging_table, staging_table_name

log = logging.getLogger(__name__)

_I = sql.Identifier

MERGE_TEMP_BUFFERS = "64MB"


def source_lock_key(source: str) -> int:
    """Advisory lock id of a source's merges (second half of a two-int key; stable everywhere)."""
    return zlib.crc32(f"merge:{source}".encode()) & 0x7FFFFFFF


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
    seconds: float = 0.0
    cascaded: dict[str, Counter[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k != "cascaded"}
        out["seconds"] = round(self.seconds, 3)
        out["cascaded"] = {level: dict(c) for level, c in self.cascaded.items()}
        return out


class _Sql:
    """The statements of one level's merge, composed once with quoted identifiers."""

    def __init__(self, s: LevelSpec, stage: sql.Identifier) -> None:
        self.s = s
        cols = s.column_names
        self.table = _I(A_SCHEMA, s.table)
        staged = ("source_key", "source_updated_at", "deleted", "new_id", *staged_columns(s.level))
        staged_list = sql.SQL(", ").join(map(_I, staged))
        pending = _I(SCHEMA, f"pending_{s.level}")

        pending_part = sql.SQL("")
        if s.parent_level:
            pending_part = sql.SQL("UNION ALL SELECT {cols}, true FROM {pending} WHERE source_system = %(src)s").format(
                cols=staged_list, pending=pending
            )
        self.build_work = sql.SQL(
            """
            CREATE TEMP TABLE merge_work AS
            SELECT d.*, ((row_number() OVER (ORDER BY d.source_key)) - 1) / %(batch)s AS batch
            FROM (
                SELECT DISTINCT ON (source_key) *
                FROM (SELECT {cols}, false AS from_pending FROM {stage} {pending_part}) u
                ORDER BY source_key, source_updated_at DESC, deleted DESC, from_pending
            ) d
            """
        ).format(cols=staged_list, stage=stage, pending_part=pending_part)

        if s.parent_level:
            parent = spec(s.parent_level)
            lookup = _I(s.parent_lookup)
            # Prefer the live parent when several rows share the lookup value (B's series_uid is
            # unique among live series only), then the newest.
            self.build_parents = sql.SQL(
                """
                CREATE TEMP TABLE merge_parent AS
                SELECT DISTINCT ON (p.{lookup}) p.{lookup} AS parent_key, p.id, p.deleted_at
                FROM {ptable} p
                WHERE p.source_system = %(src)s
                  AND p.{lookup} IN (SELECT DISTINCT parent_key FROM merge_work WHERE NOT deleted)
                ORDER BY p.{lookup}, (p.deleted_at IS NULL) DESC, p.source_updated_at DESC
                """
            ).format(lookup=lookup, ptable=_I(A_SCHEMA, parent.table))
            # A probe of merge_parent's unique index per record, not a join: a hash join read all of
            # the merge's parents for every batch, which grows with the square of the load.
            parent_join = sql.SQL(
                "LEFT JOIN LATERAL (SELECT p0.id, p0.deleted_at FROM merge_parent p0"
                " WHERE p0.parent_key = w.parent_key LIMIT 1) p ON true"
            )
            parent_cols = sql.SQL("p.id AS p_id, p.deleted_at AS p_deleted_at, a.{fk} AS a_parent_id").format(
                fk=_I(s.parent_fk or "")
            )
        else:
            self.build_parents = None
            parent_join = sql.SQL("")
            parent_cols = sql.SQL("NULL::uuid AS p_id, NULL::timestamptz AS p_deleted_at, NULL::uuid AS a_parent_id")

        a_cols = sql.SQL(", ").join(sql.SQL("a.{c} AS {ac}").format(c=_I(c), ac=_I(f"a_{c}")) for c in cols)
        # A tombstone carries no content: the row keeps what it had.
        new_cols = sql.SQL(", ").join(
            sql.SQL("CASE WHEN x.own_deleted THEN x.{ac} ELSE x.{c} END AS {nc}").format(
                c=_I(c), ac=_I(f"a_{c}"), nc=_I(f"n_{c}")
            )
            for c in cols
        )
        self.decide_select = sql.SQL(
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
                    FROM merge_work w
                    -- One index probe per record, whatever the statistics say: a first load grows A's
                    -- table faster than ANALYZE runs, and a join planned on stale statistics scanned
                    -- the whole table for every batch. (source_system, source_key) is unique, so
                    -- LIMIT 1 changes no result; it only keeps the lookup a lookup.
                    LEFT JOIN LATERAL (
                        SELECT * FROM {table} a0 WHERE a0.source_system = %(src)s AND a0.source_key = w.source_key
                        LIMIT 1
                    ) a ON true
                    LEFT JOIN LATERAL (
                        SELECT t0.source_updated_at FROM medsync.tombstone t0
                        WHERE t0.source_system = %(src)s AND t0.level = %(level)s AND t0.source_key = w.source_key
                        LIMIT 1
                    ) t ON true
                    {parent_join}
                    WHERE w.batch = %(batch)s
                ) x
            ) y
            """
        ).format(
            has_parent=sql.SQL("true" if s.parent_level else "false"),
            a_tuple=sql.SQL(", ").join(_I("y", f"a_{c}") for c in cols),
            n_tuple=sql.SQL(", ").join(_I("y", f"n_{c}") for c in cols),
            new_cols=new_cols,
            a_cols=a_cols,
            parent_cols=parent_cols,
            table=self.table,
            parent_join=parent_join,
        )
        self.decide = sql.SQL("INSERT INTO merge_decided {}").format(self.decide_select)
        self.create_decided = sql.SQL("CREATE TEMP TABLE merge_decided AS {} WITH NO DATA").format(self.decide_select)

        fk = [_I(s.parent_fk)] if s.parent_fk else []
        insert_cols = [_I("id"), _I("source_system"), _I("source_key"), *fk, *map(_I, cols)]
        insert_cols += [_I("source_updated_at"), _I("deleted_at"), _I("created_at"), _I("updated_at")]
        insert_vals = [sql.SQL("new_id"), sql.SQL("%(src)s"), _I("source_key")]
        insert_vals += [sql.SQL("n_parent_id")] if s.parent_fk else []
        insert_vals += [_I(f"n_{c}") for c in cols]
        insert_vals += [sql.SQL("n_version"), sql.SQL("n_deleted_at"), sql.SQL("now()"), sql.SQL("now()")]
        self.insert = sql.SQL(
            "INSERT INTO {table} ({cols}) SELECT {vals} FROM merge_decided WHERE action = 'insert'"
        ).format(table=self.table, cols=sql.SQL(", ").join(insert_cols), vals=sql.SQL(", ").join(insert_vals))

        sets = [sql.SQL("{c} = d.{nc}").format(c=_I(c), nc=_I(f"n_{c}")) for c in cols]
        if s.parent_fk:
            sets.append(sql.SQL("{fk} = d.n_parent_id").format(fk=_I(s.parent_fk)))
        sets += [
            sql.SQL("source_updated_at = d.n_version"),
            sql.SQL("deleted_at = d.n_deleted_at"),
            sql.SQL("updated_at = now()"),
        ]
        self.update = sql.SQL(
            "UPDATE {table} a SET {sets} FROM merge_decided d WHERE d.action = 'update' AND a.id = d.a_id"
        ).format(table=self.table, sets=sql.SQL(", ").join(sets))

        if s.parent_level:
            pcols = sql.SQL(", ").join(map(_I, ("source_system", *staged)))
            pvals = sql.SQL(", ").join([sql.SQL("%(src)s"), *map(_I, staged)])
            pupdate = sql.SQL(", ").join(sql.SQL("{c} = excluded.{c}").format(c=_I(c)) for c in staged)
            self.pending_clear = sql.SQL(
                "DELETE FROM {p} pe USING merge_decided d WHERE pe.source_system = %(src)s"
                " AND pe.source_key = d.source_key AND d.action <> 'pending'"
            ).format(p=pending)
            self.pending_keep = sql.SQL(
                "INSERT INTO {p} ({cols}) SELECT {vals} FROM merge_decided WHERE action = 'pending'"
                " ON CONFLICT (source_system, source_key) DO UPDATE SET {upd}"
            ).format(p=pending, cols=pcols, vals=pvals, upd=pupdate)
        else:
            self.pending_clear = self.pending_keep = None


_DROP_WORK_TABLES = (
    "DROP TABLE IF EXISTS merge_work, merge_parent, merge_decided, merge_flipped, merge_flipped_next, merge_cascade"
)

_TOMBSTONES_REMEMBER = """
INSERT INTO medsync.tombstone AS t (source_system, level, source_key, source_updated_at)
SELECT %(src)s, %(level)s, source_key, source_updated_at FROM merge_decided
WHERE action <> 'stale' AND own_deleted
ON CONFLICT (source_system, level, source_key) DO UPDATE SET source_updated_at = excluded.source_updated_at
WHERE t.source_updated_at < excluded.source_updated_at
"""

_TOMBSTONES_FORGET = """
DELETE FROM medsync.tombstone t USING merge_decided d
WHERE t.source_system = %(src)s AND t.level = %(level)s AND t.source_key = d.source_key
  AND d.action <> 'stale' AND NOT d.own_deleted
"""

# A quarantined version is settled once a version at least as new got past validation.
_QUARANTINE_RESOLVE_BATCH = """
UPDATE medsync.quarantine q SET resolved_at = now(), resolved_run_id = %(run)s, updated_at = now()
FROM merge_decided d
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
FROM merge_decided GROUP BY action
"""

_FLIPPED_FROM_BATCH = """
INSERT INTO merge_flipped (id, deleted_at)
SELECT a_id, n_deleted_at FROM merge_decided
WHERE action = 'update' AND (a_deleted_at IS NULL) <> (n_deleted_at IS NULL)
"""


def _cascade_statements(child: LevelSpec) -> tuple[sql.Composed, sql.Composed]:
    """Finding, then flipping, the children of the rows in ``merge_flipped`` (one level down).

    Deleted parent: live children follow it. Parent back: children deleted without a
    tombstone of their own come back. Only rows of the same source are touched.

    Both statements are shaped so that no plan can scan the child table, whatever A's
    statistics say (a bulk load leaves them far behind, and a planner that trusted them
    scanned all instances for every batch, to touch a few hundred): the children are found
    through the FK index, one probe per flipped parent (a LATERAL subquery behind OFFSET 0
    cannot be flattened into a join), and updated by primary key from an analysed table.
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


def _cascade(conn: psycopg.Connection, source: str, level: str, counts: MergeCounts) -> None:
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
        conn.execute(flip, params)
        conn.execute("TRUNCATE merge_cascade")
        deleted, undeleted = conn.execute(
            "SELECT count(*) FILTER (WHERE deleted_at IS NOT NULL), count(*) FILTER (WHERE deleted_at IS NULL)"
            " FROM merge_flipped_next"
        ).fetchone() or (0, 0)
        bucket = counts.cascaded.setdefault(child_level, Counter())
        bucket["deleted"] += deleted
        bucket["undeleted"] += undeleted
        conn.execute("TRUNCATE merge_flipped")
        conn.execute("INSERT INTO merge_flipped SELECT * FROM merge_flipped_next")
        conn.execute("TRUNCATE merge_flipped_next")
        child_level = child.child_level
    conn.execute("TRUNCATE merge_flipped")


def _lock_source(conn: psycopg.Connection, source: str, lock_timeout_seconds: int) -> None:
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(lock_timeout_seconds)}s")))
    try:
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (MEDSYNC_LOCK_CLASS, source_lock_key(source)))
    except psycopg.errors.LockNotAvailable:
        raise MergeError(
            f"another run of source {source!r} kept merging for over {lock_timeout_seconds}s; this task will be retried"
        ) from None
    finally:
        conn.execute("RESET lock_timeout")


def _unlock_source(conn: psycopg.Connection, source: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (MEDSYNC_LOCK_CLASS, source_lock_key(source)))


def merge_level(
    conn: psycopg.Connection,
    *,
    source: str,
    level: str,
    run_id: int,
    batch_size: int = 20_000,
    lock_timeout_seconds: int = 1800,
) -> MergeCounts:
    """Merges this run's staging table (and the level's pending records) into A.

    ``conn`` must be in autocommit mode and used by nothing else meanwhile: the source
    lock and the temporary work tables belong to its session.
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
    q = _Sql(s, stage)
    params: dict[str, Any] = {"src": source, "level": level, "run": run_id}
    counts = MergeCounts()
    _lock_source(conn, source, lock_timeout_seconds)
    # The batch statements are many and short: compiling them (JIT) cost more than it saved.
    conn.execute("SET jit = off")
    _use_larger_temp_buffers(conn)
    try:
        conn.execute(_DROP_WORK_TABLES)
        pending_rows = s.parent_level is not None and _has_pending_rows(conn, s, source)
        with conn.transaction():
            conn.execute(q.build_work, {**params, "batch": batch_size})
            conn.execute("CREATE INDEX ON merge_work (batch)")
            conn.execute("ANALYZE merge_work")
            if q.build_parents is not None:
                conn.execute(q.build_parents, params)
                conn.execute("CREATE UNIQUE INDEX ON merge_parent (parent_key)")
                conn.execute("ANALYZE merge_parent")
            conn.execute(q.create_decided, {**params, "batch": -1})
            conn.execute("CREATE TEMP TABLE merge_flipped (id uuid, deleted_at timestamptz)")
            conn.execute("CREATE TEMP TABLE merge_flipped_next (id uuid, deleted_at timestamptz)")
            conn.execute("CREATE TEMP TABLE merge_cascade (id uuid, deleted_at timestamptz)")
        counts.candidates, batches = conn.execute(
            "SELECT count(*), coalesce(max(batch) + 1, 0) FROM merge_work"
        ).fetchone() or (0, 0)
        for batch in range(batches):
            with conn.transaction():
                _merge_batch(conn, q, {**params, "batch": batch}, counts, pending_rows=pending_rows)
            counts.batches += 1
        with conn.transaction():
            counts.quarantine_resolved += _resolve_superseded_quarantine(conn, s, params)
    finally:
        conn.execute(_DROP_WORK_TABLES)
        conn.execute("RESET jit")
        _unlock_source(conn, source)
    counts.seconds = time.monotonic() - started
    log.info(
        "merged %s: %d candidates in %d batches: %d inserted, %d updated (%d deleted, %d undeleted), "
        "%d unchanged, %d stale, %d pending, %d tombstones of unstored records, cascaded %s in %.1fs",
        level, counts.candidates, counts.batches, counts.inserted, counts.updated, counts.deleted,
        counts.undeleted, counts.unchanged, counts.stale, counts.pending, counts.tombstones_only,
        {k: dict(v) for k, v in counts.cascaded.items()}, counts.seconds,
    )  # fmt: skip
    return counts


def _merge_batch(
    conn: psycopg.Connection, q: _Sql, params: dict[str, Any], counts: MergeCounts, *, pending_rows: bool
) -> None:
    """Decides one batch against A's current rows and applies it.

    Each statement after the decision runs only when the batch's counts say it has rows to
    touch; ``pending_rows`` says whether the level's pending table held rows of the source
    when the merge began (only this merge, under the source lock, adds to it meanwhile).
    """
    conn.execute("TRUNCATE merge_decided")
    conn.execute(q.decide, params)
    batch: Counter[str] = Counter()
    remember = forget = flipped = 0
    for action, n, became_deleted, came_back, own_deleted, tombstoned in conn.execute(_COUNT_ACTIONS):
        batch[action] += n
        if action == "insert":
            counts.deleted += became_deleted
        elif action == "update":
            counts.deleted += became_deleted
            counts.undeleted += came_back
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
    if batch["insert"]:
        conn.execute(q.insert, params)
    if batch["update"]:
        conn.execute(q.update, params)
    if remember:
        conn.execute(_TOMBSTONES_REMEMBER, params)
    if forget:
        conn.execute(_TOMBSTONES_FORGET, params)
    if q.pending_clear is not None and q.pending_keep is not None:
        if pending_rows:
            conn.execute(q.pending_clear, params)
        if batch["pending"]:
            conn.execute(q.pending_keep, params)
    cur = conn.execute(_QUARANTINE_RESOLVE_BATCH, params)
    counts.quarantine_resolved += cur.rowcount
    if flipped:
        conn.execute(_FLIPPED_FROM_BATCH)
        _cascade(conn, params["src"], q.s.level, counts)


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


def _has_pending_rows(conn: psycopg.Connection, s: LevelSpec, source: str) -> bool:
    row = conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE source_system = %s)").format(_I(SCHEMA, f"pending_{s.level}")),
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
