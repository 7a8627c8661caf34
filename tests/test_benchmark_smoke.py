"""A tiny run of the benchmark (``python -m benchmarks``, i.e. ``make bench``), so that it keeps working.

The real harness end to end, as ``make bench`` runs it: B's and C's simulators, databases, a
task process per task, every phase, on a few thousand instances. Timings are never asserted:
the benchmark is not a test. What is asserted is what the harness checks by itself (rows in
A, rows written by no-change re-syncs) and that it produced its table and JSON. The run also
loads the catalogue with dlt (``benchmarks.peers``, its own virtualenv under ``build/``, made on
first use: about a minute); where that venv cannot be made (no PyPI), the dlt checks are skipped.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_every_phase_on_a_small_catalogue(tmp_path: Path) -> None:
    args = ["--instances", "4000", "--scale", "8000", "--naive-instances", "2000", "--slice-counts", "1,2",
            "--slices", "2", "--pairs", "2", "--c-instances", "4000", "--results-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True, timeout=420, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "targets" in proc.stdout and "full load" in proc.stdout

    (saved,) = tmp_path.glob("*.json")
    r = json.loads(saved.read_text())
    shape = {"instances": 4000, "records": 4500, "subject": 20, "study": 80, "sequence": 400, "instance": 4000}
    assert {k: v for k, v in r["catalogue"].items() if k != "simulator_peak_rss_mb"} == shape
    assert r["floor"]["records"] == r["full_load"]["records"] == 4500
    assert r["full_load"]["rows"]["matches"] and r["incremental"]["rows"]["matches"]
    assert r["full_load"]["written"]["total_tuples"] == 4500
    for rerun in ("no_change_window", "no_change_full_refresh"):
        assert r[rerun]["written"]["total_tuples"] == 0
        assert r[rerun]["written"]["total_xmin"] == 0
    assert r["incremental"]["written"]["total_tuples"] > 0
    assert len(r["pairs"]) == 2 and r["pairs"][0]["full_load_seconds"] == r["full_load"]["seconds"]
    assert all(p["ratio"] == p["full_load_seconds"] / p["floor_seconds"] for p in r["pairs"])
    assert_loads_of_one_catalogue(r, instance_slices=2)
    for level in r["full_load"]["levels"].values():
        assert level["merge_build_seconds"] > 0 and level["merge_write_seconds"] > 0
    assert r["full_load"]["cpu"]["machine_cpu_seconds"] > 0
    assert [s["slices"] for s in r["slices"]] == [1, 2]
    assert all(s["records"] >= 4000 for s in r["slices"])
    assert r["naive"]["naive"]["records"] == r["naive"]["sync"]["records"] == r["naive"]["floor"]["records"] == 2250
    least, most = r["bounds"]["full_load"], r["bounds"]["naive"]
    assert 0 < least["instance_floor_seconds"] <= r["floor"]["seconds"]
    assert least["instance_floor_seconds"] == r["floor"]["levels"]["instance"]["seconds"]
    assert least["cpu_work_core_seconds"] == r["full_load"]["cpu"]["machine_cpu_seconds"] > 0
    work_bound = least["cpu_work_core_seconds"] / r["machine"]["cpus"]
    assert least["min_ratio"] == max(least["instance_floor_seconds"], work_bound) / r["floor"]["seconds"]
    assert most["max_speed_up"] == r["naive"]["naive"]["seconds"] / r["naive"]["floor"]["seconds"]
    assert r["targets"][0]["bound"] == least["min_ratio"]
    assert "least full load here" in proc.stdout and "this machine's bound" in proc.stdout
    assert [s["catalogue"]["instances"] for s in r["scale"]] == [8000]
    assert all(isinstance(t["met"], bool) for t in r["targets"])
    names = [t["target"] for t in r["targets"]]
    assert not any("naive" in name for name in names)  # issue 14 no longer asks for it
    for level in ("subject", "study", "sequence", "instance"):
        for label in ("", "C: "):
            assert sum(name.startswith(f"{label}{level} pull's records/s at least 2/3") for name in names) == 1
    assert sum(name.startswith("C: full load within 1.5x the floor") for name in names) == 1
    assert "full load, tasks one after another" in proc.stdout and "pull vs floor" in proc.stdout
    for task in r["full_load"]["tasks"].values():
        assert 0 < task["peak_rss_mb"] < 1000

    # C measured as B: the floor with C's paging, the full loads in pairs and one task after another.
    c = r["c"]
    assert {k: v for k, v in c["catalogue"].items() if k != "simulator_peak_rss_mb"} == shape  # B's shape
    assert 0 < c["catalogue"]["simulator_peak_rss_mb"] < 1000 and 0 < r["catalogue"]["simulator_peak_rss_mb"] < 1000
    assert c["page_size"] == 500 and c["slices"] == 1  # c.yaml's
    assert c["floor"]["records"] == c["full_load"]["records"] == 4500
    assert c["full_load"]["rows"]["source_live"] == {"subject": 20, "study": 80, "sequence": 400, "instance": 4000}
    assert c["full_load"]["written"]["total_tuples"] == 4500
    assert len(c["pairs"]) == 2
    assert_loads_of_one_catalogue(c, instance_slices=1)
    assert r["bounds"]["c_full_load"]["min_ratio"] == next(
        t["bound"] for t in r["targets"] if t["target"].startswith("C: ")
    )
    assert "C full load, pulls in parallel" in proc.stdout

    # Last, so that a machine without PyPI still checks everything else.
    if "skipped" in r["peers"]:
        pytest.skip(f"dlt's virtualenv could not be made: {r['peers']['skipped']}")
    assert set(r["peers"]) == {"default", "fastest"}
    for config, dlt in r["peers"].items():
        assert dlt["rows"]["matches"], (config, dlt["rows"])
        assert dlt["rows"]["not_deleted"] == dlt["rows"]["source_live"] == {
            "subject": 20, "study": 80, "sequence": 400, "instance": 4000}  # fmt: skip
        assert dlt["seconds"] > 0 and dlt["records"] == 4500
    assert "dlt fastest" in proc.stdout and "side by side, x the floor" in proc.stdout
    assert any(t["target"].startswith("full load ahead of dlt's fastest") for t in r["targets"])
    assert any(t["target"].startswith("full load with tasks one after another ahead of dlt") for t in r["targets"])
    assert "medsync tasks one after another" in proc.stdout


def assert_loads_of_one_catalogue(loads: dict[str, Any], instance_slices: int) -> None:
    """What every catalogue's full loads give (B's main one, C's): pairs with each level's pull beside its
    floor (a level in slices whole), their medians, and the full load with its tasks one after another."""
    levels = ("subject", "study", "sequence", "instance")
    for pair in loads["pairs"]:
        for level in levels:
            each = pair["levels"][level]
            assert each["ratio"] == each["pull_records_per_s"] / each["floor_records_per_s"]
    assert set(loads["pull_vs_floor"]) == set(levels)
    for level, medians in loads["pull_vs_floor"].items():
        assert medians["ratio"] == statistics.median(p["levels"][level]["ratio"] for p in loads["pairs"])
    assert loads["floor"]["levels"]["instance"]["records"] == loads["full_load"]["levels"]["instance"]["records"]

    sequential = loads["sequential"]
    assert sequential["rows"]["matches"] and sequential["records"] == loads["full_load"]["records"]
    assert sequential["written"]["total_tuples"] == loads["full_load"]["written"]["total_tuples"]
    assert sequential["x_floor"] == sequential["seconds"] / statistics.median(
        p["floor_seconds"] for p in loads["pairs"]
    )
    # One task at a time, in the order airflow dags test takes them: prepare, the pulls, the merges parents first.
    tasks = sorted(sequential["tasks"].items(), key=lambda item: item[1]["began"])
    instance_pulls = (
        [f"pull_instance_{i}" for i in range(instance_slices)] if instance_slices > 1 else ["pull_instance"]
    )
    assert [name for name, _ in tasks] == [
        "prepare", "pull_subject", "pull_study", "pull_sequence", *instance_pulls,
        *(f"merge_{level}" for level in levels), "check_files", "report", "finish"]  # fmt: skip
    for (_, before), (_, after) in itertools.pairwise(tasks):
        assert after["began"] >= before["began"] + before["seconds"] - 0.002  # figures are rounded to the ms


def test_a_insert_measures_every_case_on_a_few_rows() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.a_insert", "2000", "2", "300"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "rows/s" in line]
    assert len(lines) == 6 and "as the merge writes" in lines[0] and "in one statement" in lines[1]
