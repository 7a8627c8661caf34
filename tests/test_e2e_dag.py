"""End to end: the medsync_b DAG run by Airflow (``airflow dags test``) against the simulator of B
over HTTP, A's tables in a real PostgreSQL and B's files in an S3-compatible server.

A's tables are checked row by row against what the simulator says B holds. One stack (one
simulator, one database) is shared by the scenarios of this module, in order: each scenario
starts from the state the previous one left, like successive runs in production.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from conftest import create_database, drop_database

from devstack.airflow_env import Wiring, airflow_env, dags_test, include_copy, migrate_metadata
from devstack.s3 import put_files, s3_server
from simulator import BSimulator, SimConfig

pytestmark = pytest.mark.slow

API_KEY = "e2e-key-7f3a"
BUCKET = "b-imaging-e2e"
# Sim data lies in the 5 days before BASE; incremental runs use 12-hour ticks after it.
BASE = (datetime.now(UTC) - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)
SEOUL_TICK = BASE - timedelta(hours=9)  # 00:00 Asia/Seoul, a tick of "0 0,12 * * *"


class Stack:
    def __init__(self, tmp: Path, dsn: str, dbname: str, sim: BSimulator, endpoint: str) -> None:
        self.dsn, self.sim, self.tmp, self.endpoint = dsn, sim, tmp, endpoint
        self.include = include_copy(tmp / "include", retries=0, page_size=7, merge_batch_size=13)
        wiring = Wiring.b(f"postgresql://postgres@127.0.0.1:5432/{dbname}", sim.base_url, API_KEY, endpoint, BUCKET,
                        include_dir=self.include)  # fmt: skip
        self.env = airflow_env(tmp / "airflow", wiring)
        migrate_metadata(self.env)

    def run(self, *, logical_date: datetime | None = None, **conf: Any) -> str:
        put_files(self.endpoint, BUCKET, self.sim.iter_files())  # B stores the files of new images first
        result = dags_test(self.env, logical_date=logical_date.isoformat() if logical_date else None, conf=conf)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        assert "Task failed" not in output, output[-6000:]
        assert API_KEY not in output
        for secret in self.phi_samples():
            assert secret not in output, "patient data reached the logs"
        return output

    def phi_samples(self) -> list[str]:
        """Some MRNs, family names and birth dates B holds: none may appear in any log."""
        found = []
        for rec in list(self.sim.live_records("patients"))[:5]:
            name = rec.get("name") or {}
            found += [v for v in (rec.get("mrn"), name.get("family"), rec.get("birth_date")) if v and len(v) >= 6]
        return found

    def query(self, text: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(text, args).fetchall()

    def xmins(self) -> dict[str, str]:
        rows = self.query(
            "SELECT 'subject' || id, xmin::text FROM imaging.subject UNION ALL SELECT 'study' || id, xmin::text"
            " FROM imaging.study UNION ALL SELECT 'sequence' || id, xmin::text FROM imaging.sequence"
            " UNION ALL SELECT 'instance' || id, xmin::text FROM imaging.instance"
        )
        return dict(rows)  # type: ignore[arg-type]

    def last_report(self) -> dict[str, Any]:
        return self.query("SELECT report FROM medsync.sync_run ORDER BY id DESC LIMIT 1")[0][0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, a_template_db: str) -> Iterator[Stack]:
    dbname = f"medsync_e2e_{uuid.uuid4().hex[:8]}"
    dsn = create_database(dbname, template=a_template_db)
    config = SimConfig(
        seed=7, patients=6, studies_per_patient=2, series_per_study=2, images_per_series=3,
        clock="manual", base_time=BASE.isoformat(), history_seconds=5 * 86400,
        unknown_enum_fraction=0.0, invalid_fraction=0.0,
    )  # fmt: skip
    tmp = tmp_path_factory.mktemp("e2e")
    with BSimulator(config, api_key=API_KEY) as sim, s3_server() as endpoint:
        yield Stack(tmp, dsn, dbname, sim, endpoint)
    drop_database(dbname)
    shutil.rmtree(tmp, ignore_errors=True)


# --- what B holds, in A's terms ------------------------------------------------------------------------

GENDER = {"MALE": "M", "FEMALE": "F", "OTHER": "O", "UNKNOWN": None, None: None}
STATUS = {"ORDERED": "REQUESTED", "IN_PROGRESS": "ACQUIRING", "COMPLETED": "COMPLETED", "CANCELLED": "CANCELLED"}


def expected_live_keys(sim: BSimulator) -> dict[str, set[str]]:
    """B's live records whose parents are live too: A keeps a child of a deleted parent deleted."""
    patients = {r["id"] for r in sim.live_records("patients")}
    studies = {r["id"] for r in sim.live_records("studies") if r["patient_id"] in patients}
    series = {r["id"]: r["series_uid"] for r in sim.live_records("series") if r["study_id"] in studies}
    uids = set(series.values())
    images = {r["id"] for r in sim.live_records("images") if r["series_uid"] in uids}
    return {"subject": patients, "study": studies, "sequence": set(series), "instance": images}


