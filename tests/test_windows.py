"""Which ``[since, until)`` window a run syncs (``medsync.windows``).

Rules: windows.py's docstring, the field notes on CronDataIntervalTimetable and run
types, and B's README (windows are ``[updated_since, updated_before)``).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pendulum
import pytest
from airflow.timetables.base import DataInterval, TimeRestriction
from airflow.timetables.interval import CronDataIntervalTimetable
from airflow.utils.types import DagRunType

from medsync.errors import RunParamsError
from medsync.windows import (
    BACKFILL,
    FULL_REFRESH,
    MANUAL,
    SCHEDULED,
    RunFacts,
    Window,
    advances_watermark,
    plan_window,
    sync_kind,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LOOKBACK = timedelta(minutes=10)
START = datetime(2026, 11, 18, 15, 0, tzinfo=UTC)  # 2026-11-19 00:00 Seoul
END = datetime(2026, 11, 19, 3, 0, tzinfo=UTC)  # 2026-11-19 12:00 Seoul
RUN_AFTER = datetime(2026, 11, 19, 4, 17, 33, tzinfo=UTC)
SEOUL = pendulum.timezone("Asia/Seoul")


def facts(
    run_type: str,
    start: datetime | None = START,
    end: datetime | None = END,
    run_after: datetime = RUN_AFTER,
    full_refresh: bool = False,
) -> RunFacts:
    return RunFacts(
        airflow_run_type=run_type,
        data_interval_start=start,
        data_interval_end=end,
        run_after=run_after,
        full_refresh=full_refresh,
    )


SCHEDULED_RUN = DagRunType.SCHEDULED.value
MANUAL_RUN = DagRunType.MANUAL.value
BACKFILL_RUN = DagRunType.BACKFILL_JOB.value


# --- run kinds from Airflow's own run types -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("run_type", "kind"),
    [
        (DagRunType.SCHEDULED, SCHEDULED),
        (DagRunType.BACKFILL_JOB, BACKFILL),
        (DagRunType.MANUAL, MANUAL),
        (DagRunType.ASSET_TRIGGERED, MANUAL),
        (DagRunType.OPERATOR_TRIGGERED, MANUAL),
    ],
)
def test_sync_kind_of_airflows_run_types(run_type: DagRunType, kind: str) -> None:
    assert sync_kind(facts(run_type.value)) == kind


@pytest.mark.parametrize("run_type", list(DagRunType))
def test_full_refresh_param_makes_any_run_a_full_refresh(run_type: DagRunType) -> None:
    assert sync_kind(facts(run_type.value, full_refresh=True)) == FULL_REFRESH


# --- scheduled ----------------------------------------------------------------------------------------


def test_scheduled_run_syncs_its_interval_minus_lookback() -> None:
    assert plan_window(facts(SCHEDULED_RUN), None, LOOKBACK) == Window(START - LOOKBACK, END)


def test_scheduled_run_with_an_earlier_watermark_starts_at_the_watermark_minus_lookback() -> None:
    watermark = START - timedelta(hours=36)  # three failed runs
    assert plan_window(facts(SCHEDULED_RUN), watermark, LOOKBACK) == Window(watermark - LOOKBACK, END)


def test_scheduled_run_with_a_later_watermark_starts_at_its_interval_minus_lookback() -> None:
    watermark = START + timedelta(hours=1)
    assert plan_window(facts(SCHEDULED_RUN), watermark, LOOKBACK) == Window(START - LOOKBACK, END)


def test_scheduled_run_with_the_watermark_at_its_start() -> None:
    assert plan_window(facts(SCHEDULED_RUN), START, LOOKBACK) == Window(START - LOOKBACK, END)


def test_scheduled_run_ignores_run_after() -> None:
    late = facts(SCHEDULED_RUN, run_after=END + timedelta(hours=5))
    assert plan_window(late, None, LOOKBACK).until == END


def test_zero_lookback_gives_exactly_the_interval() -> None:
    assert plan_window(facts(SCHEDULED_RUN), None, timedelta(0)) == Window(START, END)


# --- backfill -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "watermark", [None, START - timedelta(days=30), START + timedelta(hours=2), END + timedelta(days=3)]
)
def test_backfill_syncs_exactly_its_interval_minus_lookback_ignoring_the_watermark(
    watermark: datetime | None,
) -> None:
    assert plan_window(facts(BACKFILL_RUN), watermark, LOOKBACK) == Window(START - LOOKBACK, END)


def test_backfill_does_not_advance_the_watermark() -> None:
    assert advances_watermark(BACKFILL) is False


@pytest.mark.parametrize("kind", [SCHEDULED, MANUAL, FULL_REFRESH])
def test_other_kinds_advance_the_watermark(kind: str) -> None:
    assert advances_watermark(kind) is True


# --- manual -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("watermark", [None, START + timedelta(hours=1), END + timedelta(hours=1)])
def test_manual_run_with_an_interval_syncs_that_interval_minus_lookback(watermark: datetime | None) -> None:
    assert plan_window(facts(MANUAL_RUN), watermark, LOOKBACK) == Window(START - LOOKBACK, END)


def test_manual_run_with_an_interval_and_an_earlier_watermark_leaves_no_gap() -> None:
    watermark = START - timedelta(hours=24)
    window = plan_window(facts(MANUAL_RUN), watermark, LOOKBACK)
    assert advances_watermark(sync_kind(facts(MANUAL_RUN)))
    assert window.since <= watermark - LOOKBACK


@pytest.mark.parametrize(
    ("start", "end"), [(None, None), (RUN_AFTER, RUN_AFTER), (START, START), (None, END), (START, None)]
)
def test_manual_run_without_interval_syncs_from_watermark_minus_lookback_until_run_after(
    start: datetime | None, end: datetime | None
) -> None:
    watermark = datetime(2026, 11, 10, 7, 7, tzinfo=UTC)
    window = plan_window(facts(MANUAL_RUN, start, end), watermark, LOOKBACK)
    assert window == Window(watermark - LOOKBACK, RUN_AFTER)


def test_manual_run_dated_ahead_of_its_start_ends_at_its_start() -> None:
    # Triggered at RUN_AFTER with a logical date a day later: its interval lies in the future.
    ahead = facts(MANUAL_RUN, RUN_AFTER + timedelta(hours=12), RUN_AFTER + timedelta(hours=24))
    watermark = RUN_AFTER - timedelta(hours=1)
    assert plan_window(ahead, watermark, LOOKBACK) == Window(watermark - LOOKBACK, RUN_AFTER)
    # An interval that has begun but not ended: from its start (no watermark) to the run's start.
    current = facts(MANUAL_RUN, RUN_AFTER - timedelta(minutes=5), RUN_AFTER + timedelta(minutes=55))
    assert plan_window(current, None, timedelta(0)) == Window(RUN_AFTER - timedelta(minutes=5), RUN_AFTER)


@pytest.mark.parametrize(("start", "end"), [(None, None), (RUN_AFTER, RUN_AFTER)])
def test_manual_run_without_interval_or_watermark_syncs_from_the_beginning(
    start: datetime | None, end: datetime | None
) -> None:
    assert plan_window(facts(MANUAL_RUN, start, end), None, LOOKBACK) == Window(EPOCH, RUN_AFTER)


def test_manual_run_with_watermark_after_its_start_still_syncs_a_non_empty_window() -> None:
    watermark = RUN_AFTER + timedelta(hours=2)  # clock skew
    window = plan_window(facts(MANUAL_RUN, None, None), watermark, LOOKBACK)
    assert window.until == RUN_AFTER
    assert window.since < window.until


def test_manual_run_with_watermark_equal_to_its_start_and_no_lookback_is_not_empty() -> None:
    window = plan_window(facts(MANUAL_RUN, None, None), RUN_AFTER, timedelta(0))
    assert window.until == RUN_AFTER
    assert window.since < window.until


# --- full refresh -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run_type", "start", "end"),
    [
        (SCHEDULED_RUN, START, END),
        (MANUAL_RUN, START, END),
        (MANUAL_RUN, None, None),
        (MANUAL_RUN, RUN_AFTER, RUN_AFTER),
    ],
)
@pytest.mark.parametrize("watermark", [None, START - timedelta(days=2), END + timedelta(days=2)])
def test_full_refresh_syncs_from_the_beginning_until_run_after_regardless_of_interval(
    run_type: str, start: datetime | None, end: datetime | None, watermark: datetime | None
) -> None:
    window = plan_window(facts(run_type, start, end, full_refresh=True), watermark, LOOKBACK)
    assert window == Window(EPOCH, RUN_AFTER)


# --- never open, never empty --------------------------------------------------------------------------------


@pytest.mark.parametrize("run_type", [SCHEDULED_RUN, BACKFILL_RUN])
@pytest.mark.parametrize(("start", "end"), [(None, None), (START, START), (END, START), (None, END)])
def test_scheduled_or_backfill_run_without_interval_is_refused_not_opened(
    run_type: str, start: datetime | None, end: datetime | None
) -> None:
    with pytest.raises(RunParamsError, match="interval"):
        plan_window(facts(run_type, start, end), None, LOOKBACK)


WATERMARKS = [None, EPOCH, START - timedelta(days=1), START, END, RUN_AFTER, RUN_AFTER + timedelta(days=1)]
LOOKBACKS = [timedelta(0), timedelta(seconds=1), LOOKBACK, timedelta(days=1)]
INTERVALS = [(START, END), (None, None), (RUN_AFTER, RUN_AFTER)]


@pytest.mark.parametrize(
    ("run_type", "full_refresh"),
    [(SCHEDULED_RUN, False), (BACKFILL_RUN, False), (MANUAL_RUN, False), (MANUAL_RUN, True), (SCHEDULED_RUN, True)],
)
def test_every_planned_window_is_bounded_and_not_empty(run_type: str, full_refresh: bool) -> None:
    for (start, end), watermark, lookback in itertools.product(INTERVALS, WATERMARKS, LOOKBACKS):
        run = facts(run_type, start, end, full_refresh=full_refresh)
        try:
            window = plan_window(run, watermark, lookback)
        except RunParamsError:
            assert run_type != MANUAL_RUN and not full_refresh and start == end, "only interval-less runs refuse"
            continue
        assert window.since is not None and window.until is not None
        assert window.since.tzinfo is not None and window.until.tzinfo is not None
        assert EPOCH <= window.since < window.until, (run, watermark, lookback, window)


# --- slices -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 7, 16, 32])
@pytest.mark.parametrize(
    "window",
    [
        Window(START - LOOKBACK, END),
        Window(EPOCH, RUN_AFTER),
        Window(START, START + timedelta(minutes=1, microseconds=7)),
        Window(START, START + timedelta(hours=12, microseconds=1)),
    ],
    ids=["12h10m", "full", "1min", "12h+1us"],
)
def test_slices_cover_the_window_exactly_contiguous_without_overlap(window: Window, count: int) -> None:
    parts = window.slices(count)
    assert len(parts) == count
    assert parts[0].since == window.since
    assert parts[-1].until == window.until
    for before, after in itertools.pairwise(parts):
        assert before.until == after.since
    assert all(p.since < p.until for p in parts)
    assert sum((p.until - p.since for p in parts), timedelta(0)) == window.until - window.since


def test_one_slice_is_the_window_itself() -> None:
    window = Window(START, END)
    assert window.slices(1) == [window]


# --- real intervals from Airflow's CronDataIntervalTimetable ---------------------------------------------------


@pytest.fixture(scope="module")
def timetable() -> CronDataIntervalTimetable:
    return CronDataIntervalTimetable("0 0,12 * * *", timezone="Asia/Seoul")


def _scheduled_intervals(timetable: CronDataIntervalTimetable, count: int) -> list[DataInterval]:
    restriction = TimeRestriction(
        earliest=pendulum.datetime(2026, 11, 19, 5, 30, tz="Asia/Seoul"), latest=None, catchup=True
    )
    out: list[DataInterval] = []
    last: DataInterval | None = None
    for _ in range(count):
        info = timetable.next_dagrun_info(last_automated_data_interval=last, restriction=restriction)
        assert info is not None and info.data_interval is not None
        last = info.data_interval
        out.append(last)
    return out


def test_scheduled_window_from_a_real_interval_is_12h_ending_at_seoul_midnight_or_noon(
    timetable: CronDataIntervalTimetable,
) -> None:
    for interval in _scheduled_intervals(timetable, 4):
        run = facts(SCHEDULED_RUN, interval.start, interval.end, run_after=interval.end)
        window = plan_window(run, None, LOOKBACK)
        assert window.until == interval.end
        assert window.until - window.since == timedelta(hours=12) + LOOKBACK
        local_end = pendulum.instance(window.until).in_timezone(SEOUL)
        assert (local_end.hour, local_end.minute, local_end.second) in {(0, 0, 0), (12, 0, 0)}


def test_consecutive_scheduled_windows_overlap_by_exactly_the_lookback(timetable: CronDataIntervalTimetable) -> None:
    windows = [
        plan_window(facts(SCHEDULED_RUN, i.start, i.end, run_after=i.end), i.start, LOOKBACK)
        for i in _scheduled_intervals(timetable, 4)
    ]
    for before, after in itertools.pairwise(windows):
        assert before.until - after.since == LOOKBACK


def test_scheduled_run_after_failures_catches_up_from_the_watermark(timetable: CronDataIntervalTimetable) -> None:
    first, _failed, third = _scheduled_intervals(timetable, 3)
    window = plan_window(facts(SCHEDULED_RUN, third.start, third.end), first.end, LOOKBACK)
    assert window == Window(first.end - LOOKBACK, third.end)


def test_manual_run_with_an_inferred_interval_ends_at_or_before_run_after(
    timetable: CronDataIntervalTimetable,
) -> None:
    run_after = pendulum.datetime(2026, 11, 19, 13, 5, tz="Asia/Seoul")
    interval = timetable.infer_manual_data_interval(run_after=run_after)
    window = plan_window(facts(MANUAL_RUN, interval.start, interval.end, run_after=run_after), None, LOOKBACK)
    assert window.until == interval.end <= run_after
    assert window.since == interval.start - LOOKBACK
    assert pendulum.instance(window.until).in_timezone(SEOUL).hour in {0, 12}
