"""End to end through a real Airflow: api-server, scheduler, dag-processor, triggerer, workers.

The components run natively (tests/airflow_stack.py), bound to loopback, on a fresh metadata
database, and the tests use only the REST API the UI uses. One stack per executor
(LocalExecutor, then CeleryExecutor with Redis and two workers) runs, one after the other,
the UI scenario (``airflow_stack.Scenario``) of each DAG under test, snapshots A after every
step, then stops; the tests assert on what it recorded:

- ``stack_probe``, a placeholder DAG written here with medsync_b's shape (twice-daily
  CronDataIntervalTimetable in Asia/Seoul, a ``full_refresh`` Param, parallel pulls) that
  copies the rows of its window from ``probe.source`` to ``probe.target``: it pins down what
  Airflow hands a run (type, data interval, params) independently of medsync's code;
- ``medsync_b``, the real DAG from dags/ and plugins/, against the B simulator (its CLI, as
  docker-compose.yaml runs it) and an S3 server holding B's files: skipped while
  dags/medsync.py or the simulator CLI does not exist.

Both DAGs share a stack (the probe as a DAG bundle of its own), which saves a start and a
stop per executor.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psutil
import psycopg
import pytest
import requests
from airflow_stack import (
    LOOPBACK,
    AirflowStack,
    Executor,
    Scenario,
    ScenarioResult,
    StackConfig,
    drop_stale_databases,
    free_port,
    migrated_metadata_db,
    parse_time,
    postgres_connection,
    run_scenario,
    run_windows,
    simulator_process,
)
from conftest import ROOT, RUN_TAG, create_database, drop_database

pytestmark = pytest.mark.slow

SEOUL = ZoneInfo("Asia/Seoul")
TWELVE_HOURS = timedelta(hours=12)
EXECUTORS: tuple[Executor, ...] = ("LocalExecutor", "CeleryExecutor")
MEDSYNC_DAG = ROOT / "dags" / "medsync.py"
SIMULATOR_CLI = ROOT / "simulator" / "__main__.py"
MEDSYNC_READY = MEDSYNC_DAG.exists() and SIMULATOR_CLI.exists()
needs_medsync = pytest.mark.skipif(not MEDSYNC_READY, reason="dags/medsync.py or the simulator CLI does not exist yet")


# ======================================================================================
# The generic part: one stack, the scenario of each job, snapshots, process/socket checks.
# ======================================================================================
@dataclass
class Job:
    """One DAG's scenario in a stack, and how to snapshot the database it writes."""

    scenario: Scenario
    a_dsn: str
    snapshot: Callable[[str], Any]
    after: Callable[[AirflowStack, str], dict[str, Any]] | None = None
    """Run after the scenario, in the same stack (given it and ``a_dsn``); its result is ``snapshots["after"]``."""


@dataclass
class JobOutcome:
    result: ScenarioResult | None = None
    snapshots: dict[str, Any] = field(default_factory=dict)
    """The database's state after each step (``Job.snapshot``)."""
    error: BaseException | None = None
    seconds: float = 0.0

    def ok(self) -> ScenarioResult:
        """The result; re-raises what went wrong in the stack, in the test that asks."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def hostnames(self) -> set[str]:
        """Where task instances ran (``hostname`` of every TI, from the API)."""
        tis = self.ok().task_instances.values()
        return {ti["hostname"] for run in tis for ti in run if ti["hostname"]}


@dataclass
class E2EOutcome:
    """Everything a test asserts on after one stack ran its jobs and stopped."""

    executor: Executor
    jobs: dict[str, JobOutcome]
    sockets: list[tuple[str, int, str, int]]
    """What the stack's processes listened on while running: (name, pid, address, port)."""
    ss_lines: list[str]
    """``ss -ltnp`` lines of the stack's processes, as a second witness."""
    process_names: list[str]
    leftovers: list[psutil.Process]
    ports_open_after: list[int]
    timings: dict[str, float] = field(default_factory=dict)


