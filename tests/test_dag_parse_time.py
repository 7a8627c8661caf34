"""DAG files import nothing heavy at top level (parse time stays small).

Each file in dags/ is imported as the dag-processor would, in a fresh interpreter with
``airflow.sdk`` already loaded and the plugins folder on sys.path; the modules it added
are then checked against those an empty DAG with one ``@task`` adds (Airflow's own
imports are not the file's doing). No timing assertions: benchmarks/parse_time.py measures the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.parse_time import EMPTY_DAG

ROOT = Path(__file__).resolve().parents[1]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))

HEAVY_PREFIXES = (
    "boto3",
    "botocore",
    "s3transfer",
    "psycopg",
    "psycopg2",
    "requests",
    "pandas",
    "numpy",
    # medsync's task-time modules: record models, staging, merge, task bodies, hooks
    "medsync.sources.rest.records",
    "medsync.sources.rest.converters",
    "medsync.sources.rest.client",
    "medsync.sources.rest.hook",
    "medsync.staging",
    "medsync.merge",
    "medsync.tasks",
    "medsync.hooks.",
)
"""Module names (or prefixes) a DAG file must not load while it is parsed."""

PROVIDER_HOOK_MARKERS = (".hooks.", ".hooks")
"""Any ``airflow.providers.<x>.hooks...`` module: a provider hook at top level costs ~1 s per parse."""

IMPORT_ONE = r"""
import importlib.util, json, sys
import airflow.sdk  # loaded in the dag-processor already
before = set(sys.modules)
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def heavy(modules: list[str]) -> list[str]:
    """The heavy ones among ``modules``."""
    out = []
    for name in modules:
        if name.startswith(HEAVY_PREFIXES) or name in {p.rstrip(".") for p in HEAVY_PREFIXES}:
            out.append(name)
        elif name.startswith("airflow.providers.") and any(m in name + "." for m in PROVIDER_HOOK_MARKERS):
            out.append(name)
    return out


def modules_added_by(path: Path, tmp_path: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(tmp_path),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "plugins"), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ONE, str(path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_heavy_detects_what_it_should() -> None:
    assert heavy(["boto3.session", "airflow.providers.amazon.aws.hooks.s3", "medsync.tasks"]) == [
        "boto3.session",
        "airflow.providers.amazon.aws.hooks.s3",
        "medsync.tasks",
    ]
    assert heavy(["medsync.config", "medsync.dag_factory", "pendulum", "yaml", "airflow.sdk"]) == []


@pytest.fixture(scope="module")
def empty_dag_modules(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    tmp = tmp_path_factory.mktemp("empty_dag")
    (tmp / "empty_dag.py").write_text(EMPTY_DAG)
    return set(modules_added_by(tmp / "empty_dag.py", tmp))


def test_empty_dag_baseline_is_light(empty_dag_modules: set[str]) -> None:
    """The baseline itself must not hide a heavy module (e.g. an SDK change importing boto3)."""
    assert not [m for m in heavy(sorted(empty_dag_modules)) if not m.startswith("airflow.providers.standard")]


@pytest.mark.skipif(not DAG_FILES, reason="dags/ holds no DAG file yet")
@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_imports_nothing_heavy(path: Path, tmp_path: Path, empty_dag_modules: set[str]) -> None:
    added = sorted(set(modules_added_by(path, tmp_path)) - empty_dag_modules)
    assert heavy(added) == [], f"{path.name} imports at top level: {heavy(added)}"
