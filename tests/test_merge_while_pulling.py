"""Merging while pulling (``medsync.early_merge``): a first load's instances merged chunk by chunk
during their pull leave A exactly as B is, with the same figures as a merge after the pull, and a
pull or a merge run again, or killed mid-way, converges.

The task bodies run in real processes (``tests/b_world.py``) against B's simulator; the staging
is committed in chunks of one page (5 records), so a pull has dozens of chunks to merge early.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from b_world import BASE, World, b_world, full_refresh_facts

from benchmarks.dag import Task

pytestmark = pytest.mark.slow  # real task processes and a simulator: about a minute

FIRST_LOAD = full_refresh_facts(BASE + timedelta(hours=1))
FIGURES = ("candidates", "inserted", "updated", "unchanged", "stale", "deleted", "pending", "tombstones_only")


@pytest.fixture
def world(a_template_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with b_world(a_template_db, tmp_path, monkeypatch) as w:
        yield w


def parents_first(world: World, run_id: int, *, instance_pull: bool = True) -> dict[str, Any]:
    """Pulls and merges each level before the next one's pull, so that the instances' parents are
    merged when their pull starts; returns the instance pull's figures (None when not pulled)."""
    run = {"source": "b", "run_id": run_id}
    for level in ("subject", "study", "sequence"):
        world.workers.run_one("medsync.tasks:pull", level=level, **run)
        world.workers.run_one("medsync.tasks:merge", level=level, **run)
    if not instance_pull:
        return {}
    world.workers.run_one("medsync.tasks:pull", level="instance", **run)
    return world.query("SELECT pull_counts FROM medsync.sync_run_level WHERE run_id = %s AND level = 'instance'",
                       run_id)[0][0]["slice_0"]  # fmt: skip


def finish_run(world: World, run_id: int) -> dict[str, Any]:
    """The instance merge, then the rest of the run; returns the instance merge's figures."""
    run = {"source": "b", "run_id": run_id}
    for target, kwargs in (("merge", {"level": "instance"}), ("check_files", {}), ("report", {}), ("finish", {})):
        world.workers.run_one(f"medsync.tasks:{target}", **run, **kwargs)
    return world.query("SELECT merge_counts FROM medsync.sync_run_level WHERE run_id = %s AND level = 'instance'",
                       run_id)[0][0]  # fmt: skip


def early_chunks(world: World, run_id: int) -> int:
    return world.count(
        "SELECT coalesce(sum(last_chunk - first_chunk + 1), 0) FROM medsync.early_merge_chunk WHERE run_id = %s",
        run_id,
    )


