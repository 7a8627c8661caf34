"""End to end for source C: the simulator of C over HTTP -> medsync -> A's tables in a real PostgreSQL,
C's files in an S3-compatible server (moto, server mode) in both of C's buckets.

Two paths, one set of expectations (``c_expected``, written from ``shared/contracts/c-to-a.md``):

- **task bodies** (most scenarios): ``medsync.tasks.prepare/pull/merge/check_files/report/finish``
  called in this process in the DAG's order, with every connection and Variable from
  ``AIRFLOW_CONN_*``/``AIRFLOW_VAR_*`` as in a worker. One simulator and one database are shared by
  the scenarios in order, each starting from the state the previous one left, like successive
  runs in production;
- **the real DAG** (``@pytest.mark.slow``): ``medsync_c`` run by Airflow with ``airflow dags test``,
  few runs that each combine several scenarios (each run costs Airflow's start-up).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from c_expected import LEVEL_RESOURCE, Expected, a_rows, assert_a_matches_c, millis
from conftest import create_database, drop_database

from devstack.airflow_env import SourceWiring, Wiring, connection_env, include_copy
from devstack.s3 import put_objects, s3_server
from medsync import tasks
from medsync.config import LEVELS
from medsync.windows import RunFacts
from simulator_c import CSimulator, FaultConfig, SimConfig

TOKEN = "c-e2e-token-9QmZ"
C_KEYS = ("AKIDMEDSYNCC0000TEST", "c-secret/Key+with=odd chars 9876543210")  # C's AWS identity (moto takes any)
BUCKETS = ("c-archive-eu-1", "c-archive-eu-2")  # include/sources/c.yaml: bucket + allowed_buckets
# C's data lies in the 10 days before BASE (the simulator's manual clock starts there); the runs'
# 12-hour windows after it all end before the wall clock's now, as real windows do.
BASE = (datetime.now(UTC) - timedelta(days=6)).replace(hour=0, minute=0, second=0, microsecond=0)


def sim_config(**overrides: Any) -> SimConfig:
    """A small C with everything awkward the contract allows: odd names and text, NULs, nulls, shared
    ``modified`` values, files in both buckets, late parents, records deleted during the history
    (children left pointing at them) and records A must hold back."""
    base: dict[str, Any] = dict(
        seed=11, participants=8, visits_per_participant=2, acquisitions_per_visit=2, files_per_acquisition=3,
        clock="manual", base_time=BASE.isoformat(), history_seconds=10 * 86400,
        awkward_fraction=0.3, null_fraction=0.15, nul_fraction=0.05, late_parent_fraction=0.2,
        deleted_fraction=0.05, invalid_fraction=0.04,
    )  # fmt: skip
    base.update(overrides)
    return SimConfig(**base)


@dataclass
class Run:
    """One pipeline run's figures."""

    plan: dict[str, Any]
    pulls: dict[str, dict[str, Any]]
    merges: dict[str, dict[str, Any]]
    files: dict[str, Any]
    report: dict[str, Any]


