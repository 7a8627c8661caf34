"""An Airflow home for running medsync's DAGs with ``airflow dags test``, and the env that wires it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW = Path(sys.executable).with_name("airflow")


@dataclass(frozen=True)
class Wiring:
    """What medsync's connections point at."""

    a_dsn_url: str
    """postgresql://user@host:port/dbname of A's database."""
    api_base_url: str
    api_key: str
    s3_endpoint: str
    bucket: str
    include_dir: Path | None = None


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
        AIRFLOW_CONN_MEDSYNC_A_DB=wiring.a_dsn_url,
        AIRFLOW_CONN_MEDSYNC_B_API=json.dumps(
            {"conn_type": "http", "host": wiring.api_base_url, "password": wiring.api_key}
        ),
        AIRFLOW_CONN_MEDSYNC_B_AWS=json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": wiring.s3_endpoint, "region_name": "us-east-1"},
            }
        ),
        AIRFLOW_VAR_MEDSYNC_B_BUCKET=wiring.bucket,
        PYTHONPATH=os.pathsep.join([str(ROOT / "plugins"), str(ROOT)]),
    )
    if wiring.include_dir is not None:
        env["MEDSYNC_INCLUDE_DIR"] = str(wiring.include_dir)
    return env


def migrate_metadata(env: dict[str, str]) -> None:
    """Creates the SQLite metadata database of an Airflow home (about 6 s)."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)


def dags_test(
    env: dict[str, str],
    dag_id: str = "medsync_b",
    *,
    logical_date: str | None = None,
    conf: dict[str, object] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Runs one DAG run in-process with ``airflow dags test``; the caller checks ``returncode``."""
    cmd = [str(AIRFLOW), "dags", "test", dag_id]
    if logical_date:
        cmd.append(logical_date)
    if conf:
        cmd += ["--conf", json.dumps(conf)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def include_copy(target: Path, source: str = "b", **config_overrides: object) -> Path:
    """A copy of ``include/`` whose source config has ``config_overrides`` applied; returns it.

    Tests and the demo run with ``retries: 0`` (``airflow dags test`` would otherwise sit out
    each retry delay) and edit mapping files without touching the repo's own.
    """
    import shutil

    import yaml

    shutil.copytree(ROOT / "include", target, dirs_exist_ok=True)
    path = target / "sources" / f"{source}.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(config_overrides)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return target
