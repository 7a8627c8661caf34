"""The run report's A-side figures: kept live counts for window runs, exact counts for full refreshes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from medsync import live_count
from medsync.config import LEVELS
from medsync.errors import ReconciliationError
from medsync.report import build_report, check_full_refresh, format_report
from medsync.sources.base import RawPage, SourceClient
from tests.test_merge import Sync, full_tree, tomb

B_LIVE = {"subject": 2, "study": 2, "sequence": 2, "instance": 3}


class CountsOnly(SourceClient):
    """B's side of the report: ``/counts`` and no records changed after the window."""

    def __init__(self, counts: dict[str, int] | None) -> None:
        self._counts = counts

    def counts(self) -> dict[str, int] | None:
        return None if self._counts is None else dict(self._counts)

    def iter_pages(self, level: str, since: datetime, until: datetime) -> Iterator[RawPage]:
        return iter([])


def report(sync: Sync, run_id: int, kind: str, b_live: dict[str, int] | None = B_LIVE) -> dict[str, Any]:
    conn = sync.conn
    conn.execute("UPDATE medsync.sync_run SET run_type = %s WHERE id = %s", (kind, run_id))
    for level in LEVELS:
        conn.execute(
            "INSERT INTO medsync.sync_run_level (run_id, level, since, until)"
            " VALUES (%s, %s, '1970-01-01Z', '2026-11-20Z') ON CONFLICT DO NOTHING",
            (run_id, level),
        )
    return build_report(conn, CountsOnly(b_live), "b", run_id, lock_timeout_seconds=5)


def add_to_kept_instances(sync: Sync, n: int) -> None:
    sync.conn.execute("UPDATE medsync.live_count SET live = live + %s WHERE level = 'instance'", (n,))


@pytest.fixture
def loaded(a_db: str) -> Iterator[Sync]:
    s = Sync(a_db)
    s.run(**full_tree())
    yield s
    s.conn.close()


def test_window_run_reports_the_kept_count_without_counting_a(loaded: Sync) -> None:
    # A kept count that differs from A's rows shows that the window report did not count A.
    add_to_kept_instances(loaded, 5)
    levels = report(loaded, 1, "scheduled")["levels"]
    assert levels["instance"]["a_live"] == 8 and levels["instance"]["difference"] == 5
    assert levels["subject"]["a_live"] == 2 and levels["subject"]["difference"] == 0
    assert "deleted_with_parent" not in levels["instance"]


def test_full_refresh_counts_a_again_and_reports_the_drift(loaded: Sync) -> None:
    add_to_kept_instances(loaded, 5)
    result = report(loaded, 1, "full_refresh")
    instance = result["levels"]["instance"]
    assert (instance["a_live"], instance["live_count_drift"], instance["difference"]) == (3, 5, 0)
    assert result["levels"]["subject"]["live_count_drift"] == 0
    check_full_refresh(result)
    assert live_count.read(loaded.conn, "b")["instance"] == 3


def test_full_refresh_explains_children_deleted_with_their_parent(loaded: Sync) -> None:
    # B deletes study s1 only: its sequence and instances stay live in B, deleted in A (a-model.md).
    loaded.run(study=[tomb("s1", "2026-11-19T05:00:00Z")])
    b_live = {"subject": 2, "study": 1, "sequence": 2, "instance": 3}
    result = report(loaded, 2, "full_refresh", b_live)
    instance = result["levels"]["instance"]
    assert (instance["a_live"], instance["deleted_with_parent"], instance["difference"]) == (1, 2, -2)
    check_full_refresh(result)
    with pytest.raises(ReconciliationError, match="instance: A has 1 live rows, the source 5"):
        check_full_refresh(report(loaded, 2, "full_refresh", {**b_live, "instance": 5}))


def test_a_level_without_a_kept_count_is_counted(loaded: Sync) -> None:
    loaded.conn.execute("DELETE FROM medsync.live_count WHERE level IN ('study', 'instance')")
    levels = report(loaded, 1, "scheduled")["levels"]
    assert [levels[level]["a_live"] for level in LEVELS] == [2, 2, 2, 3]
    assert live_count.read(loaded.conn, "b") == {"subject": 2, "study": 2, "sequence": 2, "instance": 3}


def test_a_source_without_counts_is_reported_as_not_checked(loaded: Sync) -> None:
    result = report(loaded, 1, "full_refresh", None)
    instance = result["levels"]["instance"]
    assert (instance["a_live"], instance["source_live"], instance["difference"]) == (3, None, None)
    check_full_refresh(result)  # nothing to reconcile against: not a failure
    text = format_report(result)
    assert "the source gives no counts" in text
    assert text.splitlines()[-2].split()[-3:] == ["3", "-", "-"]
