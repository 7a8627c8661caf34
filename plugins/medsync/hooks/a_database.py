"""The hook for service A's PostgreSQL database, where medsync writes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from airflow.providers.postgres.hooks.postgres import PostgresHook
from psycopg import sql
from psycopg.rows import tuple_row

from medsync.errors import ConfigError

if TYPE_CHECKING:
    from medsync.config import SourceConfig

DEFAULT_CONNECT_TIMEOUT_SECONDS = 10
DEFAULT_STATEMENT_TIMEOUT_SECONDS = 7200


class ADatabaseHook(PostgresHook):
    """A ``PostgresHook`` for A's database that hands out connections medsync can rely on.

    ``get_conn()`` returns a psycopg 3 connection in autocommit mode with tuple rows:
    medsync's code opens its own transactions (``with conn.transaction():``) so that
    each batch commits on its own and no transaction stays open across a long pull.
    The connection is the caller's to close. The Airflow connection is an ordinary
    postgres one (host, port, login, password, schema = database name).

    Every session is bounded in time: connecting gives up after ``connect_timeout_seconds``
    (a ``connect_timeout`` in the connection's extra wins), and any one statement after
    ``statement_timeout_seconds``, so a stuck database fails the task (and Airflow retries
    it) instead of holding it until its ``execution_timeout``.
    """

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "medsync_a_db"
    conn_type = "postgres"
    hook_name = "medsync: service A database"

    def __init__(
        self,
        postgres_conn_id: str = default_conn_name,
        *,
        connect_timeout_seconds: int = DEFAULT_CONNECT_TIMEOUT_SECONDS,
        statement_timeout_seconds: int = DEFAULT_STATEMENT_TIMEOUT_SECONDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id, **kwargs)
        self.connect_timeout_seconds = connect_timeout_seconds
        self.statement_timeout_seconds = statement_timeout_seconds

    @classmethod
    def for_source(cls, cfg: SourceConfig) -> ADatabaseHook:
        """The hook of ``cfg``'s A connection with ``cfg``'s connect and statement timeouts."""
        return cls(
            cfg.connections.db_conn_id,
            connect_timeout_seconds=cfg.database.connect_timeout_seconds,
            statement_timeout_seconds=cfg.database.statement_timeout_seconds,
        )

    def _create_connection(self, conn_args: dict[str, Any]) -> Any:
        conn_args.setdefault("connect_timeout", self.connect_timeout_seconds)
        return super()._create_connection(conn_args)

    def get_conn(self) -> psycopg.Connection:
        conn = super().get_conn()
        if not isinstance(conn, psycopg.Connection):
            conn.close()
            # The installation, not the data: no retry fixes it.
            raise ConfigError(
                "medsync needs psycopg 3 (install psycopg[binary] and SQLAlchemy 2, with which the postgres "
                "provider uses it); got a psycopg2 connection"
            )
        conn.autocommit = True
        conn.row_factory = tuple_row
        conn.execute("SET application_name = 'medsync'")
        conn.execute(
            sql.SQL("SET statement_timeout = {}").format(sql.Literal(f"{int(self.statement_timeout_seconds)}s"))
        )
        return conn
