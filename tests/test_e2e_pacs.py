"""End to end: the medsync_pacs DAG run by Airflow (``airflow dags test``) against a real Orthanc.

A's tables in a real PostgreSQL, A's bucket in moto's S3 server. The scenarios share one stack
and run in order, like successive runs in production: first load (files mirrored, fetched
through a presigned URL), a re-run that writes nothing, new instances through the change feed,
deletions found by the snapshot and cascaded, a re-added study restored, an unknown modality
quarantined and then fixed by the mapping file; B's and C's rows never touched.
"""

from __future__ import annotations

import io
import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pydicom
import pytest
import requests
import yaml
from botocore.config import Config
from conftest import create_database, drop_database
from pacs_fixtures import require_orthanc

from devstack.airflow_env import Wiring, airflow_env, dags_test, include_copy, migrate_metadata
from devstack.dicom_gen import Catalogue, generate
from devstack.orthanc import Orthanc, orthanc_server
from devstack.s3 import s3_server
from medsync.hooks.storage import presign_instance
from medsync.sources.dicomweb.client import multipart_first_part

pytestmark = pytest.mark.slow

BUCKET = "a-imaging-e2e"
TABLES = ("subject", "study", "sequence", "instance")


class Stack:
    def __init__(self, tmp: Path, orthanc: Orthanc, dsn: str, dbname: str, endpoint: str) -> None:
        self.orthanc, self.dsn, self.endpoint = orthanc, dsn, endpoint
        # Every minute, and each run dated two minutes ahead (see run): its interval lies after the
        # run's start, so its window is exactly [watermark, run's start): what the last run did not read.
        every_minute = {"cron": "* * * * *", "timezone": "UTC", "start_date": "2026-01-01"}
        self.include = include_copy(
            tmp / "include", source="pacs", retries=0, lookback_minutes=0, page_size=53, schedule=every_minute
        )
        self.runs = 0
        wiring = Wiring.b(f"postgresql://postgres@127.0.0.1:5432/{dbname}", "http://127.0.0.1:9", "unused", endpoint,
                        "b-unused", include_dir=self.include)  # fmt: skip
        self.env = airflow_env(tmp / "airflow", wiring)
        self.env.update(
            AIRFLOW_CONN_MEDSYNC_PACS_API=json.dumps(
                {"conn_type": "http", "host": orthanc.base_url, "login": orthanc.user, "password": orthanc.password}
            ),
            AIRFLOW_CONN_MEDSYNC_A_AWS=json.dumps(
                {
                    "conn_type": "aws",
                    "login": "testing",
                    "password": "testing",
                    "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"},
                }
            ),
            AIRFLOW_VAR_MEDSYNC_A_BUCKET=BUCKET,
            AWS_EC2_METADATA_DISABLED="true",
        )
        migrate_metadata(self.env)
        self.catalogue = Catalogue()
        self.files: dict[str, list[bytes]] = {}
        self.others: dict[str, tuple[str, Any]] = {}
        """Rows of B and C as seeded, before any run of the PACS."""

    def load(self, **args: Any) -> Catalogue:
        cat = Catalogue()
        files = list(generate(catalogue=cat, **args))
        self.orthanc.stow(files)
        self.orthanc.wait_until_stable()
        for data in files:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            self.files.setdefault(str(ds.StudyInstanceUID), []).append(data)
        self.catalogue.patients |= cat.patients
        self.catalogue.studies.update(cat.studies)
        self.catalogue.series.update(cat.series)
        self.catalogue.instances.update(cat.instances)
        return cat

    def run(self, **conf: Any) -> str:
        """One run of the DAG, as an incremental run from the last one (or ``full_refresh=True``).

        ``airflow dags test`` always gives a run a logical date, and a manual run syncs its interval
        (the minute before its date), from the watermark if that is earlier, never past the run's
        start. Dated two minutes ahead, the interval starts after the watermark, so the window is
        [watermark, start): from where the last run stopped reading until now, whatever minute the
        runs fall in. (Dated one minute ahead, the interval was the current minute: a run in the same
        minute as an earlier one re-read the whole minute, and on a fast machine that minute held
        the first load's change events.)
        """
        self.runs += 1
        ahead = (datetime.now(UTC) + timedelta(minutes=2)).replace(second=self.runs % 60, microsecond=0)
        result = dags_test(self.env, "medsync_pacs", logical_date=ahead.isoformat(), conf=conf or None)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        assert "Task failed" not in output, output[-6000:]
        assert self.orthanc.password not in output
        for phi in ("Hong^Gildong", "Gildong", "김^민준", "19960101"):
            assert phi not in output, "patient data reached the logs"
        return output

    def query(self, text: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(text, args).fetchall()

    def live(self, table: str) -> set[str]:
        rows = self.query(f"SELECT source_key FROM imaging.{table} WHERE source_system = 'pacs' AND deleted_at IS NULL")
        return {k for (k,) in rows}

    def xmins(self) -> dict[str, str]:
        rows = [r for t in TABLES for r in self.query(f"SELECT '{t}' || id, xmin::text FROM imaging.{t}")]
        return dict(rows)  # type: ignore[arg-type]

    def other_rows(self) -> dict[str, tuple[str, Any]]:
        """Every row of another source than the PACS: id -> (xmin, deleted_at)."""
        rows = [r for t in TABLES for r in self.query(
            f"SELECT '{t}:' || id, xmin::text, deleted_at FROM imaging.{t} WHERE source_system <> 'pacs'")]  # fmt: skip
        return {key: (xmin, deleted) for key, xmin, deleted in rows}

    def last_report(self) -> dict[str, Any]:
        return self.query("SELECT report FROM medsync.sync_run ORDER BY id DESC LIMIT 1")[0][0]


def _other_key(source: str, pacs_key: str, kind: str, n: int) -> str:
    return pacs_key if source == "b" else f"{kind}_{n:012d}"


def seed_other_sources(conn: psycopg.Connection, cat: Catalogue) -> None:
    """Rows of B and C at every level, a few live and one deleted per level, named like the PACS's records.

    B's keys and UIDs are the PACS's own (the same patient, study, series and images in two
    sources: A keeps them apart by source_system); C's keys are C's, its UIDs the PACS's too. The
    PACS's runs (merges, cascades, snapshot compares, restores, mirror) must never touch them.
    """
    patients = sorted(cat.patients)[:3]
    studies = sorted(cat.studies)[:3]
    series = [next(s for s, st in sorted(cat.series.items()) if st == study) for study in studies]
    images = [[i for i, s in sorted(cat.instances.items()) if s == one][:2] for one in series]
    for source in ("b", "c"):
        for n, (patient, study, one, sops) in enumerate(zip(patients, studies, series, images, strict=True)):
            deleted = datetime(2026, 1, 2, tzinfo=UTC) if n == 2 else None  # the last of each level: deleted
            subject_id, study_id, sequence_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
            conn.execute(
                "INSERT INTO imaging.subject (id, source_system, source_key, patient_code, deleted_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (subject_id, source, _other_key(source, patient, "pat", n), patient, deleted),
            )
            conn.execute(
                "INSERT INTO imaging.study (id, subject_id, source_system, source_key, study_uid, status, deleted_at)"
                " VALUES (%s, %s, %s, %s, %s, 'COMPLETED', %s)",
                (study_id, subject_id, source, _other_key(source, study, "stu", n), study, deleted),
            )
            conn.execute(
                "INSERT INTO imaging.sequence (id, study_id, source_system, source_key, series_uid, modality,"
                " deleted_at) VALUES (%s, %s, %s, %s, %s, 'CT', %s)",
                (sequence_id, study_id, source, _other_key(source, one, "acq", n), one, deleted),
            )
            for m, sop in enumerate(sops):
                conn.execute(
                    "INSERT INTO imaging.instance (id, sequence_id, source_system, source_key, sop_instance_uid,"
                    " storage_bucket, storage_key, deleted_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    (uuid.uuid4(), sequence_id, source, _other_key(source, sop, f"fil{m}", n), sop, f"{source}-bucket",
                     f"{source}/{sop}.dcm", deleted),
                )  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, a_template_db: str) -> Iterator[Stack]:
    require_orthanc()
    dbname = f"medsync_e2e_pacs_{uuid.uuid4().hex[:8]}"
    dsn = create_database(dbname, template=a_template_db)
    tmp = tmp_path_factory.mktemp("e2e_pacs")
    with orthanc_server() as orthanc, s3_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1", config=Config(signature_version="s3v4"))  # fmt: skip
        s3.create_bucket(Bucket=BUCKET)
        stack = Stack(tmp, orthanc, dsn, dbname, endpoint)
        stack.load(seed=7, patients=16)
        with psycopg.connect(dsn, autocommit=True) as conn:
            seed_other_sources(conn, stack.catalogue)
        stack.others = stack.other_rows()
        yield stack
    drop_database(dbname)
    shutil.rmtree(tmp, ignore_errors=True)