class Pipeline:
    """medsync's task bodies against one simulator of C, one A database and one S3 server."""

    def __init__(
        self, dsn: str, dbname: str, sim: CSimulator, endpoint: str, include: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.dsn, self.sim, self.endpoint, self.include = dsn, sim, endpoint, include
        self.monkeypatch = monkeypatch
        """Lasts as long as the module's stack (the env of a worker; a mapping change is for good)."""
        c = SourceWiring(
            "c", sim.base_url, TOKEN, endpoint, bucket=BUCKETS[0], allowed_buckets=BUCKETS[1:], aws_keys=C_KEYS
        )
        self.wiring = Wiring(f"postgresql://postgres@127.0.0.1:5432/{dbname}", (c,), include_dir=include)
        self.runs = 0

    def env(self) -> dict[str, str]:
        return {**connection_env(self.wiring), "MEDSYNC_INCLUDE_DIR": str(self.include)}

    def seed_files(self) -> dict[str, int]:
        """C writes a file's object before it lists the file."""
        return put_objects(self.endpoint, self.sim.iter_files())

    def run(
        self,
        *,
        full_refresh: bool = False,
        interval: tuple[datetime, datetime] | None = None,
        run_type: str = "manual",
        run_after: datetime | None = None,
    ) -> Run:
        """prepare -> pull every level -> merge every level (parents first) -> check_files -> report -> finish."""
        self.seed_files()
        self.runs += 1
        facts = RunFacts(
            airflow_run_type=run_type,
            data_interval_start=interval[0] if interval else None,
            data_interval_end=interval[1] if interval else None,
            run_after=run_after or millis(self.sim.now_ms()) + timedelta(seconds=1),
            full_refresh=full_refresh,
        )
        plan = tasks.prepare("c", dag_run_id=f"t{self.runs}_{uuid.uuid4().hex[:6]}", facts=facts)
        run_id = plan["run_id"]
        pulls = {level: tasks.pull("c", level, run_id) for level in LEVELS}
        merges = {level: tasks.merge("c", level, run_id) for level in LEVELS}
        files = tasks.check_files("c", run_id)
        tasks.report("c", run_id)
        tasks.finish("c", run_id)
        return Run(plan, pulls, merges, files, self.last_report())

    def conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn)

    def query(self, text: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.conn() as conn:
            return conn.execute(text, args).fetchall()

    def check(self, kept: frozenset[str] = frozenset()) -> Expected:
        with self.conn() as conn:
            return assert_a_matches_c(conn, self.sim, kept=kept)

    def xmins(self, where: str = "true") -> dict[tuple[str, str, str], str]:
        """(table, source_system, source_key or id) -> xmin of every row of A's tables (``where`` filters)."""
        return {
            (t, system, key): xmin
            for t in LEVELS
            for system, key, xmin in self.query(
                f"SELECT source_system, coalesce(source_key, id::text), xmin::text FROM imaging.{t} WHERE {where}"
            )
        }

    def row(self, level: str, key: str) -> tuple[Any, ...] | None:
        """(live?, deleted_at) of C's row ``key``, or None."""
        found = self.query(
            f"SELECT deleted_at IS NULL, deleted_at FROM imaging.{level} WHERE source_system = 'c' AND source_key = %s",
            key,
        )
        return found[0] if found else None

    def last_report(self) -> dict[str, Any]:
        (row,) = self.query("SELECT report FROM medsync.sync_run WHERE source_system = 'c' ORDER BY id DESC LIMIT 1")
        return row[0]

    def open_quarantine(self) -> dict[str, str]:
        return dict(self.query("SELECT source_key, reason FROM medsync.quarantine WHERE resolved_at IS NULL"
                               " AND source_system = 'c'"))  # fmt: skip

    def pending(self, level: str) -> set[str]:
        return {k for (k,) in self.query(f"SELECT source_key FROM medsync.pending_{level} WHERE source_system = 'c'")}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, a_template_db: str) -> Iterator[Pipeline]:
    dbname = f"medsync_e2ec_{uuid.uuid4().hex[:8]}"
    dsn = create_database(dbname, template=a_template_db)
    tmp = tmp_path_factory.mktemp("e2e_c")
    # Small pages and batches so that a run makes many requests and batches; C's own rate limit
    # is off and the client's pace high, so the tests do not sit out 10 requests/s.
    include = include_copy(tmp / "include", "c", page_size=5, merge_batch_size=7, rate_limit_per_second=500,
                           max_backoff_seconds=0.2, retries=0)  # fmt: skip
    with (
        CSimulator(sim_config(), token=TOKEN, faults=FaultConfig(rate_limit=None)) as sim,
        s3_server() as endpoint,
        pytest.MonkeyPatch.context() as mp,
    ):
        p = Pipeline(dsn, dbname, sim, endpoint, include, mp)
        for name, value in p.env().items():
            mp.setenv(name, value)
        yield p
    drop_database(dbname)
    shutil.rmtree(tmp, ignore_errors=True)


