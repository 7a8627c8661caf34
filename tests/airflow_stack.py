"""A real Airflow 3 stack, started natively for end-to-end tests and for ``make airflow``.

``AirflowStack`` starts ``airflow api-server``, ``scheduler``, ``dag-processor`` (and, when
asked, ``triggerer`` and ``celery worker`` processes, with a redis-server of their own as the
broker) as separate processes with their own AIRFLOW_HOME, a fresh PostgreSQL metadata
database (copied from a migrated template) and a known admin password, and stops them again:
SIGINT to each process group, SIGKILL to what is left, metadata database dropped. Tests
talk to it only through the REST API the UI uses (``AirflowApi``: ``/api/v2`` with a bearer
token from ``/auth/token``).

Everything listens on loopback only. The API server is told to (``--host 127.0.0.1``); the
log servers of the scheduler, triggerer and Celery workers call ``uvicorn.run(host="")``
(all interfaces) with no setting to change it, so every process gets a ``sitecustomize``
on its PYTHONPATH that pins uvicorn's host to 127.0.0.1 (see ``SITECUSTOMIZE``).
``AirflowStack.listening_sockets()`` lists what the stack's processes listen on, so a test
can prove it.

Typical use from a test::

    with AirflowStack(StackConfig(dags_folder=..., connections={...})) as stack:
        api = stack.api
        api.wait_dag_parsed("medsync_b")
        api.unpause("medsync_b")
        run = api.trigger("medsync_b", conf={"full_refresh": True})
        api.wait_runs("medsync_b", [run["dag_run_id"]])  # raises at once on a failed task

or ``run_scenario(stack, Scenario(...))`` for the whole UI scenario (scheduled run, one
window, a backfill, a full refresh), as tests/test_airflow_stack.py does.

``component_argv()`` is the one list of Airflow commands the stack runs; docker-compose.yaml
runs the same ones (tests/test_compose.py checks it). ``python tests/airflow_stack.py serve``
runs a long-lived stack for a laptop (``scripts/airflow-local.sh``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import psutil
import psycopg
import requests
from conftest import ADMIN_DSN, create_database, drop_database, dsn_for

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")
LOOPBACK = frozenset({"127.0.0.1", "::1"})
TERMINAL_RUN_STATES = frozenset({"success", "failed"})
CLAIM_KEY = "medsync:stack-claim"
REDIS_URL = os.environ.get("MEDSYNC_TEST_REDIS", "redis://127.0.0.1:6379")
Executor = Literal["LocalExecutor", "CeleryExecutor"]

# --------------------------------------------------------------------------------------
# The commands. docker-compose.yaml runs these same argv lists (tests/test_compose.py);
# "{name}" tokens are values that differ between the two (host, ports, names).
# --------------------------------------------------------------------------------------
AIRFLOW_COMMANDS: dict[str, tuple[str, ...]] = {
    "db-migrate": ("db", "migrate"),
    "api-server": ("api-server", "--host", "{host}", "--port", "{port}"),
    "scheduler": ("scheduler",),
    "dag-processor": ("dag-processor",),
    "triggerer": ("triggerer",),
    "celery-worker": (
        "celery",
        "worker",
        "--celery-hostname",
        "{worker_name}",
        "--concurrency",
        "{concurrency}",
    ),
}
"""Airflow CLI argv (after ``airflow``) per component."""

SIMULATOR_COMMAND: tuple[str, ...] = (
    "-m",
    "simulator",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--patients",
    "{patients}",
)
"""``python`` argv of the B simulator; it prints one JSON line holding ``base_url``.

The API key goes in ``$BSIM_API_KEY``, not in argv, where any ``ps`` would show it."""


def component_argv(component: str, **values: object) -> list[str]:
    """The Airflow CLI argv (without ``airflow``) of ``component``, placeholders filled in."""
    return [token.format(**values) for token in AIRFLOW_COMMANDS[component]]


def simulator_argv(**values: object) -> list[str]:
    """The ``python`` argv (without ``python``) of the B simulator, placeholders filled in."""
    return [token.format(**values) for token in SIMULATOR_COMMAND]


# --------------------------------------------------------------------------------------
# Loopback pinning for the log servers.
# --------------------------------------------------------------------------------------
SITECUSTOMIZE = '''\
"""Written by tests/airflow_stack.py for the processes of a native Airflow stack.

