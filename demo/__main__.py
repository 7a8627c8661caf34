"""`make demo`: services B and C synced side by side into A's tables, a full sync then an incremental one,
then a small hospital PACS (Orthanc over DICOMweb) beside them when Orthanc is installable.

What it starts (and stops at the end): a PostgreSQL database for A (``medsync_demo``), the
simulators of B's and C's APIs and an S3-compatible server holding B's bucket and C's two, all
on 127.0.0.1, and Airflow in throw-away homes (SQLite metadata, one per DAG so that the two
runs can go at the same time) that run the real ``medsync_b`` and ``medsync_c`` DAGs with
``airflow dags test``, both at once. ``MEDSYNC_DEMO_KEEP=1`` keeps the database to explore
afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import requests
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

from devstack.airflow_env import (  # noqa: E402
    SourceWiring,
    Wiring,
    airflow_env,
    dags_test,
    dags_test_command,
    include_copy,
    migrate_metadata,
)
from devstack.dicom_gen import generate  # noqa: E402
from devstack.orthanc import ensure_installed, orthanc_server  # noqa: E402
from devstack.s3 import put_files, put_objects, s3_server  # noqa: E402
from medsync.report import format_report  # noqa: E402
from simulator import BSimulator, SimConfig  # noqa: E402
from simulator_c import CSimulator, FaultConfig  # noqa: E402
from simulator_c import SimConfig as CSimConfig  # noqa: E402

ADMIN_DSN = os.environ.get("MEDSYNC_DEMO_PG", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
DB = os.environ.get("MEDSYNC_DEMO_DB", "medsync_demo")  # another name when several people share one server
API_KEY = "demo-key-not-secret"
C_TOKEN = "demo-c-token-not-secret"
BUCKET = "b-imaging-demo"
SOURCES = ("b", "c")
A_BUCKET = "a-imaging-demo"
AIRFLOW_PAGE_URL = "http://127.0.0.1:8080/plugin/medsync"
"""The medsync page of the local Airflow that ``make airflow`` starts (tests/airflow_stack.py serve)."""


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def last_tick(now: datetime) -> datetime:
    """The last 00:00 or 12:00 Asia/Seoul (UTC+9) before ``now``: the schedule's ticks."""
    seoul = now + timedelta(hours=9)
    tick = seoul.replace(hour=12 if seoul.hour >= 12 else 0, minute=0, second=0, microsecond=0)
    return tick - timedelta(hours=9)


def recreate_database() -> str:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB)))
    params = psycopg.conninfo.conninfo_to_dict(ADMIN_DSN)
    params["dbname"] = DB
    dsn = psycopg.conninfo.make_conninfo(**params)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((ROOT / "include" / "sql" / "a_schema.sql").read_text())
    return dsn


