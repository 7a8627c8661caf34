"""What the benchmark runs against: a source's simulator (B's or C's), A's databases, and the source config.

Databases are made with the test suite's helpers (``tests.conftest``), so that
``MEDSYNC_TEST_PG`` points both at another server. The source config is the repo's
``include/sources/<source>.yaml`` with three changes only: no client-side rate limit (the
simulator runs without the source's limit too), no file check (there is no S3 here), and the
page size and instance slices the run asks for. A source (``B``, ``C``) is described by its
config's ``api:`` section, which says how its lists are paged and counted: the floor and the
row checks read it too, so that they speak each source's API as medsync does.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import psycopg
import yaml

import simulator.client
import simulator_c.client
from benchmarks.paths import ROOT
from devstack.airflow_env import SourceWiring, Wiring, connection_env
from tests.conftest import A_SCHEMA, create_database, drop_database, dsn_for

BASE_TIME = datetime(2026, 3, 1, tzinfo=UTC)
"""The simulators' manual clock starts here; their base records lie in the 30 days before."""
API_KEY = "bench-simulator-key"
STUDIES_PER_SUBJECT, SEQUENCES_PER_STUDY, INSTANCES_PER_SEQUENCE = 4, 5, 10
INSTANCES_PER_SUBJECT = STUDIES_PER_SUBJECT * SEQUENCES_PER_STUDY * INSTANCES_PER_SEQUENCE
NO_S3 = "http://127.0.0.1:9"
"""The AWS connections' endpoint: nothing listens there, and nothing asks (file checks are off)."""


@dataclass(frozen=True)
class Shape:
    """A catalogue of ``subjects`` x 4 studies x 5 sequences x 10 instances."""

    subjects: int

    @classmethod
    def for_instances(cls, instances: int) -> Shape:
        return cls(max(1, round(instances / INSTANCES_PER_SUBJECT)))

    @property
    def per_level(self) -> dict[str, int]:
        studies = self.subjects * STUDIES_PER_SUBJECT
        sequences = studies * SEQUENCES_PER_STUDY
        return {
            "subject": self.subjects,
            "study": studies,
            "sequence": sequences,
            "instance": sequences * INSTANCES_PER_SEQUENCE,
        }

    @property
    def instances(self) -> int:
        return self.per_level["instance"]

    @property
    def records(self) -> int:
        return sum(self.per_level.values())


@dataclass(frozen=True)
class BenchSource:
    """A source the benchmark loads: its config (``include/sources/<name>.yaml``) and its simulator."""

    name: str
    secret: str
    """What the simulator is started with and the API connection's password: B's API key, C's token."""
    spawn: Callable[..., Any]
    """``simulator.client.spawn`` or ``simulator_c.client.spawn``: ``spawn(secret, *cli_args)``."""
    shape_options: tuple[str, str, str, str]
    """The simulator's options for its subjects, and for each parent's studies, sequences and instances."""
    bucket: str | None = None
    """The bucket Variable's value (None: the config's own buckets)."""

    @property
    def config(self) -> dict[str, Any]:
        return _repo_config(self.name)

    @property
    def api(self) -> dict[str, Any]:
        """The config's ``api:`` section (medsync.sources.rest.spec), read as plain YAML."""
        api: dict[str, Any] = self.config["api"]
        return api

    @property
    def resources(self) -> dict[str, str]:
        """Per level, the list endpoint's path under the base URL (``/patients``, ``/files``)."""
        return {level: spec["endpoint"] for level, spec in self.api["levels"].items()}

    @property
    def headers(self) -> dict[str, str]:
        """The authentication header of every request, as the config's ``auth`` declares it."""
        auth = self.api["auth"]
        if auth["type"] == "header":
            return {auth["header"]: self.secret}
        if auth["type"] == "bearer":
            return {"Authorization": f"Bearer {self.secret}"}
        raise ValueError(f"source {self.name}: auth type {auth['type']!r} is not one the benchmark speaks")

    @contextmanager
    def simulator(self, shape: Shape, seed: int = 0) -> Iterator[Server]:
        """The source's simulator in its own process: plain data, manual clock at BASE_TIME, no rate limit."""
        sizes = (shape.subjects, STUDIES_PER_SUBJECT, SEQUENCES_PER_STUDY, INSTANCES_PER_SEQUENCE)
        args = ["--no-rate-limit", "--plain", "--clock", "manual", "--base-time", BASE_TIME.isoformat()]
        args += ["--seed", str(seed)]
        for option, size in zip(self.shape_options, sizes, strict=True):
            args += [option, str(size)]
        sim = self.spawn(self.secret, *args)
        try:
            yield Server(self, sim.base_url, sim.proc.pid, sim.admin)
        finally:
            sim.stop()


