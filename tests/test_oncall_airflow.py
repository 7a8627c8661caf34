"""On call through Airflow itself (``airflow dags test``): what cannot succeed is tried once, what may
succeed is retried, and a failed run is in the ledger, its staging gone, and in someone's mailbox.

The medsync_b DAG runs with ``retries: 2`` against the B simulator over HTTP, A's tables in a
real PostgreSQL, and the alert receivers of oncall_receivers.py (aiosmtpd and an HTTP server).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import create_database, drop_database
from oncall_receivers import ALERTS, Received, alert_connections, smtp_server, webhook_server

from devstack.airflow_env import Wiring, airflow_env, dags_test, include_copy, migrate_metadata
from simulator import BSimulator, SimConfig

pytestmark = pytest.mark.slow

API_KEY = "oncall-af-key-93be"
PULLS = ("pull_subjects", "pull_studies", "pull_sequences", "pull_instances")


class Stack:
    def __init__(self, tmp: Path, dsn: str, dbname: str, sim: BSimulator, received: Received, ports: tuple[int, int]):
        self.dsn, self.dbname, self.sim, self.received, self.tmp = dsn, dbname, sim, received, tmp
        include = include_copy(tmp / "include", retries=2, retry_delay_minutes=0.01, max_retry_delay_minutes=0.02,
                               max_attempts=1, file_check={"enabled": False}, alerts=ALERTS)  # fmt: skip
        self.include = include
        self.ports = ports
        self.home = tmp / "airflow"
        self.env = self.env_for(API_KEY)
        migrate_metadata(self.env)

    def env_for(self, api_key: str) -> dict[str, str]:
        wiring = Wiring.b(f"postgresql://postgres@127.0.0.1:5432/{self.dbname}", self.sim.base_url, api_key,
                        "http://127.0.0.1:9", "b-imaging-dev", include_dir=self.include)  # fmt: skip
        env = airflow_env(self.home, wiring)
        env.update(alert_connections(*self.ports))
        return env

    def query(self, text: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(text, args).fetchall()

    def last_run(self) -> tuple[Any, ...]:
        return self.query(
            "SELECT id, status, failed_task, error_class, error_message FROM medsync.sync_run ORDER BY id DESC LIMIT 1"
        )[0]

    def staging_tables(self, run_id: int) -> list[str]:
        rows = self.query("SELECT tablename FROM pg_tables WHERE schemaname = 'medsync' AND tablename LIKE %s",
                          f"%_r{run_id}")  # fmt: skip
        return [r[0] for r in rows]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, a_template_db: str) -> Iterator[Stack]:
    dbname = f"medsync_oncall_{uuid.uuid4().hex[:8]}"
    dsn = create_database(dbname, template=a_template_db)
    config = SimConfig(seed=5, patients=3, studies_per_patient=1, series_per_study=1, images_per_series=2,
                       clock="manual", base_time=datetime(2026, 3, 1, tzinfo=UTC).isoformat())  # fmt: skip
    received = Received()
    tmp = tmp_path_factory.mktemp("oncall")
    try:
        with BSimulator(config, api_key=API_KEY) as sim, smtp_server(received) as smtp:
            with webhook_server(received) as hook:
                yield Stack(tmp, dsn, dbname, sim, received, (smtp, hook))
    finally:
        drop_database(dbname)


def _run(stack: Stack, env: dict[str, str], **conf: Any) -> str:
    result = dags_test(env, conf=conf or {"full_refresh": True})
    return result.stdout + result.stderr


def test_a_refused_key_is_tried_once_per_task_then_the_run_is_failed_with_its_reason(stack: Stack) -> None:
    wrong_key = "wrong-af-key-0c55e1"
    before = stack.sim.stats()["responses"].get("401", 0)
    output = _run(stack, stack.env_for(wrong_key), full_refresh=True)
    assert wrong_key not in output

    refused = stack.sim.stats()["responses"].get("401", 0) - before
    assert refused == len(PULLS), f"{refused} refused requests: a 401 was retried (retries: 2)"
    _, status, task, error_class, message = stack.last_run()
    assert (status, error_class) == ("failed", "SourceApiError")
    assert task in PULLS and "401" in message
    mails = [m for m in stack.received.mails if "SourceApiError" in m["subject"]]
    assert len(mails) == 1, [m["subject"] for m in stack.received.mails]
    assert f"failed in {task}" in mails[0]["subject"]
    assert "medsync_b" in mails[0]["body"] and "not retried" in mails[0]["body"]
    for text in stack.received.texts():
        assert wrong_key not in text and API_KEY not in text


def test_a_key_revoked_mid_run_fails_the_run_and_its_staged_pages_are_dropped(stack: Stack) -> None:
    before = stack.sim.stats()["responses"].get("401", 0)
    # The first pull to run gets its two requests (counts, one page); B refuses the key from then on.
    stack.sim.set_faults(revoke_key_after=2)
    try:
        _run(stack, stack.env, full_refresh=True)
    finally:
        stack.sim.set_faults()

    run_id, status, task, error_class, message = stack.last_run()
    assert (status, error_class) == ("failed", "SourceApiError") and task in PULLS and "401" in message
    pulled = stack.query("SELECT level, pull_counts FROM medsync.sync_run_level WHERE run_id = %s"
                         " AND pull_counts <> '{}'", run_id)  # fmt: skip
    assert len(pulled) == 1 and pulled[0][1]["slice_0"]["staged"] > 0, pulled  # a page was staged
    refused = stack.sim.stats()["responses"].get("401", 0) - before
    assert refused == len(PULLS) - 1, f"{refused} refused requests: a 401 was retried (retries: 2)"
    assert stack.staging_tables(run_id) == []  # the DAG's failure callback dropped the run's staging
    ((dag_run_id,),) = stack.query("SELECT dag_run_id FROM medsync.sync_run WHERE id = %s", run_id)
    assert [m["subject"] for m in stack.received.mails if dag_run_id in m["subject"]] == [
        f"[medsync] b: run {dag_run_id} failed in {task}: SourceApiError"
    ]


def test_a_source_that_keeps_failing_transiently_is_retried(stack: Stack) -> None:
    before = stack.sim.stats()["responses"].get("503", 0)
    stack.sim.set_faults(error_every=1)  # every request 503: transient
    try:
        _run(stack, stack.env, full_refresh=True)
    finally:
        stack.sim.set_faults()
    errors = stack.sim.stats()["responses"].get("503", 0) - before
    assert errors == len(PULLS) * 3, f"{errors} answers 503: each pull should be tried 1 + 2 retries times"
    _, status, task, error_class, _ = stack.last_run()
    assert (status, error_class) == ("failed", "SourceUnavailableError") and task in PULLS


def test_runs_airflow_ended_without_a_word_are_taken_over_by_the_next_run(stack: Stack) -> None:
    # As if the last run's processes had been killed before any callback ran: the ledger says
    # running, Airflow says failed. And a run the ledger knows but Airflow does not (deleted).
    killed_id = stack.last_run()[0]
    with psycopg.connect(stack.dsn) as conn:
        conn.execute("UPDATE medsync.sync_run SET status = 'running', error_class = NULL, failed_task = NULL"
                     " WHERE id = %s", (killed_id,))  # fmt: skip
        gone_id = conn.execute(
            "INSERT INTO medsync.sync_run (source_system, dag_run_id, run_type)"
            " VALUES ('b', %s, 'manual') RETURNING id",
            (f"manual__gone_{uuid.uuid4().hex[:6]}",),
        ).fetchone()[0]
        conn.execute(f"CREATE TABLE medsync.stage_b_subject_r{gone_id} (LIKE medsync.stage_subject)")

    output = _run(stack, stack.env, full_refresh=True)

    assert stack.last_run()[1] == "succeeded", output[-3000:]
    ended = stack.query("SELECT id, status, error_class FROM medsync.sync_run WHERE id IN (%s, %s) ORDER BY id",
                        killed_id, gone_id)  # fmt: skip
    assert ended == [(killed_id, "failed", "RunEnded"), (gone_id, "failed", "RunEnded")]
    assert stack.staging_tables(gone_id) == []


def test_a_run_whose_trigger_params_are_refused_is_in_the_ledger_as_failed(stack: Stack) -> None:
    _run(stack, stack.env, since="2026-03-01T00:00:00+00:00")  # a repair window without its end

    _, status, task, error_class, message = stack.last_run()
    assert (status, task, error_class) == ("failed", "prepare", "RunParamsError"), message
    assert "a repair window needs both since and until" in message
    assert stack.query("SELECT run_type FROM medsync.sync_run ORDER BY id DESC LIMIT 1") == [("repair",)]