def test_a_first_load_merged_while_pulling_is_exactly_b_with_the_figures_of_a_merge_after_it(
    a_template_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = {}
    for enabled in (True, False):
        with b_world(a_template_db, tmp_path / str(enabled), monkeypatch, merge_while_pulling=enabled) as world:
            run_id = world.prepare(FIRST_LOAD)
            pulled = parents_first(world, run_id)
            merged = finish_run(world, run_id)
            world.assert_a_is_b()
            images = len(list(world.sim.records("images", include_deleted=True)))
            if enabled:
                early = pulled["merged_while_pulling"]
                assert early["chunks"] == early_chunks(world, run_id) > 10 and early["left"] == 0
                assert early["gave_up"] is None
                # Every chunk was merged during the pull: the merge task had nothing of the staging left.
                assert merged["early_chunks"] == early["chunks"] and merged["early_candidates"] == images
            else:
                assert "merged_while_pulling" not in pulled and early_chunks(world, run_id) == 0
                assert merged["early_chunks"] == 0
            figures[enabled] = {k: merged[k] for k in FIGURES}
    assert figures[True] == figures[False]


def test_chunks_wait_for_their_parents_merge(world: World) -> None:
    run_id = world.prepare(FIRST_LOAD)
    run = {"source": "b", "run_id": run_id}
    for level in ("subject", "study", "sequence", "instance"):
        world.workers.run_one("medsync.tasks:pull", level=level, **run)
    pulled = world.query("SELECT pull_counts FROM medsync.sync_run_level WHERE run_id = %s AND level = 'instance'",
                         run_id)[0][0]["slice_0"]["merged_while_pulling"]  # fmt: skip
    # The series were not merged yet: no chunk was merged (its images would only have waited as
    # pending), every one was left to the merge task.
    assert pulled["chunks"] == 0 and pulled["left"] > 10 and early_chunks(world, run_id) == 0
    assert world.count("SELECT count(*) FROM medsync.pending_instance") == 0
    for level in ("subject", "study", "sequence"):
        world.workers.run_one("medsync.tasks:merge", level=level, **run)
    merged = finish_run(world, run_id)
    world.assert_a_is_b()
    assert merged["early_chunks"] == 0 and merged["pending"] == 0


def test_only_a_first_load_is_merged_while_pulling(world: World) -> None:
    world.sync(FIRST_LOAD)
    world.sim.set_now(BASE + timedelta(hours=2))
    world.sim.mutate_fraction(0.3, seed=7)
    # A full refresh of a level A holds rows of: a source behind A must fail it before A changes.
    run_id = world.prepare(full_refresh_facts(BASE + timedelta(hours=3)))
    pulled = parents_first(world, run_id)
    assert "merged_while_pulling" not in pulled and early_chunks(world, run_id) == 0
    finish_run(world, run_id)
    world.assert_a_is_b()


def test_an_instance_pull_run_again_after_merging_early_converges_and_rewrites_nothing(world: World) -> None:
    run_id = world.prepare(FIRST_LOAD)
    assert parents_first(world, run_id)["merged_while_pulling"]["chunks"] > 10
    xmins = dict(world.query("SELECT id, xmin::text FROM imaging.instance"))
    # Airflow retries the pull (its worker was lost after the pull committed, say): the slice is
    # staged again, and A holds its rows now, so this attempt leaves them to the merge task.
    again = world.workers.run_one("medsync.tasks:pull", source="b", level="instance", run_id=run_id).result
    assert again["staged"] > 0 and early_chunks(world, run_id) == 0
    merged = finish_run(world, run_id)
    world.assert_a_is_b()
    assert merged["inserted"] == merged["updated"] == 0 and merged["early_chunks"] == 0
    assert dict(world.query("SELECT id, xmin::text FROM imaging.instance")) == xmins


def test_an_instance_pull_killed_while_merging_early_then_run_again_leaves_a_exactly_as_b(world: World) -> None:
    run_id = world.prepare(FIRST_LOAD)
    parents_first(world, run_id, instance_pull=False)
    # Every other page takes B 2 s: the pull is killed with chunks merged and more to fetch.
    world.sim.set_faults(slow_every=2, slow_seconds=2)
    try:
        world.killed(
            "medsync.tasks:pull",
            lambda: early_chunks(world, run_id) >= 2,
            source="b",
            level="instance",
            run_id=run_id,
        )
    finally:
        world.sim.set_faults()
    merged_before = world.count("SELECT count(*) FROM imaging.instance WHERE source_system = 'b'")
    assert merged_before > 0
    world.workers.run_graph(
        [
            Task("pull_instance", "medsync.tasks:pull", {"source": "b", "level": "instance", "run_id": run_id}),
            *(
                Task(name, f"medsync.tasks:{name}", {"source": "b", "run_id": run_id, **kwargs}, after=(after,))
                for name, kwargs, after in (
                    ("merge", {"level": "instance"}, "pull_instance"),
                    ("check_files", {}, "merge"),
                    ("report", {}, "check_files"),
                    ("finish", {}, "report"),
                )
            ),
        ]
    )
    world.assert_a_is_b()


def test_a_dry_run_first_load_merges_nothing_while_pulling(world: World) -> None:
    run_id = world.workers.run_one(
        "medsync.tasks:prepare", source="b", dag_run_id="dry", facts=FIRST_LOAD, dry_run=True
    ).result["run_id"]
    pulled = parents_first(world, run_id)
    assert "merged_while_pulling" not in pulled and early_chunks(world, run_id) == 0
    assert world.count("SELECT count(*) FROM imaging.instance") == 0