# --- scenarios, in order ---------------------------------------------------------------------------


def test_1_first_load_holds_exactly_cs_live_records_field_by_field(pipeline: Pipeline) -> None:
    run = pipeline.run(full_refresh=True)
    want = pipeline.check()
    report = run.report
    assert report["kind"] == "full_refresh"
    # The simulated history has everything the first load must meet.
    assert all(want.live[level] for level in LEVELS)
    assert sum(map(len, want.held_back.values())) >= 3, want.held_back
    assert sum(map(len, want.waiting.values())) >= 1, "no child of a deleted or held-back parent"
    assert len({row[3] for row in want.live["instance"].values()}) == 2, "files in both buckets"
    # Held back: exactly the simulator's defects, each with its reason; their children wait.
    held = pipeline.open_quarantine()
    assert set(held) == {u for d in want.held_back.values() for u in d}
    for level in LEVELS[1:]:
        assert want.waiting[level] <= pipeline.pending(level) | set(held), level
    for level, figures in report["levels"].items():
        assert figures["source_live"] == pipeline.sim.counts()[LEVEL_RESOURCE[level]]
        assert figures["a_live"] == len(want.live[level])
    assert run.files["checked"] > 0 and run.files["ok"] == run.files["checked"], run.files


def window(n: int) -> tuple[datetime, datetime]:
    """The n-th 12-hour interval after BASE (manual runs with a data interval, as the DAG plans them)."""
    return BASE + timedelta(hours=12 * n), BASE + timedelta(hours=12 * (n + 1))


def rewritten(before: dict[Any, str], after: dict[Any, str]) -> set[Any]:
    return {k for k, x in before.items() if after.get(k) != x}


def descendants(sim: CSimulator, level: str, key: str) -> dict[str, set[str]]:
    """C's live records under ``key`` (a record of ``level``), per level below it."""
    out: dict[str, set[str]] = {}
    parents = {key}
    for child in LEVELS[LEVELS.index(level) + 1 :]:
        field = {"study": "participant", "sequence": "visit", "instance": "acquisition"}[child]
        parents = {r["uuid"] for r in sim.live_records(LEVEL_RESOURCE[child]) if r[field] in parents}
        out[child] = parents
    return out


def a_stored(p: Pipeline, level: str) -> list[str]:
    """Live C rows of a level, in key order (so that picks are deterministic)."""
    with p.conn() as conn:
        return sorted(a_rows(conn, level))


def test_2_a_full_refresh_again_rewrites_no_row(pipeline: Pipeline) -> None:
    before = pipeline.xmins()
    run = pipeline.run(full_refresh=True)
    assert pipeline.xmins() == before
    assert all(f["inserted"] == f["updated"] == 0 for f in run.report["levels"].values())
    pipeline.check()


