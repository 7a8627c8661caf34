"""On call: failures that say what happened, reach someone, and never retry what cannot succeed.

The task bodies (``medsync.tasks``) and the failure callbacks (``medsync.failures``) run here
against a real PostgreSQL, the B simulator over HTTP, a real SMTP server (aiosmtpd) and a
real HTTP webhook receiver on loopback. Airflow's own part (a context handed to a callback,
``AirflowFailException`` ending retries) is exercised for real in test_oncall_airflow.py.
"""

from __future__ import annotations

import inspect
import logging
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from oncall_receivers import ALERTS, Received, alert_connections, smtp_server, webhook_server

from devstack.airflow_env import include_copy
from medsync import errors, failures, ledger, tasks
from medsync.config import LEVELS, get_source_config
from medsync.dag_factory import build_dag
from medsync.errors import MedsyncError
from medsync.windows import RunFacts
from simulator import BSimulator, SimConfig
from tests.conftest import connection_uri

API_KEY = "oncall-key-51c9e2"
BASE = datetime(2026, 3, 1, tzinfo=UTC)


# --- errors that know whether to retry -------------------------------------------------------------------


def _all_subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_all_subclasses(sub))]


EXPECTED_PERMANENT = {
    "ConfigError": True, "MappingError": True, "RunParamsError": True, "SchemaError": True,
    "SourceApiError": True, "SourceUnavailableError": False, "MergeError": False,
    "ReconciliationError": True, "SourceBehindError": True, "StorageError": True,
}  # fmt: skip


def test_every_medsync_error_says_itself_whether_it_is_permanent() -> None:
    import medsync.sources.rest.client  # noqa: F401  (its private errors are MedsyncErrors too)

    for cls in _all_subclasses(MedsyncError):
        assert "permanent" in vars(cls) or cls.__module__ != "medsync.errors", cls
        assert isinstance(cls.permanent, bool), cls
    for name, permanent in EXPECTED_PERMANENT.items():
        assert getattr(errors, name).permanent is permanent, name


def test_a_permanent_error_fails_the_task_at_once_with_its_message() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="SourceApiError: B GET /patients: HTTP 401") as caught:
        with failures.fail_fast():
            raise errors.SourceApiError("B GET /patients: HTTP 401 unauthorized: check the API key")
    assert isinstance(caught.value.__cause__, errors.SourceApiError)
    for transient in (errors.SourceUnavailableError("B kept answering 503"), errors.MergeError("lock")):
        with pytest.raises(type(transient)):
            with failures.fail_fast():
                raise transient
    with pytest.raises(psycopg.errors.SerializationFailure):  # not medsync's: Airflow retries it
        with failures.fail_fast():
            raise psycopg.errors.SerializationFailure("could not serialize access")


