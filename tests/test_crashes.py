"""Crashes converge: a task process killed (SIGKILL) mid-way and run again leaves A exactly as B is,
and two runs racing over the same window end as one would.

The task bodies (``medsync.tasks``) run in real processes forked from a server that imported
Airflow and medsync once (``benchmarks.dag.Workers``, as the benchmark runs them), with the
connections in their environment as a worker's; the killed ones are SIGKILLed at a point the
test detects in the database or at the simulator, not at a point a mock chose. A is then
compared row by row with the simulator's ``live_records``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from b_world import BASE, World, b_world, full_refresh_facts

from benchmarks.dag import Task, sync_graph
from medsync.windows import RunFacts

pytestmark = pytest.mark.slow  # real task processes and a simulator: about 30 s


@pytest.fixture
def world(a_template_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with b_world(a_template_db, tmp_path, monkeypatch) as w:
        yield w


def test_a_merge_killed_mid_batch_then_run_again_leaves_a_exactly_as_b(world: World) -> None:
    run_id = world.prepare(full_refresh_facts(BASE + timedelta(hours=1)))
    world.workers.run_graph(sync_graph(run_id, 1, pulls_only=True))
    for level in ("subject", "study", "sequence"):
        world.workers.run_one("medsync.tasks:merge", source="b", level=level, run_id=run_id)
    keys = sorted(k for (k,) in world.query(f"SELECT DISTINCT source_key FROM medsync.stage_b_instance_r{run_id}"))
    assert len(keys) > 40
    # A batch in the middle is held inside its transaction: a row of the same key, inserted and not
    # committed by another session, makes the batch's INSERT wait on the unique index.
    blocker = psycopg.connect(world.dsn)
    try:
        blocker.execute(
            "INSERT INTO imaging.instance (id, sequence_id, source_system, source_key, sop_instance_uid,"
            " storage_bucket, storage_key) SELECT %s, id, 'b', %s, 'x', 'x', 'x' FROM imaging.sequence LIMIT 1",
            (uuid.uuid4(), keys[len(keys) // 2]),
        )

        def batch_waits_and_others_committed() -> bool:
            waiting = world.count(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'medsync' AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO%%'"
            )
            return waiting > 0 and world.count("SELECT count(*) FROM imaging.instance WHERE source_system = 'b'") > 0

        world.killed(
            "medsync.tasks:merge", batch_waits_and_others_committed, source="b", level="instance", run_id=run_id
        )
    finally:
        blocker.rollback()
        blocker.close()
    merged = world.count("SELECT count(*) FROM imaging.instance WHERE source_system = 'b'")
    assert 0 < merged < len(keys)  # killed with some batches committed and the rest not
    for task in ("merge", "check_files", "report", "finish"):
        kwargs = {"level": "instance"} if task == "merge" else {}
        world.workers.run_one(f"medsync.tasks:{task}", source="b", run_id=run_id, **kwargs)
    world.assert_a_is_b()


def test_a_pull_killed_mid_page_then_run_again_leaves_a_exactly_as_b(world: World) -> None:
    world.sync(full_refresh_facts(BASE + timedelta(hours=1)))
    world.sim.set_now(BASE + timedelta(hours=2))
    world.sim.mutate_fraction(0.3, seed=11)
    run_id = world.prepare(full_refresh_facts(BASE + timedelta(hours=3)))
    total = len(list(world.sim.records("images", include_deleted=True)))
    # Every other page takes B 10 s: the pull is killed waiting for its second page (read ahead
    # while the first is staged), with the first staged and committed.
    world.sim.set_faults(slow_every=2, slow_seconds=10)
    try:

        def page_in_flight_after_staged_pages() -> bool:
            return world.sim.stats()["faults"]["slow"] >= 1 and world.staged(run_id, "instance") > 0

        world.killed(
            "medsync.tasks:pull", page_in_flight_after_staged_pages, source="b", level="instance", run_id=run_id
        )
    finally:
        world.sim.set_faults()
    assert 0 < world.staged(run_id, "instance") < total
    tasks = [t for t in sync_graph(run_id, 1) if t.name != "pull_instance"]
    tasks.insert(0, Task("pull_instance", "medsync.tasks:pull", {"source": "b", "level": "instance", "run_id": run_id}))
    world.workers.run_graph(tasks)
    world.assert_a_is_b()


def test_a_backfill_racing_a_scheduled_run_ends_as_one_run_would(world: World) -> None:
    world.sync(full_refresh_facts(BASE + timedelta(hours=1)))
    world.sim.set_now(BASE + timedelta(hours=2))
    world.sim.mutate_fraction(0.3, seed=13)
    interval = (BASE, BASE + timedelta(hours=12))
    scheduled = world.prepare(RunFacts("scheduled", *interval, interval[1]))
    backfill = world.prepare(RunFacts("backfill", *interval, interval[1]))
    # Both runs' tasks at once: their pulls side by side, their merges wherever the dependencies allow.
    both = [
        Task(f"{tag}:{t.name}", t.target, t.kwargs, after=tuple(f"{tag}:{a}" for a in t.after))
        for tag, run_id in (("scheduled", scheduled), ("backfill", backfill))
        for t in sync_graph(run_id, 2)
    ]
    world.workers.run_graph(both)
    world.assert_a_is_b()
    # And the watermark is the scheduled run's alone: a backfill never moves it.
    marks = {m for (m,) in world.query("SELECT synced_until FROM medsync.watermark WHERE source_system = 'b'")}
    assert marks == {interval[1]}
