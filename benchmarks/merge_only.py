"""The merge alone: a first load and a 1% incremental of synthetic B records, no HTTP, no pull.

``python -m benchmarks.merge_only [--instances N] [--repeat K] [--plugins DIR ...] [--keep]``
(default 300,000 instances; catalogue shaped as ``make bench``'s: N/200 subjects x 4 studies
x 5 sequences x 10 instances). For each round and each ``--plugins`` copy in turn (so that
an old and a new ``medsync.merge`` are measured alternately, within the same minute on this
shared machine), in a fresh database holding A's tables:

1. first load: every level staged directly (``INSERT ... SELECT`` into the run's staging
   tables, shaped like the pull's COPY), then ``merge_level`` parents first, as the DAG does;
2. incremental: 1% of every level changed in a second run (updates, tombstones, new
   records; a deleted sequence's instances cascade), staged and merged the same way.

Each merge runs in a child process (``--plugins`` decides which ``medsync`` it imports) with
``b.yaml``'s batch size and sessions unless ``--batch-size`` / ``--sessions`` say otherwise.
Prints each level's seconds per copy and round, and the medians. ``--keep`` keeps the last
database (``medsync_bench_<pid>_merge_*``) for ``EXPLAIN (ANALYZE, BUFFERS)`` by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.paths import ROOT
from tests.conftest import A_SCHEMA, create_database, drop_database, dsn_for

LEVELS = ("subject", "study", "sequence", "instance")
T_LOAD = "2026-02-01T00:00:00Z"
T_CHANGE = "2026-03-01T01:00:00Z"

# Staging rows of run %(run)s, shaped like B's records after the pull's mapping. Keys and
# parent links as B's: patients, studies and series by id, images by their series' UID.
# Record i of a level has parent (i - 1) / fan-out + 1 (1-based). {where} picks the records.
STAGE = {
    "subject": """
        INSERT INTO {stage} (source_key, source_updated_at, deleted, new_id, slice, patient_code, patient_name, sex,
                             birth_date)
        SELECT 'pat_' || lpad(i::text, 10, '0'), {t}, {deleted}, {new_id}, 0,
               CASE WHEN {deleted} THEN NULL ELSE 'MRN' || i || {tag} END,
               CASE WHEN {deleted} THEN NULL ELSE 'Doe^Jane' END, CASE WHEN {deleted} THEN NULL ELSE 'F' END,
               CASE WHEN {deleted} THEN NULL ELSE date '1970-01-01' + (i %% 20000) END
        FROM generate_series(1, %(n)s) i WHERE {where}""",
    "study": """
        INSERT INTO {stage} (source_key, source_updated_at, deleted, new_id, slice, parent_key, study_uid,
                             accession_number, study_at, description, status)
        SELECT 'stu_' || lpad(i::text, 10, '0'), {t}, {deleted}, {new_id}, 0,
               CASE WHEN {deleted} THEN NULL ELSE 'pat_' || lpad(((i - 1) / 4 + 1)::text, 10, '0') END,
               CASE WHEN {deleted} THEN NULL ELSE '1.2.826.0.1.1.' || i END,
               CASE WHEN {deleted} THEN NULL ELSE 'ACC' || i END,
               CASE WHEN {deleted} THEN NULL ELSE timestamptz '2026-01-01' + i * interval '1 minute' END,
               CASE WHEN {deleted} THEN NULL ELSE 'study ' || {tag} END,
               CASE WHEN {deleted} THEN NULL ELSE 'COMPLETED' END
        FROM generate_series(1, %(n)s) i WHERE {where}""",
    "sequence": """
        INSERT INTO {stage} (source_key, source_updated_at, deleted, new_id, slice, parent_key, series_uid,
                             series_number, modality, body_part, laterality, description)
        SELECT 'ser_' || lpad(i::text, 10, '0'), {t}, {deleted}, {new_id}, 0,
               CASE WHEN {deleted} THEN NULL ELSE 'stu_' || lpad(((i - 1) / 5 + 1)::text, 10, '0') END,
               CASE WHEN {deleted} THEN NULL ELSE '1.2.826.0.1.2.' || i END,
               CASE WHEN {deleted} THEN NULL ELSE i %% 5 + 1 END,
               CASE WHEN {deleted} THEN NULL ELSE 'MR' END, CASE WHEN {deleted} THEN NULL ELSE 'KNEE' END,
               CASE WHEN {deleted} THEN NULL ELSE 'L' END, CASE WHEN {deleted} THEN NULL ELSE 'series ' || {tag} END
        FROM generate_series(1, %(n)s) i WHERE {where}""",
    "instance": """
        INSERT INTO {stage} (source_key, source_updated_at, deleted, new_id, slice, parent_key, sop_instance_uid,
                             instance_number, storage_bucket, storage_key, size_bytes, content_type)
        SELECT 'img_' || lpad(i::text, 10, '0'), {t}, {deleted}, {new_id}, 0,
               CASE WHEN {deleted} THEN NULL ELSE '1.2.826.0.1.2.' || ((i - 1) / 10 + 1) END,
               CASE WHEN {deleted} THEN NULL ELSE '1.2.826.0.1.4.' || i END,
               CASE WHEN {deleted} THEN NULL ELSE i %% 10 + 1 END,
               CASE WHEN {deleted} THEN NULL ELSE 'b-imaging-bench' END,
               CASE WHEN {deleted} THEN NULL ELSE '2026/02/01/img_' || i || {tag} || '.dcm' END,
               CASE WHEN {deleted} THEN NULL ELSE 500000 + i %% 1000 END,
               CASE WHEN {deleted} THEN NULL ELSE 'application/dicom' END
        FROM generate_series(1, %(n)s) i WHERE {where}""",
}


def per_level(instances: int) -> dict[str, int]:
    subjects = max(1, round(instances / 200))
    return {"subject": subjects, "study": subjects * 4, "sequence": subjects * 20, "instance": subjects * 200}


def stage_run(conn: psycopg.Connection, run: int, sizes: dict[str, int], *, incremental: bool) -> None:
    """Stages run ``run``: every record (first load), or 1% of each level changed (incremental).

    Incremental, per level: records i = 100k + 1 updated (content and version), i = 100k + 51
    deleted, and 0.5% new records past the catalogue's end. Deleting sequence i deletes its
    ten instances by the cascade; the instances' own 1% is chosen elsewhere.
    """
    from medsync.staging import ensure_staging_table

    # Time-ordered ids, as the pull's UUIDv7s are (random ones would scatter A's primary key).
    new_id = f"('0190{run:04x}-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid"
    for level in LEVELS:
        stage = ensure_staging_table(conn, "b", level, run)
        n = sizes[level]
        if not incremental:
            parts = [("false", T_LOAD, "''", "true", n)]
        else:
            parts = [
                ("false", T_CHANGE, "' v2'", "i %% 100 = 1", n),
                ("true", T_CHANGE, "''", "i %% 100 = 51", n),
                ("false", T_CHANGE, "''", f"i > {n}", n + max(1, n // 200)),
            ]
        for deleted, t, tag, where, upto in parts:
            statement = STAGE[level].format(
                stage=stage.as_string(conn),
                t=f"timestamptz '{t}'",
                deleted=deleted,
                tag=tag,
                where=where,
                new_id=new_id,
            )
            conn.execute(statement, {"n": upto})


def prepare_database(name: str) -> None:
    from medsync import live_count, schema

    drop_database(name)
    create_database(name)
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        conn.execute(A_SCHEMA.read_text())
        schema.migrate(conn)
        live_count.ensure(conn, "b", lock_timeout_seconds=5)


def register_run(conn: psycopg.Connection, run: int) -> None:
    conn.execute(
        "INSERT INTO medsync.sync_run (id, source_system, dag_run_id, run_type) VALUES (%s, 'b', %s, 'manual')",
        (run, f"merge-only-{run}"),
    )


def merge_run(dsn: str, run: int, batch_size: int, sessions: int) -> dict[str, Any]:
    """Merges run ``run``'s staging tables, parents first; returns each level's counts. In the child."""
    from medsync.merge import merge_level

    lookup = {"subject": "source_key", "study": "source_key", "sequence": "source_key", "instance": "series_uid"}
    out: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for level in LEVELS:
            counts = merge_level(
                conn,
                source="b",
                level=level,
                run_id=run,
                batch_size=batch_size,
                sessions=sessions,
                connect=lambda: psycopg.connect(dsn, autocommit=True),
                parent_lookup=lookup[level],
            )
            out[level] = counts.as_dict()
    return out


def child_main(argv: list[str]) -> int:
    """``--child PLUGINS DSN RUN BATCH SESSIONS``: one run's merges with that copy of medsync."""
    plugins, dsn, run, batch_size, sessions = argv
    sys.path.insert(0, plugins)
    print(json.dumps(merge_run(dsn, int(run), int(batch_size), int(sessions))))
    return 0


