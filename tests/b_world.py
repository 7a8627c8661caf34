"""Source B's sync run by its task bodies in real processes, and A compared with B row by row.

The task bodies (``medsync.tasks``) run in processes forked from a server that imported Airflow
and medsync once (``benchmarks.dag.Workers``, as the benchmark runs them), with the connections
in their environment as a worker's, against a real B simulator and a database of A's tables.
Used by the tests of crashes and of merging while pulling.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ROOT, connection_uri, create_database, drop_database

from benchmarks.dag import Workers, sync_graph
from benchmarks.worker import run as run_task
from devstack.airflow_env import include_copy
from medsync.windows import RunFacts
from simulator import BSimulator, SimConfig

API_KEY = "world-key-5b1c"
BUCKET = "b-imaging-world"
BASE = (datetime.now(UTC) - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)
PAGE_SIZE = 5
LEVELS = {"subject": "patients", "study": "studies", "sequence": "series", "instance": "images"}
PARENT_OF = {
    "study": ("subject_id", "subject"),
    "sequence": ("study_id", "study"),
    "instance": ("sequence_id", "sequence"),
}


@dataclass
class World:
    sim: BSimulator
    dsn: str
    workers: Workers
    env: dict[str, str]
    log: str
    runs: int = 0

    # --- tasks, as Airflow would run them ------------------------------------------------------

    def prepare(self, facts: RunFacts) -> int:
        self.runs += 1
        done = self.workers.run_one("medsync.tasks:prepare", source="b", dag_run_id=f"run{self.runs}", facts=facts)
        return int(done.result["run_id"])

    def sync(self, facts: RunFacts) -> int:
        run_id = self.prepare(facts)
        self.workers.run_graph(sync_graph(run_id, 1))
        return run_id

    def killed(self, target: str, kill_when: Callable[[], bool], timeout: float = 90, **kwargs: Any) -> None:
        """Runs one task body in a process of its own and SIGKILLs it as soon as ``kill_when()`` holds."""
        ctx = multiprocessing.get_context("forkserver")
        _results, theirs = ctx.Pipe(duplex=False)  # kept open: the task may report into it until killed
        proc = ctx.Process(target=run_task, args=(theirs, "killed", target, kwargs, self.env, self.log))
        proc.start()
        theirs.close()
        try:
            deadline = time.monotonic() + timeout
            while not kill_when():
                assert proc.is_alive(), f"{target} ended before the point it was to be killed at"
                assert time.monotonic() < deadline, f"{target} never reached the point it was to be killed at"
                time.sleep(0.02)
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.join(30)
        assert proc.exitcode == -signal.SIGKILL

    # --- what A holds, what B holds -------------------------------------------------------------

    def query(self, text: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(text, args).fetchall()

    def count(self, text: str, *args: Any) -> int:
        return int(self.query(text, *args)[0][0])

    def assert_a_is_b(self) -> None:
        """Every row of A from source b against B's live records: live set, version and parent.

        A keeps a live child of a deleted parent deleted, so B's live records are taken with their
        parents live; every other row of A is deleted. Content of images (uid, bucket, key, size)
        too, since those are what A hands out.
        """
        live: dict[str, dict[str, tuple[Any, ...]]] = {}
        uid_of: dict[str, str] = {}
        for level, resource in LEVELS.items():
            parents = live.get(PARENT_OF[level][1], {}) if level in PARENT_OF else {}
            rows: dict[str, tuple[Any, ...]] = {}
            for rec in self.sim.live_records(resource):
                parent = {"study": rec.get("patient_id"), "sequence": rec.get("study_id")}.get(level)
                if level == "instance":
                    parent = uid_of.get(rec["series_uid"])
                if level != "subject" and parent not in parents:
                    continue
                version = datetime.fromisoformat(rec["updated_at"].replace("Z", "+00:00"))
                extra = (
                    (rec["sop_uid"], BUCKET, rec["file_path"].lstrip("/"), rec["file_size"])
                    if level == "instance"
                    else ()
                )
                rows[rec["id"]] = (version, parent, *extra)
                if level == "sequence":
                    uid_of[rec["series_uid"]] = rec["id"]
            live[level] = rows
        for level in LEVELS:
            if level in PARENT_OF:
                fk, parent_table = PARENT_OF[level]
                join = f"JOIN imaging.{parent_table} p ON p.id = c.{fk}"
                parent_key = "p.source_key"
            else:
                join, parent_key = "", "NULL"
            extra = ", c.sop_instance_uid, c.storage_bucket, c.storage_key, c.size_bytes" if level == "instance" else ""
            a_rows = {
                key: rest
                for key, *rest in self.query(
                    f"SELECT c.source_key, c.source_updated_at, {parent_key}{extra} FROM imaging.{level} c {join}"
                    " WHERE c.source_system = 'b' AND c.deleted_at IS NULL"
                )
            }
            expected = {k: tuple(v) for k, v in live[level].items()}
            a_rows = {k: tuple(v) for k, v in a_rows.items()}
            missing, extra_rows = expected.keys() - a_rows.keys(), a_rows.keys() - expected.keys()
            assert not missing and not extra_rows, (
                f"{level}: missing {sorted(missing)[:5]}, extra {sorted(extra_rows)[:5]}"
            )
            differ = {k: (a_rows[k], v) for k, v in expected.items() if a_rows[k] != v}
            assert not differ, f"{level}: {list(differ.items())[:3]}"
            counted = self.count("SELECT live FROM medsync.live_count WHERE source_system = 'b' AND level = %s", level)
            assert counted == len(expected), f"{level}: live_count {counted}, A has {len(expected)} live rows"
        assert self.count("SELECT count(*) FROM medsync.pending_instance") == 0
        assert self.count("SELECT count(*) FROM medsync.quarantine WHERE resolved_at IS NULL") == 0

    def staged(self, run_id: int, level: str) -> int:
        table = f"stage_b_{level}_r{run_id}"
        if self.query("SELECT to_regclass(%s)", f"medsync.{table}")[0][0] is None:
            return 0
        return self.count(f"SELECT count(*) FROM medsync.{table}")


def full_refresh_facts(at: datetime) -> RunFacts:
    return RunFacts("manual", None, None, at, full_refresh=True)


@contextmanager
def b_world(
    template_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **config_overrides: Any
) -> Iterator[World]:
    """A World: B's simulator (a small catalogue on a manual clock), A's database, started workers.

    ``config_overrides`` change b.yaml's copy (small pages, batches and commit chunks by default).
    """
    # Python 3.11's fork server ignores its parent's sys.path: it finds medsync through PYTHONPATH.
    inherited = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "plugins"), str(ROOT), inherited])))
    dbname = f"medsync_world_{uuid.uuid4().hex[:8]}"
    dsn = create_database(dbname, template=template_db)
    config = SimConfig(
        seed=5, patients=6, studies_per_patient=2, series_per_study=2, images_per_series=12,
        clock="manual", base_time=BASE.isoformat(), history_seconds=5 * 86400,
        unknown_enum_fraction=0.0, invalid_fraction=0.0, orphan_fraction=0.0,
    )  # fmt: skip
    overrides: dict[str, Any] = {
        "retries": 0, "page_size": PAGE_SIZE, "merge_batch_size": 9, "merge_sessions": 2,
        "staging_commit_rows": PAGE_SIZE, "rate_limit_per_second": 1000, "file_check": {"enabled": False},
        **config_overrides,
    }  # fmt: skip
    include = include_copy(tmp_path / "include", **overrides)
    log = tempfile.mkstemp(prefix="medsync-world-", suffix=".log")[1]
    try:
        with BSimulator(config, api_key=API_KEY) as sim:
            env = {
                "MEDSYNC_INCLUDE_DIR": str(include),
                "AIRFLOW_CONN_MEDSYNC_A_DB": connection_uri(dsn),
                "AIRFLOW_CONN_MEDSYNC_B_API": json.dumps(
                    {"conn_type": "http", "host": sim.base_url, "password": API_KEY}
                ),
                "AIRFLOW_VAR_MEDSYNC_B_BUCKET": BUCKET,
            }
            workers = Workers(log, env)
            workers.start()
            yield World(sim, dsn, workers, env, log)
    finally:
        drop_database(dbname)
        Path(log).unlink(missing_ok=True)
