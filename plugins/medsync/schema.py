"""medsync's own PostgreSQL schema, and the checks ``prepare`` makes before anything is written.

- ``migrate``: applies ``include/sql/migrations/NNNN_*.sql`` in order, each recorded in
  ``medsync.schema_migration`` with a checksum; safe when two runs race (one waits).
- ``check_a_tables``: A's tables exist with the columns and types medsync writes.
- ``check_mapping``: every value a mapping file can produce is accepted by A's tables,
  tried against a constraint-identical scratch copy of each table.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import psycopg
from psycopg import sql

from medsync.config import include_dir
from medsync.errors import MappingError, SchemaError
from medsync.levels import COMMON_COLUMNS, SPECS, Column
from medsync.mapping import Mapping

log = logging.getLogger(__name__)

SCHEMA = "medsync"
A_SCHEMA = "imaging"
# Two-int advisory lock keys: (MEDSYNC_LOCK_CLASS, n). Stable across processes and versions.
MEDSYNC_LOCK_CLASS = 0x6D5C
MIGRATION_LOCK = 1


def migrations_dir() -> Path:
    return include_dir() / "sql" / "migrations"


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for path in sorted(migrations_dir().glob("*.sql")):
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", path.name)
        if not match:
            raise SchemaError(f"{path}: migrations are named NNNN_name.sql")
        found.append((int(match.group(1)), match.group(2), path.read_text(encoding="utf-8")))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise SchemaError(f"{migrations_dir()}: two migrations share a number")
    return found


def migrate(conn: psycopg.Connection) -> list[int]:
    """Brings medsync's schema to the newest version; returns the versions applied now.

    Runs in one transaction under an advisory lock, so a second ``prepare`` racing this
    one waits and then finds nothing to do. A migration whose file changed after it was
    applied is refused: applied migrations are history.
    """
    applied_now: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (MEDSYNC_LOCK_CLASS, MIGRATION_LOCK))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS medsync.schema_migration ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {v: c for v, c in conn.execute("SELECT version, checksum FROM medsync.schema_migration")}
        for version, name, text in _migrations():
            checksum = hashlib.sha256(text.encode()).hexdigest()
            if version in done:
                if done[version] != checksum:
                    raise SchemaError(
                        f"migration {version:04d}_{name} changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            conn.execute(text)
            conn.execute(
                "INSERT INTO medsync.schema_migration (version, name, checksum) VALUES (%s, %s, %s)",
                (version, name, checksum),
            )
            applied_now.append(version)
    if applied_now:
        log.info("medsync schema migrated: applied %s", applied_now)
    return applied_now


def check_a_tables(conn: psycopg.Connection) -> None:
    """Fails with a list of every difference when A's tables are not what medsync writes into."""
    rows = conn.execute(
        "SELECT table_name, column_name, data_type, is_nullable, column_default IS NOT NULL"
        " FROM information_schema.columns WHERE table_schema = %s",
        (A_SCHEMA,),
    ).fetchall()
    actual: dict[str, dict[str, tuple[str, bool, bool]]] = {}
    for table, column, data_type, nullable, has_default in rows:
        actual.setdefault(table, {})[column] = (data_type, nullable == "YES", has_default)
    problems: list[str] = []
    for level_spec in SPECS.values():
        table = level_spec.table
        columns = actual.get(table)
        if columns is None:
            problems.append(f"table {A_SCHEMA}.{table} is missing")
            continue
        expected = [*COMMON_COLUMNS, *level_spec.columns]
        expected_names = {c.name for c in expected}
        if level_spec.parent_fk:
            expected_names.add(level_spec.parent_fk)
            if columns.get(level_spec.parent_fk, ("",))[0] != "uuid":
                problems.append(f"{A_SCHEMA}.{table}.{level_spec.parent_fk} is missing or not uuid")
        problems += _column_problems(table, expected, level_spec.columns, columns)
        for name, (_, nullable, has_default) in columns.items():
            if name not in expected_names and not nullable and not has_default:
                problems.append(f"{A_SCHEMA}.{table}.{name} is NOT NULL without a default; medsync cannot fill it")
        unique = conn.execute(
            "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND i.indisunique"
            " AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a"
            "      WHERE a.attrelid = c.oid AND a.attnum = ANY(i.indkey)) = ARRAY['source_key', 'source_system']",
            (A_SCHEMA, table),
        ).fetchone()
        if unique is None:
            problems.append(f"{A_SCHEMA}.{table} has no unique index on (source_system, source_key)")
    if problems:
        raise SchemaError("A's tables differ from what medsync writes into: " + "; ".join(problems))


