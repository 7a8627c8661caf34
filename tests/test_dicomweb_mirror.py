"""Files of a PACS mirrored into A's bucket (moto's S3 server) from a real Orthanc's WADO-RS, then presigned."""

from __future__ import annotations

import io
import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import psycopg
import pydicom
import pytest
import requests
from botocore.config import Config
from conftest import create_database, drop_database
from faulty_proxy import faulty_proxy
from pacs_fixtures import pacs_connection, require_orthanc

from devstack.airflow_env import include_copy
from devstack.dicom_gen import Catalogue, dataset_bytes, generate, make_instance
from devstack.orthanc import Orthanc, orthanc_server
from devstack.s3 import s3_server
from medsync import tasks
from medsync.config import LEVELS
from medsync.errors import StorageError
from medsync.hooks.storage import presign_instance
from medsync.schema import migrate
from medsync.sources.dicomweb.client import multipart_first_part
from medsync.windows import RunFacts

BUCKET = "a-imaging-mirror"


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1", config=Config(signature_version="s3v4"),
    )  # fmt: skip


def point_pacs_at(monkeypatch: pytest.MonkeyPatch, orthanc: Orthanc, base_url: str) -> None:
    """The PACS connection through another base URL (the faulty proxy), for one test."""
    monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_PACS_API", pacs_connection(orthanc, base_url))


