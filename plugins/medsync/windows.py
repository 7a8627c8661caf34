"""Which window ``[since, until)`` of the source's ``updated_at`` a run syncs.

Every run syncs a bounded window; B is never asked for an open-ended one.

- scheduled: from its interval's start, or from the level's watermark if that is
  earlier (so a failed run leaves no gap), minus the lookback, until the interval's end;
- backfill: exactly its interval, minus the lookback;
- manual: its interval if it has one (from the watermark if that is earlier, because a
  manual run advances the watermark too), ending no later than the run's start; otherwise
  from the watermark (minus the lookback), or from the beginning when nothing was ever
  synced, until the run's start;
- full refresh: from the beginning until the run's start;
- repair (``since`` and ``until`` given in the trigger form): exactly that window, no
  lookback, whatever the run's type.

The watermark is kept per source and level. It advances only after a successful
scheduled, manual or full-refresh run, to that run's ``until``, and never moves
backwards; backfills and repairs leave it alone (they re-sync the past), and so does a
dry run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise

from medsync.errors import RunParamsError

BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)
"""``since`` of a full refresh: before any record B can hold."""

SCHEDULED, MANUAL, BACKFILL, FULL_REFRESH, REPAIR = "scheduled", "manual", "backfill", "full_refresh", "repair"


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime

    def slices(self, count: int) -> list[Window]:
        """``count`` consecutive sub-windows covering this one exactly (for parallel pulls)."""
        step = (self.until - self.since) / count
        edges = [self.since + step * i for i in range(count)] + [self.until]
        return [Window(a, b) for a, b in pairwise(edges) if a < b]


@dataclass(frozen=True)
class RunFacts:
    """What Airflow knows about a run, as plain values (so planning is testable without Airflow)."""

    airflow_run_type: str
    """Airflow's DagRunType value: scheduled, manual, backfill, asset_triggered, ..."""
    data_interval_start: datetime | None
    data_interval_end: datetime | None
    run_after: datetime
    """When the run was due or triggered: the 'run start' of a manual or full run; stable across retries."""
    full_refresh: bool = False
    since: datetime | None = None
    """With ``until``: the exact window of a repair run (the trigger form's ``since``/``until``)."""
    until: datetime | None = None

    def __post_init__(self) -> None:
        if (self.since is None) != (self.until is None):
            raise RunParamsError("a repair window needs both since and until")
        if self.since is not None and self.until is not None:
            if self.full_refresh:
                raise RunParamsError("full_refresh syncs everything: give it no since/until")
            if self.since.tzinfo is None or self.until.tzinfo is None:
                raise RunParamsError("since and until need a UTC offset (e.g. 2026-03-01T00:00:00+00:00)")
            if not self.since < self.until:
                raise RunParamsError(f"since {self.since.isoformat()} is not before until {self.until.isoformat()}")


def sync_kind(facts: RunFacts) -> str:
    if facts.full_refresh:
        return FULL_REFRESH
    if facts.since is not None:
        return REPAIR
    if facts.airflow_run_type == "backfill":
        return BACKFILL
    if facts.airflow_run_type == "scheduled":
        return SCHEDULED
    return MANUAL


def _has_interval(facts: RunFacts) -> bool:
    return (
        facts.data_interval_start is not None
        and facts.data_interval_end is not None
        and facts.data_interval_start < facts.data_interval_end
    )


def plan_window(facts: RunFacts, watermark: datetime | None, lookback: timedelta) -> Window:
    """The window one level of a run syncs, given that level's watermark (None: never synced)."""
    kind = sync_kind(facts)
    if kind == FULL_REFRESH:
        since, until = BEGINNING, facts.run_after
    elif kind == REPAIR:
        assert facts.since is not None and facts.until is not None
        return Window(max(facts.since, BEGINNING), facts.until)
    elif kind in (SCHEDULED, BACKFILL) or _has_interval(facts):
        if not _has_interval(facts):
            raise RunParamsError(f"a {kind} run needs a data interval; the DAG's timetable must give one")
        assert facts.data_interval_start is not None and facts.data_interval_end is not None
        since, until = facts.data_interval_start, facts.data_interval_end
        if kind != BACKFILL and watermark is not None and watermark < since:
            since = watermark
        since -= lookback
        if kind == MANUAL and until > facts.run_after:
            # A manual run dated ahead of its start (the trigger form and the REST API take any
            # logical date; run_after is then the trigger time) has an interval ending in the
            # future. What happens after the run read the source is the next run's: a window past
            # the start would move the watermark over changes nobody read.
            until = facts.run_after
    else:
        since = watermark - lookback if watermark is not None else BEGINNING
        until = facts.run_after
    since = max(since, BEGINNING)
    if since >= until:
        # A watermark ahead of a manual run's start (clock skew, or an earlier run with a
        # later start) still syncs the lookback, never an empty or reversed window.
        since = until - max(lookback, timedelta(minutes=1))
    return Window(since, until)


def advances_watermark(kind: str) -> bool:
    return kind in (SCHEDULED, MANUAL, FULL_REFRESH)
