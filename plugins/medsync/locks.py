"""The session lock that serialises everything that writes a source's rows in A.

Merges of one source never run at the same time (they decide against A's current rows),
and an exact recount of ``medsync.live_count`` must not race a merge that adds to it.
Both hold this lock, a session-level advisory lock keyed by the source.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from medsync.errors import MergeError
from medsync.schema import MEDSYNC_LOCK_CLASS


def lock_key(purpose: str, source: str) -> int:
    """Advisory lock id of one ``purpose`` for a source, under ``MEDSYNC_LOCK_CLASS`` (the second half
    of a two-int key; stable everywhere). Every medsync lock keyed by a source takes its id here."""
    return zlib.crc32(f"{purpose}:{source}".encode()) & 0x7FFFFFFF


def source_lock_key(source: str) -> int:
    """Advisory lock id of a source's writes."""
    return lock_key("merge", source)


@contextmanager
def source_lock_if_free(conn: psycopg.Connection, source: str) -> Iterator[bool]:
    """Holds the source's lock for the block if no other session holds it now; yields whether it does.

    For work that can as well be done later by someone else (merging while pulling): it never waits.
    """
    row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (MEDSYNC_LOCK_CLASS, source_lock_key(source))).fetchone()
    held = row == (True,)
    try:
        yield held
    finally:
        if held:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (MEDSYNC_LOCK_CLASS, source_lock_key(source)))


@contextmanager
def source_lock(conn: psycopg.Connection, source: str, lock_timeout_seconds: int) -> Iterator[None]:
    """Holds the source's lock for the block, waiting up to ``lock_timeout_seconds`` for it.

    ``conn`` must be in autocommit mode: the lock belongs to the session, not to a transaction,
    so that the block can commit as often as it likes. Raises ``MergeError`` (the task is
    retried) when another run kept the lock for longer than the timeout.
    """
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(lock_timeout_seconds)}s")))
    try:
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (MEDSYNC_LOCK_CLASS, source_lock_key(source)))
    except psycopg.errors.LockNotAvailable:
        raise MergeError(
            f"another run of source {source!r} kept merging for over {lock_timeout_seconds}s; this task will be retried"
        ) from None
    finally:
        conn.execute("RESET lock_timeout")
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", (MEDSYNC_LOCK_CLASS, source_lock_key(source)))
