"""The pacs source synced from a real Orthanc into a real PostgreSQL, through medsync's task bodies.

The task functions of ``medsync.tasks`` run in this process, in the DAG's order, with their
connections from ``AIRFLOW_CONN_*`` variables (the Airflow-run version is tests/test_e2e_pacs.py).
The scenarios share one Orthanc and one database and run in order, like successive runs.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psycopg
import pytest
import yaml
from conftest import create_database, drop_database
from faulty_proxy import FaultyProxy, faulty_proxy
from pacs_fixtures import PACS_PATIENTS, PACS_SEED, pacs_connection, require_orthanc

from devstack.airflow_env import include_copy
from devstack.dicom_gen import Catalogue, generate
from devstack.orthanc import Orthanc, orthanc_server
from medsync import tasks
from medsync.config import LEVELS
from medsync.errors import SnapshotGuardError
from medsync.schema import migrate
from medsync.windows import RunFacts

TABLE = {"subject": "subject", "study": "study", "sequence": "sequence", "instance": "instance"}


class Pacs:
    def __init__(self, orthanc: Orthanc, dsn: str, include: Path) -> None:
        self.orthanc, self.dsn, self.include = orthanc, dsn, include
        self.catalogue = Catalogue()
        self.files: dict[str, list[bytes]] = {}
        """study UID -> its files (to add a deleted study again)."""

    def load(self, **generate_args: Any) -> Catalogue:
        cat = Catalogue()
        files = list(generate(catalogue=cat, **generate_args))
        self.orthanc.stow(files)
        self.orthanc.wait_until_stable()  # its Stable* events are dated now, not during a later run
        for study, key in cat.studies.items():
            self.catalogue.studies[study] = key
        self.catalogue.patients |= cat.patients
        self.catalogue.series.update(cat.series)
        self.catalogue.instances.update(cat.instances)
        self.catalogue.modalities.update(cat.modalities)
        import io

        import pydicom

        for data in files:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            self.files.setdefault(str(ds.StudyInstanceUID), []).append(data)
        return cat

    def run(
        self, *, full_refresh: bool = False, since: datetime | None = None, until: datetime | None = None
    ) -> dict[str, Any]:
        facts = RunFacts(
            "manual", None, None, run_after=datetime.now(UTC), full_refresh=full_refresh, since=since, until=until
        )
        plan = tasks.prepare("pacs", dag_run_id=f"test-{uuid.uuid4().hex[:8]}", facts=facts)
        run_id = plan["run_id"]
        for level in LEVELS:
            tasks.pull("pacs", level, run_id)
            tasks.merge("pacs", level, run_id)
        tasks.report("pacs", run_id)
        tasks.finish("pacs", run_id)
        return self.query("SELECT report FROM medsync.sync_run WHERE id = %s", run_id)[0][0]

    def query(self, text: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(text, args).fetchall()

    def live(self, level: str) -> set[str]:
        table = TABLE[level]
        rows = self.query(f"SELECT source_key FROM imaging.{table} WHERE source_system = 'pacs' AND deleted_at IS NULL")
        return {k for (k,) in rows}

    def xmins(self) -> dict[str, str]:
        return dict(self.query(  # type: ignore[arg-type]
            "SELECT 'su' || id, xmin::text FROM imaging.subject"
            " UNION ALL SELECT 'st' || id, xmin::text FROM imaging.study"
            " UNION ALL SELECT 'se' || id, xmin::text FROM imaging.sequence"
            " UNION ALL SELECT 'in' || id, xmin::text FROM imaging.instance"))  # fmt: skip

    def pulled(self, level: str) -> int:
        row = self.query(
            "SELECT pull_counts FROM medsync.sync_run_level WHERE level = %s ORDER BY run_id DESC LIMIT 1", level
        )
        return int(row[0][0]["slice_0"]["records"])


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, a_template_db: str) -> Iterator[Pacs]:
    require_orthanc()
    dbname = f"medsync_pacs_{uuid.uuid4().hex[:8]}"
    dsn = create_database(dbname, template=a_template_db)
    tmp = tmp_path_factory.mktemp("pacs")
    # The snapshot guard's floor lowered: this PACS is small (about 30 patients).
    snapshot = {"on_full_refresh": True, "every_hours": 24, "max_delete_floor": 5}
    include = include_copy(
        tmp / "include", source="pacs", retries=0, page_size=97, merge_batch_size=500, lookback_minutes=0,
        snapshot=snapshot,
    )  # fmt: skip
    with orthanc_server() as orthanc, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSYNC_INCLUDE_DIR", str(include))
        mp.setenv("AIRFLOW_CONN_MEDSYNC_A_DB", f"postgresql://postgres@127.0.0.1:5432/{dbname}")
        mp.setenv(
            "AIRFLOW_CONN_MEDSYNC_PACS_API",
            f'{{"conn_type": "http", "host": "{orthanc.base_url}", "login": "{orthanc.user}",'
            f' "password": "{orthanc.password}"}}',
        )
        mp.setenv("AIRFLOW_VAR_MEDSYNC_A_BUCKET", "a-imaging-test")
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
            # A row of another source, which the PACS's runs must never touch.
            conn.execute(
                "INSERT INTO imaging.subject (id, source_system, source_key, patient_code)"
                " VALUES (gen_random_uuid(), 'b', 'b-1', 'P0700001')"
            )
        p = Pacs(orthanc, dsn, include)
        p.load(seed=PACS_SEED, patients=PACS_PATIENTS // 4)
        yield p
    drop_database(dbname)
    shutil.rmtree(tmp, ignore_errors=True)


def feed_reads(proxy: FaultyProxy) -> list[dict[str, str]]:
    """The /changes requests the proxy saw that read the feed (not the one that asks for its last event)."""
    reads = [dict(parse_qsl(urlsplit(p).query)) for p in proxy.paths if urlsplit(p).path == "/changes"]
    return [r for r in reads if "since" in r]


def test_1_first_load_stores_every_record_as_the_mapping_says(pacs: Pacs, monkeypatch: pytest.MonkeyPatch) -> None:
    b_before = pacs.query("SELECT xmin::text FROM imaging.subject WHERE source_system = 'b'")
    with faulty_proxy(pacs.orthanc.base_url) as proxy, monkeypatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_MEDSYNC_PACS_API", pacs_connection(pacs.orthanc, proxy.url))
        report = pacs.run(full_refresh=True)
    # Each full listing marked Orthanc's last event first; the report's count of what changed after
    # the window read the feed once for all levels, from that mark, not Orthanc's whole history.
    assert proxy.asked("/changes?last=") == 4
    assert [r["since"] for r in feed_reads(proxy)] == [str(pacs.orthanc.last_change())]
    cat = pacs.catalogue
    assert pacs.live("subject") == cat.patients
    assert pacs.live("study") == set(cat.studies)
    assert pacs.live("sequence") == set(cat.series)
    assert pacs.live("instance") == set(cat.instances)
    assert all(f["difference"] == 0 for f in report["levels"].values()), report
    # Parents linked by UID, the subject of each study made from its patient attributes.
    links = dict(pacs.query(
        "SELECT st.source_key, su.source_key FROM imaging.study st"
        " JOIN imaging.subject su ON su.id = st.subject_id"))  # fmt: skip
    assert links == cat.studies
    series = dict(pacs.query(
        "SELECT se.source_key, st.source_key FROM imaging.sequence se"
        " JOIN imaging.study st ON st.id = se.study_id"))  # fmt: skip
    assert series == cat.series
    names = {n for (n,) in pacs.query("SELECT patient_name FROM imaging.subject WHERE source_system = 'pacs'")}
    assert {"Hong^Gildong", "김^민준", "李", "Smith^Anne Marie", "^Cher", None} <= names
    keyed = pacs.query("SELECT source_key, patient_code FROM imaging.subject WHERE source_key LIKE 'HOSP_A%%'")
    assert keyed and all(key == f"HOSP_A\\{code}" for key, code in keyed)
    instance = pacs.query("SELECT storage_bucket, storage_key, content_type FROM imaging.instance LIMIT 1")[0]
    assert instance[0] == "a-imaging-test" and instance[1].startswith("pacs/") and instance[2] == "application/dicom"
    assert pacs.query("SELECT xmin::text FROM imaging.subject WHERE source_system = 'b'") == b_before


def test_2_a_rerun_writes_nothing(pacs: Pacs, monkeypatch: pytest.MonkeyPatch) -> None:
    before = pacs.xmins()
    # The full refresh marked Orthanc's last event: the next read of the feed starts there.
    last = pacs.orthanc.last_change()
    assert pacs.query("SELECT max(seq) FROM medsync.change_feed_mark") == [(last,)]
    with faulty_proxy(pacs.orthanc.base_url) as proxy, monkeypatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_MEDSYNC_PACS_API", pacs_connection(pacs.orthanc, proxy.url))
        pacs.run()  # incremental: the change feed has nothing new
    # Read once for the run's four levels, from the full refresh's mark (not from 0).
    assert [r["since"] for r in feed_reads(proxy)] == [str(last)]
    assert pacs.pulled("instance") == 0
    pacs.run(full_refresh=True)  # a full listing: every version is the kept one
    assert pacs.xmins() == before


def test_3_new_instances_are_found_through_the_change_feed(pacs: Pacs) -> None:
    new = pacs.load(seed=31, patients=3)
    report = pacs.run()
    assert set(new.instances) <= pacs.live("instance")
    assert set(new.studies) <= pacs.live("study") and new.patients <= pacs.live("subject")
    assert 0 < pacs.pulled("instance") < len(pacs.catalogue.instances)  # only what changed was fetched
    assert report["levels"]["instance"]["inserted"] == len(new.instances)
    assert all(f["difference"] == 0 for f in report["levels"].values()), report


def test_4_deletes_are_found_by_the_snapshot_and_cascade(pacs: Pacs) -> None:
    study = sorted(pacs.catalogue.studies)[0]
    children = {s for s, st in pacs.catalogue.series.items() if st == study}
    instances = {i for i, s in pacs.catalogue.instances.items() if s in children}
    pacs.orthanc.delete("studies", study)
    time.sleep(1.1)  # the next run's window starts in a later second than the last events
    pacs.run()  # the feed has no deletions, and the daily snapshot is not due yet
    assert study in pacs.live("study")
    pacs.query("UPDATE medsync.snapshot_run SET taken_at = taken_at - interval '25 hours' RETURNING 1")
    report = pacs.run()  # the snapshot is due: every level is listed whole and compared
    assert study not in pacs.live("study")
    assert not children & pacs.live("sequence") and not instances & pacs.live("instance")
    assert report["levels"]["study"]["deleted"] == 1
    ids_before = dict(pacs.query("SELECT source_key, id FROM imaging.study WHERE source_key = %s", study))
    pacs.orthanc.stow(pacs.files[study])
    pacs.orthanc.wait_until_stable()  # added again: found through the feed, restored with the same ids
    pacs.run()
    assert study in pacs.live("study") and children <= pacs.live("sequence") and instances <= pacs.live("instance")
    assert dict(pacs.query("SELECT source_key, id FROM imaging.study WHERE source_key = %s", study)) == ids_before


def test_5_an_unknown_modality_is_quarantined_then_fixed_by_the_mapping(pacs: Pacs) -> None:
    new = pacs.load(seed=41, patients=12, extra_modalities=("ES",))
    odd = {s for s, m in new.modalities.items() if m == "ES"}
    assert odd
    pacs.run()
    held = pacs.query(
        "SELECT source_key, reason FROM medsync.quarantine WHERE source_system = 'pacs' AND resolved_at IS NULL"
    )
    assert {k for k, _ in held} == odd
    assert all(reason == "Modality: unknown value 'ES' (not in the mapping file)" for _, reason in held)
    waiting = {k for (k,) in pacs.query("SELECT source_key FROM medsync.pending_instance")}
    assert waiting == {i for i, s in new.instances.items() if s in odd}
    mapping_path = pacs.include / "mappings" / "pacs.yaml"
    mapping = yaml.safe_load(mapping_path.read_text())
    mapping["sequence"][0]["values"]["ES"] = "OT"
    mapping_path.write_text(yaml.safe_dump(mapping, allow_unicode=True))
    pacs.run()
    assert odd <= pacs.live("sequence")
    assert not pacs.query("SELECT 1 FROM medsync.pending_instance")
    assert not pacs.query("SELECT 1 FROM medsync.quarantine WHERE resolved_at IS NULL")
    assert pacs.live("instance") == set(pacs.catalogue.instances)


def test_6_old_marks_are_thinned_and_a_past_window_still_starts_before_it(
    pacs: Pacs, monkeypatch: pytest.MonkeyPatch
) -> None:
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    old = [(seq, today - timedelta(days=12 - seq // 10, minutes=seq)) for seq in range(1, 30)]
    with psycopg.connect(pacs.dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM medsync.change_feed_mark WHERE seq < 30")
        for seq, when in old:
            conn.execute(
                "INSERT INTO medsync.change_feed_mark (source_system, seq, changed_at) VALUES ('pacs', %s, %s)",
                (seq, when),
            )
    pacs.orthanc.stow(generate(seed=51, patients=1))
    pacs.orthanc.wait_until_stable()
    pacs.run()  # reads the feed: old marks are pruned, the newest of each day kept
    kept = [seq for (seq,) in pacs.query("SELECT seq FROM medsync.change_feed_mark WHERE seq < 30 ORDER BY seq")]
    days = {when.date() for _, when in old}
    assert kept == sorted(max(seq for seq, when in old if when.date() == day) for day in days) == [9, 19, 29]
    # The recent marks are sparse: one per page of the feed read and one per full listing, not one per event.
    recent = pacs.query("SELECT count(*) FROM medsync.change_feed_mark WHERE seq >= 30")[0][0]
    assert 0 < recent < pacs.orthanc.last_change() / 50
    # A repair of a past window reads from the last kept mark before it, not from Orthanc's beginning.
    since = today - timedelta(days=10, hours=6)
    with faulty_proxy(pacs.orthanc.base_url) as proxy:
        monkeypatch.setenv("AIRFLOW_CONN_MEDSYNC_PACS_API", pacs_connection(pacs.orthanc, proxy.url))
        pacs.run(since=since, until=since + timedelta(hours=1))
    before_since = max(seq for seq, when in old if when < since and seq in kept)
    assert before_since == 19
    reads = feed_reads(proxy)
    assert reads and reads[0]["since"] == str(before_since)
    assert len(reads) == 1  # its first page is dated long after the window: nothing more to read


def test_7_an_outage_answering_empty_pages_deletes_nothing(pacs: Pacs, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {level: pacs.live(level) for level in LEVELS}
    pacs.query("UPDATE medsync.snapshot_run SET taken_at = taken_at - interval '25 hours' RETURNING 1")  # due
    with faulty_proxy(pacs.orthanc.base_url) as proxy, monkeypatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_MEDSYNC_PACS_API", pacs_connection(pacs.orthanc, proxy.url))
        proxy.fail("/dicom-web/", status=204)  # every QIDO-RS search answers "no content"
        with pytest.raises(SnapshotGuardError, match=r"pacs subject: the snapshot would delete \d+ of A's \d+ live"):
            pacs.run()
    assert {level: pacs.live(level) for level in LEVELS} == before