Airflow's log servers (scheduler, triggerer, Celery worker) call uvicorn.run(host=""),
i.e. all interfaces, and have no setting for it. This pins every uvicorn server of the
process to $MEDSYNC_STACK_BIND (default 127.0.0.1) when it was asked for all interfaces.
uvicorn is patched only when something imports it, so other processes pay nothing.
"""

import importlib.abc
import importlib.util
import os
import socket
import sys

_BIND = os.environ.get("MEDSYNC_STACK_BIND", "127.0.0.1")
_ALL_INTERFACES = ("", "0.0.0.0", "::", None)


def _pin_host(config_module):
    config_cls = config_module.Config
    original_init = config_cls.__init__

    def __init__(self, app, *args, **kwargs):
        if kwargs.get("host", "") in _ALL_INTERFACES:
            kwargs["host"] = _BIND
        original_init(self, app, *args, **kwargs)

    config_cls.__init__ = __init__


class _UvicornConfigFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "uvicorn.config":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _pin_host(module)

        spec.loader.exec_module = exec_module
        return spec


if "uvicorn.config" in sys.modules:
    _pin_host(sys.modules["uvicorn.config"])
else:
    sys.meta_path.insert(0, _UvicornConfigFinder())


def stack_hostname():
    """[core] hostname_callable: tells the stack's workers apart on one machine."""
    name = os.environ.get("MEDSYNC_STACK_HOSTNAME")
    return name or socket.getfqdn()