def test_3_an_incremental_window_applies_updates_moves_merges_deletes_and_new_records(pipeline: Pipeline) -> None:
    sim, p = pipeline.sim, pipeline
    sim.set_now(BASE + timedelta(hours=1))
    subjects = a_stored(p, "subject")
    renamed, merged_away, merged_into = subjects[0], subjects[1], subjects[2]
    sim.update("participants", renamed, display_name="  de la Cruz ,Ana^María=Luz ")
    moved_file = a_stored(p, "instance")[0]
    sim.move_file(moved_file)
    moved_visits = set(sim.merge_participants(merged_away, merged_into)["moved"])
    gone_visit = next(v for v in a_stored(p, "study") if v not in moved_visits)
    cascade = descendants(sim, "study", gone_visit)
    sim.delete("visits", gone_visit)
    new = sim.add_participant_tree(visits=1, acquisitions=2, files=2)
    before = p.xmins("source_system = 'c'")
    run = p.run(interval=window(0))
    want = p.check()
    assert new["participant"] in want.live["subject"] and set(new["files"]) <= set(want.live["instance"])
    assert want.live["subject"][renamed][1] == "de la Cruz^Ana María Luz"
    changed = {renamed, moved_file, merged_away, gone_visit, *moved_visits, *cascade["sequence"], *cascade["instance"]}
    # Levels merge parents first: the merged-away participant's deletion cascades to the visits A
    # still holds under it, and the visits' own move (next level) brings them and theirs back. So
    # their descendants may be written too, and end as they were (checked above).
    under_moved = {k for v in moved_visits for keys in descendants(sim, "study", v).values() for k in keys}
    written = {key for _t, _s, key in rewritten(before, p.xmins("source_system = 'c'"))}
    assert changed <= written <= changed | under_moved
    # The deleted visit's acquisitions and files went with it, at its deletion time.
    (item,) = [i for i in sim.deletions() if i["uuid"] == gone_visit]
    for level in ("sequence", "instance"):
        for key in cascade[level]:
            assert p.row(level, key) == (False, millis(item["deleted"]))
    assert run.report["kind"] == "manual"
    assert run.report["levels"]["subject"]["deleted"] == 1
    assert run.report["levels"]["instance"]["deleted"] >= len(cascade["instance"])


def test_4_an_older_window_run_again_changes_nothing(pipeline: Pipeline) -> None:
    before = pipeline.xmins()
    pipeline.run(interval=(BASE - timedelta(days=4), BASE - timedelta(days=3, hours=12)), run_type="backfill")
    assert pipeline.xmins() == before
    pipeline.check()


def test_5_deletions_from_the_feed_cascade_and_restores_bring_back_what_they_deleted(pipeline: Pipeline) -> None:
    sim, p = pipeline.sim, pipeline
    subject = a_stored(p, "subject")[3]
    tree = descendants(sim, "subject", subject)
    assert tree["instance"], "pick a participant with files"
    acquisition = sorted(tree["sequence"])[0]
    own_file = sorted(descendants(sim, "sequence", acquisition)["instance"])[0]
    sim.set_now(window(1)[0] + timedelta(hours=1))
    own = sim.delete("files", own_file)  # a tombstone of its own, in one window ...
    p.run(interval=window(1))
    assert own is not None and p.row("instance", own_file) == (False, millis(own["deleted"]))
    sim.set_now(window(2)[0] + timedelta(hours=1))
    root = sim.delete("participants", subject)  # ... then the whole tree by its root, in the next
    assert root is not None
    p.run(interval=window(2))
    p.check()
    assert p.row("subject", subject) == (False, millis(root["deleted"]))
    for level, keys in tree.items():
        for key in keys - {own_file}:
            assert p.row(level, key) == (False, millis(root["deleted"])), (level, key)
    assert p.row("instance", own_file) == (False, millis(own["deleted"]))

    # C restores the participant: everything deleted only because of it comes back; the file with
    # a tombstone of its own stays deleted, at its own deletion time.
    sim.set_now(window(3)[0] + timedelta(hours=1))
    sim.restore("participants", subject)
    run = p.run(interval=window(3))
    p.check()
    assert p.row("subject", subject) == (True, None)
    for level, keys in tree.items():
        for key in keys - {own_file}:
            assert p.row(level, key) == (True, None), (level, key)
    assert p.row("instance", own_file) == (False, millis(own["deleted"]))
    assert run.report["levels"]["subject"]["inserted"] == 0


