"""What a snapshot compare (deletions of a PACS) costs: ``python -m benchmarks.snapshot_cost``.

Two parts, measured apart because they are bounded by different machines:

1. **A's side** (PostgreSQL, this machine): A holds N instances of source ``pacs``; a full listing
   of N - 1% is staged; :func:`medsync.snapshot.stage_tombstones` finds the 1% gone and the
   merge applies those tombstones. Measured at each ``--instances`` count (default 100k and 1M).
2. **The PACS's side** (listing): a real Orthanc loaded with ``--pacs-patients`` synthetic
   patients (a few thousand instances) is listed whole through the dicomweb client, versions
   included (``medsync.content_version``), and its instances per second extrapolated to 1M.

Results go to ``benchmarks/results/snapshot_<UTC time>.json`` and stdout.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import requests

from medsync.merge import merge_level
from medsync.schema import migrate
from medsync.snapshot import stage_tombstones
from medsync.staging import ensure_staging_table

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
SOURCE = "pacs"


def _database() -> tuple[str, str]:
    name = f"medsync_snapbench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = f"host=127.0.0.1 port=5432 user=postgres dbname={name}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((ROOT / "include" / "sql" / "a_schema.sql").read_text())
        migrate(conn)
    return name, dsn


def _drop(name: str) -> None:
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def a_side(instances: int) -> dict[str, Any]:
    name, dsn = _database()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            series = max(1, instances // 500)
            conn.execute(
                "INSERT INTO imaging.subject (id, source_system, source_key, patient_code, source_updated_at)"
                " VALUES (gen_random_uuid(), %s, 'P1', 'P1', now() - interval '1 day')",
                (SOURCE,),
            )
            conn.execute(
                "INSERT INTO imaging.study (id, subject_id, source_system, source_key, study_uid, status,"
                " source_updated_at) SELECT gen_random_uuid(), id, %s, '1.2', '1.2', 'COMPLETED',"
                " now() - interval '1 day' FROM imaging.subject",
                (SOURCE,),
            )
            conn.execute(
                "INSERT INTO imaging.sequence (id, study_id, source_system, source_key, series_uid, modality,"
                " source_updated_at) SELECT gen_random_uuid(), st.id, %s, '1.2.' || g, '1.2.' || g, 'CT',"
                " now() - interval '1 day' FROM imaging.study st, generate_series(1, %s) g",
                (SOURCE, series),
            )
            loaded = time.monotonic()
            conn.execute(
                "INSERT INTO imaging.instance (id, sequence_id, source_system, source_key, sop_instance_uid,"
                " storage_bucket, storage_key, source_updated_at)"
                " SELECT gen_random_uuid(), se.id, %s, se.series_uid || '.' || g, se.series_uid || '.' || g,"
                " 'a-imaging', 'pacs/' || se.series_uid || '.' || g || '.dcm', now() - interval '1 day'"
                " FROM imaging.sequence se, generate_series(1, %s) g",
                (SOURCE, instances // series),
            )
            conn.execute("ANALYZE imaging.instance")
            load_seconds = time.monotonic() - loaded
            held = conn.execute("SELECT count(*) FROM imaging.instance").fetchone()
            total = int(held[0]) if held else 0
            run = conn.execute(
                "INSERT INTO medsync.sync_run (source_system, dag_run_id, run_type)"
                " VALUES (%s, 'bench', 'full_refresh') RETURNING id",
                (SOURCE,),
            ).fetchone()
            assert run is not None
            run_id = int(run[0])
            table = ensure_staging_table(conn, SOURCE, "instance", run_id)
            # The listing as the pull stages it: every instance but 1 in 100 (those were deleted).
            staged_at = time.monotonic()
            conn.execute(
                psycopg.sql.SQL(
                    "INSERT INTO {} (source_key, source_updated_at, deleted, new_id, slice, parent_key,"
                    " sop_instance_uid, storage_bucket, storage_key, content_type)"
                    " SELECT i.source_key, i.source_updated_at, false, gen_random_uuid(), 0, se.series_uid,"
                    " i.sop_instance_uid, i.storage_bucket, i.storage_key, i.content_type"
                    " FROM imaging.instance i JOIN imaging.sequence se ON se.id = i.sequence_id"
                    " WHERE i.source_system = %s AND hashtext(i.source_key) %% 100 <> 0"
                ).format(table),
                (SOURCE,),
            )
            stage_seconds = time.monotonic() - staged_at
            listed_row = conn.execute(psycopg.sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
            listed = int(listed_row[0]) if listed_row else 0
            compare = stage_tombstones(conn, source=SOURCE, level="instance", run_id=run_id, slice_index=0,
                                       listed=listed)  # fmt: skip
            merged = merge_level(conn, source=SOURCE, level="instance", run_id=run_id, parent_lookup="source_key")
        return {
            "a_instances": total,
            "listed": listed,
            "gone": compare["tombstones"],
            "compare_seconds": compare["seconds"],
            "merge_seconds": round(merged.seconds, 3),
            "merge_candidates": merged.candidates,
            "merge_unchanged": merged.unchanged,
            "merge_deleted": merged.deleted,
            "staging_insert_seconds_server_side": round(stage_seconds, 3),
            "a_table_load_seconds": round(load_seconds, 3),
        }
    finally:
        _drop(name)


def pacs_side(patients: int) -> dict[str, Any]:
    from devstack.dicom_gen import Catalogue, generate
    from devstack.orthanc import ensure_installed, orthanc_server
    from medsync.sources.dicomweb.client import DicomwebClient
    from medsync.sources.dicomweb.spec import DicomwebApi

    reason = ensure_installed()
    if reason:
        return {"skipped": reason}
    name, dsn = _database()
    try:
        with orthanc_server() as orthanc, psycopg.connect(dsn, autocommit=True) as db:
            cat = Catalogue()
            orthanc.stow(generate(seed=11, patients=patients, catalogue=cat))
            session = requests.Session()
            session.auth = (orthanc.user, orthanc.password)
            client = DicomwebClient(source=SOURCE, api=DicomwebApi(), session=session, base_url=orthanc.base_url,
                                    db=db, page_size=1000, timeout=60)  # fmt: skip
            figures: dict[str, Any] = {"instances": len(cat.instances)}
            for run in ("first", "again"):
                started = time.monotonic()
                listed = sum(len(page.items) for page in client.iter_listing("instance"))
                seconds = time.monotonic() - started
                figures[f"listing_{run}_seconds"] = round(seconds, 3)
                figures[f"listing_{run}_per_second"] = round(listed / seconds, 1)
            per_second = figures["listing_again_per_second"]
            figures["extrapolated_1m_listing_minutes"] = round(1_000_000 / per_second / 60, 1)
            return figures
    finally:
        _drop(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--pacs-patients", type=int, default=120)
    args = parser.parse_args()
    results: dict[str, Any] = {"when": datetime.now(UTC).isoformat(), "a_side": {}, "pacs_side": {}}
    for n in args.instances:
        results["a_side"][str(n)] = a_side(n)
        print(json.dumps({n: results["a_side"][str(n)]}), flush=True)
    results["pacs_side"] = pacs_side(args.pacs_patients)
    print(json.dumps(results["pacs_side"]), flush=True)
    out = ROOT / "benchmarks" / "results" / f"snapshot_{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
