"""An Airflow home for running medsync's DAGs with ``airflow dags test``, and the env that wires it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW = Path(sys.executable).with_name("airflow")
# moto accepts any keys; these are its documented test credentials.
TEST_AWS_KEYS = ("testing", "testing")


@dataclass(frozen=True)
class SourceWiring:
    """What one source's connections and Variables point at.

    The connection ids and Variable names are the source's config's own
    (``include/sources/<name>.yaml`` of the wiring's include dir), so a new source needs no
    change here.
    """

    name: str
    api_base_url: str
    api_secret: str
    """The connection's password: B's API key, C's bearer token."""
    s3_endpoint: str
    bucket: str | None = None
    """Sets the config's ``bucket_variable`` (None: the config's own bucket)."""
    allowed_buckets: Sequence[str] | None = None
    """Sets the config's ``allowed_buckets_variable`` (None: the config's own list)."""
    aws_keys: tuple[str, str] = TEST_AWS_KEYS


@dataclass(frozen=True)
class Wiring:
    """What medsync's connections point at: A's database once, and each source's API and S3."""

    a_dsn_url: str
    """postgresql://user@host:port/dbname of A's database."""
    sources: Sequence[SourceWiring] = field(default_factory=tuple)
    include_dir: Path | None = None

    @classmethod
    def b(
        cls,
        a_dsn_url: str,
        api_base_url: str,
        api_key: str,
        s3_endpoint: str,
        bucket: str,
        *,
        include_dir: Path | None = None,
    ) -> Wiring:
        """B alone (what the B-only tests and the old call shape wire)."""
        return cls(a_dsn_url, (SourceWiring("b", api_base_url, api_key, s3_endpoint, bucket),), include_dir)


def _source_config(include: Path, name: str) -> dict[str, Any]:
    raw = yaml.safe_load((include / "sources" / f"{name}.yaml").read_text(encoding="utf-8"))
    assert isinstance(raw, dict), f"{name}.yaml is not a mapping"
    return raw


def _var(name: str) -> str:
    return f"AIRFLOW_VAR_{name.upper()}"


def _conn(conn_id: str) -> str:
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def source_env(include: Path, wiring: SourceWiring) -> dict[str, str]:
    """The ``AIRFLOW_CONN_*`` / ``AIRFLOW_VAR_*`` variables of one source, named by its config."""
    config = _source_config(include, wiring.name)
    storage = config["storage"]
    access_key, secret_key = wiring.aws_keys
    env = {
        _conn(config["connections"]["api_conn_id"]): json.dumps(
            {"conn_type": "http", "host": wiring.api_base_url, "password": wiring.api_secret}
        ),
        _conn(storage["aws_conn_id"]): json.dumps(
            {
                "conn_type": "aws",
                "login": access_key,
                "password": secret_key,
                "extra": {"endpoint_url": wiring.s3_endpoint, "region_name": "us-east-1"},
            }
        ),
    }
    if wiring.bucket is not None and storage.get("bucket_variable"):
        env[_var(storage["bucket_variable"])] = wiring.bucket
    if wiring.allowed_buckets is not None and storage.get("allowed_buckets_variable"):
        env[_var(storage["allowed_buckets_variable"])] = ",".join(wiring.allowed_buckets)
    return env


def connection_env(wiring: Wiring) -> dict[str, str]:
    """Every connection and Variable of ``wiring`` as ``AIRFLOW_CONN_*`` / ``AIRFLOW_VAR_*``.

    A's database is one connection for all sources (each config names it; they must agree).
    """
    include = wiring.include_dir or ROOT / "include"
    env: dict[str, str] = {}
    for source in wiring.sources:
        db_conn_id = _source_config(include, source.name)["connections"].get("db_conn_id", "medsync_a_db")
        env[_conn(db_conn_id)] = wiring.a_dsn_url
        env.update(source_env(include, source))
    if not wiring.sources:
        env[_conn("medsync_a_db")] = wiring.a_dsn_url
    return env


def airflow_env(home: Path, wiring: Wiring) -> dict[str, str]:
    """The environment of an Airflow process that runs medsync against ``wiring``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
        PYTHONPATH=os.pathsep.join([str(ROOT / "plugins"), str(ROOT)]),
    )
    env.update(connection_env(wiring))
    if wiring.include_dir is not None:
        env["MEDSYNC_INCLUDE_DIR"] = str(wiring.include_dir)
    return env


def migrate_metadata(env: dict[str, str]) -> None:
    """Creates the SQLite metadata database of an Airflow home (about 6 s)."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)


def dags_test_command(
    dag_id: str = "medsync_b", *, logical_date: str | None = None, conf: dict[str, object] | None = None
) -> list[str]:
    """The ``airflow dags test`` command line of one DAG run."""
    cmd = [str(AIRFLOW), "dags", "test", dag_id]
    if logical_date:
        cmd.append(logical_date)
    if conf:
        cmd += ["--conf", json.dumps(conf)]
    return cmd


def dags_test(
    env: dict[str, str],
    dag_id: str = "medsync_b",
    *,
    logical_date: str | None = None,
    conf: dict[str, object] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Runs one DAG run in-process with ``airflow dags test``; the caller checks ``returncode``."""
    cmd = dags_test_command(dag_id, logical_date=logical_date, conf=conf)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def include_copy(target: Path, source: str | Sequence[str] = "b", **config_overrides: object) -> Path:
    """A copy of ``include/`` whose source config(s) have ``config_overrides`` applied; returns it.

    Tests and the demo run with ``retries: 0`` (``airflow dags test`` would otherwise sit out
    each retry delay) and edit mapping files without touching the repo's own.
    """
    import shutil

    shutil.copytree(ROOT / "include", target, dirs_exist_ok=True)
    for name in [source] if isinstance(source, str) else source:
        path = target / "sources" / f"{name}.yaml"
        config = yaml.safe_load(path.read_text())
        config.update(config_overrides)
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return target