def _column_problems(
    table: str,
    expected: list[Column],
    content: tuple[Column, ...],
    columns: dict[str, tuple[str, bool, bool]],
) -> list[str]:
    """How A's ``table`` (its ``columns``: type, nullable, default) differs from the ``expected`` ones.

    The nullability of the ``content`` columns is compared too: source configs are checked
    against ``medsync.levels`` when they load (a NOT NULL column needs a required field), so it
    must say what A says.
    """
    problems: list[str] = []
    for column in expected:
        found = columns.get(column.name)
        if found is None:
            problems.append(f"{A_SCHEMA}.{table}.{column.name} is missing")
        elif found[0] != column.pg_type:
            problems.append(f"{A_SCHEMA}.{table}.{column.name} is {found[0]}, expected {column.pg_type}")
        elif column in content and found[1] != column.nullable:
            problems.append(
                f"{A_SCHEMA}.{table}.{column.name} is {'' if found[1] else 'NOT '}NULL, "
                f"medsync.levels says {'' if column.nullable else 'NOT '}NULL"
            )
    return problems


def check_mapping(conn: psycopg.Connection, mapping: Mapping) -> None:
    """Refuses a mapping file that maps to a value A's tables would reject.

    Each target value is inserted into a temporary copy of its A table that has the same
    CHECK constraints and column types but no NOT NULL (so only the tested column is
    judged); nulls are checked against the real column's nullability. Nothing is written
    outside the rolled-back scratch tables.
    """
    problems: list[str] = []
    nullable = {
        (t, c): n == "YES"
        for t, c, n in conn.execute(
            "SELECT table_name, column_name, is_nullable FROM information_schema.columns WHERE table_schema = %s",
            (A_SCHEMA,),
        )
    }
    with conn.transaction(force_rollback=True):
        scratch: dict[str, sql.Identifier] = {}
        for level, column, value in mapping.targets():
            table = SPECS[level].table
            if value is None:
                if not nullable.get((table, column), True):
                    problems.append(f"{level}.{column}: maps a value to null but A requires a value")
                continue
            if table not in scratch:
                name = sql.Identifier(f"medsync_mapping_check_{table}")
                conn.execute(
                    sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING CONSTRAINTS) ON COMMIT DROP").format(
                        name, sql.Identifier(A_SCHEMA, table)
                    )
                )
                not_null = conn.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnotnull AND attnum > 0",
                    (f"pg_temp.medsync_mapping_check_{table}",),
                ).fetchall()
                for (col,) in not_null:
                    conn.execute(
                        sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(name, sql.Identifier(col))
                    )
                scratch[table] = name
            try:
                with conn.transaction():
                    conn.execute(
                        sql.SQL(
                            "INSERT INTO {} (source_system, source_key, {}) VALUES ('medsync_check', 'x', %s)"
                        ).format(scratch[table], sql.Identifier(column)),
                        (value,),
                    )
            except psycopg.errors.DataError as exc:
                problems.append(f"{level}.{column}: A cannot store {value!r} ({exc.diag.message_primary})")
            except psycopg.errors.IntegrityError as exc:
                problems.append(f"{level}.{column}: A rejects {value!r} ({exc.diag.message_primary})")
    if problems:
        where = mapping.path or "mapping"
        raise MappingError(f"{where}: values A's tables would reject: " + "; ".join(problems))
