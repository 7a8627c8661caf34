"""On call under a real Airflow (api-server, scheduler, dag-processor, LocalExecutor): a task whose
process is SIGKILLed leaves a run the ledger calls failed, by Airflow's own callback.

In Airflow 3.3 the task's supervisor outlives its killed task process and reports the task
failed; no task-level callback runs then (it would run in the dead process), and the scheduler
hands the DAG's ``on_failure_callback`` to the dag-processor once the run has failed. That
callback, not the next run's ``prepare``, must mark the run failed, drop its staging and alert.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from airflow_stack import AirflowStack, StackConfig, postgres_connection
from conftest import ROOT, create_database, drop_database
from oncall_receivers import ALERTS, Received, alert_connections, smtp_server, webhook_server

from devstack.airflow_env import include_copy
from simulator import BSimulator, SimConfig

pytestmark = pytest.mark.slow

API_KEY = "oncall-stack-key-4be1"
DAG_ID = "medsync_b"


def _query(dsn: str, text: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(text, args).fetchall()


@pytest.fixture
def a_dsn(a_template_db: str) -> Iterator[str]:
    name = f"medsync_oncall_stack_{uuid.uuid4().hex[:8]}"
    dsn = create_database(name, template=a_template_db)
    yield dsn
    drop_database(name)


def _running_pull(stack: AirflowStack, dag_run_id: str, timeout: float = 120) -> dict[str, Any]:
    """A pull task instance of the run that is running, with the pid of its task process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            tis = stack.api.task_instances(DAG_ID, dag_run_id)
        except requests.exceptions.Timeout:
            continue  # an API server busy starting the run's tasks on a loaded machine: ask again
        for ti in tis:
            if ti["task_id"].startswith("pull_") and ti["state"] == "running" and ti.get("pid"):
                return ti
        time.sleep(0.5)
    raise TimeoutError(f"no pull of {dag_run_id} running after {timeout:.0f} s")


def test_a_task_process_killed_leaves_the_run_failed_in_the_ledger_by_airflows_callback(
    tmp_path: Path, a_dsn: str
) -> None:
    config = SimConfig(seed=3, patients=3, studies_per_patient=1, series_per_study=1, images_per_series=2,
                       clock="manual", base_time=datetime(2026, 3, 1, tzinfo=UTC).isoformat())  # fmt: skip
    # retries: 0, so that the killed task fails the run instead of being tried again.
    include = include_copy(tmp_path / "include", retries=0, file_check={"enabled": False}, alerts=ALERTS)
    received = Received()
    with (
        BSimulator(config, api_key=API_KEY) as sim,
        smtp_server(received) as smtp,
        webhook_server(received) as hook,
    ):
        # Every request waits, so the pulls are caught in the middle of one.
        sim.set_faults(slow_every=1, slow_seconds=15)
        stack_config = StackConfig(
            dags_folder=ROOT / "dags",
            plugins_folder=ROOT / "plugins",
            connections={
                "medsync_a_db": postgres_connection(a_dsn),
                "medsync_b_api": {"conn_type": "http", "host": sim.base_url, "password": API_KEY},
            },
            variables={"medsync_b_bucket": "b-imaging-dev"},
            extra_env={"MEDSYNC_INCLUDE_DIR": str(include), **alert_connections(smtp, hook)},
        )
        with AirflowStack(stack_config) as stack:
            api = stack.api
            api.wait_dag_parsed(DAG_ID, alive=stack.check_alive)
            api.unpause(DAG_ID)
            dag_run_id = api.trigger(DAG_ID, conf={"full_refresh": True})["dag_run_id"]
            killed = _running_pull(stack, dag_run_id)
            os.kill(int(killed["pid"]), signal.SIGKILL)
            sim.set_faults()  # the other pulls finish, so the run can end
            (run,) = api.wait_runs(DAG_ID, [dag_run_id], timeout=180, alive=stack.check_alive, fail_fast=False)
            states = {ti["task_id"]: ti["state"] for ti in api.task_instances(DAG_ID, dag_run_id)}
            # The DAG's callback runs in the dag-processor soon after the run failed. It writes the
            # ledger, then drops the staging, then alerts: the stack stays up until all three are
            # seen (or a minute passed), or stopping it could cut the callback short.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ledger = _query(a_dsn, "SELECT id, status, failed_task, error_class FROM medsync.sync_run"
                                " WHERE dag_run_id = %s", dag_run_id)  # fmt: skip
                staging = _query(a_dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'medsync'"
                                 " AND tablename LIKE %s", f"%_r{ledger[0][0]}" if ledger else "")  # fmt: skip
                if ledger and ledger[0][1] != "running" and not staging and received.mails:
                    break
                time.sleep(1)

    assert run["state"] == "failed" and states[killed["task_id"]] == "failed", states
    ((_run_id, status, failed_task, error_class),) = ledger
    assert (status, error_class) == ("failed", "RunFailed"), ledger
    assert failed_task is None  # no task callback ran: the task's process was dead
    assert staging == []  # dropped by the callback
    assert [m["subject"] for m in received.mails] == [f"[medsync] b: run {dag_run_id} failed in the run: RunFailed"]