def ss_listening(pids: set[int]) -> list[str]:
    """Lines of ``ss -ltnpH`` that belong to ``pids``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=30).stdout
    return [line for line in out.splitlines() if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids]


def run_e2e(config: StackConfig, jobs: Mapping[str, Job]) -> E2EOutcome:
    """Starts a stack, runs each job's scenario in turn, stops; a job's failure is kept in its outcome."""
    stack = AirflowStack(config)
    outcomes = {name: JobOutcome() for name in jobs}
    with stack:
        pids = {p.pid for p in stack.processes()}
        names = sorted({c.name for c in stack.components})
        sockets = stack.listening_sockets()
        ss_lines = ss_listening(pids)
        for name, job in jobs.items():
            out = outcomes[name]
            t0 = datetime.now(UTC)
            try:
                out.result = run_scenario(
                    stack,
                    job.scenario,
                    on_step=lambda step, _runs, job=job, out=out: out.snapshots.update({step: job.snapshot(job.a_dsn)}),
                )
                if job.after is not None:
                    out.snapshots["after"] = job.after(stack, job.a_dsn)
            except Exception as exc:  # kept for the job's own test to raise
                out.error = exc
            out.seconds = (datetime.now(UTC) - t0).total_seconds()
        # Task processes and late-starting servers show up only once work ran.
        sockets += [s for s in stack.listening_sockets() if s not in sockets]
        ports = sorted({s[3] for s in sockets})
    open_after = [
        c.laddr.port
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports
    ]
    timings = {**stack.timings, **{f"job {n}": o.seconds for n, o in outcomes.items()}}
    for name, out in outcomes.items():
        if out.result:
            timings.update({f"{name} {k}": v for k, v in out.result.step_seconds.items()})
    # Shown with -s, and kept in CI's log: where an end-to-end run spends its time.
    print(f"\n[{config.executor}] " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return E2EOutcome(config.executor, outcomes, sockets, ss_lines, names, stack.leftovers, open_after, timings)


def assert_clean(outcome: E2EOutcome) -> None:
    """Loopback only while running; nothing running or listening afterwards."""
    assert outcome.sockets, "the stack listened on nothing?"
    assert all(ip in LOOPBACK for _, _, ip, _ in outcome.sockets), outcome.sockets
    for line in outcome.ss_lines:
        local = line.split()[3]
        assert local.startswith(("127.0.0.1:", "[::1]:")), line
    assert outcome.leftovers == []
    assert outcome.ports_open_after == []


def assert_runs_succeeded(result: ScenarioResult) -> None:
    failed = {r["dag_run_id"]: r["state"] for r in result.all_runs() if r["state"] != "success"}
    assert not failed, failed
    for run_id, tis in result.task_instances.items():
        bad = {ti["task_id"]: ti["state"] for ti in tis if ti["state"] != "success"}
        assert not bad, (run_id, bad)


def assert_windows(result: ScenarioResult, scenario: Scenario, now: datetime) -> None:
    """Each step's runs have the run type and data interval the UI action implies."""
    steps = result.steps
    if scenario.expect_scheduled_run:
        (scheduled,) = steps["scheduled"]
        (start, end) = run_windows([scheduled])[0]
        # catchup is off: the latest complete interval, i.e. the one that ended last before now.
        assert end - start == scenario.interval and end <= now < end + scenario.interval, (start, end)
    (window,) = steps["window"]
    assert window["run_type"] == "manual"
    assert run_windows([window]) == [scenario.window()]
    backfill = steps["backfill"]
    assert {r["run_type"] for r in backfill} == {"backfill"}
    assert run_windows(backfill) == scenario.backfill_windows()
    assert result.backfill["dag_id"] == scenario.dag_id
    (full,) = steps["full_refresh"]
    assert full["conf"] == {"full_refresh": True}
    assert full["logical_date"] is None


def celery_executor_importable() -> None:
    """Fails with the fix when the installed celery breaks the celery provider (before a slow start)."""
    import importlib

    try:
        importlib.import_module("airflow.providers.celery.executors.celery_executor_utils")
    except ImportError as exc:
        import celery

        pytest.fail(
            f"CeleryExecutor cannot start: {exc} (celery {celery.__version__}). celery 5.7 dropped "
            "celery.backends.database.retry, which apache-airflow-providers-celery 3.26.0 imports: "
            "pin celery<5.7 (5.6.3) in requirements.in."
        )


@pytest.fixture(scope="session")
def metadata_template() -> Iterator[str]:
    """A migrated Airflow metadata database; each stack gets a fresh copy of it."""
    drop_stale_databases()
    name = migrated_metadata_db(f"airflow_tpl_{RUN_TAG}")
    yield name
    drop_database(name)


def _fresh_db(template: str, tag: str) -> tuple[str, str]:
    name = f"medsync_e2e_{RUN_TAG}_{tag}_{uuid.uuid4().hex[:6]}"
    return name, create_database(name, template=template)


