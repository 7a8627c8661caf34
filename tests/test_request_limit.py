"""A source's request limit holds for all its tasks together (medsync.request_limit).

The fast test races real processes, each with its own limiter and connection, as the tasks
of a run do on any worker; the slow one counts requests per second at the simulator of B
while a real scheduler runs medsync_b with parallel pulls and sliced instance pulls.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests
from conftest import ROOT, RUN_TAG, create_database, drop_database

from devstack.airflow_env import include_copy
from medsync import schema

RATE = 8.0
CLAIMS_PER_PROCESS = 12
PROCESSES = 4

CLAIMER = textwrap.dedent(
    """
    import json, sys, time
    import psycopg
    from medsync.request_limit import DatabaseRequestLimiter

    dsn, rate, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    sys.stdin.readline()  # start together
    with DatabaseRequestLimiter(lambda: psycopg.connect(dsn, autocommit=True), "b", rate) as limiter:
        sent = []
        for _ in range(n):
            limiter.acquire()
            sent.append(time.time())
    print(json.dumps(sent))
    """
)


def per_second(moments: list[float]) -> Counter[int]:
    return Counter(int(m) for m in moments)


def test_processes_sharing_the_database_never_exceed_the_source_limit_together(a_db: str) -> None:
    with psycopg.connect(a_db, autocommit=True) as conn:
        schema.migrate(conn)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, a_db, str(RATE), str(CLAIMS_PER_PROCESS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    outs = [p.communicate("go\n", timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    sent = sorted(m for out in outs for m in json.loads(out))
    assert len(sent) == PROCESSES * CLAIMS_PER_PROCESS
    # Slots are 1/RATE apart in the database's clock; a process may send a few ms after its slot.
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert sum(gaps) / len(gaps) >= 0.95 / RATE
    assert max(per_second(sent).values()) <= RATE + 1
    # Every window of one second holds at most RATE + 1 requests (one for a late sender).
    assert all(sent[i + int(RATE) + 1] - sent[i] >= 1.0 - 0.05 for i in range(len(sent) - int(RATE) - 1))
    with psycopg.connect(a_db) as conn:
        assert conn.execute("SELECT count(*) FROM medsync.request_limit").fetchone() == (1,)


def test_b_client_paces_every_request_with_the_limiter_it_is_given(a_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two clients, one limit: B sees at most the limit per second from both together."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import UTC, datetime

    from medsync.config import get_source_config
    from medsync.request_limit import DatabaseRequestLimiter
    from medsync.sources import open_source
    from simulator import BSimulator, SimConfig

    with psycopg.connect(a_db, autocommit=True) as conn:
        schema.migrate(conn)
    config = SimConfig(clock="manual", seed=3, patients=8, studies_per_patient=2, series_per_study=3)
    with BSimulator(config, api_key="limit-key") as sim:
        sim.set_faults()  # no limit of B's own: only the client's pacing counts
        monkeypatch.setenv(
            "AIRFLOW_CONN_MEDSYNC_B_API",
            json.dumps({"conn_type": "http", "host": sim.base_url, "password": "limit-key"}),
        )
        b = open_source(get_source_config("b").model_copy(update={"page_size": 2, "max_attempts": 1}))

        def pull_all(level: str) -> int:
            limiter = DatabaseRequestLimiter(lambda: psycopg.connect(a_db, autocommit=True), "b", RATE)
            with limiter, b.connect(limiter) as client:
                window = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
                pages = sum(1 for _ in client.iter_pages(level, *window))
                assert limiter.requests == pages
                return pages

        sim.reset_stats()
        with ThreadPoolExecutor(2) as pool:
            pages = sum(pool.map(pull_all, ["sequence", "study"]))
        stats = sim.stats()
    assert stats["requests"] == pages >= 3 * RATE  # long enough to hold the limit for seconds
    assert stats["max_per_second"] <= RATE + 1, stats["per_second"]


# --- the whole run, under a real scheduler ---------------------------------------------------------
STACK_RATE = 6
SLICES = 3
SIM_ARGS = (
    *("--seed", "11", "--plain", "--history-days", "3"),
    *("--studies-per-patient", "2", "--series-per-study", "2", "--images-per-series", "3"),
)


def overlapping(intervals: list[tuple[str, str]]) -> int:
    """The most intervals (ISO start, end) open at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.fixture(scope="module")
def a_db_module(a_template_db: str) -> Iterator[str]:
    name = f"medsync_rl_{RUN_TAG}_{uuid.uuid4().hex[:6]}"
    dsn = create_database(name, template=a_template_db)
    yield dsn
    drop_database(name)


@pytest.mark.slow
def test_a_parallel_run_under_the_scheduler_keeps_the_source_limit_in_every_second(
    tmp_path: Path, a_db_module: str
) -> None:
    from airflow_stack import AirflowStack, StackConfig, postgres_connection, simulator_process

    from simulator.client import SimAdminClient

    include = include_copy(
        tmp_path / "include",
        page_size=2,  # many small pages: every pull asks for several seconds
        instance_slices=SLICES,
        rate_limit_per_second=STACK_RATE,
        file_check={"enabled": False},
    )
    api_key = uuid.uuid4().hex
    with simulator_process(api_key, patients=6, extra_args=SIM_ARGS) as base_url:
        connections = {
            "medsync_a_db": postgres_connection(a_db_module),
            "medsync_b_api": {"conn_type": "http", "host": base_url, "password": api_key},
            "medsync_b_aws": {"conn_type": "aws", "login": "testing", "password": "testing"},
        }
        config = StackConfig(
            dags_folder=ROOT / "dags",
            plugins_folder=ROOT / "plugins",
            connections=connections,
            extra_env={"MEDSYNC_INCLUDE_DIR": str(include)},
        )
        admin = SimAdminClient(base_url, api_key, timeout=30)
        with AirflowStack(config) as stack:
            api = stack.api
            api.timeout = 60  # the API server answers slowly while this machine's two cores run the pulls
            api.wait_dag_parsed("medsync_b", alive=stack.check_alive)
            api.unpause("medsync_b")
            admin.stats(reset=True)
            run = api.trigger("medsync_b", conf={"full_refresh": True})
            api.wait_runs("medsync_b", [run["dag_run_id"]], timeout=600, alive=stack.check_alive)
            stats = admin.stats()
            b_counts = requests.get(f"{base_url}/counts", headers={"X-API-Key": api_key}, timeout=30).json()
            tasks = api.task_instances("medsync_b", run["dag_run_id"])
    pulls = [(t["start_date"], t["end_date"]) for t in tasks if t["task_id"].startswith("pull_")]
    assert len(pulls) == 3 + SLICES  # three levels and the sliced instance pull
    assert overlapping(pulls) >= 3, pulls  # several pulls really ran at once
    per_second_counts = stats["per_second"]
    assert stats["requests"] >= 40, stats["requests"]  # enough requests to hold the limit for seconds
    # The limit spaces slots 1/rate apart; one more in a second allows for a sender a few ms late.
    assert stats["max_per_second"] <= STACK_RATE + 1, per_second_counts
    assert stats["faults"]["rate_limit"] == 0  # B never had to refuse a request
    with psycopg.connect(a_db_module) as conn:
        (live,) = conn.execute("SELECT count(*) FROM imaging.instance WHERE deleted_at IS NULL").fetchone() or (0,)
    assert live == b_counts["images"]  # and the run synced everything
