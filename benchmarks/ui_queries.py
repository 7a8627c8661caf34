"""``python -m benchmarks.ui_queries [--instances N]``: the medsync page's queries on a big A.

Loads an A of ``--instances`` instances (default 1,000,000; 5,000 subjects x 4 studies x 5
sequences x 10 instances, as ``make bench``) and a medsync state that a year of twice-daily
runs leaves behind: 730 runs with their per-level figures and reports, watermarks, kept
counts, a quarantine of 2% of the instances (a quarter of it open, under a few reasons) and
1% of them pending. The rows are written with ``generate_series`` in SQL, not by a sync:
the page reads what a sync leaves, and this builds it in a minute instead of the sync's
ten. Then every query the page makes (a source's overview, searches by source key and by
A's id, hits and misses) runs ``--repeat`` times, each statement timed by PostgreSQL
(auto_explain); the slowest statement is printed with its plan.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

import psycopg  # noqa: E402

from benchmarks.fixtures import Shape, connect, database  # noqa: E402
from medsync import schema  # noqa: E402
from medsync.ui import queries  # noqa: E402

RUNS = 730
SCANNED_A = 3
"""Exit status when a statement scanned a table of ``imaging.*`` (a crash exits with 1).

On a tiny A (a few thousand rows) the planner rightly prefers scanning a table of a few pages."""
LOAD = """
INSERT INTO imaging.subject (id, source_system, source_key, patient_code, source_updated_at)
SELECT md5('p' || g)::uuid, 'b', 'pat_' || lpad(g::text, 12, '0'), 'MRN-' || g, now() - interval '1 day'
FROM generate_series(1, %(subjects)s) g;
INSERT INTO imaging.study (id, subject_id, source_system, source_key, study_uid, status, source_updated_at)
SELECT md5('s' || g)::uuid, md5('p' || (1 + (g - 1) / 4))::uuid, 'b', 'stu_' || lpad(g::text, 12, '0'),
       '1.2.' || g, 'COMPLETED', now() - interval '1 day'
FROM generate_series(1, %(subjects)s * 4) g;
INSERT INTO imaging.sequence (id, study_id, source_system, source_key, series_uid, modality, source_updated_at)
SELECT md5('q' || g)::uuid, md5('s' || (1 + (g - 1) / 5))::uuid, 'b', 'ser_' || lpad(g::text, 12, '0'),
       '1.3.' || g, 'MR', now() - interval '1 day'
FROM generate_series(1, %(subjects)s * 20) g;
INSERT INTO imaging.instance (id, sequence_id, source_system, source_key, sop_instance_uid, storage_bucket,
                              storage_key, source_updated_at)
SELECT md5('i' || g)::uuid, md5('q' || (1 + (g - 1) / 10))::uuid, 'b', 'img_' || lpad(g::text, 12, '0'),
       '1.4.' || g, 'b-imaging', 'b/' || g || '.dcm', now() - interval '1 day'
FROM generate_series(1, %(subjects)s * 200) g;
"""
STATE = """
INSERT INTO medsync.sync_run (id, source_system, dag_run_id, run_type, started_at, finished_at, status, report)
SELECT g, 'b', 'scheduled__' || g, CASE WHEN g %% 60 = 0 THEN 'full_refresh' WHEN g %% 17 = 0 THEN 'backfill'
       ELSE 'scheduled' END, now() - (%(runs)s - g) * interval '12 hours',
       now() - (%(runs)s - g) * interval '12 hours' + interval '3 minutes', 'succeeded',
       jsonb_build_object('levels', jsonb_build_object(
         'subject', jsonb_build_object('pulled', 50, 'inserted', 5, 'updated', 45, 'unchanged', 0, 'deleted', 1,
                                       'quarantined', 0, 'pending', 0, 'difference', 0, 'window', '[]'::jsonb),
         'instance', jsonb_build_object('pulled', 10000, 'inserted', 1000, 'updated', 9000, 'unchanged', 0,
                                        'deleted', 10, 'quarantined', %(open)s, 'pending', %(pending)s,
                                        'difference', 0, 'window', '[]'::jsonb)),
         'files', jsonb_build_object('source', 'b', 'candidates', 1000, 'checked', 20, 'ok', 20, 'missing', 0,
                                     'denied', 0, 'refused', 0, 'errors', 0, 'failures', 0,
                                     'examples', '{}'::jsonb))
FROM generate_series(1, %(runs)s) g;
SELECT setval('medsync.sync_run_id_seq', %(runs)s);
INSERT INTO medsync.sync_run_level (run_id, level, since, until, pull_counts, merge_counts)
SELECT r.id, l.level, r.started_at - interval '12 hours', r.started_at,
       jsonb_build_object('slice_0', jsonb_build_object('records', 10000)),
       jsonb_build_object('inserted', 1000, 'updated', 9000, 'deleted', 10, 'undeleted', 0, 'pending', 0,
                          'cascaded', '{}'::jsonb)