def test_6_an_unknown_code_is_quarantined_and_fixed_by_a_mapping_change(pipeline: Pipeline) -> None:
    import c_expected

    sim, p = pipeline.sim, pipeline
    sim.set_now(window(4)[0] + timedelta(hours=1))
    stored = a_stored(p, "sequence")[0]
    with p.conn() as conn:
        stored_row = a_rows(conn, "sequence")[stored]
    sim.update("acquisitions", stored, modality="spectral_ct")
    new = sim.add_participant_tree(visits=1, acquisitions=1, files=2)
    (new_acq,) = new["acquisitions"]
    sim.update("acquisitions", new_acq, modality="spectral_ct")
    defects = set(p.open_quarantine())
    p.run(interval=window(4))
    held = {k: r for k, r in p.open_quarantine().items() if k not in defects}
    assert set(held) == {stored, new_acq}
    assert all(r.startswith("modality: unknown value") for r in held.values()), held
    assert set(new["files"]) <= p.pending("instance")
    with p.conn() as conn:
        assert a_rows(conn, "sequence")[stored] == stored_row  # A keeps the last good version
    p.check(kept=frozenset({stored, new_acq, *new["files"]}))

    # The data engineer maps the new code in the include copy; the next run fixes both records
    # and links the files that waited for the new acquisition.
    path = p.include / "mappings" / "c.yaml"
    mapping = yaml.safe_load(path.read_text())
    next(e for e in mapping["sequence"] if e["field"] == "modality")["values"]["spectral_ct"] = "CT"
    path.write_text(yaml.safe_dump(mapping, allow_unicode=True))
    p.monkeypatch.setitem(c_expected.MODALITY, "spectral_ct", "CT")  # the expectation follows the mapping
    p.run(interval=window(4))
    assert set(p.open_quarantine()) == defects
    assert p.query("SELECT modality FROM imaging.sequence WHERE source_key = %s", stored) == [("CT",)]
    assert not set(new["files"]) & p.pending("instance")
    want = p.check()
    assert set(new["files"]) <= set(want.live["instance"])


def test_7_orphans_wait_pending_and_are_linked_when_their_parent_arrives(pipeline: Pipeline) -> None:
    sim, p = pipeline.sim, pipeline
    start, end = window(5)
    sim.set_now(start + timedelta(hours=1))
    new = sim.add_participant_tree(visits=1, acquisitions=1, files=2)
    (acq,) = new["acquisitions"]
    sim.set_now(end + timedelta(minutes=30))
    sim.update("acquisitions", acq, notes="re-read after QA")  # the parent's version now lies after the window
    p.run(interval=(start, end))
    assert p.row("sequence", acq) is None
    assert set(new["files"]) <= p.pending("instance")
    assert all(p.row("instance", f) is None for f in new["files"])
    p.check(kept=frozenset({acq, *new["files"]}))
    run = p.run(interval=window(6))
    assert p.row("sequence", acq) == (True, None)
    assert not set(new["files"]) & p.pending("instance")
    assert all(p.row("instance", f) == (True, None) for f in new["files"])
    assert run.report["levels"]["instance"]["inserted"] >= 2
    p.check()


def test_8_faults_are_survived_with_complete_data(pipeline: Pipeline) -> None:
    sim, p = pipeline.sim, pipeline
    sim.set_now(window(7)[0] + timedelta(hours=1))
    sim.mutate_fraction(0.2, seed=5)
    sim.reset_stats()
    sim.set_faults(
        rate_limit=None, throttle_every=5, throttle_retry_after=1, unavailable_every=7, unavailable_retry_after=1,
        drop_every=6, drop_mode="mid_body", expire_every=2, max_faults=30,
    )  # fmt: skip
    try:
        run = p.run(full_refresh=True)
        faults = sim.stats()["faults"]
    finally:
        sim.set_faults(rate_limit=None)
    p.check()
    assert faults["throttle"] > 0 and faults["unavailable"] > 0 and faults["drop"] > 0 and faults["expire"] > 0, faults
    assert all(f["difference"] is not None for f in run.report["levels"].values())


