"""``python -m benchmarks`` (``make bench``): the sync's figures, in one run (docs/benchmarks.md).

Against a catalogue of ``--instances`` instances (default 1,000,000: 5,000 subjects x 4
studies x 5 sequences x 10 instances), served by the B simulator without its rate limit:

1. floor: every page fetched and COPYed raw into an unlogged table (``benchmarks.floor``);
2. full load: the whole DAG (prepare, pulls, merges, report, finish), rows in A checked;
3. no-change re-syncs: the newest 12 h window, then a full refresh; rows A wrote, counted
   by PostgreSQL (must be 0);
4. pairs: the floor and the full load again (``--pairs`` in all), each full load into a fresh
   A; the full load to floor ratio, and each level's pull to floor records/s, are their medians;
5. tasks one after another: the full load again, into a fresh A, every task after the previous
   one in the order ``airflow dags test`` runs them (``--no-sequential`` skips);
6. peers: dlt's full loads of the same catalogue, with its defaults and its fastest
   configuration, each into a database of its own (``benchmarks.peers``; ``--no-peers`` skips);
7. incremental: 1% of every level changed (updates, deletes, new records) inside one 12 h
   window, then that window synced;
8. instance pull split into 1, 2 and 4 time slices (parallel tasks);
9. C: phases 1, 2, 4 and 5 against the C simulator (``include/sources/c.yaml``, its page size
   and slices), on a catalogue of ``--c-instances`` (default: as many as B's; 0 skips);
10. naive baseline, the sync and the floor on a ``--naive-instances`` catalogue (default 100,000);
11. scale: the full load again at each ``--scale`` size (default 3,000,000).

The floors and the merge's own timers also give what this machine allows the full load to
floor ratio (``bounds``): the least a full load that merges a level after pulling it can take;
and the naive baseline's floor, the most any sync can be faster than the naive baseline.

Every task runs in a process of its own, forked from a server that imported Airflow once
(its start-up is reported apart). Results: a table on stdout, JSON in ``benchmarks/results/``,
task logs beside it. Timings are never asserted anywhere; ``tests/test_benchmark_smoke.py``
runs a tiny version so that this keeps working.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks import floor, measure, peers, table
from benchmarks.dag import BenchError, SyncRun, Task, TaskRun, Workers, prepare, run_sync, sync_graph
from benchmarks.fixtures import (
    BASE_TIME,
    B,
    BenchSource,
    C,
    Server,
    Shape,
    connect,
    database,
    database_name,
    include_dir,
    worker_env,
)
from benchmarks.paths import ROOT
from benchmarks.table import PULL_SHARE_OF_FLOOR
from benchmarks.worker import PROFILE_ENV, memory_mb
from medsync import staging
from medsync.config import LEVELS
from medsync.windows import BEGINNING, RunFacts, Window
from tests.conftest import dsn_for

RESULTS_DIR = ROOT / "benchmarks" / "results"
WINDOW = timedelta(hours=12)
"""The DAG's schedule: twice a day."""
B_REQUESTS_PER_SECOND = 20
"""B's documented rate limit per API key, for the figure the run cannot measure."""