FROM medsync.sync_run r CROSS JOIN (VALUES ('subject'), ('study'), ('sequence'), ('instance')) l (level);
INSERT INTO medsync.watermark (source_system, level, synced_until, run_id)
SELECT 'b', level, now(), %(runs)s FROM (VALUES ('subject'), ('study'), ('sequence'), ('instance')) l (level);
INSERT INTO medsync.live_count (source_system, level, live, counted_at)
VALUES ('b', 'subject', %(subjects)s, now()), ('b', 'study', %(subjects)s * 4, now()),
       ('b', 'sequence', %(subjects)s * 20, now()), ('b', 'instance', %(subjects)s * 200, now());
INSERT INTO medsync.quarantine (source_system, level, source_key, source_updated_at, reason, payload,
                                created_at, updated_at, resolved_at)
SELECT 'b', 'instance', 'img_q' || g, now(), (ARRAY['file_path: missing or empty', 'sop_uid: missing or empty',
       'content_type: unknown value ''image/x'' (not in the mapping file)'])[1 + g %% 3],
       jsonb_build_object('id', 'img_q' || g, 'sop_uid', NULL), now() - (g %% 700) * interval '12 hours', now(),
       CASE WHEN g %% 4 = 0 THEN NULL ELSE now() END
FROM generate_series(1, %(quarantined)s) g;
INSERT INTO medsync.pending_instance (source_system, source_key, source_updated_at, deleted, new_id, parent_key,
                                      sop_instance_uid, storage_bucket, storage_key, pending_since)
SELECT 'b', 'img_w' || g, now(), false, md5('w' || g)::uuid, '1.3.missing' || (g / 10), '1.4.w' || g, 'b-imaging',
       'b/w' || g || '.dcm', now() - (g %% 400) * interval '1 hour'
FROM generate_series(1, %(pending)s) g;
"""


class Timings:
    """PostgreSQL's own time of every statement the page runs (auto_explain with ANALYZE)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.statements: list[tuple[float, str]] = []
        for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                        "SET auto_explain.log_analyze = on", "SET auto_explain.log_level = notice"):  # fmt: skip
            conn.execute(setting)
        conn.add_notice_handler(self._notice)

    def _notice(self, diag: psycopg.errors.Diagnostic) -> None:
        message = diag.message_primary or ""
        match = re.match(r"duration: ([\d.]+) ms", message)
        if match:
            self.statements.append((float(match.group(1)), message))


def load(name: str, shape: Shape) -> float:
    began = time.perf_counter()
    subjects = shape.subjects
    instances = shape.instances
    with connect(name) as conn:
        schema.migrate(conn)
        params = {"subjects": subjects, "runs": RUNS, "quarantined": instances // 50, "pending": instances // 100,
                  "open": instances // 200}  # fmt: skip
        for statement in (LOAD + STATE).split(";\n"):
            if statement.strip():
                conn.execute(statement, params)
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - began


def page_queries(conn: psycopg.Connection) -> None:
    """What the page asks for: one source's overview, and searches (hits and misses)."""
    queries.overview(conn, "b", datetime.now(UTC))
    row = conn.execute("SELECT md5('i42')::uuid").fetchone()
    assert row is not None
    terms = ("pat_000000000007", "img_000000000042", "img_q4", "img_w17", "no-such-key", str(row[0]),
             "00000000-0000-0000-0000-000000000000")  # fmt: skip
    for term in terms:
        queries.search(conn, ["b"], term)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ui_queries", description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--keep", action="store_true", help="keep the database (medsync_bench_<pid>_ui)")
    args = p.parse_args(argv)
    shape = Shape.for_instances(args.instances)
    with database("ui", keep=args.keep) as name:
        print(f"loading A with {shape.instances:,} instances ({shape.records:,} rows) and a year of runs...")
        print(f"loaded in {load(name, shape):.1f}s")
        with connect(name) as conn:
            page_queries(conn)  # warm the cache, as a page in use is
            timings = Timings(conn)
            walls = []
            for _ in range(args.repeat):
                began = time.perf_counter()
                page_queries(conn)
                walls.append(time.perf_counter() - began)
        statements = sorted(timings.statements, reverse=True)
        seq_scans = [s for _, s in statements if re.search(r"Seq Scan on (subject|study|sequence|instance)\b", s)]
        best, worst = min(walls) * 1000, max(walls) * 1000
        print(f"{len(statements) // args.repeat} statements per page view (overview + 7 searches), "
              f"{args.repeat} views; a whole view: best {best:.1f} ms, worst {worst:.1f} ms")  # fmt: skip
        print(f"sequential scans of imaging.*: {len(seq_scans)}")
        ms, slowest = statements[0]
        print(f"slowest statement: {ms:.2f} ms\n{slowest}")
    return SCANNED_A if seq_scans else 0


if __name__ == "__main__":
    sys.exit(main())
