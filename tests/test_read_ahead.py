"""``staging.read_ahead``: the pages a pull fetches ahead of the one it stages."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from medsync.staging import READ_AHEAD_SWITCH_SECONDS, read_ahead


def test_yields_every_item_in_order_from_another_thread() -> None:
    producers: set[str] = set()

    def items() -> Iterator[int]:
        for number in range(10):
            producers.add(threading.current_thread().name)
            yield number

    assert list(read_ahead(items())) == list(range(10))
    assert producers == {"medsync-read-ahead"}


def test_the_producers_error_is_raised_where_its_item_would_have_come() -> None:
    def items() -> Iterator[int]:
        yield 1
        raise ConnectionError("source went away")

    consumed: list[int] = []
    with pytest.raises(ConnectionError, match="source went away"):
        for item in read_ahead(items()):
            consumed.append(item)
    assert consumed == [1]


def test_a_caller_stopping_early_closes_the_producer() -> None:
    closed = threading.Event()

    def items() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            closed.set()

    pages = read_ahead(items())
    assert next(pages) == 0
    pages.close()
    assert closed.is_set()


def test_the_switch_interval_is_short_while_reading_ahead_and_restored_after() -> None:
    # Python's default 5 ms would make the fetching thread wait for the GIL at every socket
    # read, so fetching and staging would take turns (READ_AHEAD_SWITCH_SECONDS).
    before = sys.getswitchinterval()
    assert before > READ_AHEAD_SWITCH_SECONDS
    seen = [sys.getswitchinterval() for _ in read_ahead(iter(range(3)))]
    assert seen == [pytest.approx(READ_AHEAD_SWITCH_SECONDS)] * 3
    assert sys.getswitchinterval() == before

    with pytest.raises(ValueError):
        for _ in read_ahead(iter([1, 2])):
            raise ValueError("the stage failed")
    assert sys.getswitchinterval() == before


def test_read_aheads_that_overlap_restore_the_switch_interval_once_both_ended() -> None:
    # One setting for the whole process: the second to start must not restore the first's
    # shortened interval when it ends, and the first must not lengthen it under the second.
    before = sys.getswitchinterval()
    first, second = read_ahead(iter(range(3))), read_ahead(iter(range(3)))
    next(first)
    next(second)
    first.close()
    assert sys.getswitchinterval() == pytest.approx(READ_AHEAD_SWITCH_SECONDS)  # the second still runs
    second.close()
    assert sys.getswitchinterval() == before