def assert_a_matches_b(stack: Stack) -> None:
    """Row by row: every live B record is a live A row with the agreed values, and nothing else is live."""
    sim = stack.sim
    expected = expected_live_keys(sim)
    for table, keys in expected.items():
        live = {k for (k,) in stack.query(
            f"SELECT source_key FROM imaging.{table} WHERE source_system = 'b' AND deleted_at IS NULL")}  # fmt: skip
        assert live == keys, f"{table}: missing {sorted(keys - live)[:5]}, extra {sorted(live - keys)[:5]}"
    subjects = {r[0]: r[1:] for r in stack.query(
        "SELECT source_key, patient_code, sex, birth_date::text, source_updated_at FROM imaging.subject")}  # fmt: skip
    for rec in sim.live_records("patients"):
        code, sex, birth, version = subjects[rec["id"]]
        assert (code, sex, birth) == (rec["mrn"].replace("\x00", ""), GENDER[rec.get("gender")], rec.get("birth_date"))
        assert version == datetime.fromisoformat(rec["updated_at"].replace("Z", "+00:00"))
    studies = {r[0]: r[1:] for r in stack.query(
        "SELECT st.source_key, su.source_key, st.study_uid, st.status FROM imaging.study st"
        " JOIN imaging.subject su ON su.id = st.subject_id")}  # fmt: skip
    for rec in sim.live_records("studies"):
        if rec["id"] not in expected["study"]:
            continue
        assert studies[rec["id"]] == (rec["patient_id"], rec["study_uid"], STATUS[rec["status"]])
    images = {r[0]: r[1:] for r in stack.query(
        "SELECT i.source_key, s.series_uid, i.sop_instance_uid, i.storage_bucket, i.storage_key, i.size_bytes"
        " FROM imaging.instance i JOIN imaging.sequence s ON s.id = i.sequence_id")}  # fmt: skip
    for rec in sim.live_records("images"):
        if rec["id"] not in expected["instance"]:
            continue
        assert images[rec["id"]] == (rec["series_uid"], rec["sop_uid"], BUCKET, rec["file_path"][1:], rec["file_size"])


# --- scenarios, in order ------------------------------------------------------------------------------


def test_1_full_refresh_loads_everything_and_reconciles(stack: Stack) -> None:
    output = stack.run(full_refresh=True)
    assert_a_matches_b(stack)
    report = stack.last_report()
    assert report["kind"] == "full_refresh"
    assert all(f["difference"] == 0 for f in report["levels"].values())
    assert report["files"]["checked"] > 0 and report["files"]["ok"] == report["files"]["checked"]
    assert "sync report for b" in output


def test_2_full_refresh_again_rewrites_no_row(stack: Stack) -> None:
    before = stack.xmins()
    stack.run(full_refresh=True)
    assert stack.xmins() == before
    report = stack.last_report()
    assert all(f["inserted"] == f["updated"] == 0 for f in report["levels"].values())


def test_3_incremental_window_applies_updates_deletes_undeletes_and_new_records(stack: Stack) -> None:
    sim = stack.sim
    sim.set_now(BASE + timedelta(hours=2))
    first_study = next(iter(sim.live_records("studies")))["id"]
    some_patient = list(sim.live_records("patients"))[-1]["id"]
    sim.update("patients", some_patient, mrn="MRN-CHANGED")
    gone = sim.delete("studies", first_study)
    sim.add_patient_tree(studies=1, series=1, images=2)
    sim.advance(3600)
    sim.undelete("studies", first_study, cascade=True)
    before = stack.xmins()
    # The run whose interval is [BASE, BASE + 12h) (a manual run at that tick infers that interval).
    stack.run(logical_date=SEOUL_TICK + timedelta(hours=12 + 9))
    assert_a_matches_b(stack)
    after = stack.xmins()
    rewritten = {k for k in before if before[k] != after.get(k)}
    assert 0 < len(rewritten) <= len(gone) + 2  # only what changed (+ the changed patient)
    report = stack.last_report()
    assert report["kind"] == "manual"
    assert report["levels"]["subject"]["pulled"] >= 1


