"""Builds one Airflow DAG per source config in ``include/sources/``.

Runs while DAG files are parsed, in the dag-processor, many times a minute: it reads
local YAML files and builds the DAG, nothing else. No network, no database, no
Variables, no heavy imports: task bodies import what they need when they run.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, CronDataIntervalTimetable, Param, task

from medsync.config import LEVELS, SourceConfig, load_source_configs

PLURAL = {"subject": "subjects", "study": "studies", "sequence": "sequences", "instance": "instances"}

DOC = """
### medsync: source `{name}` -> service A

{description}

Every run syncs a bounded window of the source's `updated_at` (see the README, "Windows"):
a scheduled run its interval (or from the last watermark if a run failed), a backfill run
exactly its interval, a manual run its interval or from the watermark, and a run with
**full_refresh** everything until the run's start. The lookback is {lookback} minutes.

Tasks: `prepare` (schema, checks, windows) -> `pull_*` (source -> staging, quarantine)
-> `merge_*` (parents first) -> `check_files` -> `report` (A vs the source's counts)
-> `finish` (watermark, clean-up). The report is in the `report` task's log and in
`medsync.sync_run.report` in A's database.

Config: `include/sources/{name}.yaml`; mapping: `include/mappings/{mapping}`.
Connections: `{db}` (A's database), `{api}` (the source's API), `{aws}` (its bucket).
"""


def _run_facts(context: Any) -> Any:
    from medsync.windows import RunFacts

    dag_run = context["dag_run"]
    run_type = getattr(dag_run.run_type, "value", dag_run.run_type)
    run_after = getattr(dag_run, "run_after", None) or context.get("logical_date") or pendulum.now("UTC")
    return RunFacts(
        airflow_run_type=str(run_type),
        data_interval_start=context.get("data_interval_start"),
        data_interval_end=context.get("data_interval_end"),
        run_after=run_after,
        full_refresh=bool(context["params"].get("full_refresh", False)),
    )


def build_dag(cfg: SourceConfig) -> DAG:
    source = cfg.name
    default_args = {
        "owner": cfg.owner,
        "retries": cfg.retries,
        "retry_delay": timedelta(minutes=cfg.retry_delay_minutes),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=cfg.max_retry_delay_minutes),
    }
    with DAG(
        dag_id=cfg.dag_id,
        description=cfg.description or f"Sync source {source} into service A",
        schedule=CronDataIntervalTimetable(cfg.schedule.cron, timezone=cfg.schedule.timezone),
        start_date=pendulum.datetime(
            cfg.schedule.start_date.year,
            cfg.schedule.start_date.month,
            cfg.schedule.start_date.day,
            tz=cfg.schedule.timezone,
        ),
        catchup=False,
        max_active_runs=1,
        default_args=default_args,
        tags=sorted({"medsync", f"source:{source}", *cfg.tags}),
        params={
            "full_refresh": Param(
                False,
                type="boolean",
                title="Full refresh",
                description="Sync everything from the beginning until now (first load, repairs).",
            )
        },
        doc_md=DOC.format(
            name=source,
            description=cfg.description,
            lookback=cfg.lookback_minutes,
            mapping=cfg.mapping_file,
            db=cfg.connections.db_conn_id,
            api=cfg.connections.api_conn_id,
            aws=cfg.storage.aws_conn_id,
        ),
    ) as dag:

        @task(task_id="prepare")
        def prepare(**context: Any) -> dict[str, Any]:
            from medsync import tasks

            return tasks.prepare(source, dag_run_id=context["dag_run"].run_id, facts=_run_facts(context))

        def pull_task(level: str) -> Any:
            slices = cfg.instance_slices if level == "instance" else 1

            @task(task_id=f"pull_{PLURAL[level]}")
            def pull(plan: dict[str, Any], slice_index: int = 0) -> dict[str, Any]:
                from medsync import tasks

                return tasks.pull(source, level, plan["run_id"], slice_index, slices)

            return pull

        def merge_task(level: str) -> Any:
            @task(task_id=f"merge_{PLURAL[level]}")
            def merge(plan: dict[str, Any]) -> dict[str, Any]:
                from medsync import tasks

                return tasks.merge(source, level, plan["run_id"])

            return merge

        @task(task_id="check_files")
        def check_files(plan: dict[str, Any]) -> dict[str, Any]:
            from medsync import tasks

            return tasks.check_files(source, plan["run_id"])

        @task(task_id="report")
        def report(plan: dict[str, Any]) -> dict[str, Any]:
            from medsync import tasks

            return tasks.report(source, plan["run_id"])

        @task(task_id="finish")
        def finish(plan: dict[str, Any]) -> dict[str, Any]:
            from medsync import tasks

            return tasks.finish(source, plan["run_id"])

        plan: Any = prepare()  # an XComArg: the run id reaches each task at run time
        previous_merge = None
        for level in LEVELS:
            pull = pull_task(level)
            if level == "instance" and cfg.instance_slices > 1:
                pulled = pull.partial(plan=plan).expand(slice_index=list(range(cfg.instance_slices)))
            else:
                pulled = pull(plan)
            merged = merge_task(level)(plan)
            pulled >> merged
            if previous_merge is not None:
                previous_merge >> merged
            previous_merge = merged
        checked = check_files(plan)
        reported = report(plan)
        assert previous_merge is not None
        previous_merge >> checked >> reported >> finish(plan)
    return dag


def build_dags() -> list[DAG]:
    """One DAG per ``include/sources/*.yaml``; a broken config fails loudly, naming its file."""
    return [build_dag(cfg) for cfg in load_source_configs()]
