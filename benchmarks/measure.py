"""What the benchmark checks in A's database: rows there, and rows a run actually wrote.

A's rows are checked against the source's own counts (its ``api.counts`` endpoint: B's
``/counts``, C's ``/stats``). Rows written are counted two ways, both by PostgreSQL rather than by medsync's own counts:
the tuples inserted, updated (HOT or not) and deleted in ``pg_stat_user_tables``, and the
rows whose ``xmin`` (the transaction that wrote the row version) is newer than the run.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from benchmarks import floor
from benchmarks.fixtures import Server
from medsync.config import LEVELS
from medsync.levels import spec
from medsync.schema import A_SCHEMA

XID_MODULUS = 2**32


def _tables() -> dict[str, str]:
    return {level: spec(level).table for level in LEVELS}


def a_rows(conn: psycopg.Connection, source: str) -> dict[str, dict[str, int]]:
    """Per level, A's rows of ``source``: all, live, and those the source has not deleted.

    The last is what the source's live count must equal. It differs from ``live`` when a
    record the source holds live sits under a deleted parent: A stores it deleted (deletion
    flows down, a-model.md), the source counts it. A row counts as deleted by the source when medsync remembers
    a tombstone of its own for it.
    """
    memory = conn.execute("SELECT to_regclass('medsync.tombstone') IS NOT NULL").fetchone() == (True,)
    # The naive baseline's database has no medsync schema, hence no tombstones.
    own_tombstone = sql.SQL(
        "EXISTS (SELECT 1 FROM medsync.tombstone t"
        " WHERE t.source_system = a.source_system AND t.level = %(level)s AND t.source_key = a.source_key)"
        if memory
        else "false AND %(level)s::text IS NULL"
    )
    out: dict[str, dict[str, int]] = {}
    for level, table in _tables().items():
        query = sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE a.deleted_at IS NULL), count(*) FILTER (WHERE NOT ({}))"
            " FROM {} a WHERE a.source_system = %(source)s"
        ).format(own_tombstone, sql.Identifier(A_SCHEMA, table))
        row = conn.execute(query, {"level": level, "source": source}).fetchone() or (0, 0, 0)
        out[level] = {"rows": int(row[0]), "live": int(row[1]), "not_deleted_by_source": int(row[2])}
    return out


def source_live(server: Server) -> dict[str, int]:
    """The simulator's live records per level, from the source's counts endpoint (``api.counts``)."""
    counts_api = server.source.api["counts"]
    request = urllib.request.Request(f"{server.base_url}{counts_api['endpoint']}", headers=server.source.headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        counts = json.loads(response.read())
    return {level: int(floor.dotted(counts, path)) for level, path in counts_api["paths"].items()}


def check_rows(conn: psycopg.Connection, server: Server) -> dict[str, Any]:
    """A's rows of the source per level against the source's live records: checked, not assumed.

    Matches when every record the source holds live is a row in A that the source did not
    delete, and A has no row live that the source does not.
    """
    rows = a_rows(conn, server.source.name)
    live = source_live(server)
    return {
        "a": rows,
        "source_live": live,
        "matches": all(
            rows[level]["not_deleted_by_source"] == live[level] and rows[level]["live"] <= live[level]
            for level in LEVELS
        ),
    }


@dataclass
class WriteProbe:
    """Taken before a run; ``written`` says what the run wrote into A's tables."""

    xid: int
    stats: dict[str, int]

    @classmethod
    def take(cls, conn: psycopg.Connection) -> WriteProbe:
        row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        assert row is not None
        return cls(xid=int(row[0]), stats=_tuple_stats(conn))

    def written(self, conn: psycopg.Connection) -> dict[str, Any]:
        """Per table: tuples written per pg_stat_user_tables, and row versions with a newer xmin."""
        after = _tuple_stats(conn)
        out: dict[str, Any] = {}
        for table in _tables().values():
            newer = conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE xmin::text::bigint >= %s").format(
                    sql.Identifier(A_SCHEMA, table)
                ),
                (self.xid % XID_MODULUS,),
            ).fetchone()
            out[table] = {
                "tuples": after.get(table, 0) - self.stats.get(table, 0),
                "xmin": int(newer[0]) if newer else 0,
            }
        out["total_tuples"] = sum(v["tuples"] for v in out.values())
        out["total_xmin"] = sum(v["xmin"] for k, v in out.items() if k != "total_tuples")
        return out


def _tuple_stats(conn: psycopg.Connection) -> dict[str, int]:
    # Backends report their counters when they go idle or exit; the task processes have exited,
    # but the collector may not have merged them yet: wait until two reads agree.
    previous: dict[str, int] | None = None
    for _ in range(20):
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables WHERE schemaname = %s",
            (A_SCHEMA,),
        ).fetchall()
        current = {name: int(n) for name, n in rows}
        if current == previous:
            return current
        previous = current
        time.sleep(0.25)
    return previous or {}


def checkpoint(conn: psycopg.Connection) -> None:
    """Flush dirty buffers before a timed phase, so no phase pays for the previous one's writes."""
    conn.execute("CHECKPOINT")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuProbe:
    """The machine's CPU use (all cores, every process: other users of the machine too) and the simulator's."""

    busy: float
    total: float
    simulator: float
    simulator_pid: int

    @classmethod
    def take(cls, simulator_pid: int) -> CpuProbe:
        busy, total = _machine_cpu()
        return cls(busy, total, process_cpu_seconds(simulator_pid), simulator_pid)

    def since(self) -> dict[str, float]:
        """Since ``take``: the machine's busy share in cores, its CPU work in core-seconds, the simulator's CPU s."""
        busy, total = _machine_cpu()
        cores = os.cpu_count() or 1
        return {
            "machine_busy_cores": (busy - self.busy) / (total - self.total) * cores if total > self.total else 0.0,
            "machine_cpu_seconds": (busy - self.busy) / os.sysconf("SC_CLK_TCK"),
            "simulator_cpu_seconds": process_cpu_seconds(self.simulator_pid) - self.simulator,
        }


def _machine_cpu() -> tuple[float, float]:
    """Busy and total ticks of all cores. Steal (the hypervisor's other guests) is neither work of ours nor idle."""
    with open("/proc/stat", encoding="ascii") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in stat.readline().split()[1:9])
    busy = user + nice + system + irq + softirq
    return float(busy), float(busy + idle + iowait + steal)