# ======================================================================================
# The placeholder DAG.
# ======================================================================================
PROBE_DAG_ID = "stack_probe"
PROBE_CONN_ID = "stack_probe_db"
"""Its own connection: the stack also runs medsync_b, whose medsync_a_db is another database."""
PROBE_DAG = textwrap.dedent(
    '''
    """Placeholder airflow DAG of tests/test_airflow_stack.py, shaped like medsync_b.

    Copies probe.source rows whose updated_at lies in the run's data interval (all of them
    on full_refresh) into probe.target, in four parallel parts, and records what each task
    was given in probe.task_log. Heavy imports stay inside the tasks, as in medsync.
    """

    from __future__ import annotations

    import pendulum
    from airflow.sdk import DAG, CronDataIntervalTimetable, Param, task

    PARTS = 4


    def _connect():
        import psycopg
        from airflow.sdk import BaseHook

        c = BaseHook.get_connection("stack_probe_db")
        return psycopg.connect(
            host=c.host, port=c.port or 5432, user=c.login, password=c.password or None,
            dbname=c.schema, autocommit=True,
        )


    def _record(context, copied=None):
        import os

        run, ti = context["dag_run"], context["ti"]
        with _connect() as conn:
            conn.execute(
                "INSERT INTO probe.task_log (run_id, task_id, run_type, interval_start, interval_end,"
                " full_refresh, node, pid, copied) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    run.run_id, ti.task_id, getattr(run.run_type, "value", run.run_type),
                    context.get("data_interval_start"), context.get("data_interval_end"),
                    bool(context["params"]["full_refresh"]), os.environ.get("MEDSYNC_STACK_HOSTNAME"),
                    os.getpid(), copied,
                ),
            )


    with DAG(
        dag_id="stack_probe",
        schedule=CronDataIntervalTimetable("0 0,12 * * *", timezone="Asia/Seoul"),
        start_date=pendulum.datetime(2026, 1, 1, tz="Asia/Seoul"),
        catchup=False,
        params={"full_refresh": Param(False, type="boolean")},
    ):

        @task
        def prepare(**context):
            _record(context)

        @task
        def pull(part: int, **context):
            start, end = context.get("data_interval_start"), context.get("data_interval_end")
            full = bool(context["params"]["full_refresh"])
            if not full and start is None:
                raise ValueError("a run without a data interval must be a full refresh")
            with _connect() as conn:
                copied = conn.execute(
                    "INSERT INTO probe.target (key, updated_at, payload, synced_by)"
                    " SELECT key, updated_at, payload, %(run_id)s FROM probe.source"
                    " WHERE mod(abs(hashtext(key)), %(parts)s) = %(part)s"
                    " AND (%(full)s OR (updated_at >= %(start)s AND updated_at < %(end)s))"
                    " ON CONFLICT (key) DO UPDATE SET updated_at = EXCLUDED.updated_at,"
                    " payload = EXCLUDED.payload, synced_by = EXCLUDED.synced_by"
                    " WHERE probe.target.updated_at < EXCLUDED.updated_at",
                    {"run_id": context["dag_run"].run_id, "parts": PARTS, "part": part, "full": full,
                     "start": start, "end": end},
                ).rowcount
            _record(context, copied)
            return copied

        @task
        def finish(copied, **context):
            _record(context, sum(copied))
            return sum(copied)

        pulls = [pull.override(task_id=f"pull_{i}")(i) for i in range(PARTS)]
        prepare() >> pulls
        finish(pulls)
    '''
)

PROBE_SCHEMA = """
CREATE SCHEMA probe;
CREATE TABLE probe.source (key text PRIMARY KEY, updated_at timestamptz NOT NULL, payload text);
CREATE TABLE probe.target (key text PRIMARY KEY, updated_at timestamptz NOT NULL, payload text,
                           synced_by text NOT NULL);
CREATE TABLE probe.task_log (run_id text, task_id text, run_type text, interval_start timestamptz,
                             interval_end timestamptz, full_refresh boolean, node text, pid integer,
                             copied integer);
"""

PROBE_SCENARIO = Scenario(
    dag_id=PROBE_DAG_ID,
    window_start=datetime(2026, 3, 1, 0, 0, tzinfo=SEOUL),
    backfill_from=datetime(2026, 1, 1, 0, 0, tzinfo=SEOUL),
    backfill_to=datetime(2026, 1, 2, 0, 0, tzinfo=SEOUL),
)
"""Window 1 March 00-12 KST; backfill ticks 1 Jan 00:00, 12:00 and 2 Jan 00:00 KST (3 runs)."""

# Five rows at each instant: inside the window (both edges), inside each backfill window,
# and outside all of them (only the full refresh copies those).
PROBE_SOURCE_TIMES = [
    datetime(2026, 3, 1, 0, 0, tzinfo=SEOUL),  # window start: inclusive
    datetime(2026, 3, 1, 9, 0, tzinfo=SEOUL),
    datetime(2026, 3, 1, 12, 0, tzinfo=SEOUL),  # window end: exclusive
    datetime(2026, 1, 1, 3, 0, tzinfo=SEOUL),
    datetime(2026, 1, 1, 15, 0, tzinfo=SEOUL),
    datetime(2026, 1, 2, 6, 0, tzinfo=SEOUL),
    datetime(2026, 1, 2, 18, 0, tzinfo=SEOUL),  # after the backfill's last window
    datetime(2025, 12, 31, 23, 59, tzinfo=SEOUL),  # before its first
]
PROBE_SOURCE = [(f"k{i:02d}_{j}", t, f"payload {i}.{j}") for i, t in enumerate(PROBE_SOURCE_TIMES) for j in range(5)]