def run_dags(envs: dict[str, dict[str, str]], what: str, *, logical_date: str | None = None,
             conf: dict[str, object] | None = None) -> None:  # fmt: skip
    """Runs medsync_b and medsync_c at the same time (one ``airflow dags test`` each) and waits for both."""
    started = time.monotonic()
    procs = {
        source: subprocess.Popen(
            dags_test_command(f"medsync_{source}", logical_date=logical_date, conf=conf),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for source, env in envs.items()
    }
    failed = []
    for source, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            print(out[-8000:])
            failed.append(source)
    if failed:
        raise SystemExit(f"the {what} run of {', '.join(failed)} failed (its log is above)")
    print(f"{what}: both DAG runs succeeded in {time.monotonic() - started:.0f}s (Airflow start-up included)")


def show_report(dsn: str, source: str) -> None:
    with psycopg.connect(dsn) as conn:
        (report,) = conn.execute(
            "SELECT report FROM medsync.sync_run WHERE source_system = %s ORDER BY id DESC LIMIT 1", (source,)
        ).fetchone() or (None,)
    print(format_report(report))


def explain_reports() -> None:
    print(
        "(difference = A's live rows - the source's live records now. Held-back records (quarantined),\n"
        " their children waiting for them (pending) and children of deleted parents explain it.)"
    )


def show_state(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        print("quarantined records (reason only; payloads stay in medsync.quarantine):")
        for source, level, key, reason in conn.execute(
            "SELECT source_system, level, source_key, reason FROM (SELECT *, row_number() OVER (PARTITION BY"
            " source_system, level ORDER BY source_key) AS n FROM medsync.quarantine WHERE resolved_at IS NULL) q"
            " WHERE n <= 1 ORDER BY 1, 2, 3"
        ):
            print(f"  {source} {level:<9} {key:<36} {reason[:80]}")
        print("a few sequences in A (B's KNEE_LEFT etc. became body_part + laterality):")
        for row in conn.execute(
            "SELECT source_key, modality, body_part, laterality, deleted_at IS NOT NULL FROM imaging.sequence"
            " WHERE source_system = 'b' AND laterality IS NOT NULL ORDER BY source_key LIMIT 4"
        ):
            print("  {:<18} modality={} body_part={} laterality={} deleted={}".format(*row))


def presign_one(dsn: str, env: dict[str, str], source: str) -> None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT id, storage_bucket, storage_key FROM imaging.instance"
            " WHERE source_system = %s AND deleted_at IS NULL ORDER BY source_key LIMIT 1",
            (source,),
        ).fetchone()
    assert row is not None
    instance_id, bucket, key = row
    out = subprocess.run(
        [sys.executable, "-m", "medsync.presign_cli", str(instance_id)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"presigning failed: {out.stderr.strip()}")
    url = out.stdout.strip()
    body = requests.get(url, timeout=30).content
    print(f"{source}'s instance {instance_id} -> s3://{bucket}/{key}")
    print(f"presigned GET (expires in 5 min): {url[:100]}...")
    print(f"fetched {len(body)} bytes; DICOM marker present: {body[128:132] == b'DICM'}")


def run_dag(env: dict[str, str], what: str, **kwargs: Any) -> None:
    started = time.monotonic()
    result = dags_test(env, **kwargs)
    if result.returncode != 0:
        print(result.stdout[-8000:], result.stderr[-4000:], sep="\n")
        raise SystemExit(f"the {what} run failed (its log is above)")
    print(f"{what}: DAG run succeeded in {time.monotonic() - started:.0f}s (Airflow start-up included)")


def sync_pacs(env: dict[str, str], dsn: str, endpoint: str, workdir: Path) -> None:
    """A small Orthanc (DICOMweb) synced beside B, its files mirrored into A's bucket; skipped when not installable."""
    reason = ensure_installed()
    if reason:
        print(f"the PACS part is skipped: {reason}")
        return
    import boto3
    from botocore.config import Config

    with orthanc_server() as orthanc:
        stored = orthanc.stow(generate(seed=2026, patients=10))
        orthanc.wait_until_stable()
        print(f"a private Orthanc at {orthanc.base_url} (DICOMweb plugin) holds {stored} synthetic instances")
        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
            region_name="us-east-1", config=Config(signature_version="s3v4"),
        ).create_bucket(Bucket=A_BUCKET)  # fmt: skip
        pacs_env = {
            **env,
            "AIRFLOW_CONN_MEDSYNC_PACS_API": json.dumps(
                {"conn_type": "http", "host": orthanc.base_url, "login": orthanc.user, "password": orthanc.password}
            ),
            "AIRFLOW_CONN_MEDSYNC_A_AWS": env["AIRFLOW_CONN_MEDSYNC_B_AWS"],
            "AIRFLOW_VAR_MEDSYNC_A_BUCKET": A_BUCKET,
        }
        step("run 3: medsync_pacs with full_refresh=true (QIDO-RS listings, files copied from WADO-RS into A's bucket)")
        run_dag(pacs_env, "PACS full refresh", dag_id="medsync_pacs", conf={"full_refresh": True})
        show_report(dsn, "pacs")
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                "SELECT source_system, count(*) FILTER (WHERE deleted_at IS NULL) FROM imaging.instance GROUP BY 1"
            ).fetchall()
        print("live instances in A per source:", dict(rows))


def airflow_homes(workdir: Path, wiring: Wiring) -> dict[str, dict[str, str]]:
    """One Airflow home per DAG (SQLite takes one writer at a time), each knowing every connection."""
    envs = {source: airflow_env(workdir / f"airflow_{source}", wiring) for source in SOURCES}
    with ThreadPoolExecutor(len(envs)) as pool:
        list(pool.map(migrate_metadata, envs.values()))
    return envs


