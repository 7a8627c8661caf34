"""Shared fixtures: every test run works in PostgreSQL databases of its own.

The run creates a template database with A's tables (``include/sql/a_schema.sql``)
under a name unique to this process, and each test that asks for ``a_db`` gets a
fresh copy of it. Everything is dropped at the end, so parallel runs and leftovers
never interfere. ``MEDSYNC_TEST_PG`` points at another server (a libpq conninfo
for a superuser; default: the machine's PostgreSQL on 127.0.0.1:5432).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

# A private Orthanc for the PACS source's tests (started only by the tests that ask for it).
from tests.pacs_fixtures import loaded_pacs, orthanc  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
A_SCHEMA = ROOT / "include" / "sql" / "a_schema.sql"
ADMIN_DSN = os.environ.get("MEDSYNC_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
RUN_TAG = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"


def dsn_for(dbname: str) -> str:
    """The admin conninfo pointed at another database."""
    params = psycopg.conninfo.conninfo_to_dict(ADMIN_DSN)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**params)


def connection_uri(dsn: str) -> str:
    """An Airflow connection URI (``AIRFLOW_CONN_...``) of a conninfo on the test PostgreSQL (trust auth)."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    user, host, port = params.get("user", "postgres"), params.get("host", "127.0.0.1"), params.get("port", 5432)
    return f"postgresql://{user}@{host}:{port}/{params['dbname']}"


def _admin() -> psycopg.Connection:
    return psycopg.connect(ADMIN_DSN, autocommit=True)


def create_database(name: str, template: str | None = None) -> str:
    with _admin() as conn:
        if template:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
            )
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return dsn_for(name)


def drop_database(name: str) -> None:
    with _admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def a_template_db() -> Iterator[str]:
    """Name of a template database holding A's tables, created once per test run."""
    name = f"medsync_tpl_{RUN_TAG}"
    dsn = create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(A_SCHEMA.read_text())
    yield name
    drop_database(name)


@pytest.fixture
def a_db(a_template_db: str) -> Iterator[str]:
    """Conninfo of a fresh database with A's tables (empty), dropped after the test."""
    name = f"medsync_t_{RUN_TAG}_{uuid.uuid4().hex[:8]}"
    dsn = create_database(name, template=a_template_db)
    yield dsn
    drop_database(name)
