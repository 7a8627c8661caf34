"""medsync's connection types as Airflow finds them: the in-repo provider distribution
(providers/medsync-airflow-provider, installed from requirements.txt) declares ``medsync_rest``
and ``medsync_dicomweb`` under the ``apache_airflow_provider`` entry point, with medsync's hooks
and the connection form's labels.

ProvidersManager is a process-wide singleton that scans installed distributions once, so it is
asked in a fresh interpreter, with ``plugins/`` on the path as Airflow puts it there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, warnings
warnings.simplefilter("ignore")  # ProvidersManager.hooks is deprecated for the task SDK's own copy
from airflow.providers_manager import ProvidersManager
from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

manager = ProvidersManager()
behaviours, hooks = manager.field_behaviours, manager.hooks
runtime = ProvidersManagerTaskRuntime().hooks
form = {m.connection_type: m.hook_name for m in manager.iter_connection_type_hook_ui_metadata()}
found = {}
for conn_type in ("medsync_rest", "medsync_dicomweb", "http"):
    hook, task_hook = hooks.get(conn_type), runtime.get(conn_type)
    found[conn_type] = {
        "hook": hook and [hook.hook_class_name, hook.connection_type, hook.connection_id_attribute_name,
                          hook.package_name],
        "task_hook": task_hook and task_hook.hook_class_name,
        "behaviour": behaviours.get(conn_type),
        "form": form.get(conn_type),
    }
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def discovered() -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=300, env=env, cwd=ROOT
    )
    found: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def test_medsync_rest_is_a_connection_type_whose_hook_is_medsyncs(discovered: dict[str, Any]) -> None:
    rest = discovered["medsync_rest"]
    assert rest["hook"] == [
        "medsync.sources.rest.hook.RestSourceHook",
        "medsync_rest",
        "api_conn_id",
        "medsync-airflow-provider",
    ]
    assert rest["task_hook"] == "medsync.sources.rest.hook.RestSourceHook"
    assert rest["form"] == "medsync: REST source"


def test_the_rest_connection_form_says_where_the_secret_goes(discovered: dict[str, Any]) -> None:
    behaviour = discovered["medsync_rest"]["behaviour"]
    password = behaviour["relabeling"]["password"]
    assert "API key" in password and "bearer token" in password
    assert "basic" in behaviour["relabeling"]["login"]
    assert behaviour["placeholders"]["host"].startswith("https://")
    assert "timeout" in behaviour["placeholders"]["extra"]


def test_medsync_dicomweb_is_a_connection_type_too(discovered: dict[str, Any]) -> None:
    dicomweb = discovered["medsync_dicomweb"]
    assert dicomweb["hook"][:3] == ["medsync.sources.dicomweb.hook.DicomwebHook", "medsync_dicomweb", "http_conn_id"]
    assert "bearer token" in dicomweb["behaviour"]["relabeling"]["password"]
    assert dicomweb["form"] == "medsync: PACS (DICOMweb)"


def test_http_stays_the_http_providers(discovered: dict[str, Any]) -> None:
    assert discovered["http"]["hook"][0] == "airflow.providers.http.hooks.http.HttpHook"


def test_the_hooks_declare_the_types_the_provider_registers_them_under() -> None:
    # ProvidersManager only warns ("Inconsistency!") when they differ: held here instead.
    from medsync_airflow_provider import get_provider_info

    from medsync.sources.dicomweb.hook import DicomwebHook
    from medsync.sources.rest.hook import RestSourceHook

    declared = {c["connection-type"]: c for c in get_provider_info()["connection-types"]}
    for hook in (RestSourceHook, DicomwebHook):
        entry = declared[hook.conn_type]
        assert entry["hook-class-name"] == f"{hook.__module__}.{hook.__qualname__}"
        assert entry["hook-name"] == hook.hook_name