def where_to_look(keep: bool) -> None:
    step("done")
    print("The report of every run is in medsync.sync_run.report; A's rows are in imaging.*.")
    print(
        "To look at runs, quarantine and pending records in the Airflow UI: `make airflow`, then open\n"
        f"{AIRFLOW_PAGE_URL} (user admin, password admin; the medsync entry of the navigation)."
    )
    if keep:
        print(f"Database kept: psql -h 127.0.0.1 -U postgres {DB}")


def main() -> None:
    now = datetime.now(UTC)
    tick = last_tick(now)
    base_time = (tick - timedelta(hours=6)).isoformat()
    config = SimConfig(
        seed=2026, patients=40, studies_per_patient=3, series_per_study=3, images_per_series=8,
        clock="manual", base_time=base_time, unknown_enum_fraction=0.01, invalid_fraction=0.005,
    )  # fmt: skip
    c_config = CSimConfig(
        seed=2026, participants=20, visits_per_participant=2, acquisitions_per_visit=2, files_per_acquisition=4,
        clock="manual", base_time=base_time, history_seconds=20 * 86400, invalid_fraction=0.01,
        deleted_fraction=0.01, late_parent_fraction=0.05,
    )  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="medsync-demo-"))
    keep = os.environ.get("MEDSYNC_DEMO_KEEP") == "1"
    try:
        step(f"service A's database: {DB} on 127.0.0.1:5432 with A's tables")
        dsn = recreate_database()
        with (
            BSimulator(config, api_key=API_KEY) as sim,
            CSimulator(c_config, token=C_TOKEN, faults=FaultConfig()) as csim,  # C's 10 requests/s limit on
            s3_server() as endpoint,
        ):
            sim.set_faults(rate_limit_per_second=20)  # as B's real API
            step(f"simulated B at {sim.base_url}: {sim.counts()}")
            c_counts = {k: v for k, v in csim.counts().items() if k != "as_of"}
            step(f"simulated C at {csim.base_url}: {c_counts}")
            put_files(endpoint, BUCKET, sim.iter_files())
            print(f"B's image files are in s3://{BUCKET} on {endpoint}")
            print(f"C's files: {put_objects(endpoint, csim.iter_files())} objects per bucket")
            include = include_copy(workdir / "include", (*SOURCES, "pacs"), retries=0)
            wiring = Wiring(
                f"postgresql://postgres@127.0.0.1:5432/{DB}",
                (SourceWiring("b", sim.base_url, API_KEY, endpoint, bucket=BUCKET),
                 SourceWiring("c", csim.base_url, C_TOKEN, endpoint)),
                include_dir=include,
            )  # fmt: skip
            step("Airflow: throw-away homes with SQLite metadata databases (one per DAG)")
            envs = airflow_homes(workdir, wiring)

            step("run 1: medsync_b and medsync_c at the same time, with full_refresh=true (the first load)")
            run_dags(envs, "full refresh", conf={"full_refresh": True})
            for source in SOURCES:
                show_report(dsn, source)
            explain_reports()
            show_state(dsn)

            step(f"B and C change things at {(tick - timedelta(hours=1)).isoformat()}: updates, deletes, new records")
            sim.set_now(tick - timedelta(hours=1))
            csim.set_now(tick - timedelta(hours=1))
            for name, source_sim in (("B", sim), ("C", csim)):
                changed = source_sim.mutate_fraction(0.03, seed=11)
                print(name, {kind: sum(v.values()) for kind, v in changed.items()})
            put_files(endpoint, BUCKET, sim.iter_files())
            put_objects(endpoint, csim.iter_files())

            step(f"run 2: both DAGs for the 12 hours until {tick.isoformat()} (an incremental window)")
            run_dags(envs, "incremental", logical_date=now.isoformat())
            for source in SOURCES:
                show_report(dsn, source)

            step("presigned URLs for one synced instance of each source, from the command line (medsync.presign_cli)")
            for source in SOURCES:
                presign_one(dsn, envs[source], source)

            step("a hospital PACS beside B and C: Orthanc over DICOMweb")
            sync_pacs(envs["b"], dsn, endpoint, workdir)
        where_to_look(keep)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if not keep:
            with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB)))


if __name__ == "__main__":
    main()
