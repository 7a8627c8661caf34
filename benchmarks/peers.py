"""Peers in the benchmark: dlt loading the same B simulator and catalogue, into databases of its own.

dlt runs in a virtualenv of its own (``build/dlt-venv``, ignored by git), created on first use
from the pinned ``benchmarks/dlt-requirements.txt`` with ``uv`` (medsync's environment has it)
and re-created when that file changes; medsync's environment never imports dlt. Each load is
a process of that venv running ``benchmarks/dlt_load.py`` (its two configurations are
described there); its rows are then counted here and checked against B's ``/counts``, as
medsync's are.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.dag import BenchError
from benchmarks.fixtures import B, Server, connection_uri
from benchmarks.measure import CpuProbe, source_live
from benchmarks.paths import ROOT
from tests.conftest import create_database, drop_database, dsn_for

VENV = ROOT / "build" / "dlt-venv"
REQUIREMENTS = ROOT / "benchmarks" / "dlt-requirements.txt"
SCRIPT = ROOT / "benchmarks" / "dlt_load.py"
CONFIGS = ("default", "fastest")
INSTALL_TIMEOUT_SECONDS = 900
LOAD_TIMEOUT_SECONDS = 3600


class PeerUnavailable(BenchError):
    """dlt's virtualenv could not be made (no network, no uv): the run goes on without the peer."""


def dlt_python() -> Path:
    """The dlt venv's interpreter, the venv made or re-made first if its pins changed."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".requirements-sha256"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    uv = Path(sys.executable).parent / "uv"
    found = str(uv) if uv.exists() else shutil.which("uv")
    if found is None:
        raise PeerUnavailable("no uv beside this Python or on PATH to make dlt's virtualenv")
    steps = (
        [found, "venv", "--clear", "--python", "3.11", str(VENV)],
        [found, "pip", "install", "--python", str(python), "-r", str(REQUIREMENTS)],
    )
    began = time.perf_counter()
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECONDS, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PeerUnavailable(f"{' '.join(step[:3])} took over {INSTALL_TIMEOUT_SECONDS} s") from exc
        if done.returncode != 0:
            raise PeerUnavailable(f"{' '.join(step[:3])} failed: {done.stderr.strip()[-500:]}")
    stamp.write_text(wanted + "\n")
    print(f"dlt's virtualenv made in {time.perf_counter() - began:.0f} s: {VENV}", flush=True)
    return python


def load(
    python: Path,
    config: str,
    *,
    server: Server,
    db: str,
    since: datetime,
    until: datetime,
    page_size: int,
    pipelines_dir: Path,
) -> dict[str, Any]:
    """One dlt full load of B into ``db`` (a fresh database); its figures, rows checked against ``/counts``."""
    job = {
        "base_url": server.base_url,
        "api_key": server.source.secret,
        "dsn": _dlt_credentials(db),
        "since": since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),  # RFC 3339, as B's contract asks
        "until": until.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "page_size": page_size,
        "pipelines_dir": str(pipelines_dir / config),
    }
    pipelines_dir.mkdir(parents=True, exist_ok=True)
    cpu = CpuProbe.take(server.pid)
    began = time.perf_counter()
    done = subprocess.run(
        [str(python), str(SCRIPT), config],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=LOAD_TIMEOUT_SECONDS,
        check=False,
        cwd=pipelines_dir,
    )
    wall = time.perf_counter() - began
    if done.returncode != 0:
        return {"config": config, "failed": done.stderr.strip()[-2000:]}
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_seconds"] = wall
    figures["cpu"] = cpu.since()
    with psycopg.connect(dsn_for(db), autocommit=True) as conn:
        figures["rows"] = check_rows(conn, server)
    records = sum(figures["rows"]["stored"].values())
    figures["records"] = records
    figures["records_per_s"] = records / figures["seconds"]
    return figures


def check_rows(conn: psycopg.Connection, server: Server) -> dict[str, Any]:
    """dlt's tables against B's live records: per level, stored rows, and those not deleted, = ``/counts``."""
    live = source_live(server)
    stored: dict[str, int] = {}
    not_deleted: dict[str, int] = {}
    for level, endpoint in B.resources.items():
        row = conn.execute(
            sql.SQL("SELECT count(*), count(*) FILTER (WHERE deleted IS NOT TRUE) FROM {}").format(
                sql.Identifier("b", endpoint.lstrip("/"))
            )
        ).fetchone()
        stored[level], not_deleted[level] = (int(row[0]), int(row[1])) if row else (0, 0)
    return {
        "stored": stored,
        "not_deleted": not_deleted,
        "source_live": live,
        "matches": not_deleted == live,
    }


def fresh_database(name: str) -> None:
    drop_database(name)
    create_database(name)


def drop(name: str) -> None:
    drop_database(name)


def _dlt_credentials(db: str) -> str:
    """``db``'s URL for dlt, which refuses credentials without a password even where the server trusts
    the connection (as the test server does): a placeholder, which such a server ignores, then."""
    uri = connection_uri(db)
    if "@" in uri and ":" not in uri.split("@", 1)[0].removeprefix("postgresql://"):
        user, rest = uri.removeprefix("postgresql://").split("@", 1)
        uri = f"postgresql://{user}:unused@{rest}"
    return uri
