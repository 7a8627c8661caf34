"""B and C side by side in one A: ``medsync_b`` and ``medsync_c`` run by Airflow at the same time.

Both DAG runs (``airflow dags test``) start together against one A database, one S3 server
holding B's bucket and C's two buckets, and the two simulators. Each DAG must end with exactly
its own source's records in A, and a second concurrent round, after both sources changed,
must write only rows of the source that changed them. The two runs use two Airflow homes
(one SQLite metadata database each: SQLite takes one writer, and production's metadata database
is not what is under test); A's database, where the sources could collide, is shared.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from c_expected import assert_a_matches_c
from conftest import create_database, drop_database
from test_e2e_dag import BUCKET as B_BUCKET
from test_e2e_dag import assert_a_matches_b

from devstack.airflow_env import SourceWiring, Wiring, airflow_env, dags_test_command, include_copy, migrate_metadata
from devstack.s3 import put_files, put_objects, s3_server
from medsync.config import LEVELS
from simulator import BSimulator
from simulator import SimConfig as BConfig
from simulator_c import CSimulator, FaultConfig
from simulator_c import SimConfig as CConfig

pytestmark = pytest.mark.slow

B_KEY = "side-by-side-b-key"
C_TOKEN = "side-by-side-c-token"
BASE = (datetime.now(UTC) - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass
class Both:
    dsn: str
    b: BSimulator
    c: CSimulator
    endpoint: str
    env: dict[str, dict[str, str]]

    def query(self, text: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(text, args).fetchall()

    def xmins(self, source: str) -> dict[tuple[str, str], str]:
        return {
            (t, key): xmin
            for t in LEVELS
            for key, xmin in self.query(
                f"SELECT source_key, xmin::text FROM imaging.{t} WHERE source_system = %s", source
            )
        }

    def run_both(self, **conf: Any) -> dict[str, str]:
        """Starts medsync_b and medsync_c together and waits for both; returns their output."""
        put_files(self.endpoint, B_BUCKET, self.b.iter_files())
        put_objects(self.endpoint, self.c.iter_files())
        procs = {
            source: subprocess.Popen(
                dags_test_command(f"medsync_{source}", conf=conf),
                env=self.env[source],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for source in ("b", "c")
        }
        outputs = {}
        for source, proc in procs.items():
            out, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, f"medsync_{source}: {out[-6000:]}"
            assert "Task failed" not in out, out[-6000:]
            outputs[source] = out
        assert B_KEY not in "".join(outputs.values()) and C_TOKEN not in "".join(outputs.values())
        return outputs

    def runs_overlapped(self) -> bool:
        """Whether the last run of B and the last run of C were running at the same time."""
        rows = dict(
            (s, (a, f))
            for s, a, f in self.query(
                "SELECT DISTINCT ON (source_system) source_system, started_at, finished_at FROM medsync.sync_run"
                " ORDER BY source_system, id DESC"
            )
        )
        (b_start, b_end), (c_start, c_end) = rows["b"], rows["c"]
        return b_start < c_end and c_start < b_end


class _BView:
    """What test_e2e_dag's ``assert_a_matches_b`` reads: the simulator and a query function."""

    def __init__(self, both: Both) -> None:
        self.sim, self.query = both.b, both.query


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, a_template_db: str) -> Iterator[Both]:
    dbname = f"medsync_bc_{uuid.uuid4().hex[:8]}"
    dsn = create_database(dbname, template=a_template_db)
    tmp = tmp_path_factory.mktemp("e2e_bc")
    b_config = BConfig(
        seed=5, patients=5, studies_per_patient=2, series_per_study=2, images_per_series=3, clock="manual",
        base_time=BASE.isoformat(), history_seconds=5 * 86400, unknown_enum_fraction=0.0, invalid_fraction=0.0,
    )  # fmt: skip
    c_config = CConfig(
        seed=5, participants=5, clock="manual", base_time=BASE.isoformat(), history_seconds=5 * 86400,
        deleted_fraction=0.05, invalid_fraction=0.03,
    )  # fmt: skip
    include = include_copy(tmp / "include", ("b", "c"), retries=0, page_size=10, merge_batch_size=11)
    with (
        BSimulator(b_config, api_key=B_KEY) as b,
        CSimulator(c_config, token=C_TOKEN, faults=FaultConfig()) as c,
        s3_server() as endpoint,
    ):
        a_url = f"postgresql://postgres@127.0.0.1:5432/{dbname}"
        wirings = {
            "b": SourceWiring("b", b.base_url, B_KEY, endpoint, bucket=B_BUCKET),
            "c": SourceWiring("c", c.base_url, C_TOKEN, endpoint),
        }
        # Each home knows both sources' connections (as one Airflow deployment would).
        wiring = Wiring(a_url, tuple(wirings.values()), include_dir=include)
        env = {source: airflow_env(tmp / f"airflow_{source}", wiring) for source in wirings}
        for e in env.values():
            migrate_metadata(e)
        yield Both(dsn, b, c, endpoint, env)
    drop_database(dbname)
    shutil.rmtree(tmp, ignore_errors=True)


def test_b_and_c_full_loads_at_the_same_time_each_hold_exactly_their_source(both: Both) -> None:
    outputs = both.run_both(full_refresh=True)
    assert both.runs_overlapped(), "the two runs did not overlap: nothing was tested side by side"
    assert_a_matches_b(_BView(both))  # type: ignore[arg-type]
    with psycopg.connect(both.dsn) as conn:
        assert_a_matches_c(conn, both.c)
    assert "sync report for b" in outputs["b"] and "sync report for c" in outputs["c"]
    sources = {s for (s,) in both.query("SELECT DISTINCT source_system FROM imaging.instance")}
    assert sources == {"b", "c"}


def test_a_second_concurrent_round_writes_only_what_each_source_changed(both: Both) -> None:
    b_before, c_before = both.xmins("b"), both.xmins("c")
    # Only C changes; B's rows must not be written by either DAG.
    both.c.set_now(BASE + timedelta(hours=1))
    (victim,) = both.query(
        "SELECT source_key FROM imaging.subject WHERE source_system = 'c' AND deleted_at IS NULL"
        " ORDER BY source_key LIMIT 1"
    )[0]
    both.c.delete("participants", victim)
    both.run_both(full_refresh=True)
    assert both.runs_overlapped()
    assert both.xmins("b") == b_before
    written_c = {k for k, x in c_before.items() if both.xmins("c").get(k) != x}
    assert ("subject", victim) in written_c
    assert_a_matches_b(_BView(both))  # type: ignore[arg-type]
    with psycopg.connect(both.dsn) as conn:
        assert_a_matches_c(conn, both.c)
