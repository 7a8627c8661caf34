"""A source's request limit for all its tasks together, kept in A's database.

The source's ``rate_limit_per_second`` is the limit of the source (B allows about 20 requests/s
per key in all), not of one task: a run's pulls, their slices and the report run in separate
processes on any worker, and a backfill may run beside a scheduled run. Those share only the
database, so the limit lives there: a row per source in ``medsync.request_limit`` holds the
next free request slot, and every request claims one slot with one short statement (the row
lock serialises concurrent claims; the database's clock is the only clock that counts), then
sleeps until it. Slots are ``1 / rate`` seconds apart, so any second holds at most ``rate``
of them, however many clients ask.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType

import psycopg
from psycopg import sql

from medsync.errors import ConfigError, SourceUnavailableError

log = logging.getLogger(__name__)

STATEMENT_TIMEOUT = "5s"
"""A claim is one row update; one that waits longer than this is a database in trouble."""

# The new slot is claimed and the wait until it returned in one round trip. A source's first
# request creates its row.
_CLAIM = """
INSERT INTO medsync.request_limit AS r (source_system, next_slot)
VALUES (%(source)s, clock_timestamp() + %(gap)s)
ON CONFLICT (source_system) DO UPDATE SET next_slot = GREATEST(r.next_slot, clock_timestamp()) + %(gap)s
RETURNING extract(epoch FROM (r.next_slot - %(gap)s) - clock_timestamp())::float8
"""


class DatabaseRequestLimiter:
    """A :class:`medsync.sources.base.RequestLimiter` for ``source`` at ``rate`` requests/s, run-wide.

    ``connect`` opens a connection to A's database (autocommit); the limiter opens its own on
    first use, apart from the task's, because a pull claims slots while its session is in the
    middle of a COPY. Thread-safe (a pull reads pages ahead on a thread). Close it, or use ``with``.
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection],
        source: str,
        rate: float,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate > 0:
            raise ConfigError(f"rate limit must be positive, got {rate!r}")
        self._connect = connect
        self._source = source
        self._gap = timedelta(seconds=1.0 / float(rate))
        self._rate = float(rate)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self.waited_seconds = 0.0
        self.requests = 0

    @property
    def rate(self) -> float:
        return self._rate

    def acquire(self) -> float:
        """Claims the source's next request slot and sleeps until it; returns the seconds waited."""
        with self._lock:
            try:
                row = self._session().execute(_CLAIM, {"source": self._source, "gap": self._gap}).fetchone()
            except psycopg.OperationalError as exc:
                self._drop_session()
                raise SourceUnavailableError(
                    f"{self._source}: could not claim a request slot in medsync.request_limit ({type(exc).__name__})"
                ) from exc
            wait = max(float(row[0]), 0.0) if row else 0.0
            self.requests += 1
            self.waited_seconds += wait
        # Outside the lock: another thread of this client claims the next slot meanwhile.
        if wait > 0:
            self._sleep(wait)
        return wait

    def _session(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = self._connect()
            conn.autocommit = True
            conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(STATEMENT_TIMEOUT)))
            conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(STATEMENT_TIMEOUT)))
            conn.execute("SET application_name = 'medsync request limit'")
            self._conn = conn
        return self._conn

    def _drop_session(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            if self.requests:
                log.info(
                    "%s: %d requests at the source's limit of %g/s, %.1f s spent waiting for a slot",
                    self._source, self.requests, self._rate, self.waited_seconds,
                )  # fmt: skip
            self._drop_session()

    def __enter__(self) -> DatabaseRequestLimiter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