def test_errors_on_task_paths_are_medsync_errors_that_fail_at_once(a_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a task can meet besides the source and A's data: each fails the task without retries."""
    from airflow.providers.postgres.hooks import postgres as postgres_provider
    from airflow.sdk.exceptions import AirflowFailException

    from medsync.hooks.a_database import ADatabaseHook
    from medsync.levels import spec
    from medsync.staging import window_slice
    from medsync.windows import Window, plan_window

    tiny = Window(BASE, BASE + timedelta(microseconds=1))
    monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_A_DB", connection_uri(a_db))
    # The postgres provider hands out psycopg2 connections under SQLAlchemy 1 (a wrong installation).
    monkeypatch.setattr(postgres_provider, "USE_PSYCOPG3", False)
    failing: list[tuple[type[MedsyncError], Any]] = [
        (errors.RunParamsError, lambda: plan_window(RunFacts("scheduled", None, None, BASE), None, timedelta(0))),
        (errors.RunParamsError, lambda: window_slice(tiny, 4, 3)),
        (errors.ConfigError, lambda: spec("patient")),
        (errors.ConfigError, lambda: ADatabaseHook().get_conn()),
    ]
    for expected, call in failing:
        with pytest.raises(AirflowFailException) as caught, failures.fail_fast():
            call()
        assert type(caught.value.__cause__) is expected, caught.value


def test_an_error_that_may_quote_a_record_is_recorded_by_class_only(a_db: str) -> None:
    with psycopg.connect(a_db) as conn, pytest.raises(psycopg.errors.InvalidDatetimeFormat) as caught:
        conn.execute("SELECT 'MRN-4471-SECRET'::date")
    assert "MRN-4471-SECRET" in str(caught.value)
    error_class, message, permanent = failures.describe_error(caught.value)
    assert error_class == "InvalidDatetimeFormat"
    assert "MRN-4471-SECRET" not in message and "22007" in message
    assert permanent is False


def test_a_database_error_leaves_a_task_without_the_record_it_quotes(a_db: str) -> None:
    # Airflow prints a task's exception in the task log: DETAIL would say "Failing row contains
    # (MRN-..., Roe^Richard, ...)", a data error quotes the value it could not read.
    failing: list[tuple[str, tuple[object, ...] | None, type[psycopg.Error], str]] = [
        ("INSERT INTO patient VALUES ('MRN-5582-SECRET', 'Roe^Richard', NULL)", None,
         psycopg.errors.NotNullViolation, 'null value in column "born"'),
        ("INSERT INTO patient VALUES ('MRN-4471-SECRET', 'Doe^Jane', '1961-04-02')", None,
         psycopg.errors.UniqueViolation, "constraint patient_pkey"),
        ("SELECT 'MRN-4471-SECRET'::date", None, psycopg.errors.InvalidDatetimeFormat, "SQLSTATE 22007"),
        ("SELECT %s, %s", ("MRN-4471-SECRET",), psycopg.ProgrammingError, "ProgrammingError;"),  # the client's
    ]  # fmt: skip
    with psycopg.connect(a_db, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE patient (mrn text PRIMARY KEY, name text, born date NOT NULL)")
        conn.execute("INSERT INTO patient VALUES ('MRN-4471-SECRET', 'Doe^Jane', '1961-04-02')")
        for statement, params, expected, says in failing:
            with pytest.raises(expected) as caught, failures.fail_fast():
                conn.execute(statement, params)
            printed = "".join(traceback.format_exception(caught.value))
            assert "MRN-" not in printed and "Doe" not in printed and "Roe" not in printed, printed
            assert says in printed
            assert caught.value.diag.message_primary or not caught.value.diag.sqlstate  # still there for code


# --- config: timeouts, alerts -----------------------------------------------------------------------


def test_every_task_gets_its_execution_timeout_and_the_failure_callbacks() -> None:
    cfg = get_source_config("b").model_copy(
        update={"task_timeouts": get_source_config("b").task_timeouts.model_copy(update={"pull_minutes": 7.0})}
    )
    dag = build_dag(cfg)
    for t in dag.tasks:
        assert t.execution_timeout is not None, t.task_id
        assert t.on_failure_callback, t.task_id
    assert dag.get_task("pull_subjects").execution_timeout == timedelta(minutes=7)
    assert dag.get_task("merge_subjects").execution_timeout == timedelta(minutes=cfg.task_timeouts.merge_minutes)
    assert dag.on_failure_callback


def test_params_of_the_trigger_form_have_titles_descriptions_and_types() -> None:
    params = build_dag(get_source_config("b")).params
    for name in ("full_refresh", "levels", "since", "until", "dry_run"):
        param = params.get_param(name)
        assert param.schema["title"] and param.description and param.schema["type"], name
    assert params.get_param("since").schema["format"] == "date-time"
    assert params.get_param("levels").schema["items"]["enum"] == list(LEVELS)


def _config_with(tmp_path: Path, **overrides: Any) -> Path:
    return include_copy(tmp_path / "include", **overrides) / "sources" / "b.yaml"


def test_alerts_section_is_validated(tmp_path: Path) -> None:
    from medsync.config import load_source_config

    cfg = load_source_config(_config_with(tmp_path, alerts=ALERTS))
    assert cfg.alerts.email is not None and cfg.alerts.email.to == ("oncall@example.org",)
    for bad in (
        {**ALERTS, "email": {"smtp_conn_id": "x", "to": []}},  # nobody to tell
        {**ALERTS, "webhook": {"url": "https://hooks.example/secret-token"}},  # a secret belongs in a connection
        {**ALERTS, "slack": {"slack_webhook_conn_id": "s"}},  # the slack provider is not installed here
        {**ALERTS, "thresholds": {"quarantined": 0}},
    ):
        with pytest.raises(errors.ConfigError):
            load_source_config(_config_with(tmp_path, alerts=bad))


def test_timeouts_must_outlast_the_merge_lock_wait(tmp_path: Path) -> None:
    from medsync.config import load_source_config

    with pytest.raises(errors.ConfigError, match="statement_timeout_seconds"):
        load_source_config(_config_with(tmp_path, lock_timeout_seconds=600, database={"statement_timeout_seconds": 60}))
    with pytest.raises(errors.ConfigError, match="merge_minutes"):
        load_source_config(_config_with(tmp_path, lock_timeout_seconds=600, task_timeouts={"merge_minutes": 5}))


def test_every_database_session_has_connect_and_statement_timeouts(a_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsync.hooks.a_database import ADatabaseHook

    monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_A_DB", connection_uri(a_db))
    with ADatabaseHook(connect_timeout_seconds=4, statement_timeout_seconds=1).get_conn() as conn:
        assert conn.info.get_parameters()["connect_timeout"] == "4"
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1s",)
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(3)")


# --- the run ledger, the callbacks and the alerts, against B's simulator ------------------------------------


@dataclass
class Ctx:
    """What Airflow hands a callback: the task instance and the run (just the fields medsync reads)."""

    ti: Any
    dag_run: Any
    exception: BaseException | str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def as_context(self) -> dict[str, Any]:
        return {"ti": self.ti, "dag_run": self.dag_run, "exception": self.exception, "reason": "task_failure",
                "params": self.params}  # fmt: skip


@dataclass
class FakeTi:
    task_id: str
    try_number: int = 1
    max_tries: int = 3


@dataclass
class FakeDagRun:
    run_id: str
    run_type: str = "manual"


class Env:
    def __init__(self, dsn: str, sim: BSimulator, received: Received) -> None:
        self.dsn, self.sim, self.received = dsn, sim, received

    def query(self, text: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(text, args).fetchall()

    def staging_tables(self, run_id: int) -> list[str]:
        rows = self.query("SELECT tablename FROM pg_tables WHERE schemaname = 'medsync' AND tablename LIKE %s",
                          f"%_r{run_id}")  # fmt: skip
        return sorted(r[0] for r in rows)

    def a_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        columns = "id, source_key, source_updated_at, deleted_at, xmin::text"
        return {t: self.query(f"SELECT {columns} FROM imaging.{t} ORDER BY id") for t in LEVELS}

    def sync(self, dag_run_id: str, *, facts: RunFacts | None = None, **options: Any) -> dict[str, Any]:
        """One run, task by task in the DAG's order; returns each task's result."""
        facts = facts or RunFacts("manual", None, None, datetime.now(UTC), full_refresh=True)
        plan = tasks.prepare("b", dag_run_id=dag_run_id, facts=facts, **options)
        out: dict[str, Any] = {"plan": plan}
        for level in LEVELS:
            out[f"pull_{level}"] = tasks.pull("b", level, plan["run_id"])
        for level in LEVELS:
            out[f"merge_{level}"] = tasks.merge("b", level, plan["run_id"])
        out["report"] = tasks.report("b", plan["run_id"])
        out["finish"] = tasks.finish("b", plan["run_id"])
        return out

    def phi(self) -> list[str]:
        found = []
        for rec in list(self.sim.live_records("patients"))[:5]:
            name = rec.get("name") or {}
            found += [v for v in (rec.get("mrn"), name.get("family"), rec.get("birth_date")) if v and len(v) >= 6]
        return found


@pytest.fixture
def env(a_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    config = SimConfig(seed=11, patients=4, studies_per_patient=1, series_per_study=2, images_per_series=2,
                       clock="manual", base_time=BASE.isoformat(), history_seconds=3 * 86400)  # fmt: skip
    received = Received()
    include = include_copy(tmp_path / "include", retries=2, file_check={"enabled": False}, alerts=ALERTS)
    with BSimulator(config, api_key=API_KEY) as sim, smtp_server(received) as smtp, webhook_server(received) as hook:
        monkeypatch.setenv("MEDSYNC_INCLUDE_DIR", str(include))
        monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_A_DB", connection_uri(a_db))
        monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_B_API",
                           f'{{"conn_type": "http", "host": "{sim.base_url}", "password": "{API_KEY}"}}')  # fmt: skip
        monkeypatch.setenv("AIRFLOW_VAR_MEDSYNC_B_BUCKET", "b-imaging-dev")
        for key, value in alert_connections(smtp, hook).items():
            monkeypatch.setenv(key, value)
        yield Env(a_db, sim, received)


def _fail(env: Env, dag_run_id: str, task_id: str, exc: BaseException) -> None:
    failures.task_failed("b", Ctx(FakeTi(task_id, 1, 3), FakeDagRun(dag_run_id), exc).as_context())


def test_a_refused_key_marks_the_run_failed_with_its_reason_and_tells_someone(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    facts = RunFacts("manual", None, None, datetime.now(UTC), full_refresh=True)
    plan = tasks.prepare("b", dag_run_id="manual__bad_key", facts=facts)
    tasks.pull("b", "instance", plan["run_id"])  # staged before the failure
    wrong_key = "wrong-key-77d0aa13"
    monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_B_API",
                       f'{{"conn_type": "http", "host": "{env.sim.base_url}", "password": "{wrong_key}"}}')  # fmt: skip
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException) as caught, failures.fail_fast():
        tasks.pull("b", "subject", plan["run_id"])
    _fail(env, "manual__bad_key", "pull_subjects", caught.value)

    status, task, error_class, message = env.query(
        "SELECT status, failed_task, error_class, error_message FROM medsync.sync_run WHERE id = %s", plan["run_id"]
    )[0]
    assert (status, task, error_class) == ("failed", "pull_subjects", "SourceApiError")
    assert "401" in message
    # Someone is told, once per channel: the source, the run, what failed and where to look.
    assert len(env.received.mails) == 1 and len(env.received.posts) == 1
    mail, post = env.received.mails[0], env.received.posts[0]
    assert mail["to"] == "oncall@example.org"
    assert "b: run manual__bad_key failed in pull_subjects: SourceApiError" in mail["subject"]
    for text in (mail["body"], str(post["json"])):
        assert "manual__bad_key" in text and "pull_subjects" in text and "401" in text
        assert "http://airflow.example.internal/dags/medsync_b/runs/manual__bad_key/tasks/pull_subjects" in text
        assert f"WHERE id = {plan['run_id']}" in text and "On call" in text
        assert "not retried" in text
    assert post["path"] == "/hooks/medsync" and post["json"]["event"] == "failure"
    for text in env.received.texts():
        assert API_KEY not in text and wrong_key not in text
        for value in env.phi():
            assert value not in text

    # The run as a whole failed (the DAG-level callback): staging dropped, no second alert.
    assert env.staging_tables(plan["run_id"])
    failures.run_failed("b", {"dag_run": FakeDagRun("manual__bad_key"), "reason": "task_failure"})
    assert env.staging_tables(plan["run_id"]) == []
    assert len(env.received.mails) == 1 and len(env.received.posts) == 1
    assert env.query("SELECT failed_task, error_class FROM medsync.sync_run WHERE id = %s", plan["run_id"]) == [
        ("pull_subjects", "SourceApiError")
    ]


def _closed_port() -> int:
    """A loopback port nothing listens on (chosen by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_someone_is_told_even_when_a_database_is_unreachable(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    facts = RunFacts("manual", None, None, datetime.now(UTC), full_refresh=True)
    plan = tasks.prepare("b", dag_run_id="manual__a_down", facts=facts)
    # A's database goes away: the ledger cannot be written, the callbacks must not fail for it.
    monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_A_DB", f"postgresql://postgres@127.0.0.1:{_closed_port()}/a")
    with caplog.at_level(logging.INFO, "medsync"):
        _fail(env, "manual__a_down", "merge_subjects", errors.MergeError("lock on source b not obtained"))
        failures.run_failed("b", {"dag_run": FakeDagRun("manual__a_down"), "reason": "task_failure"})

    # Both callbacks alert (neither can tell from the ledger whether the other did), through both channels.
    assert len(env.received.mails) == 2 and len(env.received.posts) == 2
    task_mail, run_mail = env.received.mails
    assert "failed in merge_subjects: MergeError" in task_mail["subject"] and "RunFailed" in run_mail["subject"]
    for text in (task_mail["body"], run_mail["body"], *(str(p["json"]) for p in env.received.posts)):
        assert "manual__a_down" in text and "ledger not written" in text
    assert "lock on source b not obtained" in task_mail["body"]
    # The ledger could not be written, and the log says so by the error's class only.
    assert env.query("SELECT status FROM medsync.sync_run WHERE id = %s", plan["run_id"]) == [("running",)]
    unwritten = [r.getMessage() for r in caplog.records if "ledger could not be written" in r.getMessage()]
    assert len(unwritten) == 2 and all("(OperationalError)" in m for m in unwritten), unwritten
    assert not any("refused" in r.getMessage().lower() for r in caplog.records)


def test_a_run_killed_without_callbacks_is_taken_over_by_the_next_run_at_once(env: Env) -> None:
    facts = RunFacts("manual", None, None, datetime.now(UTC), full_refresh=True)
    killed = tasks.prepare("b", dag_run_id="manual__killed", facts=facts)
    tasks.pull("b", "subject", killed["run_id"])
    beside = tasks.prepare("b", dag_run_id="backfill__beside", facts=facts)
    tasks.pull("b", "subject", beside["run_id"])
    states = {"manual__killed": "failed", "backfill__beside": "running"}

    tasks.prepare("b", dag_run_id="manual__next", facts=facts, airflow_run_state=states.get)

    assert env.query("SELECT status, error_class FROM medsync.sync_run WHERE id = %s", killed["run_id"]) == [
        ("failed", "RunEnded")
    ]
    assert env.staging_tables(killed["run_id"]) == []
    # A run Airflow still runs (a backfill beside this one) keeps its state and its staging.
    assert env.query("SELECT status FROM medsync.sync_run WHERE id = %s", beside["run_id"]) == [("running",)]
    assert env.staging_tables(beside["run_id"])


ONCALL_QUERY = (
    "SELECT id, dag_run_id, run_type, status, failed_task, error_class, error_message, started_at, finished_at"
    " FROM medsync.sync_run WHERE source_system = 'b' ORDER BY id DESC LIMIT 10"
)
"""The README's on-call query."""


def test_a_run_refused_before_prepare_registered_it_is_in_the_ledger_as_failed(env: Env) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from medsync import schema

    with psycopg.connect(env.dsn, autocommit=True) as conn:
        schema.migrate(conn)  # medsync's schema exists: every earlier run's prepare made it
    facts = RunFacts("manual", None, None, datetime.now(UTC), full_refresh=True)
    params = {"full_refresh": True, "levels": ["patient"]}
    with pytest.raises(AirflowFailException) as caught, failures.fail_fast():
        tasks.prepare("b", dag_run_id="manual__bad_levels", facts=facts, levels=params["levels"])
    failures.task_failed("b", Ctx(FakeTi("prepare", 1, 3), FakeDagRun("manual__bad_levels"), caught.value,
                                  params).as_context())  # fmt: skip
    failures.run_failed("b", {"dag_run": FakeDagRun("manual__bad_levels"), "reason": "task_failure", "params": params})

    # A's tables not as expected: a scheduled run refused by prepare's checks.
    with psycopg.connect(env.dsn) as conn:
        conn.execute("ALTER TABLE imaging.study DROP COLUMN accession_number")
    scheduled = RunFacts("scheduled", BASE - timedelta(hours=12), BASE, BASE)
    with pytest.raises(AirflowFailException) as caught, failures.fail_fast():
        tasks.prepare("b", dag_run_id="scheduled__a_changed", facts=scheduled)
    failures.task_failed("b", Ctx(FakeTi("prepare", 1, 3), FakeDagRun("scheduled__a_changed", "scheduled"),
                                  caught.value).as_context())  # fmt: skip

    rows = {r[1]: r for r in env.query(ONCALL_QUERY)}
    _, _, kind, status, task, error_class, message, started, finished = rows["manual__bad_levels"]
    assert (kind, status, task, error_class) == ("full_refresh", "failed", "prepare", "RunParamsError")
    assert "levels must be a non-empty subset" in message and started <= finished
    _, _, kind, status, task, error_class, message, _, _ = rows["scheduled__a_changed"]
    assert (kind, status, task, error_class) == ("scheduled", "failed", "prepare", "SchemaError")
    assert "imaging.study.accession_number is missing" in message
    # One alert per run: the run-level callback after the task's sends none.
    subjects = [m["subject"] for m in env.received.mails]
    assert len(subjects) == 2 and "manual__bad_levels failed in prepare: RunParamsError" in subjects[0], subjects


def test_run_state_lives_in_the_ledger_module_only() -> None:
    root = Path(__file__).resolve().parents[1] / "plugins" / "medsync"
    for path in root.rglob("*.py"):
        if path.name == "ledger.py":
            continue
        text = path.read_text()
        for table in ("medsync.sync_run", "medsync.watermark"):
            writes = [w for w in ("INSERT INTO " + table, "UPDATE " + table) if w in text]
            assert not writes, f"{path.relative_to(root)} writes {table}: the ledger owns it"


# --- a source that went back in time ----------------------------------------------------------------------


def test_a_full_refresh_against_a_source_behind_a_names_it_and_leaves_a_unchanged(env: Env) -> None:
    env.sync("manual__first")
    # A holds newer versions than B serves now: as if B's replica were restored from an older backup.
    with psycopg.connect(env.dsn) as conn:
        conn.execute("UPDATE imaging.subject SET source_updated_at = source_updated_at + interval '1 day'")
        conn.execute("UPDATE imaging.study SET source_updated_at = source_updated_at + interval '1 day'")
    before = env.a_rows()
    subjects = len(before["subject"])

    with pytest.raises(errors.SourceBehindError) as caught:
        env.sync("manual__behind")
    message = str(caught.value)
    assert f"served {subjects} records in versions older than A holds (subject {subjects})" in message
    assert "went back in time" in message
    assert env.a_rows() == before  # not one row rewritten

    # A window run is not failed for it, but every report counts it per level, and someone is told.
    window = RunFacts("scheduled", BASE - timedelta(days=4), BASE, BASE)
    out = env.sync("scheduled__after", facts=window)
    levels = out["report"]["levels"]
    assert levels["subject"]["older_than_a"] == subjects and levels["study"]["older_than_a"] >= 1
    assert levels["instance"]["older_than_a"] == 0
    report_posts = [p["json"] for p in env.received.posts if p["json"]["event"] == "report"]
    assert report_posts and any("older than A holds" in d for d in report_posts[-1]["details"])
    assert env.a_rows() == before


def test_a_full_refresh_against_a_source_partly_behind_a_writes_nothing_of_that_level(env: Env) -> None:
    env.sync("manual__first")
    patients = sorted(r["id"] for r in env.sim.live_records("patients"))
    newer_in_b, newer_in_a = patients[:2], patients[2:]
    # Mixed: B changed two patients since (newer than A), while A holds newer versions of the others.
    env.sim.advance(3600)
    for pid in newer_in_b:
        env.sim.update("patients", pid, mrn=f"MRN-NEW-{pid[-4:]}")
    with psycopg.connect(env.dsn) as conn:
        conn.execute("UPDATE imaging.subject SET source_updated_at = source_updated_at + interval '1 day'"
                     " WHERE source_key = ANY(%s)", (newer_in_a,))  # fmt: skip
    before = env.a_rows()  # with each row's xmin: a row rewritten, even to the same values, shows

    with pytest.raises(errors.SourceBehindError) as caught:
        env.sync("manual__mixed")
    assert f"served {len(newer_in_a)} records in versions older than A holds (subject {len(newer_in_a)})" in str(
        caught.value
    )
    assert env.a_rows() == before  # B's newer records were not written either


def test_the_report_alert_goes_out_once_and_only_for_a_run_that_passes_its_checks(env: Env) -> None:
    def report_alerts(dag_run_id: str) -> tuple[list[str], list[dict[str, Any]]]:
        mails = [m["subject"] for m in env.received.mails if f"run {dag_run_id} succeeded" in m["subject"]]
        posts = [p["json"] for p in env.received.posts
                 if p["json"]["event"] == "report" and p["json"]["dag_run_id"] == dag_run_id]  # fmt: skip
        return mails, posts

    env.sync("manual__first")
    # A full refresh that then fails its check: an instance of A deleted behind medsync's back after
    # the merges (A's kept count drifts, a threshold; A and B differ, unexplained). It alerts as
    # failed (by its callback), never as "succeeded, but".
    facts = RunFacts("manual", None, None, datetime.now(UTC), full_refresh=True)
    plan = tasks.prepare("b", dag_run_id="manual__drift", facts=facts)
    for level in LEVELS:
        tasks.pull("b", level, plan["run_id"])
    for level in LEVELS:
        tasks.merge("b", level, plan["run_id"])
    with psycopg.connect(env.dsn) as conn:
        conn.execute("DELETE FROM imaging.instance WHERE id = (SELECT min(id::text)::uuid FROM imaging.instance)")
    with pytest.raises(errors.ReconciliationError):
        tasks.report("b", plan["run_id"])
    assert report_alerts("manual__drift") == ([], [])

    # A window run whose report crosses a threshold (records older than A), its report task run twice
    # (a retry, or cleared): one alert per channel, and the ledger says it went out.
    with psycopg.connect(env.dsn) as conn:
        conn.execute("UPDATE imaging.subject SET source_updated_at = source_updated_at + interval '1 day'")
    window = RunFacts("scheduled", BASE - timedelta(days=4), BASE, BASE)
    plan = tasks.prepare("b", dag_run_id="scheduled__older", facts=window)
    for level in LEVELS:
        tasks.pull("b", level, plan["run_id"])
    for level in LEVELS:
        tasks.merge("b", level, plan["run_id"])
    tasks.report("b", plan["run_id"])
    tasks.report("b", plan["run_id"])
    mails, posts = report_alerts("scheduled__older")
    assert len(mails) == 1 and len(posts) == 1, (mails, posts)
    assert any("older than A holds" in line for line in posts[0]["details"])
    ((alerted,),) = env.query("SELECT report_alerted_at FROM medsync.sync_run WHERE id = %s", plan["run_id"])
    assert alerted is not None


# --- repairs: levels, an exact window, dry run ---------------------------------------------------------------


def test_a_dry_run_reports_what_it_would_write_and_writes_nothing(env: Env) -> None:
    out = env.sync("manual__dry", dry_run=True)
    assert env.query("SELECT count(*) FROM imaging.subject") == [(0,)]
    assert env.query("SELECT count(*) FROM imaging.instance") == [(0,)]
    assert env.query("SELECT count(*) FROM medsync.watermark") == [(0,)]
    assert out["merge_subject"]["inserted"] == len(list(env.sim.live_records("patients")))
    assert out["report"]["dry_run"] is True
    assert out["finish"]["watermark_advanced"] is False
    # The real run afterwards inserts exactly what the dry run said it would.
    real = env.sync("manual__real")
    assert real["merge_subject"]["inserted"] == out["merge_subject"]["inserted"]


def test_levels_and_an_exact_window_sync_only_those_and_move_no_watermark(env: Env) -> None:
    env.sync("manual__first")
    marks = env.query("SELECT level, synced_until FROM medsync.watermark ORDER BY level")
    since, until = BASE - timedelta(days=2), BASE - timedelta(days=1)
    facts = RunFacts("manual", None, None, datetime.now(UTC), since=since, until=until)
    out = env.sync("manual__repair", facts=facts, levels=["study", "instance"])
    assert out["plan"]["kind"] == "repair"
    assert out["plan"]["windows"] == {"study": [since.isoformat(), until.isoformat()],
                                      "instance": [since.isoformat(), until.isoformat()]}  # fmt: skip
    assert out["pull_subject"]["skipped"] and out["merge_sequence"]["skipped"]
    assert set(out["report"]["levels"]) == {"study", "instance"}
    assert env.query("SELECT level, synced_until FROM medsync.watermark ORDER BY level") == marks
    with pytest.raises(errors.RunParamsError):
        tasks.prepare("b", dag_run_id="manual__bad", facts=facts, levels=["patient"])
    with pytest.raises(errors.RunParamsError):
        RunFacts("manual", None, None, datetime.now(UTC), since=since)


# --- progress ---------------------------------------------------------------------------------------------


def test_a_long_pull_logs_its_progress_also_while_it_waits_for_the_source(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    from medsync.sources import open_source
    from medsync.staging import PROGRESS_SECONDS, pull_level

    assert PROGRESS_SECONDS == 30 and inspect.signature(pull_level).parameters["progress_seconds"].default == 30
    facts = RunFacts("manual", None, None, datetime.now(UTC), full_refresh=True)
    plan = tasks.prepare("b", dag_run_id="manual__progress", facts=facts)
    patients = len(list(env.sim.live_records("patients")))
    # One patient a page, each answered in 0.4 s, and B's third request refused with Retry-After: 2.
    cfg = get_source_config("b").model_copy(update={"page_size": 1})
    env.sim.set_faults(slow_every=1, slow_seconds=0.4, throttle_every=3, retry_after=2)
    try:
        with (
            open_source(cfg).connect() as client,
            psycopg.connect(env.dsn, autocommit=True) as conn,
            caplog.at_level(logging.INFO, "medsync.staging"),
        ):
            pull_level(conn, source="b", level="subject", run_id=plan["run_id"], parser=tasks.record_parser(cfg),
                       pages=client.iter_pages("subject", BASE - timedelta(days=30), datetime.now(UTC)),
                       expected_records=patients * 2, progress_seconds=0.15)  # fmt: skip
    finally:
        env.sim.set_faults()

    def progress_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("pulling subject")]

    lines = progress_lines()
    assert len(lines) >= 10, lines
    # Logged before the first page came (the timer, not a page, keeps the time) and while B's
    # Retry-After kept the pull waiting, with records, pages, rate and what is left.
    assert lines[0].startswith("pulling subject slice 0: 0 records in 0 pages after 0s (0/s)"), lines[0]
    waited = [line for line in lines if "waiting 2s for the next page" in line]
    assert waited and "records left" in waited[-1], lines
    estimate = f"of {patients * 2} records left, about"
    assert any(" records in " in line and "/s)" in line and estimate in line for line in lines), lines
    # Stopped with the pull: no thread left, no line after.
    time.sleep(0.5)
    assert progress_lines() == lines
    assert not [t for t in threading.enumerate() if t.name.startswith("medsync-progress")]


def test_ledger_keeps_the_first_reason(a_db: str) -> None:
    with psycopg.connect(a_db, autocommit=True) as conn:
        from medsync import schema
        from medsync.windows import Window

        schema.migrate(conn)
        window = Window(BASE - timedelta(hours=12), BASE)
        run_id = ledger.register_run(conn, "b", "r1", "manual", windows={"subject": window})
        first = ledger.fail(conn, "b", "r1", task_id="merge_subjects", error_class="MergeError", message="lock")
        second = ledger.fail(conn, "b", "r1", task_id=None, error_class="RunFailed", message="task_failure")
        assert first is not None and first.first and second is not None and not second.first
        assert ledger.failure(conn, run_id)["failed_task"] == "merge_subjects"
        # A run prepare never registered is recorded, failed, with what the caller knows of it.
        unknown = ledger.fail(conn, "b", "never-prepared", task_id="prepare", error_class="X", message="m",
                              run_type="repair")  # fmt: skip
        assert unknown is not None and unknown.first and unknown.run.run_type == "repair"
        assert ledger.failure(conn, unknown.run.id)["status"] == "failed"
        again = ledger.fail(conn, "b", "never-prepared", task_id=None, error_class="RunFailed", message="")
        assert again is not None and not again.first and again.run.id == unknown.run.id
