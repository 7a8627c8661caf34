"""prepare's checks on a real PostgreSQL: migrations, A's tables, mappings A would reject."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from medsync import schema
from medsync.config import get_source_config
from medsync.errors import MappingError, SchemaError
from medsync.mapping import load_mapping, parse_mapping

MIGRATIONS = sorted(int(p.name.split("_", 1)[0]) for p in schema.migrations_dir().glob("*.sql"))
"""Every migration in include/sql/migrations, by version (other branches add theirs)."""


def b_mapping_raw() -> dict[str, Any]:
    mapping = load_mapping(get_source_config("b").mapping_path)
    raw: dict[str, Any] = {"source": "b"}
    for level, entries in mapping.levels.items():
        raw[level] = [
            {"field": e.field, "columns": list(e.columns),
             "values": {k: (list(v) if len(v) > 1 else v[0]) for k, v in e.values.items()}}
            for e in entries
        ]  # fmt: skip
    return raw


def test_migrations_apply_once_and_are_recorded(a_db: str) -> None:
    with psycopg.connect(a_db, autocommit=True) as conn:
        assert schema.migrate(conn) == MIGRATIONS
        assert schema.migrate(conn) == []
        applied = conn.execute("SELECT version FROM medsync.schema_migration ORDER BY 1").fetchall()
        assert applied == [(v,) for v in MIGRATIONS]
        # medsync's tables live in its own schema, none inside A's.
        imaging = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'imaging'")
        assert {r[0] for r in imaging} == {"subject", "study", "sequence", "instance"}


def test_two_prepares_racing_both_succeed_and_migrate_once(a_db: str) -> None:
    results: list[object] = []

    def migrate() -> None:
        try:
            with psycopg.connect(a_db, autocommit=True) as conn:
                results.append(schema.migrate(conn))
        except psycopg.Error as exc:  # collected for the assertion below
            results.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, results)) == [str(MIGRATIONS), "[]", "[]", "[]"]


def test_an_edited_applied_migration_is_refused(a_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with psycopg.connect(a_db, autocommit=True) as conn:
        schema.migrate(conn)
        # A deployment whose include/ holds an edited copy of an applied migration.
        edited = tmp_path / "include"
        shutil.copytree(schema.migrations_dir().parents[1], edited)
        first = sorted((edited / "sql" / "migrations").glob("*.sql"))[0]
        first.write_text(first.read_text() + "\n-- edited\n")
        monkeypatch.setenv("MEDSYNC_INCLUDE_DIR", str(edited))
        with pytest.raises(SchemaError, match="changed after it was applied"):
            schema.migrate(conn)


def test_a_tables_as_in_the_contract_pass(a_db: str) -> None:
    with psycopg.connect(a_db, autocommit=True) as conn:
        schema.check_a_tables(conn)


@pytest.mark.parametrize(
    ("ddl", "expected"),
    [
        ("DROP TABLE imaging.instance", "imaging.instance is missing"),
        ("ALTER TABLE imaging.sequence DROP COLUMN laterality", "imaging.sequence.laterality is missing"),
        ("ALTER TABLE imaging.subject ALTER COLUMN birth_date TYPE text", "birth_date is text, expected date"),
        ("ALTER TABLE imaging.study ADD COLUMN site text NOT NULL", "imaging.study.site is NOT NULL without a default"),
        ("ALTER TABLE imaging.subject DROP CONSTRAINT subject_source_system_source_key_key", "no unique index"),
        # medsync.levels says which columns are NOT NULL (source configs must make them): it must agree with A.
        (
            "ALTER TABLE imaging.instance ALTER COLUMN storage_key DROP NOT NULL",
            "imaging.instance.storage_key is NULL, medsync.levels says NOT NULL",
        ),
        (
            "ALTER TABLE imaging.study ALTER COLUMN accession_number SET NOT NULL",
            "imaging.study.accession_number is NOT NULL, medsync.levels says NULL",
        ),
    ],
)
def test_a_tables_that_differ_are_refused_with_every_difference(a_db: str, ddl: str, expected: str) -> None:
    with psycopg.connect(a_db, autocommit=True) as conn:
        conn.execute(ddl)
        with pytest.raises(SchemaError, match=expected):
            schema.check_a_tables(conn)


def test_the_b_mapping_is_accepted_by_a(a_db: str) -> None:
    with psycopg.connect(a_db, autocommit=True) as conn:
        schema.check_mapping(conn, load_mapping(get_source_config("b").mapping_path))
        # Nothing is left behind by the check.
        assert conn.execute("SELECT count(*) FROM imaging.sequence").fetchone() == (0,)


@pytest.mark.parametrize(
    ("level", "index", "value", "target", "expected"),
    [
        ("sequence", 0, "MRI", "MRX", "sequence.modality: A rejects 'MRX'"),
        ("subject", 0, "MALE", "MALE", "subject.sex: A"),
        ("study", 0, "ORDERED", None, "study.status: maps a value to null but A requires a value"),
        ("sequence", 1, "KNEE_LEFT", ["KNEE", "LEFT"], "sequence.laterality: A"),
    ],
)
def test_a_mapping_to_values_a_rejects_is_refused_before_anything_is_written(
    a_db: str, level: str, index: int, value: str, target: object, expected: str
) -> None:
    raw = b_mapping_raw()
    raw[level][index]["values"][value] = target
    with psycopg.connect(a_db, autocommit=True) as conn, pytest.raises(MappingError, match=expected):
        schema.check_mapping(conn, parse_mapping(raw))