@dataclass(frozen=True)
class Options:
    instances: int
    scale: tuple[int, ...]
    naive_instances: int
    slices: int
    """Instance slices of B's full loads (the DAG's ``instance_slices``)."""
    slice_counts: tuple[int, ...]
    page_size: int
    """B's page size."""
    incremental_fraction: float
    pairs: int
    """Floor + full load pairs per source; the full-load-to-floor targets are judged on their medians."""
    sequential: bool
    """A full load of each catalogue with every task one after another, as ``airflow dags test`` runs them."""
    c_instances: int
    """Size of C's catalogue (B's shape); 0: C is not measured."""
    c_page_size: int
    """C's page size and instance slices: c.yaml's (C serves at most 500 records a page)."""
    c_slices: int
    keep: bool
    results_dir: Path
    plugins: str
    profile: bool
    peers: bool
    """dlt's full loads of the main catalogue beside medsync's (``benchmarks.peers``)."""


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=1_000_000, help="size of the main catalogue (default 1,000,000)")
    p.add_argument(
        "--scale", default="3000000", help="comma-separated sizes of the scale runs, or 'none' (default 3000000)"
    )
    p.add_argument("--naive-instances", type=int, default=100_000, help="size of the naive baseline's catalogue")
    p.add_argument("--slices", type=int, default=None, help="instance slices of B's full loads (default: b.yaml's)")
    p.add_argument("--slice-counts", default="1,2,4", help="slice counts of the instance pull comparison")
    p.add_argument("--page-size", type=int, default=None, help="B's records per page (default: b.yaml's)")
    p.add_argument("--incremental-fraction", type=float, default=0.01)
    p.add_argument(
        "--pairs",
        type=int,
        default=3,
        help="floor + full load pairs per source, each in a fresh A; the ratios are their medians",
    )
    p.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a full load of each catalogue with every task one after another, as `airflow dags test` runs"
        " them, into a fresh A (default: on)",
    )
    p.add_argument(
        "--c-instances",
        type=int,
        default=None,
        help="size of C's catalogue, 0 to skip C (default: as --instances, so as many records as B's)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes (20k, C 20k, scale 60k, naive 5k): a few minutes less"
    )
    p.add_argument("--keep", action="store_true", help="keep the databases (medsync_bench_<pid>_*)")
    p.add_argument("--profile", action="store_true", help="profile every task (pyinstrument) next to the results")
    p.add_argument(
        "--no-peers", dest="peers", action="store_false", help="skip dlt's loads (its own venv, made on first use)"
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--plugins", default=str(ROOT / "plugins"), help="run another checkout's plugins/ (before/after)")
    a = p.parse_args(argv)
    from medsync.config import load_source_config

    b_cfg = load_source_config(ROOT / "include" / "sources" / "b.yaml")
    c_cfg = load_source_config(ROOT / "include" / "sources" / "c.yaml")
    instances, scale, naive = a.instances, a.scale, a.naive_instances
    if a.quick:
        instances, scale, naive = 20_000, "60000", 5_000
    return Options(
        instances=instances,
        scale=() if scale.strip().lower() in ("", "none") else tuple(int(x) for x in scale.split(",")),
        naive_instances=naive,
        slices=a.slices or b_cfg.instance_slices,
        slice_counts=tuple(int(x) for x in a.slice_counts.split(",") if x.strip()),
        page_size=a.page_size or b_cfg.page_size,
        incremental_fraction=a.incremental_fraction,
        pairs=max(1, a.pairs),
        sequential=a.sequential,
        c_instances=instances if a.c_instances is None else max(0, a.c_instances),
        c_page_size=c_cfg.page_size,
        c_slices=c_cfg.instance_slices,
        keep=a.keep,
        results_dir=a.results_dir,
        plugins=a.plugins,
        profile=a.profile,
        peers=a.peers,
    )


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass(frozen=True)
class Served:
    """A catalogue served by a source's simulator, and the config medsync reads it with: what a phase needs."""

    server: Server
    shape: Shape
    include: Path
    """The include folder holding the source's config as the benchmark runs it (``fixtures.include_dir``)."""
    page_size: int
    slices: int
    """Instance slices, of the full loads and of their floors alike."""

    @property
    def source(self) -> BenchSource:
        return self.server.source

    def env(self, db: str) -> dict[str, str]:
        return worker_env(self.include, db, self.server)


FullLoad = tuple[dict[str, Any], dict[str, Any]]
"""A floor's figures and those of the full load measured beside it."""


class Bench:
    """One benchmark run; ``results`` is what gets printed and saved."""

    def __init__(self, opts: Options, log_path: Path) -> None:
        self.opts = opts
        self.log_path = log_path
        self.workers = Workers(str(log_path))
        self.results: dict[str, Any] = {}

    # --- the run ---------------------------------------------------------------------------------

    def run(self, tmp: Path) -> dict[str, Any]:
        opts = self.opts
        self.results.update(
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            machine=self._machine(),
            options={k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items()},
            load_before=_load(),
        )
        self.results["startup_seconds"] = round(self.workers.start(), 2)
        self.main_catalogue(tmp)
        self.results["c"] = self.c_catalogue(tmp)
        self.naive(tmp)
        self.results["scale"] = [self.scale(tmp, n) for n in opts.scale]
        self.results["load_after"] = _load()
        self.results["bounds"] = bounds(self.results)
        self.results["targets"] = targets(self.results)
        return self.results

    @contextmanager
    def serve(self, source: BenchSource, instances: int, folder: Path) -> Iterator[Served]:
        """``source``'s simulator holding about ``instances`` instances, read with the run's page size and slices
        (its config set up for them in ``folder``)."""
        page_size, slices = (
            (self.opts.page_size, self.opts.slices) if source is B else (self.opts.c_page_size, self.opts.c_slices)
        )
        shape = Shape.for_instances(instances)
        include = include_dir(folder, source, page_size=page_size, instance_slices=slices)
        with source.simulator(shape) as server:
            yield Served(server, shape, include, page_size, slices)

    def main_catalogue(self, tmp: Path) -> None:
        opts = self.opts
        with (
            self.serve(B, opts.instances, tmp / "include") as served,
            database("main", opts.keep) as db,
            connect(db) as conn,
        ):
            workers = self.workers.using(served.env(db))
            shape, server = served.shape, served.server
            self.results["catalogue"] = {"instances": shape.instances, "records": shape.records, **shape.per_level}
            floor_figures = self.floor(workers, conn, served)
            full = self.full_load(workers, conn, served, "full-load")
            full["b_rate_limit"] = b_rate_limit(full, opts.page_size)

            newest = RunFacts("scheduled", BASE_TIME - WINDOW, BASE_TIME, BASE_TIME)
            self.results["no_change_window"] = self.sync(workers, conn, served, "no-change-window", newest)
            refresh = RunFacts("manual", None, None, BASE_TIME, full_refresh=True)
            self.results["no_change_full_refresh"] = self.sync(workers, conn, served, "no-change-full-refresh", refresh)
            # Before the incremental run changes B: every pair and every peer loads the same catalogue.
            self.results.update(self.full_loads(served, first=(floor_figures, full)))
            self.results["peers"] = self.peers(tmp, server)

            self.results["incremental"] = self.incremental(workers, conn, served)
            self.results["slices"] = [self.sliced_pull(workers, conn, served, k) for k in opts.slice_counts]
            self.results["catalogue"]["simulator_peak_rss_mb"] = memory_mb("VmHWM", server.pid)

    def c_catalogue(self, tmp: Path) -> dict[str, Any]:
        """C's full load measured as B's: the floor and the full load in pairs, and tasks one after another."""
        if not self.opts.c_instances:
            return {"skipped": "--c-instances 0"}
        with self.serve(C, self.opts.c_instances, tmp / "include-c") as served:
            shape = served.shape
            out: dict[str, Any] = {
                "catalogue": {"instances": shape.instances, "records": shape.records, **shape.per_level},
                "page_size": served.page_size,
                "slices": served.slices,
            }
            out.update(self.full_loads(served))
            # C's simulator computes its base records on demand: its memory should stay small at any size.
            out["catalogue"]["simulator_peak_rss_mb"] = memory_mb("VmHWM", served.server.pid)
        return out

    def full_loads(self, served: Served, first: FullLoad | None = None) -> dict[str, Any]:
        """The floor and the full load ``--pairs`` times (``first``, if given, is one), each full load into a
        fresh A, then the full load with its tasks one after another; with the medians the targets judge."""
        loads = [first] if first else []
        loads += [self.pair(served, k) for k in range(len(loads) + 1, self.opts.pairs + 1)]
        pairs = [_pair(f, full) for f, full in loads]
        out: dict[str, Any] = {
            "floor": loads[0][0],
            "full_load": loads[0][1],
            "pairs": pairs,
            "pairs_median_ratio": statistics.median(p["ratio"] for p in pairs),
            "pull_vs_floor": pull_vs_floor(pairs),
        }
        if self.opts.sequential:
            sequential = self.one_by_one(served)
            sequential["x_floor"] = sequential["seconds"] / statistics.median(p["floor_seconds"] for p in pairs)
            out["sequential"] = sequential
        return out

    def floor(self, workers: Workers, conn: psycopg.Connection, served: Served) -> dict[str, Any]:
        """Raw fetch + COPY of the full load's windows, with the pulls' parallelism."""
        floor.create_table(conn, served.source.api["version"]["format"])
        measure.checkpoint(conn)
        cpu = measure.CpuProbe.take(served.server.pid)
        began = time.perf_counter()
        ran = workers.run_graph(_floor_tasks(served, conn.info.dbname, Window(BEGINNING, BASE_TIME)))
        seconds = time.perf_counter() - began
        used = cpu.since()
        records = sum(t.result["records"] for t in ran.values())
        stored = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(floor.TABLE))).fetchone()
        floor.drop_table(conn)
        expected = served.shape.records
        self._require(records == expected, f"the floor fetched {records} records, the catalogue has {expected}")
        self._require(stored is not None and stored[0] == records, "the floor table lost records")
        levels: dict[str, Any] = {}
        for level in LEVELS:
            tasks = [t for name, t in ran.items() if name.startswith(f"floor_{level}_")]
            level_records, level_seconds = sum(t.result["records"] for t in tasks), _span_seconds(tasks)
            levels[level] = {
                "records": level_records,
                "seconds": level_seconds,
                "records_per_s": level_records / level_seconds,
            }
        return {
            "seconds": seconds,
            "records": records,
            "records_per_s": records / seconds,
            "peak_rss_mb": max(t.peak_rss_mb for t in ran.values()),
            "cpu": used,
            "client_cpu_seconds": sum(t.cpu_seconds for t in ran.values()),
            "levels": levels,
            # The instance level's part, beside the other levels' as in the full load: its pull's floor.
            "instance_seconds": levels["instance"]["seconds"],
        }

    def pair(self, served: Served, k: int) -> FullLoad:
        """The floor and the full load once more, into a fresh A: how much their ratio varies here."""
        with database(f"{served.source.name}_pair_{k}", self.opts.keep) as db, connect(db) as conn:
            workers = self.workers.using(served.env(db))
            floor_figures = self.floor(workers, conn, served)
            return floor_figures, self.full_load(workers, conn, served, f"full-load-{k}")

    def one_by_one(self, served: Served) -> dict[str, Any]:
        """The full load into a fresh A with every task after the previous one, as ``airflow dags test`` runs them."""
        with database(f"{served.source.name}_sequential", self.opts.keep) as db, connect(db) as conn:
            workers = self.workers.using(served.env(db))
            return self.full_load(workers, conn, served, "full-load-one-by-one", one_by_one=True)

    def full_load(
        self, workers: Workers, conn: psycopg.Connection, served: Served, name: str, *, one_by_one: bool = False
    ) -> dict[str, Any]:
        """A manual run into an empty A, with A's rows then checked against the source's counts."""
        full = self.sync(workers, conn, served, name, RunFacts("manual", None, None, BASE_TIME), one_by_one=one_by_one)
        full["rows"] = measure.check_rows(conn, served.server)
        self._require(
            full["rows"]["matches"],
            f"after {name} of {served.source.name} A's rows differ from the source's: {full['rows']}",
        )
        return full

    def peers(self, tmp: Path, server: Server) -> dict[str, Any]:
        """dlt's full loads of the same catalogue, each into a database of its own (``benchmarks.peers``)."""
        if not self.opts.peers:
            return {"skipped": "--no-peers"}
        try:
            python = peers.dlt_python()
        except peers.PeerUnavailable as exc:
            print(f"dlt skipped: {exc}", flush=True)
            return {"skipped": str(exc)}
        out: dict[str, Any] = {}
        for config in peers.CONFIGS:
            name = database_name(f"dlt_{config}")
            peers.fresh_database(name)
            try:
                with connect(name) as conn:
                    measure.checkpoint(conn)
                out[config] = peers.load(
                    python,
                    config,
                    server=server,
                    db=name,
                    since=BEGINNING,
                    until=BASE_TIME,
                    page_size=self.opts.page_size,
                    pipelines_dir=tmp / "dlt",
                )
            finally:
                if not self.opts.keep:
                    peers.drop(name)
        return out

    def sync(
        self,
        workers: Workers,
        conn: psycopg.Connection,
        served: Served,
        name: str,
        facts: RunFacts,
        *,
        one_by_one: bool = False,
    ) -> dict[str, Any]:
        """One DAG run with the rows it wrote into A, counted by PostgreSQL, and the CPU it kept busy."""
        measure.checkpoint(conn)
        probe = measure.WriteProbe.take(conn)
        cpu = measure.CpuProbe.take(served.server.pid)
        ran = run_sync(workers, served.source.name, name, facts, served.slices, one_by_one=one_by_one)
        figures = sync_figures(ran)
        figures["cpu"] = cpu.since()
        figures["written"] = probe.written(conn)
        return figures

    def incremental(self, workers: Workers, conn: psycopg.Connection, served: Served) -> dict[str, Any]:
        """Changes 1% of every level at one instant, then syncs the 12 h window holding it."""
        admin = served.server.admin
        admin.set_now((BASE_TIME + timedelta(hours=1)).isoformat())
        changed = admin.mutate_fraction(self.opts.incremental_fraction, seed=7)
        admin.set_now((BASE_TIME + WINDOW).isoformat())
        facts = RunFacts("scheduled", BASE_TIME, BASE_TIME + WINDOW, BASE_TIME + WINDOW)
        figures = self.sync(workers, conn, served, "incremental", facts)
        figures["changed"] = changed
        figures["rows"] = measure.check_rows(conn, served.server)
        self._require(
            figures["rows"]["matches"], f"after the incremental run A's rows differ from B's: {figures['rows']}"
        )
        return figures

    def sliced_pull(self, workers: Workers, conn: psycopg.Connection, served: Served, slices: int) -> dict[str, Any]:
        """The whole instance window pulled by ``slices`` parallel tasks (staging only), then its floor."""
        measure.checkpoint(conn)
        source = served.source.name
        facts = RunFacts("manual", None, None, BASE_TIME + WINDOW, full_refresh=True)
        began = time.perf_counter()
        run_id = prepare(workers, source, f"slices-{slices}", facts).result["run_id"]
        prepared = time.perf_counter()
        cpu = measure.CpuProbe.take(served.server.pid)
        ran = workers.run_graph(sync_graph(run_id, slices, levels=("instance",), source=source, pulls_only=True))
        seconds = time.perf_counter() - prepared
        used = cpu.since()
        staging.drop_staging_tables(conn, source, run_id)
        conn.execute("UPDATE medsync.sync_run SET status = 'failed' WHERE id = %s", (run_id,))
        records = sum(t.result["staged"] + t.result["quarantined"] for t in ran.values())
        # The same window and slices through the floor: what the source and the machine allow for it.
        floor.create_table(conn, served.source.api["version"]["format"])
        tasks = _floor_tasks(
            served, conn.info.dbname, Window(BEGINNING, facts.run_after), levels=("instance",), slices=slices
        )
        floor_began = time.perf_counter()
        workers.run_graph(tasks)
        floor_seconds = time.perf_counter() - floor_began
        floor.drop_table(conn)
        return {
            "slices": slices,
            "seconds": seconds,
            "prepare_seconds": prepared - began,
            "records": records,
            "records_per_s": records / seconds,
            "peak_rss_mb": max(t.peak_rss_mb for t in ran.values()),
            "cpu": used,
            "pull_cpu_seconds": sum(t.cpu_seconds for t in ran.values()),
            "floor_seconds": floor_seconds,
        }

    def naive(self, tmp: Path) -> None:
        """The naive baseline, the sync and the floor, the syncs each into an empty A, on the same smaller catalogue."""
        with self.serve(B, self.opts.naive_instances, tmp / "include-naive") as served:
            shape = served.shape
            out: dict[str, Any] = {"catalogue": {"instances": shape.instances, "records": shape.records}}
            with database("naive", self.opts.keep) as db, connect(db) as conn:
                workers = self.workers.using(served.env(db))
                measure.checkpoint(conn)
                began = time.perf_counter()
                ran = workers.run_one("benchmarks.naive:load", since=BEGINNING, until=BASE_TIME)
                seconds = time.perf_counter() - began
                rows = measure.check_rows(conn, served.server)
                self._require(rows["matches"], f"the naive baseline did not load the catalogue: {rows}")
                out["naive"] = {
                    "seconds": seconds,
                    "records": shape.records,
                    "records_per_s": shape.records / seconds,
                    "peak_rss_mb": ran.peak_rss_mb,
                    "per_level": ran.result,
                }
            with database("naive_sync", self.opts.keep) as db, connect(db) as conn:
                workers = self.workers.using(served.env(db))
                figures = self.full_load(workers, conn, served, "full-load")
                out["sync"] = {k: figures[k] for k in ("seconds", "records", "records_per_s", "peak_rss_mb")}
                # What the machine allows on this catalogue: no sync is faster than fetching and COPYing it raw.
                out["floor"] = self.floor(workers, conn, served)
        out["speed_up"] = out["naive"]["seconds"] / out["sync"]["seconds"]
        self.results["naive"] = out

    def scale(self, tmp: Path, instances: int) -> dict[str, Any]:
        """The full load of a catalogue of ``instances``: time, records/s and peak RSS."""
        with (
            self.serve(B, instances, tmp / f"include-{instances}") as served,
            database(f"scale_{instances}", self.opts.keep) as db,
            connect(db) as conn,
        ):
            workers = self.workers.using(served.env(db))
            figures = self.full_load(workers, conn, served, "full-load")
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            figures["database_mb"] = int(size[0]) / 2**20 if size else None
        figures["catalogue"] = {"instances": served.shape.instances, "records": served.shape.records}
        return figures

    # --- helpers ---------------------------------------------------------------------------------

    def _require(self, condition: bool, message: str) -> None:
        if not condition:
            raise BenchError(f"{message} (task logs: {self.log_path})")

    def _machine(self) -> dict[str, Any]:
        with psycopg.connect(dsn_for("postgres")) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            settings: dict[str, str] = dict(
                conn.execute(
                    "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN"
                    " ('shared_buffers', 'max_wal_size', 'work_mem', 'synchronous_commit', 'fsync', 'wal_level')"
                ).fetchall()
            )
        return {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgresql": version[0] if version else None,
            "pg_settings": settings,
            "plugins": self.opts.plugins,
        }