class Stack:
    def __init__(self, orthanc: Orthanc, dsn: str, endpoint: str) -> None:
        self.orthanc, self.dsn, self.endpoint = orthanc, dsn, endpoint
        self.s3 = s3_client(endpoint)

    def sync(self, *, full_refresh: bool = False, mirror: bool = True) -> int:
        facts = RunFacts("manual", None, None, run_after=datetime.now(UTC), full_refresh=full_refresh)
        run_id = tasks.prepare("pacs", dag_run_id=f"m-{uuid.uuid4().hex[:8]}", facts=facts)["run_id"]
        for level in LEVELS:
            tasks.pull("pacs", level, run_id)
            tasks.merge("pacs", level, run_id)
        if mirror:
            tasks.mirror_files("pacs", run_id)
        return run_id

    def query(self, text: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(text, args).fetchall()

    def wado(self, study: str, series: str, sop: str) -> bytes:
        with self.orthanc.session() as session:
            answer = session.get(
                f"{self.orthanc.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}",
                headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30,
            )  # fmt: skip
        answer.raise_for_status()
        boundary = answer.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()
        return b"".join(multipart_first_part(iter([answer.content]), boundary))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, a_template_db: str) -> Iterator[Stack]:
    require_orthanc()
    dbname = f"medsync_mirror_{uuid.uuid4().hex[:8]}"
    dsn = create_database(dbname, template=a_template_db)
    tmp = tmp_path_factory.mktemp("mirror")
    # Three attempts per file (tenacity): a file that keeps failing costs 1.5 s of backoff, not 15.
    include = include_copy(tmp / "include", source="pacs", retries=0, lookback_minutes=0, max_attempts=3)
    config = include / "sources" / "pacs.yaml"
    import yaml

    raw = yaml.safe_load(config.read_text())
    raw["api"].update(multipart_threshold_mb=5, mirror_workers=3)
    config.write_text(yaml.safe_dump(raw))
    with orthanc_server() as orthanc, s3_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSYNC_INCLUDE_DIR", str(include))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AIRFLOW_CONN_MEDSYNC_A_DB", f"postgresql://postgres@127.0.0.1:5432/{dbname}")
        api = {"conn_type": "http", "host": orthanc.base_url, "login": orthanc.user, "password": orthanc.password}
        mp.setenv("AIRFLOW_CONN_MEDSYNC_PACS_API", json.dumps(api))
        mp.setenv("AIRFLOW_CONN_MEDSYNC_A_AWS", json.dumps({
            "conn_type": "aws", "login": "testing", "password": "testing",
            "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}}))  # fmt: skip
        mp.setenv("AIRFLOW_VAR_MEDSYNC_A_BUCKET", BUCKET)
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
        s = Stack(orthanc, dsn, endpoint)
        cat = Catalogue()
        orthanc.stow(generate(seed=5, patients=6, catalogue=cat))
        # One large file (about 12 MB), uploaded in parts.
        big = make_instance(
            patient={"PatientID": "BIG1", "PatientName": "Big^File"},
            study={"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1", "StudyDate": "20240101"},
            series={"SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.1.1", "Modality": "CT"},
            sop_uid="1.2.826.0.1.3680043.8.498.1.1.1", number=1,
        )  # fmt: skip
        big.Rows = big.Columns = 2500
        big.BitsAllocated = big.BitsStored = 16
        big.HighBit = 15
        big.PixelData = bytes(range(256)) * (2500 * 2500 * 2 // 256)
        orthanc.stow([dataset_bytes(big)], batch=1)
        orthanc.wait_until_stable()
        yield s
    drop_database(dbname)
    shutil.rmtree(tmp, ignore_errors=True)


def test_files_are_mirrored_and_served_through_a_presigned_url_with_as_identity(stack: Stack) -> None:
    run_id = stack.sync(full_refresh=True, mirror=False)
    stack.query("DELETE FROM medsync.request_limit RETURNING 1")
    tasks.mirror_files("pacs", run_id)
    # The copies claimed their requests from the source's run-wide limit, as the pulls do.
    assert stack.query("SELECT source_system FROM medsync.request_limit") == [("pacs",)]
    figures = stack.query("SELECT report->'mirror' FROM medsync.sync_run WHERE id = %s", run_id)[0][0]
    rows = stack.query(
        "SELECT i.id, st.study_uid, se.series_uid, i.sop_instance_uid, i.storage_bucket, i.storage_key"
        " FROM imaging.instance i JOIN imaging.sequence se ON se.id = i.sequence_id"
        " JOIN imaging.study st ON st.id = se.study_id"
    )
    assert figures["copied"] == len(rows) > 100 and figures["failed"] == 0
    big = next(r for r in rows if r[3] == "1.2.826.0.1.3680043.8.498.1.1.1")
    for instance_id, study, series, sop, bucket, key in [big, *rows[:5]]:
        assert bucket == BUCKET and key == f"pacs/{study}/{series}/{sop}.dcm"
        expected = stack.wado(study, series, sop)
        assert pydicom.dcmread(io.BytesIO(expected)).SOPInstanceUID == sop
        with psycopg.connect(stack.dsn) as conn:
            url = presign_instance(conn, instance_id)
        assert "X-Amz-Signature=" in url and "AKIA" not in url
        fetched = requests.get(url, timeout=30)
        assert fetched.status_code == 200 and fetched.content == expected
    assert len(stack.wado(*big[1:4])) > 12_000_000
    # The big file went up in parts: its ETag is a multipart one ("<md5>-<parts>").
    assert "-" in stack.s3.head_object(Bucket=BUCKET, Key=big[5])["ETag"]


def mirror_figures(run_id: int, stack: Stack) -> dict[str, Any]:
    figures: dict[str, Any] = stack.query("SELECT report->'mirror' FROM medsync.sync_run WHERE id = %s", run_id)[0][0]
    return figures


def test_a_rerun_copies_nothing_again(stack: Stack) -> None:
    (run_id,) = stack.query("SELECT max(id) FROM medsync.sync_run")[0]
    live = stack.query("SELECT count(*) FROM imaging.instance WHERE deleted_at IS NULL")[0][0]
    recorded = stack.query(
        "SELECT count(*) FROM medsync.mirrored_file m JOIN imaging.instance i ON i.id = m.instance_id"
        " AND i.storage_key = m.storage_key AND i.source_updated_at = m.source_version"
    )[0][0]
    assert recorded == live  # every copy is known, with the instance's location and version
    tasks.mirror_files("pacs", run_id)  # the first run's mirror again: nothing is unknown
    assert mirror_figures(run_id, stack)["candidates"] == 0
    # Records lost (or a copy made by a task killed before it recorded them): A's copies are
    # found equal by size and checksum, and nothing is uploaded again.
    stack.query("DELETE FROM medsync.mirrored_file WHERE instance_id IN"
                " (SELECT instance_id FROM medsync.mirrored_file LIMIT 40) RETURNING 1")  # fmt: skip
    tasks.mirror_files("pacs", run_id)
    figures = mirror_figures(run_id, stack)
    assert figures["copied"] == 0 and figures["skipped"] == figures["candidates"] == 40


def test_copies_are_read_in_batches_and_a_transient_failure_is_retried_within_the_run(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat = Catalogue()
    stack.orthanc.stow(generate(seed=14, patients=2, catalogue=cat))
    stack.orthanc.wait_until_stable()
    flaky = sorted(cat.instances)[0]
    with faulty_proxy(stack.orthanc.base_url) as proxy:
        point_pacs_at(monkeypatch, stack.orthanc, proxy.url)
        run_id = stack.sync(mirror=False)
        proxy.clear()
        proxy.fail(f"/instances/{flaky}", times=2)  # HTTP 500, twice: the source could not answer now
        with monkeypatch.context() as mp:
            mp.setattr("medsync.mirror.BATCH_SIZE", 3)  # a batch is smaller than the new files
            tasks.mirror_files("pacs", run_id)
        assert proxy.asked(f"/instances/{flaky}") == 3  # two failures, then the copy
    figures = mirror_figures(run_id, stack)
    assert figures["failed"] == 0 and figures["copied"] == figures["candidates"] == len(cat.instances) > 3
    key = stack.query("SELECT storage_key FROM imaging.instance WHERE source_key = %s", flaky)[0][0]
    assert stack.s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0


def test_a_file_that_could_not_be_copied_is_copied_by_a_later_run(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ClientError

    cat = Catalogue()
    stack.orthanc.stow(generate(seed=18, patients=2, catalogue=cat))
    stack.orthanc.wait_until_stable()
    down = sorted(cat.instances)[-1]
    with faulty_proxy(stack.orthanc.base_url) as proxy:
        point_pacs_at(monkeypatch, stack.orthanc, proxy.url)
        proxy.fail(f"/instances/{down}")  # unavailable for the whole run: every attempt fails
        with pytest.raises(StorageError, match="more files could not be copied than the allowed 0"):
            stack.sync()
        assert proxy.asked(f"/instances/{down}") == 3  # max_attempts
        first = stack.query("SELECT max(id) FROM medsync.sync_run")[0][0]
        assert mirror_figures(first, stack)["failed"] == 1
        key = stack.query("SELECT storage_key FROM imaging.instance WHERE source_key = %s", down)[0][0]
        with pytest.raises(ClientError):
            stack.s3.head_object(Bucket=BUCKET, Key=key)  # the row points at a file A does not have yet
        proxy.clear()
        # The next run has nothing new from the PACS; its mirror still copies the missing file.
        later = stack.sync()
        assert proxy.asked("/instances/") == 1
    figures = mirror_figures(later, stack)
    assert figures["candidates"] == figures["copied"] == 1 and figures["failed"] == 0
    assert stack.s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0
    assert stack.query("SELECT count(*) FROM imaging.instance WHERE source_key = %s AND updated_at >= "
                       "(SELECT started_at FROM medsync.sync_run WHERE id = %s)", down, later) == [(0,)]  # fmt: skip


def test_a_file_the_pacs_no_longer_has_is_reported_and_fails_the_run(stack: Stack) -> None:
    cat = Catalogue()
    stack.orthanc.stow(generate(seed=6, patients=1, catalogue=cat))
    stack.orthanc.wait_until_stable()
    facts = RunFacts("manual", None, None, run_after=datetime.now(UTC), full_refresh=False)
    run_id = tasks.prepare("pacs", dag_run_id=f"m-{uuid.uuid4().hex[:8]}", facts=facts)["run_id"]
    for level in LEVELS:
        tasks.pull("pacs", level, run_id)
        tasks.merge("pacs", level, run_id)
    gone = sorted(cat.instances)[0]
    stack.orthanc.delete("instances", gone)  # deleted between the listing and the copy
    with pytest.raises(StorageError, match="more files could not be copied than the allowed 0"):
        tasks.mirror_files("pacs", run_id)
    figures = stack.query("SELECT report->'mirror' FROM medsync.sync_run WHERE id = %s", run_id)[0][0]
    assert figures["failed"] == 1 and figures["copied"] == len(cat.instances) - 1
    (instance_id,) = stack.query("SELECT id::text FROM imaging.instance WHERE source_key = %s", gone)[0]
    assert figures["examples"] == [instance_id]
    assert figures["reasons"] == {"SourceApiError: HTTP 404": 1}