def probe_snapshot(dsn: str) -> list[tuple]:
    """probe.target without the run that copied a row (run ids differ between stacks)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT key, updated_at, payload FROM probe.target ORDER BY key").fetchall()


def probe_task_log(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT * FROM probe.task_log ORDER BY run_id, task_id").fetchall()


def source_rows_in(*windows: tuple[datetime, datetime]) -> list[tuple]:
    return sorted(r for r in PROBE_SOURCE if any(s <= r[1] < e for s, e in windows))


def probe_db(a_template: str, tag: str) -> tuple[str, str]:
    """A fresh copy of A's template with the probe's tables and source rows."""
    name, dsn = _fresh_db(a_template, tag)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(PROBE_SCHEMA)
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO probe.source VALUES (%s, %s, %s)", PROBE_SOURCE)
    return name, dsn


# ======================================================================================
# medsync_b: the real DAG, the B simulator and an S3 server with B's files.
# ======================================================================================
LEVELS = {"subject": "patients", "study": "studies", "sequence": "series", "instance": "images"}
"""A's table -> B's resource."""
PARENT = {
    "study": ("subject_id", "subject"),
    "sequence": ("study_id", "study"),
    "instance": ("sequence_id", "sequence"),
}
VOLATILE = {"id", "created_at", "updated_at", "deleted_at"}
LOOKBACK = timedelta(minutes=10)
"""include/sources/b.yaml's lookback_minutes: a window run also reads this much before its start."""