@dataclass(frozen=True)
class Server:
    """A source's simulator, running."""

    source: BenchSource
    base_url: str
    """The API's base URL, its base path included (``.../api/v1``, ``.../v2``)."""
    pid: int
    admin: Any
    """Its admin client (``SimAdminClient`` or ``CSimAdminClient``): clock, changes."""


@cache
def _repo_config(name: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "include" / "sources" / f"{name}.yaml").read_text(encoding="utf-8"))
    return config


B = BenchSource(
    "b",
    API_KEY,
    simulator.client.spawn,
    ("--patients", "--studies-per-patient", "--series-per-study", "--images-per-series"),
    bucket="b-imaging-bench",
)
C = BenchSource(
    "c",
    "bench-simulator-token",
    simulator_c.client.spawn,
    ("--participants", "--visits-per-participant", "--acquisitions-per-visit", "--files-per-acquisition"),
)
"""C's catalogue has B's shape: the same records per level for the same number of instances."""


def database_name(tag: str) -> str:
    return f"medsync_bench_{os.getpid()}_{tag}"


@contextmanager
def database(tag: str, keep: bool = False) -> Iterator[str]:
    """A fresh database holding A's tables (empty); dropped afterwards unless ``keep``."""
    name = database_name(tag)
    drop_database(name)
    create_database(name)
    try:
        with psycopg.connect(dsn_for(name), autocommit=True) as conn:
            conn.execute(A_SCHEMA.read_text())
        yield name
    finally:
        if not keep:
            drop_database(name)


def connect(name: str) -> psycopg.Connection:
    return psycopg.connect(dsn_for(name), autocommit=True)


def include_dir(
    directory: Path, source: BenchSource, *, page_size: int | None = None, instance_slices: int | None = None
) -> Path:
    """A copy of ``include/`` holding ``source``'s config alone, set up for the benchmark (see above).

    ``page_size`` and ``instance_slices`` default to the config's own.
    """
    origin = ROOT / "include"
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for entry in origin.iterdir():
        if entry.name != "sources":
            (directory / entry.name).symlink_to(entry)
    config = dict(source.config)
    config.update(
        page_size=page_size or config["page_size"],
        instance_slices=instance_slices or config["instance_slices"],
        rate_limit_per_second=1e9,
    )
    config["file_check"] = {**config.get("file_check", {}), "enabled": False}
    (directory / "sources").mkdir()
    (directory / "sources" / f"{source.name}.yaml").write_text(
        yaml.safe_dump(config, sort_keys=False), encoding="utf-8"
    )
    return directory


def connection_uri(name: str) -> str:
    """``AIRFLOW_CONN_*`` form of the conninfo for database ``name``."""
    params = psycopg.conninfo.conninfo_to_dict(dsn_for(name))
    user = params.get("user", "postgres")
    password = f":{params['password']}" if params.get("password") else ""
    return f"postgresql://{user}{password}@{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{name}"


def worker_env(include: Path, db_name: str, server: Server) -> dict[str, str]:
    """What a worker's environment would hold: A's and the source's connections, its Variables."""
    wiring = SourceWiring(server.source.name, server.base_url, server.source.secret, NO_S3, bucket=server.source.bucket)
    return {
        "MEDSYNC_INCLUDE_DIR": str(include),
        **connection_env(Wiring(connection_uri(db_name), (wiring,), include_dir=include)),
    }