def _floor_tasks(
    served: Served, db: str, window: Window, levels: Sequence[str] = LEVELS, slices: int | None = None
) -> list[Task]:
    """One floor task per level (``floor_<level>_0``), the instance level in ``slices`` time slices (default: the
    full load's), each fetching its part of ``window`` as the pulls do."""
    source = served.source
    common = {
        "dsn": dsn_for(db),
        "base_url": served.server.base_url,
        "headers": source.headers,
        "api": source.api,
        "page_size": served.page_size,
        "commit_rows": 50_000,
    }
    tasks = []
    for level in levels:
        parts = window.slices((slices or served.slices) if level == "instance" else 1)
        for i, part in enumerate(parts):
            kwargs = {**common, "endpoint": source.resources[level], "since": part.since, "until": part.until}
            tasks.append(Task(f"floor_{level}_{i}", "benchmarks.floor:pull_raw", kwargs))
    return tasks


def _span_seconds(tasks: Sequence[TaskRun]) -> float:
    """From the first task's start to the last one's end: one level's pull or floor, whole when it runs in
    slices (so that a level in slices is compared slices against slices)."""
    return max(t.began + t.seconds for t in tasks) - min(t.began for t in tasks)


def sync_figures(ran: SyncRun) -> dict[str, Any]:
    """A DAG run's time, records, records/s per level and peak RSS per task."""
    levels: dict[str, Any] = {}
    for level in LEVELS:
        pulls = ran.tasks_like(f"pull_{level}")
        merge = ran.tasks[f"merge_{level}"]
        records = sum(t.result["staged"] + t.result["quarantined"] for t in pulls)
        pull_seconds = _span_seconds(pulls)
        merged = merge.result
        levels[level] = {
            "records": records,
            "pull_seconds": pull_seconds,
            "pull_records_per_s": records / pull_seconds if pull_seconds else None,
            "merge_seconds": merge.seconds,
            "merge_records_per_s": records / merge.seconds if merge.seconds else None,
            "merge_build_seconds": merged.get("build_seconds"),
            "merge_write_seconds": merged.get("write_seconds"),
            "merge_sessions": merged.get("sessions"),
            "inserted": merged["inserted"],
            "updated": merged["updated"],
            "unchanged": merged["unchanged"],
            "pending": merged["pending"],
            "pull_peak_rss_mb": max(t.peak_rss_mb for t in pulls),
            "merge_peak_rss_mb": merge.peak_rss_mb,
        }
    records = sum(v["records"] for v in levels.values())
    last_merge = ran.tasks[f"merge_{LEVELS[-1]}"]
    return {
        "run_id": ran.run_id,
        "kind": ran.kind,
        "seconds": ran.seconds,
        # The sync proper, without the report (which counts A's live rows: a scan of every table).
        "seconds_to_last_merge": last_merge.began + last_merge.seconds,
        "report_seconds": ran.tasks["report"].seconds,
        "records": records,
        "records_per_s": records / ran.seconds,
        "levels": levels,
        "tasks": {name: _task_figures(t) for name, t in ran.tasks.items()},
        "peak_rss_mb": max(t.peak_rss_mb for t in ran.tasks.values()),
        "start_rss_mb": max(t.start_rss_mb for t in ran.tasks.values()),
    }


