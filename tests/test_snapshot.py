"""medsync.snapshot on a real PostgreSQL: what a listing compare tombstones, what it spares, and when it runs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from medsync import snapshot
from medsync.config import SnapshotConfig, get_source_config
from medsync.errors import SnapshotGuardError
from medsync.merge import merge_level
from medsync.schema import migrate
from medsync.staging import ensure_staging_table, staging_table

SRC = "pacs"
OLD = datetime(2026, 1, 1, tzinfo=UTC)


def _run(conn: psycopg.Connection, kind: str = "manual", status: str = "running") -> int:
    row = conn.execute(
        "INSERT INTO medsync.sync_run (source_system, dag_run_id, run_type, status) VALUES (%s, %s, %s, %s)"
        " RETURNING id",
        (SRC, uuid.uuid4().hex, kind, status),
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def conn(a_db: str) -> psycopg.Connection:
    c = psycopg.connect(a_db, autocommit=True)
    migrate(c)
    # One study with two series; series 1.2 has an instance.
    c.execute(
        "INSERT INTO imaging.subject (id, source_system, source_key, patient_code, source_updated_at)"
        " VALUES (gen_random_uuid(), %s, 'P1', 'P1', %s), (gen_random_uuid(), 'b', 'P1', 'P1', %s)",
        (SRC, OLD, OLD),
    )
    c.execute(
        "INSERT INTO imaging.study (id, subject_id, source_system, source_key, study_uid, status, source_updated_at)"
        " SELECT gen_random_uuid(), id, %s, '1', '1', 'COMPLETED', %s FROM imaging.subject WHERE source_system = %s",
        (SRC, OLD, SRC),
    )
    c.execute(
        "INSERT INTO imaging.sequence (id, study_id, source_system, source_key, series_uid, modality,"
        " source_updated_at) SELECT gen_random_uuid(), id, %s, k, k, 'CT', %s FROM imaging.study,"
        " unnest(array['1.1', '1.2']) k",
        (SRC, OLD),
    )
    return c


def _stage_listing(conn: psycopg.Connection, level: str, run_id: int, keys: list[str]) -> None:
    table = ensure_staging_table(conn, SRC, level, run_id)
    for key in keys:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (source_key, source_updated_at, deleted, new_id, slice, parent_key, series_uid,"
                " modality) VALUES (%s, %s, false, gen_random_uuid(), 0, '1', %s, 'CT')"
            ).format(table),
            (key, OLD, key),
        )


def test_gone_records_are_tombstoned_and_held_back_ones_spared(conn: psycopg.Connection) -> None:
    run_id = _run(conn, "full_refresh")
    # 1.1 is listed, 1.2 is gone; a third series 1.3 is in A but its newest version is quarantined.
    conn.execute(
        "INSERT INTO imaging.sequence (id, study_id, source_system, source_key, series_uid, modality,"
        " source_updated_at) SELECT gen_random_uuid(), id, %s, '1.3', '1.3', 'CT', %s FROM imaging.study",
        (SRC, OLD),
    )
    conn.execute(
        "INSERT INTO medsync.quarantine (source_system, level, source_key, source_updated_at, reason, payload)"
        " VALUES (%s, 'sequence', '1.3', now(), 'Modality: unknown value', '{}')",
        (SRC,),
    )
    _stage_listing(conn, "sequence", run_id, ["1.1"])
    figures = snapshot.stage_tombstones(conn, source=SRC, level="sequence", run_id=run_id, slice_index=0, listed=2)
    assert figures["tombstones"] == 1
    merge_level(conn, source=SRC, level="sequence", run_id=run_id)
    live = {k for (k,) in conn.execute(
        "SELECT source_key FROM imaging.sequence WHERE source_system = %s AND deleted_at IS NULL", (SRC,))}  # fmt: skip
    assert live == {"1.1", "1.3"}
    remembered = conn.execute("SELECT source_key FROM medsync.tombstone WHERE level = 'sequence'").fetchall()
    assert remembered == [("1.2",)]
    # A second compare of the same listing stages nothing more: 1.2 has its tombstone.
    again = _run(conn, "full_refresh")
    _stage_listing(conn, "sequence", again, ["1.1"])
    assert snapshot.stage_tombstones(conn, source=SRC, level="sequence", run_id=again, slice_index=0,
                                     listed=1)["tombstones"] == 0  # fmt: skip
    # Other sources' rows are never compared.
    assert conn.execute("SELECT deleted_at FROM imaging.subject WHERE source_system = 'b'").fetchone() == (None,)


def test_children_deleted_with_their_parent_get_their_own_tombstone_when_gone(conn: psycopg.Connection) -> None:
    conn.execute("UPDATE imaging.sequence SET deleted_at = now() WHERE source_key = '1.2'")  # as a cascade leaves it
    run_id = _run(conn, "full_refresh")
    _stage_listing(conn, "sequence", run_id, ["1.1"])
    assert snapshot.stage_tombstones(conn, source=SRC, level="sequence", run_id=run_id, slice_index=0,
                                     listed=1)["tombstones"] == 1  # fmt: skip
    merge_level(conn, source=SRC, level="sequence", run_id=run_id)
    # Now its own: the parent coming back would not bring it back.
    assert conn.execute("SELECT count(*) FROM medsync.tombstone WHERE source_key = '1.2'").fetchone() == (1,)


def _add_sequences(conn: psycopg.Connection, keys: list[str]) -> None:
    conn.execute(
        "INSERT INTO imaging.sequence (id, study_id, source_system, source_key, series_uid, modality,"
        " source_updated_at) SELECT gen_random_uuid(), id, %s, k, k, 'CT', %s FROM imaging.study, unnest(%s::text[]) k",
        (SRC, OLD, keys),
    )


def test_a_snapshot_that_would_delete_most_of_a_level_stages_nothing_and_fails(conn: psycopg.Connection) -> None:
    _add_sequences(conn, [f"2.{i}" for i in range(8)])  # ten live series in A
    run_id = _run(conn, "full_refresh")
    _stage_listing(conn, "sequence", run_id, ["1.1", "2.0", "2.1"])  # a listing cut short: 7 of 10 missing
    with pytest.raises(SnapshotGuardError, match=r"would delete 7 of A's 10 live rows .*max_delete_share 0.5"):
        snapshot.stage_tombstones(conn, source=SRC, level="sequence", run_id=run_id, slice_index=0, listed=3,
                                  max_delete_share=0.5, max_delete_floor=2)  # fmt: skip
    stage = staging_table(SRC, "sequence", run_id)
    assert conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE deleted").format(stage)).fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM medsync.snapshot_run").fetchone() == (0,)
    # Under the floor, or within the share, the same compare goes ahead.
    assert snapshot.stage_tombstones(conn, source=SRC, level="sequence", run_id=run_id, slice_index=0, listed=3,
                                     max_delete_share=0.5, max_delete_floor=7)["tombstones"] == 7  # fmt: skip
    again = _run(conn, "full_refresh")
    _stage_listing(conn, "sequence", again, ["1.1", "2.0", "2.1"])
    assert snapshot.stage_tombstones(conn, source=SRC, level="sequence", run_id=again, slice_index=0, listed=3,
                                     max_delete_share=0.7, max_delete_floor=0)["tombstones"] == 7  # fmt: skip


def test_the_guard_is_configurable_with_sensible_defaults() -> None:
    assert SnapshotConfig().max_delete_share == 0.5 and SnapshotConfig().max_delete_floor == 100
    with pytest.raises(ValueError, match="max_delete_share"):
        SnapshotConfig(max_delete_share=0)
    with pytest.raises(ValueError, match="max_delete_share"):
        SnapshotConfig(max_delete_share=1.5)


def test_cadence(conn: psycopg.Connection) -> None:
    cfg = get_source_config("pacs")
    assert cfg.snapshot == SnapshotConfig(on_full_refresh=True, every_hours=24)
    full = _run(conn, "full_refresh")
    assert snapshot.due(conn, cfg, "instance", full)
    assert not snapshot.due(conn, cfg.model_copy(update={"snapshot": SnapshotConfig(on_full_refresh=False)}),
                            "instance", full)  # fmt: skip
    first = _run(conn)
    assert snapshot.due(conn, cfg, "instance", first)  # never taken
    conn.execute(
        "INSERT INTO medsync.snapshot_run (run_id, source_system, level, taken_at, listed, tombstones, seconds)"
        " VALUES (%s, %s, 'instance', %s, 1, 0, 0)",
        (first, SRC, datetime.now(UTC) - timedelta(hours=2)),
    )
    assert snapshot.due(conn, cfg, "instance", _run(conn))  # taken by a run that has not succeeded
    conn.execute("UPDATE medsync.sync_run SET status = 'succeeded' WHERE id = %s", (first,))
    assert not snapshot.due(conn, cfg, "instance", _run(conn))  # 2 hours ago, every 24
    assert snapshot.due(conn, cfg.model_copy(update={"snapshot": SnapshotConfig(every_hours=1)}), "instance",
                        _run(conn))  # fmt: skip
    never = cfg.model_copy(update={"snapshot": SnapshotConfig(every_hours=None)})
    assert not snapshot.due(conn, never, "instance", _run(conn))