def _wado(orthanc: Orthanc, study: str, series: str, sop: str) -> bytes:
    with orthanc.session() as session:
        answer = session.get(
            f"{orthanc.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
            timeout=30,
        )
    answer.raise_for_status()
    boundary = answer.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    return b"".join(multipart_first_part(iter([answer.content]), boundary))


def test_1_first_load_mirrors_the_files_and_a_presigned_url_serves_them(stack: Stack) -> None:
    output = stack.run(full_refresh=True)
    assert "sync report for pacs" in output
    cat = stack.catalogue
    assert stack.live("subject") == cat.patients and stack.live("study") == set(cat.studies)
    assert stack.live("sequence") == set(cat.series) and stack.live("instance") == set(cat.instances)
    report = stack.last_report()
    assert all(f["difference"] == 0 for f in report["levels"].values()), report
    assert report["mirror"]["copied"] == len(cat.instances) and report["mirror"]["failed"] == 0
    assert report["files"]["checked"] > 0 and report["files"]["ok"] == report["files"]["checked"]
    instance_id, study, series, sop = stack.query(
        "SELECT i.id, st.study_uid, se.series_uid, i.sop_instance_uid FROM imaging.instance i"
        " JOIN imaging.sequence se ON se.id = i.sequence_id JOIN imaging.study st ON st.id = se.study_id"
        " WHERE i.source_system = 'pacs' LIMIT 1"
    )[0]
    env = {k: v for k, v in stack.env.items() if k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_", "MEDSYNC_"))}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with psycopg.connect(stack.dsn) as conn:
            url = presign_instance(conn, instance_id)
    assert BUCKET in url
    assert requests.get(url, timeout=30).content == _wado(stack.orthanc, study, series, sop)
    assert stack.other_rows() == stack.others


def test_2_a_rerun_writes_nothing(stack: Stack) -> None:
    before = stack.xmins()
    stack.run()
    assert stack.xmins() == before
    report = stack.last_report()
    assert all(f["inserted"] == f["updated"] == 0 for f in report["levels"].values())


def test_3_new_instances_come_through_the_change_feed(stack: Stack) -> None:
    new = stack.load(seed=21, patients=2)
    stack.run()
    windows = stack.query(
        "SELECT run_id, level, since, until, pull_counts FROM medsync.sync_run_level ORDER BY run_id DESC, level"
    )
    assert set(new.instances) <= stack.live("instance"), windows[:8]
    report = stack.last_report()
    # Read from the change feed: only the new series' instances, not a listing of everything.
    assert report["levels"]["instance"]["pulled"] == len(new.instances), windows[:8]
    assert report["mirror"]["copied"] == len(new.instances)


def test_4_deletes_found_by_the_snapshot_cascade_and_re_added_ones_are_restored(stack: Stack) -> None:
    study = sorted(stack.catalogue.studies)[1]
    series = {s for s, st in stack.catalogue.series.items() if st == study}
    instances = {i for i, s in stack.catalogue.instances.items() if s in series}
    stack.orthanc.delete("studies", study)
    stack.query("UPDATE medsync.snapshot_run SET taken_at = taken_at - interval '25 hours' RETURNING 1")
    stack.run()
    assert study not in stack.live("study")
    assert not series & stack.live("sequence") and not instances & stack.live("instance")
    deleted = stack.query(
        "SELECT count(*) FROM imaging.instance WHERE source_system = 'pacs' AND deleted_at IS NOT NULL"
    )[0][0]
    assert deleted == len(instances)
    stack.orthanc.stow(stack.files[study])
    stack.orthanc.wait_until_stable()
    stack.run()
    assert study in stack.live("study") and instances <= stack.live("instance")


def test_5_an_unknown_modality_is_quarantined_then_fixed_by_the_mapping(stack: Stack) -> None:
    new = stack.load(seed=43, patients=12, extra_modalities=("ES",))
    odd = {s for s, m in new.modalities.items() if m == "ES"}
    assert odd
    stack.run()
    held = stack.query("SELECT source_key FROM medsync.quarantine WHERE resolved_at IS NULL")
    assert {k for (k,) in held} == odd
    path = stack.include / "mappings" / "pacs.yaml"
    mapping = yaml.safe_load(path.read_text())
    mapping["sequence"][0]["values"]["ES"] = "OT"
    path.write_text(yaml.safe_dump(mapping, allow_unicode=True))
    stack.run()
    assert odd <= stack.live("sequence")
    assert stack.live("instance") == set(stack.catalogue.instances)


def test_6_rows_of_b_and_c_are_untouched(stack: Stack) -> None:
    # After a first load, a re-run, the change feed, snapshot deletes with cascades, a restore, a
    # quarantine fixed by the mapping and the mirror: B's and C's rows (every level, some sharing
    # the PACS's keys and UIDs, some deleted) have the xmin and deleted_at they were seeded with.
    assert {key.split(":")[0] for key in stack.others} == set(TABLES) and len(stack.others) >= 2 * 3 * 4
    assert any(deleted for _, deleted in stack.others.values())
    assert stack.other_rows() == stack.others
    assert not stack.query("SELECT 1 FROM medsync.mirrored_file m JOIN imaging.instance i ON i.id = m.instance_id"
                           " WHERE i.source_system <> 'pacs'")  # fmt: skip