def _task_figures(t: TaskRun) -> dict[str, Any]:
    return {
        "began": round(t.began, 3),
        "seconds": round(t.seconds, 3),
        "cpu_seconds": round(t.cpu_seconds, 3),
        "peak_rss_mb": round(t.peak_rss_mb, 1),
        "start_rss_mb": round(t.start_rss_mb, 1),
    }


def b_rate_limit(full: dict[str, Any], page_size: int) -> dict[str, Any]:
    """What B's real limit (about 20 requests/s per key, all tasks together) means for this load."""
    pages = sum(-(-v["records"] // page_size) for v in full["levels"].values())
    return {
        "pages": pages,
        "requests_per_s": B_REQUESTS_PER_SECOND,
        "min_seconds": pages / B_REQUESTS_PER_SECOND,
        "min_seconds_at_1000_per_page": sum(-(-v["records"] // 1000) for v in full["levels"].values())
        / B_REQUESTS_PER_SECOND,
    }


def _pair(floor_figures: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """A floor and the full load beside it: their seconds and ratio, and per level the pull's records/s
    beside the floor's (each level whole: every slice, first start to last end)."""
    levels = {}
    for level in LEVELS:
        floor_rate = floor_figures["levels"][level]["records_per_s"]
        pull_rate = full["levels"][level]["pull_records_per_s"]
        levels[level] = {
            "floor_records_per_s": floor_rate,
            "pull_records_per_s": pull_rate,
            "ratio": pull_rate / floor_rate if pull_rate is not None else None,
        }
    return {
        "floor_seconds": floor_figures["seconds"],
        "full_load_seconds": full["seconds"],
        "ratio": full["seconds"] / floor_figures["seconds"],
        "levels": levels,
    }


def pull_vs_floor(pairs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per level, the medians over the pairs of the pull's and the floor's records/s, and of their ratio."""
    out: dict[str, dict[str, float]] = {}
    for level in LEVELS:
        each = [p["levels"][level] for p in pairs if p["levels"][level]["ratio"] is not None]
        out[level] = {
            key: statistics.median(e[key] for e in each)
            for key in ("pull_records_per_s", "floor_records_per_s", "ratio")
        }
    return out


def full_load_bound(loads: dict[str, Any], cores: int) -> dict[str, Any]:
    """The least a full load can take here (see ``bounds``), from one catalogue's floor and full load."""
    fl, full = loads["floor"], loads["full_load"]
    work = full["cpu"].get("machine_cpu_seconds") or 0.0
    least = max(fl["instance_seconds"], work / cores)
    return {
        "instance_floor_seconds": fl["instance_seconds"],
        "cpu_work_core_seconds": work,
        "cores": cores,
        "min_seconds": least,
        "min_ratio": least / fl["seconds"],
        "work_at_1_5x_core_seconds": 1.5 * fl["seconds"] * cores,
    }


def bounds(r: dict[str, Any]) -> dict[str, Any]:
    """What this machine allows the full load to floor ratio, and the naive baseline, from figures of the same run.

    ``full_load`` (and ``c_full_load``, C's): the instances are merged while they are pulled
    (``medsync.early_merge``), so a full load takes at least the instance level's floor, and at
    least the CPU work the machine did for it (simulator, tasks, PostgreSQL) spread over its
    cores with none ever idle; ``min_ratio`` is the larger over the floor, and
    ``work_at_1_5x_core_seconds`` the most work a 1.5x full load could do on these cores.
    ``naive``: no sync is faster than the floor of the same catalogue, so ``max_speed_up`` is
    the most any sync can be faster than the naive baseline.
    """
    naive = r["naive"]
    out = {
        "full_load": full_load_bound(r, r["machine"]["cpus"]),
        "naive": {
            "naive_seconds": naive["naive"]["seconds"],
            "floor_seconds": naive["floor"]["seconds"],
            "max_speed_up": naive["naive"]["seconds"] / naive["floor"]["seconds"],
        },
    }
    if "full_load" in r["c"]:
        out["c_full_load"] = full_load_bound(r["c"], r["machine"]["cpus"])
    return out


def load_targets(loads: dict[str, Any], bound: dict[str, Any], label: str = "") -> list[dict[str, Any]]:
    """One catalogue's full load within 1.5x its floor, and each level's pull at 2/3 of its floor's records/s
    (the parallel full loads against their floors, medians of the pairs)."""
    pairs = len(loads["pairs"])
    ratio = loads["pairs_median_ratio"]
    out = [
        {
            "target": f"{label}full load within 1.5x the floor (median of {pairs} pairs)",
            "value": ratio,
            "limit": 1.5,
            "met": ratio <= 1.5,
            "bound": bound["min_ratio"],
        }
    ]
    for level, rates in loads["pull_vs_floor"].items():
        out.append(
            {
                "target": f"{label}{level} pull's records/s at least 2/3 of the floor's on its level"
                f" (median of {pairs} pairs)",
                "value": rates["ratio"],
                "limit": round(PULL_SHARE_OF_FLOOR, 3),
                "met": rates["ratio"] >= PULL_SHARE_OF_FLOOR,
            }
        )
    return out


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met (with this machine's bound, if any)."""
    full = r["full_load"]
    out = load_targets(r, r["bounds"]["full_load"])
    out += [
        {
            "target": "incremental 1% within 5% of the full load",
            "value": r["incremental"]["seconds"] / full["seconds"],
            "limit": 0.05,
            "met": r["incremental"]["seconds"] / full["seconds"] <= 0.05,
        },
        {
            "target": "no rows rewritten by a no-change re-sync of the newest window",
            "value": r["no_change_window"]["written"]["total_tuples"],
            "limit": 0,
            "met": r["no_change_window"]["written"]["total_tuples"] == 0
            and r["no_change_window"]["written"]["total_xmin"] == 0,
        },
        {
            "target": "no rows rewritten by a no-change full refresh",
            "value": r["no_change_full_refresh"]["written"]["total_tuples"],
            "limit": 0,
            "met": r["no_change_full_refresh"]["written"]["total_tuples"] == 0
            and r["no_change_full_refresh"]["written"]["total_xmin"] == 0,
        },
    ]
    # Every task of the main catalogue's full loads: in parallel and one after another.
    peak = max(full["peak_rss_mb"], r.get("sequential", {}).get("peak_rss_mb", 0))
    out.append(
        {
            "target": f"peak RSS of every task under 300 MB at {r['catalogue']['instances']:,}",
            "value": peak,
            "limit": 300,
            "met": peak < 300,
        }
    )
    fastest = r.get("peers", {}).get("fastest", {})
    if "seconds" in fastest:
        full_load = statistics.median(p["full_load_seconds"] for p in r["pairs"])
        out.append(
            {
                "target": "full load ahead of dlt's fastest configuration (median full load / dlt, same run)",
                "value": full_load / fastest["seconds"],
                "limit": 1.0,
                "met": full_load < fastest["seconds"],
            }
        )
        if "sequential" in r:
            one_by_one = r["sequential"]["seconds"]
            out.append(
                {
                    "target": "full load with tasks one after another ahead of dlt's fastest configuration"
                    " (its seconds / dlt, same run)",
                    "value": one_by_one / fastest["seconds"],
                    "limit": 1.0,
                    "met": one_by_one < fastest["seconds"],
                }
            )
    for s in r["scale"]:
        growth = s["peak_rss_mb"] / full["peak_rss_mb"]
        out.append(
            {
                "target": f"peak RSS at {s['catalogue']['instances']:,} at most 10% above the main load's",
                "value": growth,
                "limit": 1.1,
                "met": growth <= 1.1,
            }
        )
    if "full_load" in r["c"]:
        out += load_targets(r["c"], r["bounds"]["c_full_load"], label="C: ")
    return out


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log_path = opts.results_dir / f"{stamp}.log"
    if opts.profile:
        # Every task process profiles itself into this folder (benchmarks.worker); the task name is the file name.
        profiles = opts.results_dir / f"{stamp}-profiles"
        profiles.mkdir()
        os.environ[PROFILE_ENV] = str(profiles)
    bench = Bench(opts, log_path)
    with tempfile.TemporaryDirectory(prefix="medsync-bench-") as tmp:
        results = bench.run(Path(tmp))
    out = opts.results_dir / f"{stamp}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(table.render(results))
    print(f"\nsaved {out} (task logs: {log_path})")
    return 0