'''


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sqlalchemy_url(dbname: str, driver: str = "psycopg") -> str:
    """SQLAlchemy URL of ``dbname`` on the test PostgreSQL (the conftest admin conninfo)."""
    params = psycopg.conninfo.conninfo_to_dict(dsn_for(dbname))
    auth = params.get("user", "postgres")
    if params.get("password"):
        auth += f":{params['password']}"
    return f"postgresql+{driver}://{auth}@{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{dbname}"


def postgres_connection(dsn: str) -> dict[str, Any]:
    """An Airflow postgres connection (JSON form) for a libpq conninfo."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    conn: dict[str, Any] = {
        "conn_type": "postgres",
        "host": params.get("host", "127.0.0.1"),
        "port": int(params.get("port", 5432)),
        "login": params.get("user", "postgres"),
        "schema": params["dbname"],
    }
    if params.get("password"):
        conn["password"] = params["password"]
    return conn


def conn_env(connections: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``AIRFLOW_CONN_<ID>`` env vars (JSON form) for connections given as dicts."""
    return {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(dict(conn)) for conn_id, conn in connections.items()}


def _run_quiet(argv: Sequence[str], env: Mapping[str, str], log: Path, timeout: float) -> None:
    """Runs a command with output to ``log``; raises with the log's tail on failure."""
    with log.open("ab") as out:
        proc = subprocess.run(argv, check=False, env=dict(env), stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed ({proc.returncode}):\n{_tail(log)}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def migrated_metadata_db(name: str, home: Path | None = None, timeout: float = 180) -> str:
    """Creates database ``name`` and runs ``airflow db migrate`` on it; returns the name.

    Tests migrate once per session into a template and copy it per stack
    (``StackConfig.metadata_template``): a copy takes well under a second, a migration ~10 s.
    """
    create_database(name)
    with tempfile.TemporaryDirectory(prefix="airflow-migrate-", dir=home) as tmp:
        env = _base_env(Path(tmp), sqlalchemy_url(name))
        try:
            _run_quiet([AIRFLOW, *component_argv("db-migrate")], env, Path(tmp) / "migrate.log", timeout)
        except BaseException:
            drop_database(name)
            raise
    return name


def _base_env(home: Path, metadata_url: str) -> dict[str, str]:
    """Environment every Airflow process of a stack shares (apart from per-process values)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            # Off by default; said here because its server would bind 0.0.0.0.
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _owner_gone(tag: str | bytes | None) -> bool:
    """Whether the process that made ``tag`` (``<pid>_<hex>``) on this machine has exited."""
    if isinstance(tag, bytes):
        tag = tag.decode(errors="replace")
    match = re.match(r"(\d+)_", tag or "")
    return bool(match) and not psutil.pid_exists(int(match.group(1)))


def _redis_db_for(tag: str) -> int:
    """A Redis DB number (1-15) nobody uses, claimed with a key, so parallel stacks never share a queue.

    A DB claimed by a process that no longer exists (a run killed with SIGKILL) is flushed and reused.
    """
    import redis

    start = uuid.uuid5(uuid.NAMESPACE_OID, tag).int % 15
    for i in range(15):
        number = 1 + (start + i) % 15
        client = redis.Redis.from_url(REDIS_URL, db=number, socket_timeout=5)
        try:
            if client.dbsize() and _owner_gone(client.get(CLAIM_KEY)):
                client.flushdb()
            if client.dbsize() == 0 and client.set(CLAIM_KEY, tag, nx=True) and client.dbsize() == 1:
                return number
        finally:
            client.close()
    raise RuntimeError("no empty Redis database for the Celery broker")


def drop_stale_databases() -> list[str]:
    """Drops metadata databases left by runs of this machine that were killed before cleaning up."""
    params = psycopg.conninfo.conninfo_to_dict(ADMIN_DSN)
    if params.get("host", "127.0.0.1") not in {"127.0.0.1", "localhost", "::1"}:
        return []  # pids mean nothing for another machine's runs
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname ~ '^airflow_(meta|tpl)_'")]
    stale = [n for n in names if _owner_gone(n.split("_", 2)[2])]
    for name in stale:
        drop_database(name)
    return stale


def _flush_redis_db(number: int) -> None:
    import redis

    with contextlib.suppress(Exception):
        redis.Redis.from_url(REDIS_URL, db=number, socket_timeout=5).flushdb()


def _raise_on_sigterm() -> Any:
    """Makes SIGTERM (``timeout``, a CI runner giving up) raise SystemExit, so ``with`` blocks
    stop the stack instead of leaving its sessions running. Returns the previous handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------------------
# REST client: only what the UI itself uses.
# --------------------------------------------------------------------------------------
class ApiError(RuntimeError):
    """An /api/v2 call answered with an error status."""


class RunFailed(AssertionError):
    """A DAG run failed, or one of its tasks is waiting to retry."""


class AirflowApi:
    """A client of Airflow's public REST API (``/api/v2``), as the UI uses it.

    Every request has a timeout. The token is fetched from ``/auth/token`` and renewed on 401.
    Nothing here logs the password or the token.
    """

    def __init__(self, base_url: str, username: str, password: str, timeout: float = 15) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._username = username
        self._password = password
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    # -- plumbing ------------------------------------------------------------------
    def login(self) -> None:
        resp = self._session.post(
            f"{self.base_url}/auth/token",
            json={"username": self._username, "password": self._password},
            timeout=self.timeout,
        )
        if resp.status_code >= 400:
            raise ApiError(f"POST /auth/token -> {resp.status_code}")
        self._session.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def request(self, method: str, path: str, expect: Sequence[int] = (200,), **kwargs: Any) -> Any:
        """``method`` on ``/api/v2{path}``; returns the JSON body (or text for non-JSON)."""
        url = f"{self.base_url}/api/v2{path}"
        kwargs.setdefault("timeout", self.timeout)
        if "Authorization" not in self._session.headers:
            self.login()
        resp = self._session.request(method, url, **kwargs)
        if resp.status_code == 401:
            self.login()
            resp = self._session.request(method, url, **kwargs)
        if resp.status_code not in expect:
            raise ApiError(f"{method} /api/v2{path} -> {resp.status_code}: {resp.text[:800]}")
        if "json" in resp.headers.get("content-type", ""):
            return resp.json()
        return resp.text

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    # -- health and parsing ----------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``/api/v2/monitor/health``: needs no token."""
        resp = self._session.get(f"{self.base_url}/api/v2/monitor/health", timeout=self.timeout)
        resp.raise_for_status()
        return resp.json()

    def wait_healthy(
        self, components: Sequence[str], timeout: float = 120, alive: Callable[[], None] | None = None
    ) -> None:
        """Waits until the API answers and each of ``components`` reports a healthy heartbeat."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if alive:
                alive()
            try:
                last = self.health()
                if all((last.get(c) or {}).get("status") == "healthy" for c in components):
                    return
            except requests.RequestException as exc:
                last = type(exc).__name__
            time.sleep(1)
        raise TimeoutError(f"not healthy after {timeout:.0f} s: {last}")

    def import_errors(self) -> list[dict[str, Any]]:
        return self.get("/importErrors", params={"limit": 100})["import_errors"]

    def wait_dag_parsed(self, dag_id: str, timeout: float = 120, alive: Callable[[], None] | None = None) -> dict:
        """Waits until ``dag_id`` is known to the API; fails at once on any import error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if alive:
                alive()
            errors = self.import_errors()
            if errors:
                raise AssertionError(f"import errors: {json.dumps(errors, indent=1)[:4000]}")
            dag = self.request("GET", f"/dags/{dag_id}", expect=(200, 404))
            if isinstance(dag, dict) and dag.get("dag_id") == dag_id:
                return dag
            time.sleep(1)
        raise TimeoutError(f"DAG {dag_id} not parsed after {timeout:.0f} s")

    # -- what the UI does ------------------------------------------------------------
    def unpause(self, dag_id: str) -> dict:
        return self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(
        self,
        dag_id: str,
        *,
        conf: Mapping[str, Any] | None = None,
        logical_date: datetime | None = None,
        data_interval: tuple[datetime, datetime] | None = None,
        run_id: str | None = None,
    ) -> dict:
        """The UI's "Trigger" button: ``POST /dags/{dag_id}/dagRuns``.

        ``logical_date=None`` gives a run without a logical date or data interval (as the UI
        does by default); a ``data_interval`` makes it a scheduled-style run of that window.
        """
        body: dict[str, Any] = {"logical_date": logical_date.isoformat() if logical_date else None}
        if conf is not None:
            body["conf"] = dict(conf)
        if data_interval:
            body["data_interval_start"] = data_interval[0].isoformat()
            body["data_interval_end"] = data_interval[1].isoformat()
        if run_id:
            body["dag_run_id"] = run_id
        return self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)

    def create_backfill(
        self,
        dag_id: str,
        from_date: datetime,
        to_date: datetime,
        *,
        max_active_runs: int = 10,
        conf: Mapping[str, Any] | None = None,
        reprocess_behavior: str = "none",
        dry_run: bool = False,
    ) -> dict:
        """``POST /backfills``: queues one run per schedule tick with ``from <= logical_date <= to``."""
        body: dict[str, Any] = {
            "dag_id": dag_id,
            "from_date": from_date.isoformat(),
            "to_date": to_date.isoformat(),
            "max_active_runs": max_active_runs,
            "reprocess_behavior": reprocess_behavior,
        }
        if conf is not None:
            body["dag_run_conf"] = dict(conf)
        return self.request("POST", "/backfills/dry_run" if dry_run else "/backfills", json=body)

    def dag_runs(self, dag_id: str) -> list[dict]:
        runs: list[dict] = []
        while True:
            page = self.get(f"/dags/{dag_id}/dagRuns", params={"limit": 100, "offset": len(runs)})
            runs.extend(page["dag_runs"])
            if not page["dag_runs"] or len(runs) >= page["total_entries"]:
                return runs

    def wait_runs(
        self,
        dag_id: str,
        run_ids: Sequence[str] | None = None,
        *,
        count: int | None = None,
        where: Callable[[dict], bool] | None = None,
        timeout: float = 180,
        alive: Callable[[], None] | None = None,
        fail_fast: bool = True,
    ) -> list[dict]:
        """Waits until the chosen runs (by id, or the first ``count`` matching ``where``) finished.

        With ``fail_fast``, a failed run or a task waiting for a retry raises at once, with the
        end of that task's log: a test should not sit through a DAG's retry delays.
        """
        deadline = time.monotonic() + timeout
        chosen: list[dict] = []
        while time.monotonic() < deadline:
            if alive:
                alive()
            runs = self.dag_runs(dag_id)
            if run_ids is not None:
                chosen = [r for r in runs if r["dag_run_id"] in set(run_ids)]
                enough = len(chosen) == len(set(run_ids))
            else:
                chosen = [r for r in runs if where is None or where(r)]
                enough = len(chosen) >= (count or 1)
            if fail_fast:
                for run in chosen:
                    if run["state"] != "success":
                        self._raise_on_failed_task(dag_id, run)
            if enough and all(r["state"] in TERMINAL_RUN_STATES for r in chosen):
                return sorted(chosen, key=lambda r: r["run_after"])
            time.sleep(1)
        states = {r["dag_run_id"]: r["state"] for r in chosen}
        raise TimeoutError(f"runs of {dag_id} not finished after {timeout:.0f} s: {states}")

    def _raise_on_failed_task(self, dag_id: str, run: dict) -> None:
        for ti in self.task_instances(dag_id, run["dag_run_id"]):
            if ti["state"] in {"failed", "up_for_retry"}:
                log = self.task_log(dag_id, run["dag_run_id"], ti["task_id"], max(ti["try_number"], 1))
                raise RunFailed(
                    f"{dag_id} run {run['dag_run_id']} ({run['state']}): task {ti['task_id']} is "
                    f"{ti['state']}; end of its log:\n" + "\n".join(log.splitlines()[-25:])
                )
        if run["state"] == "failed":
            raise RunFailed(f"{dag_id} run {run['dag_run_id']} failed")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})["task_instances"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """The task's log as the UI shows it, one line per structured log event."""
        data = self.get(
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"full_content": "true"},
            headers={"Accept": "application/json"},
        )
        lines = []
        for item in data.get("content", []) if isinstance(data, dict) else []:
            if not isinstance(item, dict):
                lines.append(str(item))
                continue
            line = f"{item.get('timestamp', '')} {item.get('level', '')} {item.get('event', '')}"
            for exc in item.get("error_detail") or []:
                if isinstance(exc, dict):
                    line += f"\n    {exc.get('exc_type')}: {exc.get('exc_value')}"
            lines.append(line)
        return "\n".join(lines)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        entry = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}")
        return entry.get("value")


# --------------------------------------------------------------------------------------
# The stack.
# --------------------------------------------------------------------------------------
@dataclass
class StackConfig:
    """What a stack runs. Paths are absolute or relative to the repository root."""

    dags_folder: Path
    plugins_folder: Path | None = None
    extra_bundles: Mapping[str, Path] = field(default_factory=dict)
    """More folders of DAG files, as DAG bundles of their own (name -> folder), next to dags_folder."""
    executor: Executor = "LocalExecutor"
    celery_workers: int = 2
    worker_concurrency: int = 2
    triggerer: bool = False
    connections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    variables: Mapping[str, str] = field(default_factory=dict)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    metadata_db: str | None = None
    """Use (and keep) this existing database instead of a fresh one; migrated at start."""
    metadata_template: str | None = None
    """Copy a fresh metadata database from this migrated template instead of migrating."""
    home: Path | None = None
    """AIRFLOW_HOME; a temporary directory (removed at stop) when None."""
    api_port: int | None = None
    admin_user: str = "admin"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    start_timeout: float = 180


@dataclass
class _Component:
    name: str
    proc: subprocess.Popen
    log: Path
    stop_last: bool = False
    """Stopped after the others (the broker: workers talk to it while they shut down)."""


class AirflowStack:
    """Starts the Airflow components of a ``StackConfig`` as a context manager."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.components: list[_Component] = []
        self.tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._own_home = config.home is None
        self.home = Path(config.home or tempfile.mkdtemp(prefix="airflow-stack-")).resolve()
        self.api_port = config.api_port or free_port()
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.metadata_db = config.metadata_db or f"airflow_meta_{self.tag}"
        self._own_db = config.metadata_db is None
        self._redis_db: int | None = None
        self.api = AirflowApi(self.base_url, config.admin_user, config.admin_password)
        self.timings: dict[str, float] = {}
        self.leftovers: list[psutil.Process] = []
        self._previous_sigterm: Any = None

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> AirflowStack:
        self._previous_sigterm = _raise_on_sigterm()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)

    def start(self) -> None:
        t0 = time.monotonic()
        cfg = self.config
        (self.home / "stack-logs").mkdir(parents=True, exist_ok=True)
        site = self.home / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        # A known password, written before the API server starts, so it never prints one.
        pw_file = self.home / "simple_auth_manager_passwords.json"
        pw_file.write_text(json.dumps({cfg.admin_user: cfg.admin_password}) + "\n")
        pw_file.chmod(0o600)

        if self._own_db:
            if cfg.metadata_template:
                create_database(self.metadata_db, template=cfg.metadata_template)
            else:
                migrated_metadata_db(self.metadata_db, self.home)
        else:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                create_database(self.metadata_db)
        broker = self._start_private_redis() if cfg.executor == "CeleryExecutor" else None
        self.env = self._env(pw_file, site, broker)
        if not self._own_db:
            _run_quiet([AIRFLOW, *component_argv("db-migrate")], self.env, self._log("db-migrate"), 300)
        self.timings["metadata_db"] = time.monotonic() - t0

        self._spawn("api-server", component_argv("api-server", host="127.0.0.1", port=self.api_port))
        self._spawn("dag-processor", component_argv("dag-processor"))
        self._spawn("scheduler", component_argv("scheduler"), {"MEDSYNC_STACK_HOSTNAME": "scheduler"})
        if cfg.triggerer:
            self._spawn("triggerer", component_argv("triggerer"))
        if cfg.executor == "CeleryExecutor":
            for i in range(1, cfg.celery_workers + 1):
                name = f"worker{i}"
                # Workers share nothing but the database and the broker: a home, a temp dir and
                # a working directory of their own. Only the log folder is common, as a log
                # volume would be, so the API server can show their task logs.
                worker_home = self.home / name
                (worker_home / "tmp").mkdir(parents=True, exist_ok=True)
                self._spawn(
                    name,
                    component_argv("celery-worker", worker_name=f"{name}@%h", concurrency=cfg.worker_concurrency),
                    {
                        "AIRFLOW_HOME": str(worker_home),
                        "TMPDIR": str(worker_home / "tmp"),
                        "MEDSYNC_STACK_HOSTNAME": name,
                        # Each worker on this one machine needs its own log server port.
                        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                    },
                    cwd=worker_home,
                )
        wanted = ["metadatabase", "scheduler", "dag_processor"] + (["triggerer"] if cfg.triggerer else [])
        self.api.wait_healthy(wanted, timeout=cfg.start_timeout, alive=self.check_alive)
        self.api.login()
        self.timings["start"] = time.monotonic() - t0

    def _start_private_redis(self) -> str | None:
        """A redis-server of this stack's own on a free loopback port: a broker no other run
        shares and nothing outlives. None when there is no redis-server (or MEDSYNC_TEST_REDIS
        asks for a shared one): then a claimed DB number of the shared server is used."""
        binary = shutil.which("redis-server")
        if not binary or os.environ.get("MEDSYNC_TEST_REDIS"):
            return None
        port = free_port()
        argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
        self._spawn("redis", argv, program=None, stop_last=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
            time.sleep(0.1)
        raise TimeoutError("the stack's redis-server did not answer")

    def _env(self, pw_file: Path, site: Path, broker: str | None = None) -> dict[str, str]:
        cfg = self.config
        env = _base_env(self.home, sqlalchemy_url(self.metadata_db))
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
                "MEDSYNC_STACK_BIND": "127.0.0.1",
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "sitecustomize.stack_hostname",
                "AIRFLOW__CORE__DAGS_FOLDER": str((ROOT / cfg.dags_folder).resolve()),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str((ROOT / (cfg.plugins_folder or "plugins")).resolve()),
                "AIRFLOW__CORE__EXECUTOR": cfg.executor,
                "AIRFLOW__CORE__AUTH_MANAGER": (
                    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
                ),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{cfg.admin_user}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file),
                "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
                # Shared by the API server (signs) and the task processes (present): one value.
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                # Quick pickup of new DAG files and runs; the defaults suit production, not tests.
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
                "AIRFLOW__CORE__PARALLELISM": "8",
            }
        )
        if cfg.executor == "CeleryExecutor":
            if broker is None:
                self._redis_db = _redis_db_for(self.tag)
                broker = f"{REDIS_URL}/{self._redis_db}"
            env["AIRFLOW__CELERY__BROKER_URL"] = broker
            env["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+" + sqlalchemy_url(self.metadata_db, "psycopg2")
            env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] = str(cfg.worker_concurrency)
        if cfg.extra_bundles:
            local = "airflow.dag_processing.bundles.local.LocalDagBundle"
            bundles = [{"name": "dags-folder", "classpath": local, "kwargs": {}}] + [
                {"name": name, "classpath": local, "kwargs": {"path": str((ROOT / path).resolve())}}
                for name, path in cfg.extra_bundles.items()
            ]
            env["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"] = json.dumps(bundles)
        env.update(conn_env(cfg.connections))
        env.update({f"AIRFLOW_VAR_{k.upper()}": v for k, v in cfg.variables.items()})
        env.update(cfg.extra_env)
        return env

    def _log(self, name: str) -> Path:
        return self.home / "stack-logs" / f"{name}.log"

    def _spawn(
        self,
        name: str,
        argv: list[str],
        extra_env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        program: str | None = AIRFLOW,
        stop_last: bool = False,
    ) -> None:
        """Starts ``program argv`` (``airflow`` by default; None: argv is the whole command)."""
        log = self._log(name)
        env = {**getattr(self, "env", os.environ), **(extra_env or {})}
        with log.open("ab") as out:
            # A session of its own: SIGINT reaches the component and every child it forked.
            proc = subprocess.Popen(
                [program, *argv] if program else argv,
                env=env,
                cwd=cwd or self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.components.append(_Component(name, proc, log, stop_last))

    def check_alive(self) -> None:
        """Raises with the log's tail when a component exited."""
        for comp in self.components:
            code = comp.proc.poll()
            if code is not None:
                raise RuntimeError(f"airflow {comp.name} exited with {code}:\n{_tail(comp.log)}")

    def stop(self, timeout: float = 30) -> None:
        """SIGINT to every component's process group, then SIGKILL to what is left; drops the DB."""
        t0 = time.monotonic()
        self.api.close()
        sessions = [c.proc.pid for c in self.components]
        for group in (False, True):
            members = [c for c in self.components if c.stop_last is group]
            for comp in members:
                if comp.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(comp.proc.pid, signal.SIGINT)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.session_processes([c.proc.pid for c in members]):
                time.sleep(0.3)
            for proc in self.session_processes([c.proc.pid for c in members]):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        for comp in self.components:
            with contextlib.suppress(subprocess.TimeoutExpired):
                comp.proc.wait(timeout=10)
        self.leftovers = self.session_processes(sessions)
        if self._redis_db is not None:
            _flush_redis_db(self._redis_db)
        if self._own_db:
            drop_database(self.metadata_db)
        if self._own_home and not os.environ.get("MEDSYNC_KEEP_STACK_HOME"):
            shutil.rmtree(self.home, ignore_errors=True)
        self.timings["stop"] = time.monotonic() - t0

    # -- inspection ------------------------------------------------------------------
    @staticmethod
    def session_processes(sessions: Sequence[int]) -> list[psutil.Process]:
        """Live processes in the given sessions (each component leads one)."""
        found = []
        wanted = set(sessions)
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getsid(proc.pid) in wanted and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    def processes(self) -> list[psutil.Process]:
        """Every live process of the stack: components and all they forked."""
        return self.session_processes([c.proc.pid for c in self.components])

    def listening_sockets(self) -> list[tuple[str, int, str, int]]:
        """``(process name, pid, address, port)`` of every socket the stack listens on."""
        pids = {p.pid: p for p in self.processes()}
        found = []
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
                with contextlib.suppress(psutil.Error):
                    found.append((pids[conn.pid].name(), conn.pid, conn.laddr.ip, conn.laddr.port))
        return found

    def component_log(self, name: str) -> str:
        return self._log(name).read_text(errors="replace")


# --------------------------------------------------------------------------------------
# The B simulator, run by its CLI (the command docker-compose.yaml runs).
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def simulator_process(
    api_key: str, patients: int = 20, extra_args: Sequence[str] = (), timeout: float = 60
) -> Iterator[str]:
    """Runs ``python -m simulator`` on a free loopback port; yields its base URL."""
    log = Path(tempfile.mkstemp(prefix="b-simulator-", suffix=".log")[1])
    argv = [sys.executable, *simulator_argv(host="127.0.0.1", port=0, patients=patients), *extra_args]
    env = {**os.environ, "BSIM_API_KEY": api_key, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as err:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        base_url = None
        assert proc.stdout is not None
        while time.monotonic() < deadline and base_url is None:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"simulator exited ({proc.wait()}):\n{_tail(log)}")
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                base_url = json.loads(line).get("base_url")
        if base_url is None:
            raise TimeoutError("simulator printed no base_url")
        yield base_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# The UI scenario every end-to-end test runs, for any DAG with a 12-hour data-interval cron.
# --------------------------------------------------------------------------------------
@dataclass
class Scenario:
    """What to do through the API, and the windows it expects.

    The steps, in order (each waits for its runs to finish, then calls ``on_step``):

    - ``scheduled``: unpausing makes the scheduler create the latest interval's run
      (catchup is off); waited for when ``expect_scheduled_run``;
    - ``window``: a run triggered with ``logical_date`` and an explicit data interval,
      i.e. a scheduled-style run of ``window()``;
    - ``backfill``: ``POST /backfills`` over ``[backfill_from, backfill_to]``;
    - ``full_refresh``: a manual run with ``conf={"full_refresh": true}`` and no logical
      date, as the UI's Trigger button sends it.

    The window and backfill come before the full refresh so that each can be checked to
    sync only its own window; the full refresh then has to make A equal to B.
    """

    dag_id: str
    window_start: datetime
    """Start of the scheduled-style run's window (a schedule tick, aware)."""
    backfill_from: datetime
    backfill_to: datetime
    interval: timedelta = timedelta(hours=12)
    expect_scheduled_run: bool = True
    run_timeout: float = 240

    def window(self) -> tuple[datetime, datetime]:
        return self.window_start, self.window_start + self.interval

    def backfill_windows(self) -> list[tuple[datetime, datetime]]:
        """One window per tick with ``from <= tick <= to`` (Airflow's inclusive semantics)."""
        out = []
        tick = self.backfill_from
        while tick <= self.backfill_to:
            out.append((tick, tick + self.interval))
            tick += self.interval
        return out


@dataclass
class ScenarioResult:
    """The finished runs of each step, as the API reports them."""

    steps: dict[str, list[dict]] = field(default_factory=dict)
    backfill: dict = field(default_factory=dict)
    parse_seconds: float = 0.0
    seconds: float = 0.0
    step_seconds: dict[str, float] = field(default_factory=dict)
    task_instances: dict[str, list[dict]] = field(default_factory=dict)

    def all_runs(self) -> list[dict]:
        return [run for runs in self.steps.values() for run in runs]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


StepHook = Callable[[str, list[dict]], None]


def run_scenario(stack: AirflowStack, scen: Scenario, on_step: StepHook | None = None) -> ScenarioResult:
    """Runs the steps of ``scen`` (see ``Scenario``) through the REST API.

    ``on_step(step, runs)`` is called after each step's runs finished, e.g. to snapshot A.
    Returns the finished runs per step and every run's task instances.
    """
    api, dag_id, t0 = stack.api, scen.dag_id, time.monotonic()
    out = ScenarioResult()

    def wait(**kwargs: Any) -> list[dict]:
        return api.wait_runs(dag_id, timeout=scen.run_timeout, alive=stack.check_alive, **kwargs)

    def step(name: str, runs: list[dict]) -> None:
        out.steps[name] = runs
        out.step_seconds[name] = time.monotonic() - t0 - sum(out.step_seconds.values())
        if on_step:
            on_step(name, runs)

    api.wait_dag_parsed(dag_id, alive=stack.check_alive)
    out.parse_seconds = time.monotonic() - t0
    api.unpause(dag_id)
    if scen.expect_scheduled_run:
        step("scheduled", wait(count=1, where=lambda r: r["run_type"] == "scheduled"))

    start, end = scen.window()
    run = api.trigger(dag_id, logical_date=start, data_interval=(start, end), conf={"full_refresh": False})
    step("window", wait(run_ids=[run["dag_run_id"]]))

    out.backfill = api.create_backfill(dag_id, scen.backfill_from, scen.backfill_to, conf={"full_refresh": False})
    count = len(scen.backfill_windows())
    step("backfill", wait(count=count, where=lambda r: r["run_type"] == "backfill"))

    run = api.trigger(dag_id, conf={"full_refresh": True})
    step("full_refresh", wait(run_ids=[run["dag_run_id"]]))

    for r in out.all_runs():
        out.task_instances[r["dag_run_id"]] = api.task_instances(dag_id, r["dag_run_id"])
    out.seconds = time.monotonic() - t0
    return out


def run_windows(runs: Sequence[dict]) -> list[tuple[datetime, datetime]]:
    """The data intervals of API run records, as aware datetimes."""
    return [(parse_time(r["data_interval_start"]), parse_time(r["data_interval_end"])) for r in runs]


# --------------------------------------------------------------------------------------
# ``make airflow``: one long-lived local stack.
# --------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    """Runs a local stack until Ctrl-C: persistent metadata DB and A DB, demo connections."""
    a_db = args.a_db
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (a_db,)).fetchone()
    if not exists:
        create_database(a_db)
        with psycopg.connect(dsn_for(a_db), autocommit=True) as conn:
            conn.execute((ROOT / "include" / "sql" / "a_schema.sql").read_text())
    password = os.environ.get("MEDSYNC_AIRFLOW_PASSWORD", "admin")
    connections: dict[str, dict[str, Any]] = {"medsync_a_db": postgres_connection(dsn_for(a_db))}
    with contextlib.ExitStack() as stack_ctx:
        s3_port = free_port()
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
        moto.start()
        stack_ctx.callback(moto.stop)
        connections["medsync_b_aws"] = {
            "conn_type": "aws",
            "login": "testing",
            "password": "testing",
            "extra": {
                "endpoint_url": f"http://127.0.0.1:{s3_port}",
                "region_name": "us-east-1",
                "config_kwargs": {"signature_version": "s3v4"},
            },
        }
        api_key = secrets.token_urlsafe(16)
        if (ROOT / "simulator" / "__main__.py").exists():
            base_url = stack_ctx.enter_context(simulator_process(api_key, patients=args.patients))
            # B's files into the S3 server: the script docker-compose.yaml's b-files runs.
            seed_env = {
                **os.environ,
                "BSIM_API_KEY": api_key,
                "MEDSYNC_B_BASE_URL": base_url,
                "MEDSYNC_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
                "MEDSYNC_B_BUCKET": args.bucket,
            }
            subprocess.run([sys.executable, str(ROOT / "docker" / "seed_s3.py")], env=seed_env, check=True, timeout=600)
        else:
            print("simulator/ has no CLI yet: medsync_b_api points nowhere", file=sys.stderr)
            base_url = "http://127.0.0.1:9/api/v1"
        connections["medsync_b_api"] = {"conn_type": "http", "host": base_url, "password": api_key}
        config = StackConfig(
            dags_folder=Path(args.dags),
            plugins_folder=Path(args.plugins),
            executor=args.executor,
            triggerer=True,
            connections=connections,
            metadata_db=args.metadata_db,
            home=Path(args.home),
            api_port=args.port,
            admin_password=password,
            start_timeout=300,
        )
        stack = stack_ctx.enter_context(AirflowStack(config))
        print(f"Airflow UI: {stack.base_url}  (user admin; password: $MEDSYNC_AIRFLOW_PASSWORD, default admin)")
        print(f"medsync page: {stack.base_url}/plugin/medsync  (the medsync entry of the UI's navigation)")
        print(f"A's database: {a_db}; component logs: {stack.home / 'stack-logs'}; Ctrl-C stops")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                stack.check_alive()
                time.sleep(2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a local Airflow with the project loaded until Ctrl-C")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--home", default=str(ROOT / "airflow_home"))
    serve.add_argument("--dags", default="dags")
    serve.add_argument("--plugins", default="plugins")
    serve.add_argument("--executor", default="LocalExecutor", choices=["LocalExecutor", "CeleryExecutor"])
    serve.add_argument("--metadata-db", default="medsync_airflow_local")
    serve.add_argument("--a-db", default="medsync_a_local")
    serve.add_argument("--patients", type=int, default=50)
    serve.add_argument("--bucket", default="b-imaging-dev", help="include/sources/b.yaml's bucket")
    args = parser.parse_args(argv)
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
