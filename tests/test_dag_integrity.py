"""DAG integrity: ``dags/`` parsed by Airflow's DagBag in a clean interpreter.

Each parse runs in a subprocess with its own AIRFLOW_HOME, examples off, and every way
of reaching the outside world (connections, Variables, sockets, psycopg) made to
fail, so a DAG file that looks anything up while parsing shows up here.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsync.config import SourceConfig, load_source_configs

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "include"

TASK_IDS = {
    "prepare",
    "pull_subjects",
    "pull_studies",
    "pull_sequences",
    "pull_instances",
    "merge_subjects",
    "merge_studies",
    "merge_sequences",
    "merge_instances",
    "check_files",
    "report",
    "finish",
}
LEVELS_PLURAL = ("subjects", "studies", "sequences", "instances")  # parents first (a-model.md)
HEAVY = (
    "boto3",
    "botocore",
    "requests",
    "psycopg",
    "medsync.sources.rest.records",
    "medsync.sources.rest.client",
    "medsync.sources.rest.hook",
    "medsync.sources.rest.converters",
    "medsync.merge",
    "medsync.staging",
    "medsync.tasks",
)

PARSE_SCRIPT = r'''
import importlib.abc
import importlib.util
import inspect
import itertools
import json
import socket
import sys

out_path, dags_folder, heavy = sys.argv[1], sys.argv[2], tuple(sys.argv[3].split(","))
calls = []
attempts = []


def forbid(what):
    def raiser(*args, **kwargs):
        calls.append(what)
        raise RuntimeError(f"{what} called while parsing DAG files")
    return raiser


def heavy_root(name):
    return next((h for h in heavy if name == h or name.startswith(h + ".")), None)


socket.socket.connect = forbid("socket.connect")
socket.socket.connect_ex = forbid("socket.connect_ex")


class Watch(importlib.abc.MetaPathFinder):
    """Records heavy imports while parsing; makes psycopg.connect raise whenever psycopg is imported."""

    parsing = False

    def find_spec(self, name, path=None, target=None):
        if self.parsing and heavy_root(name) and heavy_root(name) not in attempts:
            attempts.append(heavy_root(name))
        if name != "psycopg":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            module.connect = forbid("psycopg.connect")

        spec.loader.exec_module = exec_and_patch
        return spec


watch = Watch()
sys.meta_path.insert(0, watch)

import airflow.sdk  # noqa: E402

airflow.sdk.BaseHook.get_connection = staticmethod(forbid("BaseHook.get_connection"))
airflow.sdk.Variable.get = staticmethod(forbid("Variable.get"))

try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:  # older layout
    from airflow.models.dagbag import DagBag
from airflow.sdk.definitions.mappedoperator import MappedOperator  # noqa: E402
from airflow.serialization.serialized_objects import DagSerialization  # noqa: E402

kwargs = {"dag_folder": dags_folder}
if "include_examples" in inspect.signature(DagBag).parameters:
    kwargs["include_examples"] = False

heavy_before = sorted({heavy_root(m) for m in sys.modules} - {None})
before = set(sys.modules)
watch.parsing = True
bag = DagBag(**kwargs)
watch.parsing = False
imported_by_parse = sorted({heavy_root(m) for m in set(sys.modules) - before} - {None})


def plain(value):
    return json.loads(json.dumps(value, default=str))


dags = {}
for dag_id, dag in bag.dags.items():
    try:
        serialized = DagSerialization.to_dict(dag)
        serialization_error = None
        serialized_timetable = serialized["dag"]["timetable"].get("__type")
    except Exception as exc:  # reported, asserted on by the test
        serialization_error, serialized_timetable = repr(exc), None
    tt = dag.timetable
    tz = getattr(tt, "timezone", None)
    params = {}
    for name in dag.params:
        p = dag.params.get_param(name)
        params[name] = {"value": plain(p.value), "schema": plain(p.schema)}
    tasks = {}
    for t in dag.tasks:
        mapped = isinstance(t, MappedOperator)
        expand = {}
        if mapped:
            expand = {k: plain(v) for k, v in t._get_specified_expand_input().value.items()}
        tasks[t.task_id] = {
            "retries": t.retries,
            "retry_exponential_backoff": plain(t.retry_exponential_backoff),
            "retry_delay": plain(getattr(t, "retry_delay", None)),
            "owner": t.owner,
            "upstream": sorted(t.upstream_task_ids),
            "mapped": mapped,
            "expand": expand,
        }
    dags[dag_id] = {
        "fileloc": dag.fileloc,
        "tags": sorted(dag.tags),
        "max_active_runs": dag.max_active_runs,
        "catchup": dag.catchup,
        "doc_md": dag.doc_md,
        "owner": dag.owner,
        "timetable": {
            "module": type(tt).__module__,
            "name": type(tt).__name__,
            "expression": getattr(tt, "expression", None),
            "timezone": str(getattr(tz, "name", tz)),
            "serialized_type": serialized_timetable,
        },
        "serialization_error": serialization_error,
        "params": params,
        "tasks": tasks,
    }

with open(out_path, "w") as fh:
    json.dump(
        {
            "import_errors": plain(bag.import_errors),
            "dags": dags,
            "forbidden_calls": calls,
            "heavy_import_attempts": attempts,
            "heavy_imported_by_parse": imported_by_parse,
            "heavy_before_parse": heavy_before,
            "medsync_modules": sorted(m for m in sys.modules if m.startswith("medsync")),
        },
        fh,
    )
'''


def _parse_in_subprocess(work: Path, include_dir: Path | None) -> dict[str, Any]:
    script = work / "parse_dags.py"
    script.write_text(PARSE_SCRIPT, encoding="utf-8")
    out = work / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MEDSYNC_", "PYTHON"))}
    env.update(
        {
            "AIRFLOW_HOME": str(work / "airflow_home"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "PYTHONPATH": str(ROOT / "plugins"),
        }
    )
    if include_dir is not None:
        env["MEDSYNC_INCLUDE_DIR"] = str(include_dir)
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(ROOT / "dags"), ",".join(HEAVY)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"DAG parse subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text(encoding="utf-8"))


def _include_with_source_c(target: Path) -> Path:
    include = target / "include"
    shutil.copytree(INCLUDE, include)
    raw = yaml.safe_load((INCLUDE / "sources" / "b.yaml").read_text(encoding="utf-8"))
    raw.update(
        {
            "name": "c",
            "description": "A second source speaking B's protocol",
            "mapping_file": "c.yaml",
            "instance_slices": 3,
            "tags": ["medsync", "source:c"],
        }
    )
    raw["connections"] = {**raw["connections"], "api_conn_id": "medsync_c_api"}
    raw["storage"] = {
        **raw["storage"],
        "aws_conn_id": "medsync_c_aws",
        "bucket": "c-imaging-dev",
        "bucket_variable": "medsync_c_bucket",
        "allowed_buckets_variable": None,
    }
    raw["schedule"] = {"cron": "30 1 * * *", "timezone": "Europe/Berlin", "start_date": "2026-02-01"}
    (include / "sources" / "c.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    mapping = (INCLUDE / "mappings" / "b.yaml").read_text(encoding="utf-8").replace("source: b", "source: c", 1)
    (include / "mappings" / "c.yaml").write_text(mapping, encoding="utf-8")
    return include


def _parse(tmp_path_factory: pytest.TempPathFactory, with_source_c: bool) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("dagbag_with_c" if with_source_c else "dagbag_repo")
    include = _include_with_source_c(work) if with_source_c else None
    result = _parse_in_subprocess(work, include)
    result["sources_dir"] = (include or INCLUDE) / "sources"
    result["configs"] = {c.dag_id: c for c in load_source_configs(result["sources_dir"])}
    return result


@pytest.fixture(scope="module")
def parsed_repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """dags/ as the repo ships it."""
    return _parse(tmp_path_factory, with_source_c=False)


@pytest.fixture(scope="module")
def parsed_with_c(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """dags/ with MEDSYNC_INCLUDE_DIR pointing at a copy of include/ plus source c (instance_slices: 3)."""
    return _parse(tmp_path_factory, with_source_c=True)


@pytest.fixture(params=["repo", "with_source_c"])
def parsed(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.getfixturevalue("parsed_repo" if request.param == "repo" else "parsed_with_c")


def _dags(parsed: dict[str, Any]) -> list[tuple[dict[str, Any], SourceConfig]]:
    configs: dict[str, SourceConfig] = parsed["configs"]
    return [(parsed["dags"][dag_id], cfg) for dag_id, cfg in configs.items() if dag_id in parsed["dags"]]


# --- the bag --------------------------------------------------------------------------------------------


def test_dags_folder_parses_without_import_errors(parsed: dict[str, Any]) -> None:
    assert parsed["import_errors"] == {}


def test_every_dag_serializes_as_the_dag_processor_does(parsed: dict[str, Any]) -> None:
    assert {d: i["serialization_error"] for d, i in parsed["dags"].items() if i["serialization_error"]} == {}


EXAMPLE_DAGS = {"example_downstream"}
"""dags/example_downstream.py: an asset-scheduled example, not a source's DAG."""


