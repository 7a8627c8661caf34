"""Merging a level while it is still being pulled (``merge_while_pulling`` in a source's config).

On a first load the instances are about nine records in ten, and with each level merged after
its pull, the run's critical path is the whole instance pull and then the whole instance merge,
one after the other. Here the pull task hands each staging chunk it commits to a thread of its
own, which merges that chunk into A (``merge.merge_level`` with ``chunk``) on a database session
of its own as soon as the level's parents are merged in this run, while the pull goes on
fetching. The level's merge task then merges what is left (chunks not merged early, the pending
records) and adds the early chunks' counts to its own, so the run's figures are the same.

A chunk is merged exactly as the merge task's batches are: under the source lock, deduplicated,
parents resolved, every record decided against A's current rows. So every rule of a-model.md
holds; what changes is only when the work is done. It applies only where that is safe and pays:

- the level has no children (no cascade, no children following their parents' UIDs, which the
  merge task does over all of the run's records);
- the level is pulled by one task (``instance_slices: 1``): one pull commits its chunks in the
  order it fetched them, and a record fetched later is never older than the same record fetched
  earlier, so no early merge can see an older version after a newer one (with slices, a record
  that changed during the run may sit in two slices, whose chunks are merged in any order);
- the level held no row and no tombstone of the source when the pull began (a first load): a
  full refresh against a source that went back in time must fail before A changes, and with
  nothing in A there is nothing to be behind of;
- not a dry run.

The merging never holds up the pull: it takes the source lock only when it is free (a merge of
another level, or of another run, may hold it), and chunks wait meanwhile. When the pull ends,
what is still waiting is merged then, waiting for the lock as a merge task does, if the
parents are merged by then; otherwise it is left to the merge task. A database error while
merging early is logged, and the chunk and all later ones are left to the merge task, which
re-merges the chunk and converges (A's rows are decided against, never assumed).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import psycopg

from medsync import ledger
from medsync.errors import MedsyncError
from medsync.levels import spec
from medsync.locks import source_lock_if_free
from medsync.merge import Chunks, holds_nothing_of_the_source, merge_level

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
"""How often waiting chunks look again whether the parents are merged and the source lock is free."""

_PULL_ENDED = -1


def applies(
    conn: psycopg.Connection,
    *,
    enabled: bool,
    source: str,
    level: str,
    slices: int,
    dry_run: bool,
) -> bool:
    """Whether this pull merges its chunks while it runs (the conditions in the module's docstring)."""
    return (
        enabled
        and spec(level).child_level is None
        and slices == 1
        and not dry_run
        and holds_nothing_of_the_source(conn, source, level)
    )


@dataclass
class EarlyMergeFigures:
    chunks: int = 0
    merges: int = 0
    """Each merge takes every chunk committed and waiting at the time."""
    candidates: int = 0
    inserted: int = 0
    seconds: float = 0.0
    """Spent merging, on the merging thread (while the pull went on)."""
    left: int = 0
    """Chunks left to the merge task (the parents were not merged in time, or merging gave up)."""
    gave_up: str | None = None
    """The class of the error that stopped the early merging, if one did."""

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "seconds": round(self.seconds, 3)}


@dataclass
class EarlyMerger:
    """Merges one pull's committed chunks on a thread of its own; a context manager around the pull.

    ``connect`` opens a session of A's database in autocommit mode (the thread's own). Leaving
    the block normally merges what is still waiting (see the module's docstring); leaving it by
    an error stops after the merge under way and leaves the rest to the merge task.
    """

    connect: Callable[[], psycopg.Connection]
    source: str
    level: str
    run_id: int
    slice_index: int
    batch_size: int
    lock_timeout_seconds: int
    parent_lookup: str
    sessions: int = 1
    """Sessions the merge of what is left when the pull ends may use (while it pulls: one, as the
    pull needs the machine too)."""
    poll_seconds: float = POLL_SECONDS
    figures: EarlyMergeFigures = field(default_factory=EarlyMergeFigures)
    _committed: queue.Queue[int] = field(default_factory=queue.Queue)
    _waiting: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _defect: BaseException | None = None

    def __enter__(self) -> EarlyMerger:
        self._thread = threading.Thread(target=self._run, name=f"early-merge-{self.level}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self._stop.set()  # the pull failed: no more merging (what committed stays, and converges)
        self._committed.put(_PULL_ENDED)
        if self._thread is not None:
            self._thread.join()
        if kind is None and self._defect is not None:
            raise self._defect

    def committed(self, chunk: int) -> None:
        """Called by the pull once chunk number ``chunk`` of its slice is committed."""
        self._committed.put(chunk)

    def _run(self) -> None:
        try:
            with self.connect() as conn:
                self._merge_as_they_come(conn)
        except (psycopg.Error, MedsyncError) as exc:
            # The merge task merges whatever is not recorded as merged: nothing is lost.
            self.figures.gave_up = type(exc).__name__
            log.warning("%s: merging while pulling gave up (%s); the merge task merges the rest",
                        self.level, type(exc).__name__)  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 (a defect: raised in the pull's thread when the block ends)
            self._defect = exc
        finally:
            self._take(timeout=0)
            self.figures.left = len(self._waiting)

    def _take(self, timeout: float) -> bool:
        """Moves the chunks committed so far to ``_waiting`` (waiting up to ``timeout`` for the first);
        returns whether the pull has ended."""
        ended = False
        try:
            chunk = self._committed.get(timeout=timeout) if timeout > 0 else self._committed.get_nowait()
            while True:
                if chunk == _PULL_ENDED:
                    ended = True
                else:
                    self._waiting.append(chunk)
                chunk = self._committed.get_nowait()
        except queue.Empty:
            return ended

    def _merge_as_they_come(self, conn: psycopg.Connection) -> None:
        parent = spec(self.level).parent_level
        parents_merged = parent is None
        pull_ended = False
        while not self._stop.is_set():
            pull_ended = self._take(self.poll_seconds) or pull_ended
            if not parents_merged and parent is not None:
                parents_merged = ledger.level_merged(conn, self.run_id, parent)
            if self._waiting and parents_merged:
                if pull_ended:
                    # The pull is done: wait for the lock, as the merge task would, and use its sessions.
                    self._merge(conn, sessions=self.sessions)
                else:
                    with source_lock_if_free(conn, self.source) as held:
                        if held:
                            self._merge(conn, sessions=1)
            if pull_ended:
                return

    def _merge(self, conn: psycopg.Connection, *, sessions: int) -> None:
        """Merges every waiting chunk (consecutive: committed in order) in one merge, recorded as merged.

        A merge that lags behind the pull takes bigger bites: fewer work tables, fuller batches.
        """
        chunks = Chunks(self.slice_index, self._waiting[0], self._waiting[-1])
        counts = merge_level(
            conn,
            source=self.source,
            level=self.level,
            run_id=self.run_id,
            batch_size=self.batch_size,
            lock_timeout_seconds=self.lock_timeout_seconds,
            sessions=sessions,
            connect=self.connect,
            parent_lookup=self.parent_lookup,
            chunks=chunks,
        )
        self._waiting.clear()
        self.figures.chunks += chunks.count
        self.figures.merges += 1
        self.figures.candidates += counts.candidates
        self.figures.inserted += counts.inserted
        self.figures.seconds += counts.seconds
        log.info(
            "%s chunks %d-%d merged while pulling: %d records, %d inserted, %d updated, %d pending in %.2fs",
            self.level, chunks.first, chunks.last, counts.candidates, counts.inserted, counts.updated,
            counts.pending, counts.seconds,
        )  # fmt: skip