def in_child(plugins: str, dsn: str, run: int, batch_size: int, sessions: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([plugins, str(ROOT)])}
    args = [sys.executable, "-m", "benchmarks.merge_only", "--child", plugins, dsn, str(run)]
    done = subprocess.run(
        [*args, str(batch_size), str(sessions)], env=env, capture_output=True, text=True, check=False, timeout=3600
    )
    if done.returncode != 0:
        raise RuntimeError(f"merge of run {run} with {plugins} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def one_round(plugins: str, name: str, sizes: dict[str, int], batch_size: int, sessions: int) -> dict[str, Any]:
    prepare_database(name)
    dsn = dsn_for(name)
    figures: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for run, phase, incremental in ((1, "first_load", False), (2, "incremental", True)):
            register_run(conn, run)
            stage_run(conn, run, sizes, incremental=incremental)
            conn.execute("CHECKPOINT")
            figures[phase] = in_child(plugins, dsn, run, batch_size, sessions)
        # Rows, live rows, and a digest of every row but its A timestamps (now() of the merge): the
        # same for every copy of the code, or the copies do not merge alike.
        count = sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE deleted_at IS NULL),"
            " left(md5(string_agg((to_jsonb(t) - 'created_at' - 'updated_at')::text, '|' ORDER BY source_key)), 8)"
            " FROM {} t"
        )
        figures["a_rows"] = {
            level: conn.execute(count.format(sql.Identifier("imaging", level))).fetchone() for level in LEVELS
        }
    return figures


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    sys.path.insert(0, str(ROOT / "plugins"))  # staging and migrations: this checkout's
    from medsync.config import load_source_config

    cfg = load_source_config(ROOT / "include" / "sources" / "b.yaml")
    p = argparse.ArgumentParser(prog="python -m benchmarks.merge_only", description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=300_000)
    p.add_argument("--repeat", type=int, default=3, help="rounds; each runs every --plugins copy once")
    p.add_argument("--plugins", action="append", help="a plugins/ directory (repeat to compare; default: this one)")
    p.add_argument("--batch-size", type=int, default=cfg.merge_batch_size)
    p.add_argument("--sessions", type=int, default=cfg.merge_sessions)
    p.add_argument("--keep", action="store_true", help="keep the last round's database")
    p.add_argument("--json", type=Path, help="write every figure here")
    a = p.parse_args(argv)
    copies = a.plugins or [str(ROOT / "plugins")]
    sizes = per_level(a.instances)
    print(f"catalogue: {sizes}; batch {a.batch_size:,}, {a.sessions} sessions; copies: {copies}")
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in copies}
    name = f"medsync_bench_{os.getpid()}_merge"
    try:
        for k in range(a.repeat):
            for copy in copies:
                figures = one_round(copy, name, sizes, a.batch_size, a.sessions)
                results[copy].append(figures)
                print(f"round {k + 1} {copy}: " + _line(figures), flush=True)
                print(f"    A rows (all, live, digest): {figures['a_rows']}", flush=True)
    finally:
        if not a.keep:
            drop_database(name)
    print("medians:")
    for copy, rounds in results.items():
        print(f"  {copy}: " + _line(_median(rounds)))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


def _median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase in ("first_load", "incremental"):
        out[phase] = {
            level: {
                key: statistics.median(r[phase][level][key] for r in rounds)
                for key in ("seconds", "build_seconds", "write_seconds")
            }
            for level in LEVELS
        }
    return out


def _line(figures: dict[str, Any]) -> str:
    parts = []
    for phase in ("first_load", "incremental"):
        levels = figures[phase]
        total = sum(levels[level]["seconds"] for level in LEVELS)
        inst = levels["instance"]
        parts.append(
            f"{phase} {total:.2f}s (instance {inst['seconds']:.2f}s: work table {inst['build_seconds']:.2f}s,"
            f" writing {inst['write_seconds']:.2f} session-s; sequence {levels['sequence']['seconds']:.2f}s)"
        )
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