def a_snapshot(dsn: str) -> dict[str, list[dict[str, Any]]]:
    """A's rows from source b per table, comparable across databases, sorted by source_key.

    Ids are issued by the application, so a foreign key becomes ``parent_key`` (the
    parent's source_key), and the row's own times become ``deleted`` (a bool).
    """
    out: dict[str, list[dict[str, Any]]] = {}
    keys: dict[str, dict[Any, str]] = {}
    with psycopg.connect(dsn) as conn:
        for table in LEVELS:
            cur = conn.execute(f"SELECT * FROM imaging.{table} WHERE source_system = 'b'")
            cols = [d.name for d in cur.description]
            rows = [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
            keys[table] = {r["id"]: r["source_key"] for r in rows}
            fk = PARENT.get(table)
            out[table] = sorted(
                (
                    {
                        **{c: r[c] for c in cols if c not in VOLATILE and (fk is None or c != fk[0])},
                        "parent_key": keys[fk[1]].get(r[fk[0]]) if fk else None,
                        "deleted": r["deleted_at"] is not None,
                    }
                    for r in rows
                ),
                key=lambda row: row["source_key"],
            )
    return out


def b_records(base_url: str, api_key: str, resource: str, **params: str) -> list[dict]:
    """Every record of a B resource (live only unless asked), paged by the contract's cursor."""
    records: list[dict] = []
    query: dict[str, Any] = {"limit": 1000, **params}
    while True:
        resp = requests.get(f"{base_url}/{resource}", params=query, headers={"X-API-Key": api_key}, timeout=30)
        resp.raise_for_status()
        page = resp.json()
        records += page["data"]
        if not page["next_cursor"]:
            return records
        query["cursor"] = page["next_cursor"]


def tick_before(moment: datetime) -> datetime:
    """The schedule tick (00:00 or 12:00 Asia/Seoul) at or before ``moment``."""
    local = moment.astimezone(SEOUL)
    return local.replace(hour=0 if local.hour < 12 else 12, minute=0, second=0, microsecond=0)


def medsync_scenario(patients: list[dict]) -> Scenario:
    """Windows chosen from B's own data, so the test holds whatever dates the simulator uses:
    the window holds the median patient change, the backfill covers the 36 hours before it."""
    times = sorted(parse_time(p["updated_at"]) for p in patients)
    window_start = tick_before(times[len(times) // 2])
    return Scenario(
        dag_id="medsync_b",
        window_start=window_start,
        backfill_from=window_start - 3 * TWELVE_HOURS,
        backfill_to=window_start - TWELVE_HOURS,
        run_timeout=600,
    )


SIM_ARGS = (
    # Small and plain: the end-to-end test proves the wiring; the sync's edge cases
    # (awkward text, defects, orphans, faults) are the integration tests' job.
    *("--seed", "7", "--plain", "--history-days", "3"),
    *("--studies-per-patient", "2", "--series-per-study", "2", "--images-per-series", "2"),
)


def upload_b_files(base_url: str, api_key: str, s3_endpoint: str, bucket: str) -> int:
    """Puts every live image's file where B keeps it, so the DAG's file check finds them."""
    import boto3

    from simulator.client import SimAdminClient

    admin = SimAdminClient(base_url, api_key, timeout=30)
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=bucket)
    images = b_records(base_url, api_key, "images")
    for image in images:
        s3.put_object(Bucket=bucket, Key=image["file_path"].lstrip("/"), Body=admin.file_bytes(image["id"]))
    return len(images)


@dataclass
class MedsyncEnv:
    base_url: str
    api_key: str
    s3_port: int
    bucket: str
    scenario: Scenario

    def connections(self, a_dsn: str) -> dict[str, dict[str, Any]]:
        """medsync_b's three connections (ids from include/sources/b.yaml)."""
        return {
            "medsync_a_db": postgres_connection(a_dsn),
            "medsync_b_api": {"conn_type": "http", "host": self.base_url, "password": self.api_key},
            "medsync_b_aws": {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {
                    "endpoint_url": f"http://127.0.0.1:{self.s3_port}",
                    "region_name": "us-east-1",
                    "config_kwargs": {"signature_version": "s3v4"},
                },
            },
        }


@pytest.fixture(scope="module")
def medsync_env() -> Iterator[MedsyncEnv | None]:
    """The B simulator (its CLI, as compose runs it) and an S3 server with B's files, on loopback;
    None while medsync_b or the simulator does not exist."""
    if not MEDSYNC_READY:
        yield None
        return
    from moto.server import ThreadedMotoServer

    s3_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    api_key = uuid.uuid4().hex
    # moto keeps buckets per process, not per server: a bucket of this run's own, given to the
    # DAG through the Variable include/sources/b.yaml names (storage.bucket_variable).
    bucket = f"b-imaging-{uuid.uuid4().hex[:8]}"
    try:
        with simulator_process(api_key, patients=12, extra_args=SIM_ARGS) as base_url:
            upload_b_files(base_url, api_key, f"http://127.0.0.1:{s3_port}", bucket)
            scenario = medsync_scenario(b_records(base_url, api_key, "patients"))
            yield MedsyncEnv(base_url, api_key, s3_port, bucket, scenario)
    finally:
        moto.stop()


def assert_only_window(snapshot: dict[str, list[dict]], windows: list[tuple[datetime, datetime]]) -> None:
    """Every row A holds changed in one of ``windows`` (less the lookback), or is the parent
    of such a row (a child can make the sync fetch its parent)."""
    needed: set[tuple[str, str]] = set()
    for table in reversed(LEVELS):  # children first, so parents learn they are needed
        for row in snapshot[table]:
            changed = row["source_updated_at"]
            inside = any(s - LOOKBACK <= changed < e for s, e in windows)
            assert inside or (table, row["source_key"]) in needed, (table, row["source_key"], changed)
            if table in PARENT:
                needed.add((PARENT[table][1], row["parent_key"]))


def assert_a_is_b(snapshot: dict[str, list[dict]], base_url: str, api_key: str) -> None:
    """A holds exactly B's live records, at B's versions, and agrees with B's /counts."""
    for table, resource in LEVELS.items():
        b_live = {r["id"]: parse_time(r["updated_at"]) for r in b_records(base_url, api_key, resource)}
        a_live = {r["source_key"]: r["source_updated_at"] for r in snapshot[table] if not r["deleted"]}
        assert a_live == b_live, table
    counts = requests.get(f"{base_url}/counts", headers={"X-API-Key": api_key}, timeout=30).json()
    a_counts = {t: sum(not r["deleted"] for r in rows) for t, rows in snapshot.items()}
    assert a_counts == {t: counts[r] for t, r in LEVELS.items()}


def watermarks(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT level, synced_until FROM medsync.watermark ORDER BY level").fetchall()


def medsync_run_id(dsn: str, dag_run_id: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT id FROM medsync.sync_run WHERE dag_run_id = %s", (dag_run_id,)).fetchone()
    assert row is not None, dag_run_id
    return int(row[0])


def oncall_after_scenario(stack: AirflowStack, a_dsn: str) -> dict[str, Any]:
    """Repairs from the trigger form and A's assets, through /api/v2 as the UI does them.

    The trigger form's params (what the UI renders), a conf the form would refuse, a dry run
    of two levels in an exact window (nothing written, no watermark moved, no asset event),
    then a real run, after which example_downstream (scheduled on A's tables) runs with the
    merges' counts as its triggering events' metadata.
    """
    api, out = stack.api, {}
    api.wait_dag_parsed("example_downstream", alive=stack.check_alive)
    api.unpause("example_downstream")
    out["params"] = api.get("/dags/medsync_b/details")["params"]
    out["refused"] = api.request(
        "POST", "/dags/medsync_b/dagRuns", expect=(400, 422),
        json={"logical_date": None, "conf": {"levels": ["patients"]}},
    )  # fmt: skip
    downstream_before = {r["dag_run_id"] for r in api.dag_runs("example_downstream")}
    a_before, marks_before = a_snapshot(a_dsn), watermarks(a_dsn)
    since, until = datetime(2026, 1, 1, tzinfo=UTC), datetime.now(UTC).replace(microsecond=0)
    conf = {"dry_run": True, "levels": ["subject", "study"], "since": since.isoformat(), "until": until.isoformat()}
    dry = api.trigger("medsync_b", conf=conf)
    api.wait_runs("medsync_b", [dry["dag_run_id"]], timeout=300, alive=stack.check_alive)
    out["dry_run"] = {
        "a_unchanged": a_snapshot(a_dsn) == a_before,
        "watermarks_unchanged": watermarks(a_dsn) == marks_before,
        "report": api.xcom("medsync_b", dry["dag_run_id"], "report"),
        "merge_subjects": api.xcom("medsync_b", dry["dag_run_id"], "merge_subjects"),
        "pull_sequences": api.xcom("medsync_b", dry["dag_run_id"], "pull_sequences"),
        "medsync_run_id": medsync_run_id(a_dsn, dry["dag_run_id"]),
    }
    # A run the ledger calls running but Airflow does not know (its processes died, the run was
    # deleted): the next run's prepare asks Airflow through the worker and takes it over.
    with psycopg.connect(a_dsn) as conn:
        conn.execute("INSERT INTO medsync.sync_run (source_system, dag_run_id, run_type) VALUES ('b', %s, 'manual')",
                     ("manual__gone_from_airflow",))  # fmt: skip
    real = api.trigger("medsync_b", conf={"full_refresh": False})
    api.wait_runs("medsync_b", [real["dag_run_id"]], timeout=300, alive=stack.check_alive)
    real_id = medsync_run_id(a_dsn, real["dag_run_id"])
    with psycopg.connect(a_dsn) as conn:
        out["gone"] = conn.execute(
            "SELECT status, error_class FROM medsync.sync_run WHERE dag_run_id = 'manual__gone_from_airflow'"
        ).fetchone()
    events: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        e.get("extra", {}).get("run_id") == real_id for evs in events.values() for e in evs
    ):
        time.sleep(2)
        stack.check_alive()
        for run in api.dag_runs("example_downstream"):
            if run["dag_run_id"] in downstream_before:
                continue
            if run["state"] in ("success", "failed"):
                rid = run["dag_run_id"]
                events[rid] = api.get(f"/dags/example_downstream/dagRuns/{rid}/upstreamAssetEvents")["asset_events"]
    out["downstream"] = {
        "runs": {r["dag_run_id"]: r["state"] for r in api.dag_runs("example_downstream")
                 if r["dag_run_id"] not in downstream_before},
        "events": events,
        "real_run_id": real_id,
    }  # fmt: skip
    return out


# ======================================================================================
# One stack per executor, running every job; the tests below read what it recorded.
# ======================================================================================
OUTCOMES: dict[str, E2EOutcome] = {}
"""Per executor, so the CeleryExecutor tests can compare with the LocalExecutor run."""


@pytest.fixture(scope="module", params=EXECUTORS)
def e2e(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    a_template_db: str,
    metadata_template: str,
    medsync_env: MedsyncEnv | None,
) -> Iterator[E2EOutcome]:
    executor: Executor = request.param
    if executor == "CeleryExecutor":
        celery_executor_importable()
    probe_folder = tmp_path_factory.mktemp("probe_dags")
    (probe_folder / "stack_probe.py").write_text(PROBE_DAG)
    dbs = [probe_db(a_template_db, "probe")]
    jobs = {"probe": Job(PROBE_SCENARIO, dbs[0][1], probe_snapshot)}
    connections: dict[str, Any] = {PROBE_CONN_ID: postgres_connection(dbs[0][1])}
    variables: dict[str, str] = {}
    if medsync_env:
        dbs.append(_fresh_db(a_template_db, "medsync"))
        # The on-call checks (trigger form, dry run, assets) once, under the LocalExecutor.
        after = oncall_after_scenario if executor == "LocalExecutor" else None
        jobs["medsync_b"] = Job(medsync_env.scenario, dbs[1][1], a_snapshot, after)
        connections.update(medsync_env.connections(dbs[1][1]))
        variables["medsync_b_bucket"] = medsync_env.bucket
    config = StackConfig(
        dags_folder=ROOT / "dags",
        plugins_folder=ROOT / "plugins",
        extra_bundles={"stack-probe": probe_folder},
        executor=executor,
        triggerer=True,
        connections=connections,
        variables=variables,
        metadata_template=metadata_template,
    )
    try:
        outcome = run_e2e(config, jobs)
        outcome.jobs["probe"].snapshots["task_log"] = probe_task_log(dbs[0][1])
        OUTCOMES[executor] = outcome
        yield outcome
    finally:
        for name, _ in dbs:
            drop_database(name)


def local_outcome() -> E2EOutcome:
    if "LocalExecutor" not in OUTCOMES:
        pytest.skip("no LocalExecutor run in this session to compare with")
    return OUTCOMES["LocalExecutor"]


# --- the stack itself -------------------------------------------------------------------------


def test_stack_ran_the_components_on_loopback_and_stopped_clean(e2e: E2EOutcome) -> None:
    expected = ["api-server", "dag-processor", "scheduler", "triggerer"]
    if e2e.executor == "CeleryExecutor":
        expected += ["worker1", "worker2"]
        if shutil.which("redis-server") and not os.environ.get("MEDSYNC_TEST_REDIS"):
            expected.append("redis")  # the stack's own broker
    assert e2e.process_names == sorted(expected)
    assert_clean(e2e)
    names = sorted(name for name, *_ in e2e.sockets)
    # The pin caught every log server that would otherwise listen on 0.0.0.0 / [::]: the
    # triggerer's, and the scheduler's (LocalExecutor) or each worker's (CeleryExecutor).
    assert sum(n.startswith("airflow api_server") for n in names) == 1
    assert names.count("airflow serve-logs") == (2 if e2e.executor == "LocalExecutor" else 3)


def test_tasks_ran_where_the_executor_puts_them(e2e: E2EOutcome) -> None:
    hosts = e2e.jobs["probe"].hostnames()
    if e2e.executor == "LocalExecutor":
        assert hosts == {"scheduler"}  # children of the scheduler
    else:
        assert hosts == {"worker1", "worker2"}  # both workers took tasks
        log = e2e.jobs["probe"].snapshots["task_log"]
        assert {row[6] for row in log} == {"worker1", "worker2"}  # as the tasks themselves saw it


# --- the placeholder DAG ----------------------------------------------------------------------


def test_probe_runs_got_the_windows_and_params_of_their_ui_action(e2e: E2EOutcome) -> None:
    job = e2e.jobs["probe"]
    result = job.ok()
    assert_runs_succeeded(result)
    assert_windows(result, PROBE_SCENARIO, datetime.now(UTC))
    # What the tasks themselves were given matches what the API says about their runs.
    by_run = {r["dag_run_id"]: r for r in result.all_runs()}
    log = job.snapshots["task_log"]
    assert {row[0] for row in log} == set(by_run)
    for run_id, task_id, run_type, start, end, full_refresh, _node, _pid, _copied in log:
        run = by_run[run_id]
        assert run_type == run["run_type"], (run_id, task_id)
        expected = run_windows([run])[0] if run["data_interval_start"] else (None, None)
        assert (start, end) == expected, (run_id, task_id)
        assert full_refresh == bool(run["conf"].get("full_refresh")), (run_id, task_id)
    assert len(log) == 6 * len(by_run)  # prepare, four pulls, finish per run


def test_probe_synced_exactly_its_windows_step_by_step(e2e: E2EOutcome) -> None:
    job = e2e.jobs["probe"]
    job.ok()
    snaps = job.snapshots
    assert snaps["scheduled"] == []  # the latest interval has no source rows
    window = PROBE_SCENARIO.window()
    assert snaps["window"] == source_rows_in(window)
    assert len(snaps["window"]) == 10  # both of 1 March's instants, not the 12:00 one
    assert snaps["backfill"] == source_rows_in(window, *PROBE_SCENARIO.backfill_windows())
    assert snaps["full_refresh"] == sorted(PROBE_SOURCE)


def test_probe_ends_the_same_under_celery(e2e: E2EOutcome) -> None:
    if e2e.executor != "CeleryExecutor":
        pytest.skip("compares the CeleryExecutor run with the LocalExecutor one")
    local = local_outcome().jobs["probe"]
    mine = e2e.jobs["probe"]
    assert {k: v for k, v in mine.snapshots.items() if k != "task_log"} == {
        k: v for k, v in local.snapshots.items() if k != "task_log"
    }


# --- medsync_b --------------------------------------------------------------------------------


@needs_medsync
def test_medsync_b_runs_succeed_with_the_windows_of_their_ui_action(e2e: E2EOutcome, medsync_env: MedsyncEnv) -> None:
    result = e2e.jobs["medsync_b"].ok()
    assert_runs_succeeded(result)
    assert_windows(result, medsync_env.scenario, datetime.now(UTC))


@needs_medsync
def test_medsync_b_syncs_only_its_windows_then_a_is_b(e2e: E2EOutcome, medsync_env: MedsyncEnv) -> None:
    job, scen = e2e.jobs["medsync_b"], medsync_env.scenario
    result = job.ok()
    snaps = job.snapshots
    # The automatic scheduled run (latest interval) may have synced recent changes first.
    scheduled = run_windows(result.steps["scheduled"])
    assert any(snaps["window"][t] for t in LEVELS), "the window held no change of B: pick another window"
    assert_only_window(snaps["window"], [*scheduled, scen.window()])
    assert_only_window(snaps["backfill"], [*scheduled, scen.window(), *scen.backfill_windows()])
    assert_a_is_b(snaps["full_refresh"], medsync_env.base_url, medsync_env.api_key)


@needs_medsync
def test_medsync_b_ends_the_same_under_celery(e2e: E2EOutcome) -> None:
    if e2e.executor != "CeleryExecutor":
        pytest.skip("compares the CeleryExecutor run with the LocalExecutor one")
    assert e2e.jobs["medsync_b"].hostnames() == {"worker1", "worker2"}
    local = local_outcome().jobs["medsync_b"]
    local.ok()
    # The scenario's steps; the on-call checks after them run under the LocalExecutor only.
    steps = {k: v for k, v in local.snapshots.items() if k != "after"}
    assert e2e.jobs["medsync_b"].snapshots == steps


# --- on call: repairs from the trigger form, A's assets ---------------------------------------------------


def _after(e2e: E2EOutcome) -> dict[str, Any]:
    if e2e.executor != "LocalExecutor":
        pytest.skip("the on-call checks run once, under the LocalExecutor")
    e2e.jobs["medsync_b"].ok()
    return e2e.jobs["medsync_b"].snapshots["after"]


@needs_medsync
def test_medsync_b_trigger_form_offers_the_repairs_with_descriptions(e2e: E2EOutcome) -> None:
    after = _after(e2e)
    params = after["params"]
    for name in ("full_refresh", "levels", "since", "until", "dry_run"):
        assert params[name]["description"], name
        assert params[name]["schema"]["title"] and params[name]["schema"]["type"], name
    assert params["since"]["schema"]["format"] == "date-time"
    assert "patients" in str(after["refused"])  # a level that does not exist is refused at the trigger


@needs_medsync
def test_medsync_b_dry_run_of_some_levels_in_a_window_writes_nothing(e2e: E2EOutcome) -> None:
    dry = _after(e2e)["dry_run"]
    assert dry["a_unchanged"] and dry["watermarks_unchanged"]
    assert dry["report"]["dry_run"] is True and set(dry["report"]["levels"]) == {"subject", "study"}
    assert dry["merge_subjects"]["dry_run"] is True
    assert dry["pull_sequences"]["skipped"] is True


@needs_medsync
def test_medsync_b_takes_over_a_run_airflow_no_longer_knows(e2e: E2EOutcome) -> None:
    assert _after(e2e)["gone"] == ("failed", "RunEnded")


@needs_medsync
def test_medsync_b_merges_schedule_the_downstream_dag_through_their_assets(e2e: E2EOutcome) -> None:
    down = _after(e2e)["downstream"]
    mine = {
        rid: evs
        for rid, evs in down["events"].items()
        if any(e["extra"].get("run_id") == down["real_run_id"] for e in evs)
    }
    assert mine, down
    assert all(down["runs"][rid] == "success" for rid in mine)
    events = [e for evs in mine.values() for e in evs]
    uris = {e["uri"] for e in events}
    assert {f"x-medsync://a/imaging/{t}" for t in ("subject", "study", "sequence", "instance")} <= uris
    for e in events:
        assert e["extra"]["source"] == "b" and "inserted" in e["extra"] and "updated" in e["extra"]
    dry_id = _after(e2e)["dry_run"]["medsync_run_id"]
    assert not any(e["extra"].get("run_id") == dry_id for evs in down["events"].values() for e in evs)


def test_medsync_helpers() -> None:
    """The helpers the medsync_b tests rely on, checked even while those are skipped."""
    assert tick_before(datetime(2026, 3, 1, 11, 59, tzinfo=SEOUL)) == datetime(2026, 3, 1, tzinfo=SEOUL)
    assert tick_before(datetime(2026, 3, 1, 3, 0, tzinfo=UTC)) == datetime(2026, 3, 1, 12, tzinfo=SEOUL)
    scen = medsync_scenario([{"updated_at": "2026-03-01T05:00:00+09:00"}])
    assert scen.window() == (datetime(2026, 3, 1, tzinfo=SEOUL), datetime(2026, 3, 1, 12, tzinfo=SEOUL))
    assert len(scen.backfill_windows()) == 3
    assert scen.backfill_windows()[-1][1] == scen.window_start
    t0 = datetime(2026, 3, 1, 1, tzinfo=SEOUL)
    snap = {
        "subject": [{"source_key": "p1", "source_updated_at": t0 - timedelta(days=9), "parent_key": None}],
        "study": [{"source_key": "s1", "source_updated_at": t0, "parent_key": "p1"}],
        "sequence": [],
        "instance": [],
    }
    assert_only_window(snap, [scen.window()])  # p1 is outside but is s1's parent
    snap["subject"][0]["source_key"] = "p2"
    with pytest.raises(AssertionError):
        assert_only_window(snap, [scen.window()])
