"""docker-compose.yaml, checked by every means short of running it (no Docker engine on CI).

It must parse; every host path it mounts must exist; every port must be published on
127.0.0.1 only; every image must be pinned; the connections it sets must be the ones the
source configs name, pointing at services it defines; and the Airflow and simulator commands
it runs must be the ones tests/airflow_stack.py runs natively in the end-to-end tests.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from airflow_stack import AIRFLOW_COMMANDS, SIMULATOR_COMMAND, component_argv

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
SOURCE_CONFIGS = sorted((ROOT / "include" / "sources").glob("*.yaml"))

AIRFLOW_SERVICES = {
    "api-server": "api-server",
    "scheduler": "scheduler",
    "dag-processor": "dag-processor",
    "triggerer": "triggerer",
    "worker-1": "celery-worker",
    "worker-2": "celery-worker",
}
"""Compose service -> the harness's component (tests/airflow_stack.py AIRFLOW_COMMANDS)."""
PROJECT_MOUNTS = {
    "./dags": "/opt/airflow/dags",
    "./plugins": "/opt/airflow/plugins",
    "./include": "/opt/airflow/include",
}
PIN = re.compile(r"^[\w.\-/]+(:[\w.\-]+)(@sha256:[0-9a-f]{64})?$|^[\w.\-/]+@sha256:[0-9a-f]{64}$")


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` with nothing set: what a fresh laptop gets."""
    value = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", "", value)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def volumes_of(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume, short or long syntax."""
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            out.append((vol.get("source", ""), vol["target"]))
        else:
            parts = vol.split(":")
            out.append((parts[0], parts[1]))
    return out


def command_of(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def matches_template(tokens: list[str], template: tuple[str, ...]) -> bool:
    """Same length, same literal tokens; ``{placeholder}`` tokens match any value."""
    return len(tokens) == len(template) and all(
        t.startswith("{") or t == tok for t, tok in zip(template, tokens, strict=True)
    )


def source_configs() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in SOURCE_CONFIGS]


def service_port(name: str) -> int:
    """The port a service listens on inside the network (from its command or image default)."""
    cmd = command_of(SERVICES[name])
    if "--port" in cmd:
        return int(cmd[cmd.index("--port") + 1])
    return {"s3": 5000, "redis": 6379, "a-db": 5432, "airflow-db": 5432}[name]


# --- it parses and has what the issue asks for --------------------------------------------------


def test_compose_file_parses_with_the_stack_the_issue_asks_for() -> None:
    assert COMPOSE["name"] == "medsync"
    required = {"airflow-db", "a-db", "redis", "s3", "b-simulator", "airflow-init", *AIRFLOW_SERVICES}
    assert required <= set(SERVICES), required - set(SERVICES)
    assert sum(AIRFLOW_SERVICES.get(s) == "celery-worker" for s in SERVICES) >= 2


def test_airflow_runs_celery_with_redis_and_the_metadata_database() -> None:
    for name in AIRFLOW_SERVICES:
        env = env_of(SERVICES[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert urlsplit(env["AIRFLOW__CELERY__BROKER_URL"]).hostname == "redis"
        assert urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).hostname == "airflow-db"
        assert urlsplit(env["AIRFLOW__CELERY__RESULT_BACKEND"].removeprefix("db+")).hostname == "airflow-db"
        assert urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]).hostname == "api-server"
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"


def test_every_airflow_container_gets_the_same_settings_and_the_project() -> None:
    """One JWT secret, one set of connections, the same mounts: else tasks fail on one worker only."""
    envs = [{k: v for k, v in env_of(SERVICES[n]).items() if k.startswith("AIRFLOW")} for n in AIRFLOW_SERVICES]
    assert all(env == envs[0] for env in envs)
    assert envs[0]["AIRFLOW__API_AUTH__JWT_SECRET"]
    for name in AIRFLOW_SERVICES:
        mounts = dict(volumes_of(SERVICES[name]))
        for src, target in PROJECT_MOUNTS.items():
            assert mounts.get(src) == target, (name, src)
        assert "airflow-logs" in mounts, name  # one log volume: the UI shows every worker's logs


def test_the_admin_password_file_is_shared_by_init_and_api_server() -> None:
    target = env_of(SERVICES["api-server"])["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    for name in ("airflow-init", "api-server"):
        mounts = {t: s for s, t in volumes_of(SERVICES[name])}
        assert mounts.get(str(Path(target).parent)) == "airflow-auth", name


# --- paths, ports, images -----------------------------------------------------------------------


def test_every_mounted_host_path_exists_and_named_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for src, _ in volumes_of(service):
            if src.startswith((".", "/")):
                assert (ROOT / src).exists(), (name, src)
                assert (ROOT / src).resolve().is_relative_to(ROOT), (name, src)
            else:
                assert src in declared, (name, src)
        if build := service.get("build"):
            context = ROOT / (build if isinstance(build, str) else build["context"])
            assert context.is_dir(), name
            if isinstance(build, dict) and build.get("dockerfile"):
                assert (context / build["dockerfile"]).is_file(), name


def test_every_published_port_is_on_loopback() -> None:
    for name, service in SERVICES.items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert re.fullmatch(r"127\.0\.0\.1:\d+:\d+(/tcp|/udp)?", str(port)), (name, port)
    assert "127.0.0.1:8080:8080" in SERVICES["api-server"]["ports"]


def test_every_image_is_pinned() -> None:
    for name, service in SERVICES.items():
        image = service.get("image")
        assert image, f"{name} has no image tag (a build without one gets a floating name)"
        assert "$" not in image and PIN.match(image), (name, image)
        assert not image.endswith(":latest"), (name, image)
    for dockerfile in (ROOT / "docker").glob("*Dockerfile*"):
        for line in dockerfile.read_text().splitlines():
            if line.upper().startswith("FROM "):
                image = line.split()[1]
                assert PIN.match(image) and not image.endswith(":latest"), (dockerfile.name, image)


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)", line):
            pins[re.sub(r"\[.*\]", "", m.group(1)).lower().replace("_", "-")] = m.group(2)
    return pins


def test_the_image_is_the_airflow_and_python_the_project_pins() -> None:
    pins = requirement_pins(ROOT / "requirements.txt")
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM apache/airflow:(\S+)-python(\S+)$", dockerfile, re.M)
    assert base, "the image must build FROM apache/airflow:<version>-python<version>"
    assert base.group(1) == pins["apache-airflow"]
    assert f"apache-airflow=={pins['apache-airflow']}" in dockerfile  # pip keeps Airflow as it is
    requires = re.search(r'requires-python = ">=(\d+\.\d+)', (ROOT / "pyproject.toml").read_text())
    assert requires and base.group(2) == requires.group(1)
    tag = f"{base.group(1)}-python{base.group(2)}"
    for name, service in SERVICES.items():
        if service.get("build"):
            assert service["image"] == f"medsync-airflow:{tag}", name
    # The image installs every pin the tests ran with, not a few of them over the base image's own.
    image_pins = requirement_pins(ROOT / "docker" / "requirements-image.txt")
    assert image_pins == pins, {
        p: (image_pins.get(p), pins.get(p)) for p in image_pins.keys() | pins.keys() if image_pins.get(p) != pins.get(p)
    }
    assert re.search(r"^RUN pip install .*-r /tmp/requirements-image\.txt$", dockerfile, re.M)
    s3 = SERVICES["s3"]["image"]
    assert s3 == f"motoserver/moto:{requirement_pins(ROOT / 'requirements-dev.txt')['moto']}"


MEDSYNC_IMAGE = "medsync-airflow:"


def test_the_image_is_built_once_and_every_other_service_reuses_it() -> None:
    builders = [name for name, service in SERVICES.items() if service.get("build")]
    assert builders == ["airflow-init"], builders  # the first Airflow service to run; all wait for it
    image = SERVICES["airflow-init"]["image"]
    users = [name for name, service in SERVICES.items() if service.get("image", "").startswith(MEDSYNC_IMAGE)]
    assert {"b-simulator", "b-files", *AIRFLOW_SERVICES} <= set(users)
    for name in users:
        assert SERVICES[name]["image"] == image, name
        if name != "airflow-init":
            # Never pulled: there is no such image in a registry, compose builds it before starting anything.
            assert SERVICES[name].get("pull_policy") == "never", name


def healthcheck_shell(service: str) -> str:
    """The service's healthcheck as the container's shell gets it (compose turns ``$$`` into ``$``)."""
    check = SERVICES[service].get("healthcheck")
    assert check, f"{service} has no healthcheck"
    assert {"interval", "timeout", "retries", "start_period"} <= set(check), service
    test = check["test"]
    assert test[0] == "CMD-SHELL" and len(test) == 2, (service, test)
    return str(test[1]).replace("$$", "$")


@pytest.mark.parametrize(("service", "job_type"), [("dag-processor", "DagProcessorJob"), ("triggerer", "TriggererJob")])
def test_dag_processor_and_triggerer_check_their_own_job_as_airflows_compose_does(service: str, job_type: str) -> None:
    argv = shlex.split(healthcheck_shell(service).replace("${HOSTNAME}", "container-host"))
    assert argv[0] == "airflow"
    from airflow.cli import cli_parser

    args = cli_parser.get_parser().parse_args(argv[1:])  # the installed Airflow accepts the command (or exits)
    assert argv[1:3] == ["jobs", "check"]
    assert args.job_type == job_type
    assert args.hostname == "container-host"  # this container's job, not any other's


@pytest.mark.parametrize("service", [s for s, c in AIRFLOW_SERVICES.items() if c == "celery-worker"])
def test_each_worker_pings_itself_as_airflows_compose_does(service: str) -> None:
    argv = shlex.split(healthcheck_shell(service).replace("${HOSTNAME}", "container-host"))
    assert argv[:2] == ["celery", "--app"] and argv[3:6] == ["inspect", "ping", "-d"], argv
    module, _, attribute = argv[2].rpartition(".")
    import importlib

    assert hasattr(importlib.import_module(module), attribute)  # the Celery app the workers run
    worker_name = command_of(SERVICES[service])[3]
    assert argv[6] == worker_name.replace("%h", "container-host"), (argv[6], worker_name)


def test_the_image_gives_the_passwords_directory_to_the_airflow_user() -> None:
    """A fresh named volume takes the owner of the image's directory: airflow-init (uid 50000) can write it."""
    auth_dir = str(Path(env_of(SERVICES["airflow-init"])["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]).parent)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    made = re.search(rf"^RUN install -d -o airflow -g root -m 0775 {re.escape(auth_dir)}$", dockerfile, re.M)
    assert made, f"the Dockerfile must create {auth_dir} owned by the airflow user"
    assert re.findall(r"^USER (\S+)$", dockerfile, re.M)[-1] == "airflow"  # and the image runs as it
    assert SERVICES["airflow-init"].get("user", "50000:0").split(":")[0] in ("50000", "0")


# --- connections against the source configs -----------------------------------------------------


SIMULATORS = {"b": ("b-simulator", "/api/v1", "BSIM_API_KEY"), "c": ("c-simulator", "/v2", "CSIM_TOKEN")}
"""Per source config: the stack's simulator service, the API's base path, the variable of its secret."""
NOT_IN_STACK = {"pacs": "the stack runs no PACS: its DAG parses, and runs once medsync_pacs_api names one"}
STACK_CONFIGS = [p for p in SOURCE_CONFIGS if p.stem not in NOT_IN_STACK]


def test_every_source_config_is_in_the_stack_or_says_why_not() -> None:
    assert {p.stem for p in SOURCE_CONFIGS} == set(SIMULATORS) | set(NOT_IN_STACK)


def test_source_configs_exist() -> None:
    assert SOURCE_CONFIGS


@pytest.mark.parametrize("config_path", STACK_CONFIGS, ids=lambda p: p.name)
def test_connections_of_each_source_config_are_set_and_point_at_the_stack(config_path: Path) -> None:
    cfg = yaml.safe_load(config_path.read_text())
    env = env_of(SERVICES["scheduler"])
    wanted = {
        cfg["connections"]["db_conn_id"]: "postgres",
        cfg["connections"]["api_conn_id"]: "http",
        cfg["storage"]["aws_conn_id"]: "aws",
    }
    for conn_id, conn_type in wanted.items():
        raw = env.get(f"AIRFLOW_CONN_{conn_id.upper()}")
        assert raw, f"no AIRFLOW_CONN_{conn_id.upper()} for {config_path.name}"
        conn = json.loads(raw)
        assert conn["conn_type"] == conn_type, conn_id
        if conn_type == "postgres":
            a_env = env_of(SERVICES[conn["host"]])
            assert conn["port"] == service_port(conn["host"])
            assert (conn["login"], conn["password"], conn["schema"]) == (
                a_env["POSTGRES_USER"],
                a_env["POSTGRES_PASSWORD"],
                a_env["POSTGRES_DB"],
            )
            assert any(t.endswith("a_schema.sql") for _, t in volumes_of(SERVICES[conn["host"]]))
        elif conn_type == "http":
            url = urlsplit(conn["host"])
            simulator, path, secret = SIMULATORS[cfg["name"]]
            assert url.hostname == simulator and url.port == service_port(simulator)
            assert url.path == path
            # The key (token) Airflow sends is the one the simulator accepts.
            assert conn["password"] == env_of(SERVICES[simulator])[secret]
        else:
            url = urlsplit(conn["extra"]["endpoint_url"])
            assert url.hostname == "s3" and url.port == service_port("s3")
            assert conn["extra"]["config_kwargs"]["signature_version"] == "s3v4"
    if cfg["name"] == "b":
        # B's files are put where the config says B keeps them.
        assert env_of(SERVICES["b-files"])["MEDSYNC_B_BUCKET"] == cfg["storage"]["bucket"]


def test_a_schema_mount_is_the_repo_copy() -> None:
    sources = [s for s, t in volumes_of(SERVICES["a-db"]) if t.startswith("/docker-entrypoint-initdb.d/")]
    assert sources == ["./include/sql/a_schema.sql"]


def test_every_url_names_a_service_of_the_stack() -> None:
    for name, service in SERVICES.items():
        for key, value in env_of(service).items():
            for url in re.findall(r"[a-z+]+://[^\s\"',}]+", value):
                host = urlsplit(url).hostname
                assert host in SERVICES or host == "127.0.0.1", (name, key, host)


# --- the same commands as the native harness ----------------------------------------------------


@pytest.mark.parametrize("service", sorted(AIRFLOW_SERVICES))
def test_airflow_service_runs_the_harness_command(service: str) -> None:
    cmd = command_of(SERVICES[service])
    assert matches_template(cmd, AIRFLOW_COMMANDS[AIRFLOW_SERVICES[service]]), (service, cmd)


def test_celery_workers_have_distinct_names() -> None:
    names = [command_of(SERVICES[s])[3] for s, c in AIRFLOW_SERVICES.items() if c == "celery-worker"]
    assert len(set(names)) == len(names)


def test_airflow_init_migrates_with_the_harness_command() -> None:
    cmd = command_of(SERVICES["airflow-init"])
    script = cmd[-1]
    host_script = {t: s for s, t in volumes_of(SERVICES["airflow-init"])}[script]
    lines = [line.strip() for line in (ROOT / host_script).read_text().splitlines()]
    assert "airflow " + " ".join(component_argv("db-migrate")) in lines


def test_every_harness_component_runs_in_compose() -> None:
    used = set(AIRFLOW_SERVICES.values()) | {"db-migrate"}
    assert used == set(AIRFLOW_COMMANDS)


def test_simulator_runs_the_harness_command_with_arguments_it_accepts() -> None:
    cmd = command_of(SERVICES["b-simulator"])
    assert cmd[0] == "python"
    head = cmd[1 : 1 + len(SIMULATOR_COMMAND)]
    assert matches_template(head, SIMULATOR_COMMAND), cmd
    # Inside its container (published on 127.0.0.1 only), so other containers reach it.
    assert head[head.index("--host") + 1] == "0.0.0.0"
    assert "--api-key" not in cmd  # the key is in $BSIM_API_KEY, not in every `ps`
    main = pytest.importorskip("simulator.__main__")
    try:
        parsed = main._parser().parse_args(cmd[3:])
    except SystemExit:
        pytest.fail(f"the simulator rejects {cmd[3:]}")
    assert parsed.port == service_port("b-simulator")
    # The project is mounted where `python -m simulator` finds it.
    sim = SERVICES["b-simulator"]
    assert dict(volumes_of(sim))["./simulator"] == f"{sim['working_dir']}/simulator"


# --- the scripts compose runs, run natively --------------------------------------------------------


@pytest.mark.slow
def test_airflow_init_script_runs(tmp_path: Path) -> None:
    """docker/airflow-init.sh against a throw-away metadata database: migrates, sets the password."""
    import os
    import subprocess
    import uuid

    from airflow_stack import AIRFLOW, sqlalchemy_url
    from conftest import create_database, drop_database

    name = f"airflow_init_{uuid.uuid4().hex[:8]}"
    create_database(name)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        passwords = tmp_path / "auth" / "passwords.json"
        env.update(
            AIRFLOW_HOME=str(tmp_path),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlalchemy_url(name),
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
            MEDSYNC_AIRFLOW_PASSWORD="s3cret-for-test",
            PATH=f"{Path(AIRFLOW).parent}{os.pathsep}{env['PATH']}",
        )
        proc = subprocess.run(
            ["bash", str(ROOT / "docker" / "airflow-init.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert json.loads(passwords.read_text()) == {"admin": "s3cret-for-test"}
        assert "s3cret-for-test" not in proc.stdout + proc.stderr
        if os.geteuid() == 0:  # run as root, it hands what it wrote to the image's user
            assert {p.stat().st_uid for p in (passwords, passwords.parent)} == {AIRFLOW_UID}
        import psycopg
        from conftest import dsn_for

        with psycopg.connect(dsn_for(name)) as conn:
            assert conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
    finally:
        drop_database(name)


@pytest.mark.slow
def test_seed_s3_script_copies_every_live_image_file(tmp_path: Path) -> None:
    """docker/seed_s3.py against the simulator (its CLI) and a moto server, both on loopback."""
    import os
    import subprocess
    import uuid

    import boto3
    from airflow_stack import free_port, simulator_process
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    key = uuid.uuid4().hex
    bucket = f"b-seed-{key[:8]}"  # moto keeps buckets per process: one of this test's own
    try:
        with simulator_process(key, patients=3, extra_args=("--plain", "--no-rate-limit")) as base_url:
            env = {
                **os.environ,
                "BSIM_API_KEY": key,
                "MEDSYNC_B_BASE_URL": base_url,
                "MEDSYNC_S3_ENDPOINT": f"http://127.0.0.1:{port}",
                "MEDSYNC_B_BUCKET": bucket,
            }
            proc = subprocess.run(
                [sys.executable, str(ROOT / "docker" / "seed_s3.py")],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert proc.returncode == 0, proc.stderr[-2000:]
            import requests

            counts = requests.get(f"{base_url}/counts", headers={"X-API-Key": key}, timeout=30).json()
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert len(keys) == counts["images"] > 0
        assert proc.stdout.strip() == f"b-files: {counts['images']} files in s3://{bucket}"
    finally:
        moto.stop()


AIRFLOW_UID = 50000


def run_init_script(home: Path, db: str, *, as_uid: int | None) -> subprocess.CompletedProcess[str]:
    """docker/airflow-init.sh with AIRFLOW_HOME ``home``, as the image's user when ``as_uid`` is given."""
    from airflow_stack import AIRFLOW, sqlalchemy_url

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        HOME=str(home),
        # The image's passwd names uid 50000 "airflow"; this machine has no such entry, and Airflow
        # asks getpass for a user name, which reads LOGNAME before the passwd file.
        LOGNAME="airflow",
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlalchemy_url(db),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "auth" / "passwords.json"),
        MEDSYNC_AIRFLOW_PASSWORD="s3cret-for-test",
        PATH=f"{Path(AIRFLOW).parent}{os.pathsep}{env['PATH']}",
    )
    # The user may read and search everything (the venv's interpreter lives under root's 0700 home
    # on this machine) but writes only where uid 50000 may: what the script writes is what is tested.
    read_anything = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    prefix = [] if as_uid is None else ["setpriv", f"--reuid={as_uid}", "--regid=0", "--clear-groups", *read_anything]
    return subprocess.run(
        [*prefix, "bash", str(ROOT / "docker" / "airflow-init.sh")],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.fixture
def fresh_home() -> Iterator[Path]:
    """An empty directory outside pytest's root-only tmp tree, owned by the image's user (as /opt/airflow is)."""
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="airflow-init-home-"))
    os.chown(home, AIRFLOW_UID, 0)
    yield home
    shutil.rmtree(home)


@pytest.fixture
def throwaway_db() -> Iterator[str]:
    import uuid

    from conftest import create_database, drop_database

    name = f"airflow_init_{uuid.uuid4().hex[:8]}"
    create_database(name)
    yield name
    drop_database(name)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to switch user")
def test_airflow_init_script_runs_as_the_images_user_on_a_fresh_directory(fresh_home: Path, throwaway_db: str) -> None:
    proc = run_init_script(fresh_home, throwaway_db, as_uid=AIRFLOW_UID)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    passwords = fresh_home / "auth" / "passwords.json"
    assert json.loads(passwords.read_text()) == {"admin": "s3cret-for-test"}
    info = passwords.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (AIRFLOW_UID, 0o600)
    assert "s3cret-for-test" not in proc.stdout + proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to switch user")
def test_airflow_init_script_says_why_when_the_passwords_directory_is_not_its_own(fresh_home: Path) -> None:
    """A volume created before the image owned the directory (root's): a clear error, not a traceback."""
    (fresh_home / "auth").mkdir()  # root's, 0755
    proc = run_init_script(fresh_home, "unused", as_uid=AIRFLOW_UID)
    assert proc.returncode == 1
    assert "is not writable by uid 50000" in proc.stderr and "airflow-auth volume" in proc.stderr


def test_the_image_installs_the_in_repo_provider_from_its_build_context() -> None:
    # requirements.txt installs it by path, which the image's build context (./docker) cannot reach.
    build = SERVICES["airflow-init"]["build"]
    context = build["additional_contexts"]["medsync-provider"]
    assert (ROOT / context / "pyproject.toml").is_file()
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^COPY --from=medsync-provider \. (\S+)\nRUN pip install .*--no-deps \1$", dockerfile, re.M)
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    assert "./" + context.removeprefix("./") in requirements
    image_requirements = (ROOT / "docker" / "requirements-image.txt").read_text().splitlines()
    assert not any(line.startswith("./") for line in image_requirements)