def test_9_a_bucket_that_is_not_allowed_is_held_back(pipeline: Pipeline) -> None:
    sim, p = pipeline.sim, pipeline
    sim.set_now(window(8)[0] + timedelta(hours=1))
    acquisition = a_stored(p, "sequence")[1]
    added = sim.add("files", parent=acquisition)["uuid"]
    sim.make_invalid("files", added, "bucket_not_allowed")
    stored = a_stored(p, "instance")[2]
    with p.conn() as conn:
        stored_row = a_rows(conn, "instance")[stored]
    sim.make_invalid("files", stored, "bucket_not_allowed")
    bad_bucket = sim.get("files", added)["object"]["bucket"]
    assert bad_bucket not in BUCKETS
    p.run(interval=window(8))
    held = p.open_quarantine()
    for key in (added, stored):
        assert held[key] == "object.bucket: is not one of the buckets allowed for this source"
    assert p.row("instance", added) is None
    with p.conn() as conn:
        assert a_rows(conn, "instance")[stored] == stored_row  # the last allowed location stays
    p.check(kept=frozenset({stored}))


def test_10_rows_of_other_sources_are_untouched(pipeline: Pipeline) -> None:
    sim, p = pipeline.sim, pipeline
    victim = a_stored(p, "subject")[4]
    with psycopg.connect(p.dsn, autocommit=True) as conn:
        a_subject, b_subject = uuid.uuid4(), uuid.uuid4()
        conn.execute(
            "INSERT INTO imaging.subject (id, source_system, source_key, patient_code) VALUES"
            " (%s, 'a', NULL, 'A-1'), (%s, 'b', %s, 'B-1')",
            (a_subject, b_subject, victim),  # B happens to use the same key as one of C's participants
        )
        conn.execute(
            "INSERT INTO imaging.study (id, subject_id, source_system, source_key, study_uid, status)"
            " VALUES (%s, %s, 'b', 'stu_1', '9.9', 'COMPLETED'), (%s, %s, 'a', NULL, '9.8', 'REQUESTED')",
            (uuid.uuid4(), b_subject, uuid.uuid4(), a_subject),
        )
    before = p.xmins("source_system <> 'c'")
    sim.set_now(window(9)[0] + timedelta(hours=1))
    sim.delete("participants", victim)
    sim.update("participants", a_stored(p, "subject")[5], sex="x")
    p.run(interval=window(9))
    p.run(full_refresh=True)
    assert p.xmins("source_system <> 'c'") == before
    assert p.query("SELECT deleted_at FROM imaging.subject WHERE source_system = 'b'") == [(None,)]
    assert p.row("subject", victim)[0] is False
    p.check(kept=frozenset(_kept_by_test_9(p)))


def _kept_by_test_9(p: Pipeline) -> set[str]:
    """The stored file test 9 made unstorable (A keeps its last allowed version)."""
    held = p.open_quarantine()
    return {k for k, r in held.items() if r.startswith("object.bucket:") and p.row("instance", k) is not None}


def test_11_presigned_urls_for_cs_instances_in_both_buckets_with_cs_identity_and_a_third_bucket_refused(
    pipeline: Pipeline,
) -> None:
    import requests
    from test_storage import BadUrl, s3_path, verify_presigned_get

    from medsync.errors import StorageError
    from medsync.hooks.storage import InstanceFileHook, presign_instance, presign_instances

    p = pipeline
    files = dict(p.sim.iter_files())
    rows = p.query(
        "SELECT DISTINCT ON (storage_bucket) id, storage_bucket, storage_key FROM imaging.instance"
        " WHERE source_system = 'c' AND deleted_at IS NULL ORDER BY storage_bucket, source_key"
    )
    assert {bucket for _, bucket, _ in rows} == set(BUCKETS)
    host = p.endpoint.removeprefix("http://")
    with p.conn() as conn:
        for instance_id, bucket, key in rows:
            url = presign_instance(conn, instance_id)
            verify_presigned_get(url, access_key=C_KEYS[0], secret_key=C_KEYS[1], host=host,
                                 path=s3_path(bucket, key), expires=300)  # fmt: skip
            with pytest.raises(BadUrl):  # not signed with moto's default (B's test) identity
                verify_presigned_get(url, access_key="testing", secret_key="testing", host=host,
                                     path=s3_path(bucket, key), expires=300)  # fmt: skip
            assert requests.get(url, timeout=30).content == files[(bucket, key)]
        # A C instance whose row names a third bucket (say, written before C's buckets were
        # narrowed) is refused, and so is a direct request for that bucket.
        sequence_id = p.query("SELECT id FROM imaging.sequence WHERE source_system = 'c' AND deleted_at IS NULL")[0][0]
        third = uuid.uuid4()
        conn.execute(
            "INSERT INTO imaging.instance (id, sequence_id, source_system, source_key, sop_instance_uid,"
            " storage_bucket, storage_key) VALUES (%s, %s, 'c', %s, '1.2.3', 'c-archive-us-9', 'v2/x/0001.dcm')",
            (third, sequence_id, str(uuid.uuid4())),
        )
        batch = presign_instances(conn, [third, rows[0][0]])
        conn.rollback()
    assert set(batch.urls) == {rows[0][0]}
    assert "not allowed" in batch.refused[third] and "c-archive-us-9" in batch.refused[third]
    with pytest.raises(StorageError, match="not allowed for source 'c'"):
        InstanceFileHook("c").presign("c-archive-us-9", "v2/x/0001.dcm")


