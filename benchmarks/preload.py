"""Imported once by the benchmark's fork server, before any task: a worker's start-up.

A real Airflow worker imports the task SDK, the providers and the DAG's code once, then
forks a process per task. The benchmark does the same, so the start-up (timed apart, see
``benchmarks.dag.Workers.start``) is not charged to any task, while each task still runs,
and is measured, in a process of its own.
"""

from __future__ import annotations

import airflow.sdk  # noqa: F401  (most of the start-up: about a second and 100 MB)
import psycopg  # noqa: F401
from airflow.providers.postgres.hooks.postgres import PostgresHook  # noqa: F401

import medsync.dag_factory  # (what a task process's parse of the DAG file imports: the cron timetable)
import medsync.tasks  # noqa: F401
from medsync import live_count, merge, report, schema, staging  # noqa: F401
from medsync.hooks import a_database  # noqa: F401
from medsync.sources.rest import client, converters, hook, records, source  # noqa: F401


def _warm_up_connections() -> None:
    """The first connection lookup in a process initialises Airflow's secrets backends (~30-80 ms).

    A worker does that once too; doing it here keeps it out of the first task's time.
    """
    import os

    from airflow.sdk import BaseHook

    name = "AIRFLOW_CONN_MEDSYNC_BENCH_WARM_UP"
    os.environ[name] = "postgresql://warm-up@127.0.0.1:5432/warm-up"
    try:
        BaseHook.get_connection("medsync_bench_warm_up")
    finally:
        del os.environ[name]


_warm_up_connections()