def test_exactly_one_dag_per_source_config(parsed: dict[str, Any]) -> None:
    expected = {f"medsync_{p.stem}" for p in Path(parsed["sources_dir"]).glob("*.yaml")}
    assert expected
    assert set(parsed["dags"]) == expected | EXAMPLE_DAGS
    assert len(parsed["dags"]) == len(expected) + len(EXAMPLE_DAGS)


def test_every_dag_comes_from_dags_medsync_py(parsed: dict[str, Any]) -> None:
    for info, _ in _dags(parsed):
        assert Path(info["fileloc"]) == ROOT / "dags" / "medsync.py"


# --- parsing touches nothing outside -------------------------------------------------------------------------


def test_parsing_looks_up_no_connection_variable_socket_or_database(parsed: dict[str, Any]) -> None:
    assert parsed["forbidden_calls"] == []


def test_parsing_imports_no_heavy_module(parsed: dict[str, Any]) -> None:
    assert parsed["heavy_import_attempts"] == []
    assert parsed["heavy_imported_by_parse"] == []


def test_task_modules_of_medsync_are_not_loaded_at_parse_time(parsed: dict[str, Any]) -> None:
    loaded = set(parsed["medsync_modules"])
    assert "medsync.dag_factory" in loaded  # the parse really went through medsync
    assert "medsync.sources.rest.source" in loaded  # B's config was opened through the rest protocol
    task_time = {
        "medsync.sources.rest.records",
        "medsync.sources.rest.client",
        "medsync.sources.rest.hook",
        "medsync.merge",
        "medsync.staging",
        "medsync.tasks",
    }
    assert loaded.isdisjoint(task_time)


