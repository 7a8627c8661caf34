"""B, end to end without Airflow's scheduler: B's simulator -> ``open_source(b).connect()`` (the
Airflow connection through RestSourceHook) -> RestClient -> the parser -> staging -> merge -> A.

The simulator injects throttling, 5xx, dropped connections and cursor expiry; A must end up with
exactly the simulator's live records, each once."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime

import psycopg
import pytest

from medsync import live_count, schema
from medsync.config import LEVELS, get_source_config
from medsync.mapping import load_mapping
from medsync.merge import merge_level
from medsync.sources import open_source
from medsync.sources.base import Buckets
from medsync.staging import pull_level

API_KEY = "sk-test-pull-7Hq2"
RESOURCES = {"subject": "patients", "study": "studies", "sequence": "series", "instance": "images"}


def test_a_full_pull_of_bs_simulator_through_its_faults_lands_every_live_record_once(
    a_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulator import BSimulator, SimConfig

    # Small pages, so that a pull makes many requests; a short backoff cap and no own rate limit,
    # so that the retries (real sleeps) stay brief.
    cfg = get_source_config("b").model_copy(
        update={"page_size": 4, "max_backoff_seconds": 0.05, "rate_limit_per_second": 1000.0}
    )
    source = open_source(cfg)
    config = SimConfig(
        seed=11, patients=5, studies_per_patient=2, series_per_study=2, images_per_series=3, clock="manual"
    )
    with BSimulator(config, api_key=API_KEY) as sim, psycopg.connect(a_db, autocommit=True) as conn:
        sim.set_faults(throttle_every=9, retry_after=0, error_every=13, drop_every=17, expire_every=4, max_faults=40)
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{cfg.connections.api_conn_id.upper()}",
            json.dumps({"conn_type": "http", "host": sim.base_url, "password": API_KEY, "extra": {"timeout": 5}}),
        )
        schema.migrate(conn)
        live_count.ensure(conn, "b", lock_timeout_seconds=5)
        conn.execute(
            "INSERT INTO medsync.sync_run (id, source_system, dag_run_id, run_type) VALUES (1, 'b', 'r1', 'manual')"
        )
        parser = source.parser(
            load_mapping(cfg.mapping_path), Buckets(cfg.storage.bucket, frozenset({cfg.storage.bucket}))
        )
        since, until = datetime(2025, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
        pulled = {}
        with source.connect() as client:
            for level in LEVELS:
                pulled[level] = pull_level(
                    conn, source="b", level=level, run_id=1, pages=client.iter_pages(level, since, until), parser=parser
                )
            counts = client.counts()
        for level in LEVELS:
            merge_level(
                conn,
                source="b",
                level=level,
                run_id=1,
                batch_size=1000,
                sessions=1,
                connect=lambda: psycopg.connect(a_db, autocommit=True),
                parent_lookup=source.parent_link(level).column if level != "subject" else "source_key",
            )
        live = {level: {r["id"] for r in sim.live_records(resource)} for level, resource in RESOURCES.items()}
        faults = sim.stats()["faults"]
        in_a = {
            level: {
                key
                for (key,) in conn.execute(
                    f"SELECT source_key FROM imaging.{level} WHERE source_system = 'b' AND deleted_at IS NULL"
                )
            }
            for level in LEVELS
        }
    assert faults["expire"] > 0 and faults["error"] > 0 and faults["drop"] > 0
    assert counts == {level: len(keys) for level, keys in live.items()}
    for level in LEVELS:
        assert pulled[level].quarantined == 0, pulled[level].as_dict()
        assert in_a[level] == live[level], level
    assert len(list(itertools.chain.from_iterable(in_a.values()))) == sum(map(len, live.values()))
