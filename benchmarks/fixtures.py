"""What the benchmark runs against: the B simulator, A's databases, and the source config.

Databases are made with the test suite's helpers (``tests.conftest``), so that
``MEDSYNC_TEST_PG`` points both at another server. The source config is the repo's
``include/sources/b.yaml`` with three changes only: no client-side rate limit (the
simulator runs without B's limit too), no file check (there is no S3 here), and the page
size and instance slices the run asks for.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml

from benchmarks.paths import ROOT
from simulator.client import SpawnedSimulator, spawn
from tests.conftest import A_SCHEMA, create_database, drop_database, dsn_for

BASE_TIME = datetime(2026, 3, 1, tzinfo=UTC)
"""The simulator's manual clock starts here; its base records lie in the 30 days before."""
API_KEY = "bench-simulator-key"
STUDIES_PER_SUBJECT, SEQUENCES_PER_STUDY, INSTANCES_PER_SEQUENCE = 4, 5, 10
INSTANCES_PER_SUBJECT = STUDIES_PER_SUBJECT * SEQUENCES_PER_STUDY * INSTANCES_PER_SEQUENCE
RESOURCES = {"subject": "patients", "study": "studies", "sequence": "series", "instance": "images"}


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


@contextmanager
def simulator(shape: Shape, seed: int = 0) -> Iterator[SpawnedSimulator]:
    """B's simulator in its own process: plain data, manual clock at BASE_TIME, no rate limit."""
    args = [
        "--no-rate-limit",
        "--plain",
        "--clock",
        "manual",
        "--base-time",
        BASE_TIME.isoformat(),
        "--seed",
        str(seed),
        "--patients",
        str(shape.subjects),
        "--studies-per-patient",
        str(STUDIES_PER_SUBJECT),
        "--series-per-study",
        str(SEQUENCES_PER_STUDY),
        "--images-per-series",
        str(INSTANCES_PER_SEQUENCE),
    ]
    sim = spawn(API_KEY, *args)
    try:
        yield sim
    finally:
        sim.stop()


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


def include_dir(directory: Path, *, page_size: int, instance_slices: int) -> Path:
    """A copy of ``include/`` whose ``sources/b.yaml`` is set up for the benchmark (see above)."""
    source = ROOT / "include"
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "sources":
            (directory / entry.name).symlink_to(entry)
    config: dict[str, Any] = yaml.safe_load((source / "sources" / "b.yaml").read_text(encoding="utf-8"))
    config.update(page_size=page_size, instance_slices=instance_slices, rate_limit_per_second=1e9)
    config["file_check"] = {**config.get("file_check", {}), "enabled": False}
    (directory / "sources").mkdir()
    (directory / "sources" / "b.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return directory


def connection_uri(name: str) -> str:
    """``AIRFLOW_CONN_*`` form of the conninfo for database ``name``."""
    params = psycopg.conninfo.conninfo_to_dict(dsn_for(name))
    user = params.get("user", "postgres")
    password = f":{params['password']}" if params.get("password") else ""
    return f"postgresql://{user}{password}@{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{name}"


def worker_env(include: Path, db_name: str, base_url: str) -> dict[str, str]:
    """What a worker's environment would hold: A's and B's connections, the bucket Variable."""
    return {
        "MEDSYNC_INCLUDE_DIR": str(include),
        "AIRFLOW_CONN_MEDSYNC_A_DB": connection_uri(db_name),
        "AIRFLOW_CONN_MEDSYNC_B_API": json.dumps({"conn_type": "http", "host": base_url, "password": API_KEY}),
        "AIRFLOW_VAR_MEDSYNC_B_BUCKET": "b-imaging-bench",
    }