# --- each DAG ---------------------------------------------------------------------------------------------------


def test_dag_is_tagged_medsync(parsed: dict[str, Any]) -> None:
    for info, _ in _dags(parsed):
        assert "medsync" in info["tags"]


def test_dag_runs_one_at_a_time_without_catchup(parsed: dict[str, Any]) -> None:
    for info, _ in _dags(parsed):
        assert info["max_active_runs"] == 1
        assert info["catchup"] is False


def test_dag_has_documentation(parsed: dict[str, Any]) -> None:
    for info, _ in _dags(parsed):
        assert isinstance(info["doc_md"], str)
        assert info["doc_md"].strip()


def test_dag_timetable_is_cron_data_interval_with_the_configs_cron_and_timezone(parsed: dict[str, Any]) -> None:
    for info, cfg in _dags(parsed):
        tt = info["timetable"]
        assert tt["name"] == "CronDataIntervalTimetable"
        assert tt["serialized_type"] == "airflow.timetables.interval.CronDataIntervalTimetable"
        assert tt["expression"] == cfg.schedule.cron
        assert tt["timezone"] == cfg.schedule.timezone


def test_dag_has_a_boolean_full_refresh_param_defaulting_to_false(parsed: dict[str, Any]) -> None:
    for info, _ in _dags(parsed):
        param = info["params"]["full_refresh"]
        assert param["value"] is False
        assert param["schema"]["type"] == "boolean"


def test_every_task_retries_with_exponential_backoff(parsed: dict[str, Any]) -> None:
    for info, _ in _dags(parsed):
        for task_id, task in info["tasks"].items():
            assert task["retries"] >= 1, task_id
            backoff = task["retry_exponential_backoff"]
            assert backoff is True or (isinstance(backoff, int | float) and backoff > 0), (task_id, backoff)


def test_every_task_has_the_configs_owner(parsed: dict[str, Any]) -> None:
    for info, cfg in _dags(parsed):
        assert cfg.owner
        for task_id, task in info["tasks"].items():
            assert task["owner"] == cfg.owner, task_id


