"""What inserting N instances into A's table costs, and which of its constraints the cost is.

``python -m benchmarks.a_insert [N]`` (default 1,000,000): in a fresh database holding A's
tables (``include/sql/a_schema.sql``) and N/10 sequences, INSERTs N instance rows, shaped
like the benchmark's, from an unlogged table into ``imaging.instance``: first as the merge
writes them (batches of 20,000 in key order, one statement and transaction each, shared out
among 2 sessions; ``[N [SESSIONS [BATCH]]]`` change that), then in one statement as the
table is, without the FK check (``session_replication_role = replica``: superuser,
measurement only), without the FK index, without the unique key. It is the floor under any
merge into A's table as it is: docs/benchmarks.md, "What bounds them", cites it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import NamedTuple

import psycopg

from tests.conftest import A_SCHEMA, create_database, drop_database, dsn_for

PARENTS = """
INSERT INTO imaging.subject (id, source_system, source_key, patient_code, source_updated_at)
SELECT ('01900000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 'b', 'pat_' || lpad(i::text, 12, '0'),
       'mrn' || i, now()
FROM generate_series(1, %(subjects)s) i;
INSERT INTO imaging.study (id, subject_id, source_system, source_key, study_uid, status, source_updated_at)
SELECT ('01910000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
       ('01900000-0000-7000-8000-' || lpad(to_hex(1 + (i - 1) / 4), 12, '0'))::uuid,
       'b', 'stu_' || lpad(i::text, 12, '0'), '1.2.826.0.1.3680043.8.498.1' || lpad(i::text, 12, '0'),
       'COMPLETED', now()
FROM generate_series(1, %(studies)s) i;
INSERT INTO imaging.sequence (id, study_id, source_system, source_key, series_uid, modality, source_updated_at)
SELECT ('01920000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
       ('01910000-0000-7000-8000-' || lpad(to_hex(1 + (i - 1) / 5), 12, '0'))::uuid,
       'b', 'ser_' || lpad(i::text, 12, '0'), '1.2.826.0.1.3680043.8.498.2' || lpad(i::text, 12, '0'), 'MR', now()
FROM generate_series(1, %(sequences)s) i;
CREATE UNLOGGED TABLE rows_to_insert AS
SELECT ('01930000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid AS id,
       ('01920000-0000-7000-8000-' || lpad(to_hex(1 + (i - 1) / 10), 12, '0'))::uuid AS sequence_id,
       'b'::text AS source_system, 'img_' || lpad(i::text, 12, '0') AS source_key,
       '1.2.826.0.1.3680043.8.498.4' || lpad(i::text, 12, '0') AS sop_instance_uid, i %% 10 AS instance_number,
       'b-imaging-bench'::text AS storage_bucket,
       '2026/02/03/stu_000000012345/ser_000000067890/img_' || lpad(i::text, 12, '0') || '.dcm' AS storage_key,
       (500000 + i %% 1000)::bigint AS size_bytes, 'application/dicom'::text AS content_type,
       now() AS source_updated_at, now() AS created_at, now() AS updated_at,
       (i - 1) / %(batch)s AS batch
FROM generate_series(1, %(instances)s) i;
CREATE INDEX ON rows_to_insert (batch);
VACUUM ANALYZE rows_to_insert;
"""

INSERT = "INSERT INTO imaging.instance ({cols}) SELECT {cols} FROM rows_to_insert"
COLUMNS = (
    "id, sequence_id, source_system, source_key, sop_instance_uid, instance_number, storage_bucket, storage_key,"
    " size_bytes, content_type, source_updated_at, created_at, updated_at"
)

# (label, statement run before the insert, DDL applied for this and every later case)
CASES: tuple[tuple[str, str | None, str | None], ...] = (
    ("as it is, in one statement", None, None),
    ("without the FK check", "SET session_replication_role = replica", None),
    ("without the FK index", None, "DROP INDEX imaging.instance_sequence_id_idx"),
    ("without the FK index and the unique key", None,
     "ALTER TABLE imaging.instance DROP CONSTRAINT instance_source_system_source_key_key"),
    ("without all three (primary key only)", "SET session_replication_role = replica", None),
)  # fmt: skip


def load_rows(conn: psycopg.Connection, instances: int, batch_size: int = 20_000) -> int:
    """A's parents of ``instances`` instances and the instance rows to insert (``rows_to_insert``), numbered in
    batches of ``batch_size`` in key order as the merge's work table is; returns the number of batches."""
    sequences = max(1, instances // 10)
    sizes = {"instances": instances, "sequences": sequences, "batch": batch_size}
    sizes |= {"studies": max(1, sequences // 5), "subjects": max(1, sequences // 20)}
    for statement in filter(str.strip, PARENTS.split(";\n")):
        conn.execute(statement, sizes)
    return -(-instances // batch_size)


class BatchedInsert(NamedTuple):
    wall_seconds: float
    """The whole phase: the batches' rows read, staged and inserted, by every session at once."""
    insert_session_seconds: float
    """Inside ``INSERT INTO imaging.instance`` only, summed over the sessions (the merge's ``write_seconds``)."""
    sessions: int

    @property
    def insert_seconds(self) -> float:
        """The inserts' share of the wall time: their session-seconds over the sessions that ran them at once."""
        return self.insert_session_seconds / self.sessions


def insert_in_batches(dsn: str, batches: int, sessions: int) -> BatchedInsert:
    """Inserts every row of ``rows_to_insert`` into A's table as it is, the way the merge writes.

    The batches are shared out among ``sessions`` sessions working at once (each takes the
    next batch when done); a session copies its batch into a temporary table, then inserts it
    into A in one statement and one transaction, as ``medsync.merge`` does from its table of
    decisions; but nothing else: no decision, no tombstone, no count. Connecting is not timed.
    """
    todo = iter(range(batches))
    take = threading.Lock()
    errors: list[Exception] = []
    inserting = [0.0] * sessions
    statement = INSERT.format(cols=COLUMNS).replace("rows_to_insert", "batch_rows")

    def insert(conn: psycopg.Connection, session: int) -> None:
        try:
            while not errors:
                with take:
                    batch = next(todo, None)
                if batch is None:
                    return
                with conn.transaction():
                    conn.execute("TRUNCATE batch_rows")
                    conn.execute("INSERT INTO batch_rows SELECT * FROM rows_to_insert WHERE batch = %s", (batch,))
                    began = time.perf_counter()
                    conn.execute(statement)
                    inserting[session] += time.perf_counter() - began
        except Exception as exc:  # noqa: BLE001  (handed to the calling thread, which raises it)
            errors.append(exc)

    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(sessions)]
    try:
        for conn in conns:
            # Set as the merge's sessions set them (medsync.merge).
            conn.execute("SET temp_buffers = '64MB'")
            conn.execute("SET jit = off")
            conn.execute("CREATE TEMP TABLE batch_rows AS SELECT * FROM rows_to_insert WITH NO DATA")
        threads = [threading.Thread(target=insert, args=(conn, k)) for k, conn in enumerate(conns)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
    finally:
        for conn in conns:
            conn.close()
    if errors:
        raise errors[0]
    return BatchedInsert(wall, sum(inserting), sessions)


def main(argv: list[str]) -> int:
    instances = int(argv[0]) if argv else 1_000_000
    sessions = int(argv[1]) if len(argv) > 1 else 2
    batch_size = int(argv[2]) if len(argv) > 2 else 20_000
    name = f"medsync_bench_{os.getpid()}_a_insert"
    create_database(name)
    try:
        with psycopg.connect(dsn_for(name), autocommit=True) as conn:
            conn.execute(A_SCHEMA.read_text())
            batches = load_rows(conn, instances, batch_size)
            print(f"{instances:,} instances into imaging.instance, {max(1, instances // 10):,} sequences")
            conn.execute("CHECKPOINT")
            batched = insert_in_batches(dsn_for(name), batches, sessions)
            stored = conn.execute("SELECT count(*) FROM imaging.instance").fetchone()
            if stored != (instances,):
                print(f"the batches inserted {stored} rows of {instances}", file=sys.stderr)
                return 1
            seconds = batched.insert_seconds
            label = f"as the merge writes ({batch_size:,} a batch, {sessions} sessions)"
            print(
                f"  {label:<48} {seconds:6.1f} s  {instances / seconds:>9,.0f} rows/s"
                f" (inserts only; {batched.wall_seconds:.1f} s with reading the batches)"
            )
            for label, before, ddl in CASES:
                if ddl:
                    conn.execute(ddl)
                conn.execute("TRUNCATE imaging.instance")
                conn.execute("CHECKPOINT")
                began = time.perf_counter()
                with conn.transaction():
                    if before:
                        conn.execute(f"SET LOCAL {before.removeprefix('SET ')}")
                    conn.execute(INSERT.format(cols=COLUMNS))
                seconds = time.perf_counter() - began
                print(f"  {label:<48} {seconds:6.1f} s  {instances / seconds:>9,.0f} rows/s")
    finally:
        drop_database(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