def test_4_older_window_rerun_changes_nothing(stack: Stack) -> None:
    before = stack.xmins()
    stack.run(logical_date=BASE - timedelta(days=1))
    assert stack.xmins() == before
    assert_a_matches_b(stack)


def test_5_unknown_enum_is_quarantined_and_its_children_wait_until_the_mapping_is_fixed(stack: Stack) -> None:
    sim = stack.sim
    sim.set_now(BASE + timedelta(hours=14))
    series_id = next(iter(sim.live_records("series")))["id"]
    sim.update("series", series_id, modality="SPECTRAL_CT")
    new_tree = sim.add_patient_tree(studies=1, series=1, images=2)
    (new_series,) = new_tree["series"]
    sim.update("series", new_series, modality="SPECTRAL_CT")
    window_run = SEOUL_TICK + timedelta(hours=24 + 9)
    stack.run(logical_date=window_run)
    held = stack.query("SELECT source_key, reason FROM medsync.quarantine WHERE resolved_at IS NULL")
    assert {k for k, _ in held} == {series_id, new_series}
    assert all("modality: unknown value" in reason for _, reason in held)
    report = stack.last_report()
    assert report["levels"]["instance"]["pending"] == 2 and report["levels"]["sequence"]["quarantined"] == 2
    # The data engineer maps the new value; the next run (any window) fixes it.
    mapping_path = stack.include / "mappings" / "b.yaml"
    mapping = yaml.safe_load(mapping_path.read_text())
    mapping["sequence"][0]["values"]["SPECTRAL_CT"] = "CT"
    mapping_path.write_text(yaml.safe_dump(mapping))
    stack.run(logical_date=window_run)
    assert stack.query("SELECT count(*) FROM medsync.quarantine WHERE resolved_at IS NULL") == [(0,)]
    assert stack.query("SELECT modality FROM imaging.sequence WHERE source_key = %s", series_id) == [("CT",)]
    assert stack.query("SELECT count(*) FROM medsync.pending_instance") == [(0,)]
    assert_a_matches_b(stack)


def test_6_faults_are_survived_with_complete_data(stack: Stack) -> None:
    sim = stack.sim
    sim.set_now(BASE + timedelta(hours=30))
    sim.mutate_fraction(0.2, seed=3)
    sim.set_faults(throttle_every=4, retry_after=1, error_every=5, drop_every=7)
    try:
        stack.run(full_refresh=True)
        stats = sim.stats()
    finally:
        sim.set_faults()
    assert_a_matches_b(stack)
    faults = stats.get("faults", {})
    assert sum(faults.values()) >= 3, stats


def test_7_rows_of_other_sources_are_untouched(stack: Stack) -> None:
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        subject = conn.execute("SELECT id FROM imaging.subject WHERE source_system = 'b' LIMIT 1").fetchone()[0]
        conn.execute(
            "INSERT INTO imaging.subject (id, source_system, source_key, patient_code) VALUES"
            " (%s, 'a', NULL, 'A-1'), (%s, 'c', 'pat_000000000000', 'C-1')",
            (uuid.uuid4(), uuid.uuid4()),
        )
        conn.execute(
            "INSERT INTO imaging.study (id, subject_id, source_system, source_key, study_uid, status)"
            " VALUES (%s, %s, 'c', 'stu_000000000000', '9.9', 'COMPLETED')",
            (uuid.uuid4(), subject),
        )
    others = (
        "SELECT id::text, xmin::text FROM imaging.subject WHERE source_system <> 'b'"
        " UNION ALL SELECT id::text, xmin::text FROM imaging.study WHERE source_system <> 'b'"
    )
    before = dict(stack.query(others))
    stack.sim.set_now(BASE + timedelta(hours=31))
    stack.sim.delete("patients", "pat_000000000000")
    stack.run(full_refresh=True)
    after = dict(stack.query(others))
    assert after == before
    assert_a_matches_b(stack)