def test_task_ids_are_exactly_the_sync_steps(parsed: dict[str, Any]) -> None:
    from medsync.sources import open_source

    for info, cfg in _dags(parsed):
        mirrored = {"mirror_files"} if open_source(cfg).file_mirror is not None else set()
        assert set(info["tasks"]) == TASK_IDS | mirrored


def test_files_are_mirrored_after_the_instance_merge_and_before_the_check(parsed: dict[str, Any]) -> None:
    mirrored = [info for info, _ in _dags(parsed) if "mirror_files" in info["tasks"]]
    assert mirrored, "the pacs source mirrors its files"
    for info in mirrored:
        assert set(info["tasks"]["mirror_files"]["upstream"]) == {"prepare", "merge_instances"}
        assert "mirror_files" in info["tasks"]["check_files"]["upstream"]


def test_mirror_files_has_its_own_execution_timeout() -> None:
    from datetime import timedelta

    from medsync.config import get_source_config
    from medsync.dag_factory import build_dag

    cfg = get_source_config("pacs")
    timeouts = cfg.task_timeouts.model_copy(update={"mirror_files_minutes": 17.0, "check_files_minutes": 9.0})
    dag = build_dag(cfg.model_copy(update={"task_timeouts": timeouts}))
    assert dag.get_task("mirror_files").execution_timeout == timedelta(minutes=17)
    assert dag.get_task("check_files").execution_timeout == timedelta(minutes=9)


def test_each_merge_is_downstream_of_its_pull(parsed: dict[str, Any]) -> None:
    for info, _ in _dags(parsed):
        for plural in LEVELS_PLURAL:
            assert f"pull_{plural}" in info["tasks"][f"merge_{plural}"]["upstream"]


def test_merges_are_chained_parents_first(parsed: dict[str, Any]) -> None:
    for info, _ in _dags(parsed):
        for parent, child in itertools.pairwise(LEVELS_PLURAL):
            assert f"merge_{parent}" in info["tasks"][f"merge_{child}"]["upstream"]
        assert not any(u.startswith("merge_") for u in info["tasks"]["merge_subjects"]["upstream"])


def test_pulls_wait_only_for_prepare(parsed: dict[str, Any]) -> None:
    for info, _ in _dags(parsed):
        for plural in LEVELS_PLURAL:
            assert info["tasks"][f"pull_{plural}"]["upstream"] == ["prepare"]


def test_tail_runs_after_the_last_merge_in_order(parsed: dict[str, Any]) -> None:
    for info, _ in _dags(parsed):
        tasks = info["tasks"]
        assert "merge_instances" in tasks["check_files"]["upstream"]
        assert "check_files" in tasks["report"]["upstream"]
        assert "report" in tasks["finish"]["upstream"]


def test_instance_pull_is_mapped_only_when_instance_slices_above_one(parsed: dict[str, Any]) -> None:
    for info, cfg in _dags(parsed):
        pull = info["tasks"]["pull_instances"]
        assert pull["mapped"] is (cfg.instance_slices > 1), cfg.name
        for other in ("pull_subjects", "pull_studies", "pull_sequences"):
            assert info["tasks"][other]["mapped"] is False


# --- a second source without code changes -------------------------------------------------------------------------


def test_second_source_gives_a_second_dag(parsed_with_c: dict[str, Any]) -> None:
    parsed = parsed_with_c
    assert set(parsed["dags"]) - {"medsync_pacs"} == {"medsync_b", "medsync_c"} | EXAMPLE_DAGS
    c = parsed["dags"]["medsync_c"]
    assert c["timetable"]["expression"] == "30 1 * * *"
    assert c["timetable"]["timezone"] == "Europe/Berlin"
    assert "source:c" in c["tags"]


def test_instance_slices_three_makes_pull_instances_a_mapped_task_over_three_slices(
    parsed_with_c: dict[str, Any],
) -> None:
    parsed = parsed_with_c
    pull = parsed["dags"]["medsync_c"]["tasks"]["pull_instances"]
    assert pull["mapped"] is True
    assert pull["expand"] == {"slice_index": [0, 1, 2]}
    assert parsed["dags"]["medsync_b"]["tasks"]["pull_instances"]["mapped"] is False
    assert "pull_instances" in parsed["dags"]["medsync_c"]["tasks"]["merge_instances"]["upstream"]