# --- the real DAG: medsync_c run by Airflow (airflow dags test) ---------------------------------------

SEOUL_TICK = BASE - timedelta(hours=9)  # 00:00 Asia/Seoul, a tick of "0 0,12 * * *"


class DagStack:
    """One Airflow home (SQLite metadata) wired to C's simulator, A's database and the S3 server."""

    def __init__(self, tmp: Path, dsn: str, dbname: str, sim: CSimulator, endpoint: str) -> None:
        from devstack.airflow_env import airflow_env, migrate_metadata

        self.dsn, self.sim, self.endpoint = dsn, sim, endpoint
        self.include = include_copy(tmp / "include", "c", page_size=10, merge_batch_size=13, retries=0)
        c = SourceWiring("c", sim.base_url, TOKEN, endpoint, aws_keys=C_KEYS)  # the config's own buckets
        self.env = airflow_env(tmp / "airflow", Wiring(f"postgresql://postgres@127.0.0.1:5432/{dbname}", (c,),
                                                       include_dir=self.include))  # fmt: skip
        migrate_metadata(self.env)

    def run(self, *, logical_date: datetime | None = None, **conf: Any) -> str:
        from devstack.airflow_env import dags_test

        put_objects(self.endpoint, self.sim.iter_files())
        when = logical_date.isoformat() if logical_date else None
        result = dags_test(self.env, "medsync_c", logical_date=when, conf=conf)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        assert "Task failed" not in output, output[-6000:]
        assert_no_secret_or_phi(output, self.sim)
        return output

    def query(self, text: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(text, args).fetchall()

    def check(self) -> Expected:
        with psycopg.connect(self.dsn) as conn:
            return assert_a_matches_c(conn, self.sim)


def phi_samples(sim: CSimulator) -> list[str]:
    """Some MRNs, family names and birth dates C holds: none may appear in any log."""
    found: list[str] = []
    for rec in list(sim.live_records("participants"))[:8]:
        family = (rec.get("display_name") or "").partition(",")[0].strip()
        found += [v for v in (rec["identifiers"].get("mrn"), family, rec.get("dob")) if v and len(v) >= 6]
    return found


def assert_no_secret_or_phi(output: str, sim: CSimulator) -> None:
    assert TOKEN not in output and C_KEYS[1] not in output
    for secret in phi_samples(sim):
        assert secret not in output, "patient data reached the logs"


@pytest.fixture(scope="module")
def dag_stack(tmp_path_factory: pytest.TempPathFactory, a_template_db: str) -> Iterator[DagStack]:
    dbname = f"medsync_e2ecd_{uuid.uuid4().hex[:8]}"
    dsn = create_database(dbname, template=a_template_db)
    tmp = tmp_path_factory.mktemp("e2e_c_dag")
    # C's documented 10 requests/s limit stays on: the config's own pace (8/s) must live with it.
    with CSimulator(sim_config(seed=23), token=TOKEN, faults=FaultConfig()) as sim, s3_server() as endpoint:
        yield DagStack(tmp, dsn, dbname, sim, endpoint)
    drop_database(dbname)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_dag_first_load_through_cs_faults_then_a_window_with_deletes_restores_and_new_records(
    dag_stack: DagStack,
) -> None:
    stack, sim = dag_stack, dag_stack.sim
    # Run 1: the first load (full_refresh) through 429 with an HTTP-date Retry-After, 503 with
    # one, dropped connections and expired snapshots (410).
    sim.set_faults(throttle_every=6, throttle_retry_after=1, unavailable_every=9, unavailable_retry_after=1,
                   drop_every=7, expire_every=3, max_faults=24)  # fmt: skip
    try:
        output = stack.run(full_refresh=True)
        faults = sim.stats()["faults"]
    finally:
        sim.set_faults()
    assert faults["throttle"] > 0 and faults["unavailable"] > 0 and faults["drop"] > 0 and faults["expire"] > 0, faults
    want = stack.check()
    assert "sync report for c" in output
    (report,) = stack.query("SELECT report FROM medsync.sync_run WHERE source_system = 'c' ORDER BY id DESC LIMIT 1")
    report = report[0]
    assert report["kind"] == "full_refresh"
    for level, figures in report["levels"].items():
        assert figures["a_live"] == len(want.live[level])
        assert figures["source_live"] == sim.counts()[LEVEL_RESOURCE[level]]
    assert report["files"]["checked"] > 0 and report["files"]["ok"] == report["files"]["checked"]
    held = dict(stack.query("SELECT source_key, reason FROM medsync.quarantine WHERE resolved_at IS NULL"))
    assert set(held) == {u for d in want.held_back.values() for u in d}

    # Run 2: the scheduled window [tick - 12h, tick) after C changed things inside it.
    tick = SEOUL_TICK + timedelta(hours=24)
    sim.set_now(tick - timedelta(hours=11))
    subjects = sorted(want.live["subject"])
    gone = subjects[0]
    cascade = descendants(sim, "subject", gone)
    sim.delete("participants", gone)
    renamed = subjects[1]
    sim.update("participants", renamed, display_name="Ōkubo ,  Ren ")
    visit = sorted(want.live["study"])[-1]
    sim.delete("visits", visit)
    sim.advance(60)
    sim.restore("visits", visit)  # deleted and back within one window: live, nothing cascades
    new = sim.add_participant_tree(visits=1, acquisitions=1, files=2)
    before = {(t, k): x for t in LEVELS for k, x in stack.query(
        f"SELECT source_key, xmin::text FROM imaging.{t} WHERE source_system = 'c'")}  # fmt: skip
    stack.run(logical_date=tick)
    want = stack.check()
    assert want.live["subject"][renamed][1] == "Ōkubo^Ren"
    assert new["participant"] in want.live["subject"] and set(new["files"]) <= set(want.live["instance"])
    after = {(t, k): x for t in LEVELS for k, x in stack.query(
        f"SELECT source_key, xmin::text FROM imaging.{t} WHERE source_system = 'c'")}  # fmt: skip
    written = {k for k, x in before.items() if after[k] != x}
    changed = {("subject", gone), ("subject", renamed), ("study", visit)}
    changed |= {(level, k) for level, keys in cascade.items() for k in keys}
    assert ("subject", gone) in written and ("subject", renamed) in written
    assert written <= changed, sorted(written - changed)[:5]
    (root,) = [i for i in sim.deletions() if i["uuid"] == gone]
    for level, keys in cascade.items():
        for key in keys:
            assert stack.query(f"SELECT deleted_at FROM imaging.{level} WHERE source_key = %s", key) == [
                (millis(root["deleted"]),)
            ]
