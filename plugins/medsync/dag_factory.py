"""Builds one Airflow DAG per source config in ``include/sources/``.

Runs while DAG files are parsed, in the dag-processor, many times a minute: it reads
local YAML files and builds the DAG, nothing else. No network, no database, no
Variables, no heavy imports: task bodies import what they need when they run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, AssetAlias, CronDataIntervalTimetable, Param, task

from medsync.config import LEVELS, SourceConfig, load_source_configs
from medsync.levels import spec
from medsync.sources import open_source

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

**Repairs** (trigger form): `levels` (some levels only; parents are still looked up in A),
`since`/`until` (exactly that window, no lookback, no watermark moved), `dry_run` (pull,
validate, stage and report what would be inserted, updated and deleted; nothing written to
A, no watermark moved). A failed run's reason: `medsync.sync_run` (`failed_task`,
`error_class`, `error_message`) and the alerts of `alerts` in the config.

Each merge emits an asset event for the A table it wrote (`{asset_prefix}<table>`), with the
run's counts as its metadata: schedule downstream DAGs on them (`dags/example_downstream.py`).

Config: `include/sources/{name}.yaml`; mapping: `include/mappings/{mapping}`.
Connections: `{db}` (A's database), `{api}` (the source's API), `{aws}` (its bucket).
"""


# "x-": a scheme of our own, which Airflow does not try to normalise (that would load every provider).
ASSET_PREFIX = "x-medsync://a/imaging/"


def a_table_asset(table: str) -> Asset:
    """The Asset of one of A's tables, as every source's merge writes it."""
    return Asset(name=f"a.imaging.{table}", uri=f"{ASSET_PREFIX}{table}", group="medsync")


def merge_alias(source: str, level: str) -> AssetAlias:
    """The alias a merge emits its table's event through: only a merge that wrote (not a dry run,
    not a level the run skips) emits one, so downstream DAGs never run after nothing happened."""
    return AssetAlias(name=f"medsync_{source}_merge_{level}")


def _param_time(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    # ISO 8601 / RFC 3339; a time without an offset is UTC, as Airflow reads dates in the trigger form.
    try:
        parsed = datetime.fromisoformat(str(value).strip())
    except ValueError:
        from medsync.errors import RunParamsError

        raise RunParamsError(f"{value!r} is not an ISO 8601 date-time (e.g. 2026-11-03T00:00:00Z)") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _run_facts(context: Any) -> Any:
    from medsync.windows import RunFacts

    dag_run = context["dag_run"]
    params = context["params"]
    run_type = getattr(dag_run.run_type, "value", dag_run.run_type)
    run_after = getattr(dag_run, "run_after", None) or context.get("logical_date") or pendulum.now("UTC")
    return RunFacts(
        airflow_run_type=str(run_type),
        data_interval_start=context.get("data_interval_start"),
        data_interval_end=context.get("data_interval_end"),
        run_after=run_after,
        full_refresh=bool(params.get("full_refresh", False)),
        since=_param_time(params.get("since")),
        until=_param_time(params.get("until")),
    )


def _airflow_run_state(context: Any) -> Callable[[str], str | None]:
    """Asks Airflow (the task SDK) for the state of another run of this DAG; None if it is gone."""
    ti, dag_id = context["ti"], context["dag"].dag_id

    def state(dag_run_id: str) -> str | None:
        from airflow.sdk.api.client import ServerResponseError
        from airflow.sdk.exceptions import AirflowRuntimeError

        # 404: Airflow no longer knows the run (deleted), so it has ended. Any other error is raised:
        # a run must not be taken over because the API could not be asked (prepare is retried).
        try:
            found = ti.get_dagrun_state(dag_id=dag_id, run_id=dag_run_id)
        except AirflowRuntimeError as exc:  # the supervisor's answer, in a worker
            detail = exc.error.detail if isinstance(exc.error.detail, dict) else {}
            if detail.get("status_code") == 404:
                return None
            raise
        except ServerResponseError as exc:  # the execution API's own answer, in-process (`airflow dags test`)
            if exc.response.status_code == 404:
                return None
            raise
        return str(getattr(found, "value", found))  # a str Enum: its value, not "DagRunState.FAILED"

    return state


@contextmanager
def _fail_fast() -> Iterator[None]:
    from medsync.failures import fail_fast

    with fail_fast():
        yield


def _failure_callbacks(source: str) -> tuple[Callable[[Any], None], Callable[[Any], None]]:
    """The task-level and the DAG-level ``on_failure_callback`` of a source's DAG (medsync.failures)."""

    def on_task_failure(context: Any) -> None:
        from medsync.failures import task_failed

        task_failed(source, context)

    def on_run_failure(context: Any) -> None:
        from medsync.failures import run_failed

        run_failed(source, context)

    return on_task_failure, on_run_failure


def _params(levels: tuple[str, ...]) -> dict[str, Param]:
    return {
        "full_refresh": Param(
            False,
            type="boolean",
            title="Full refresh",
            description="Sync everything from the beginning until now (first load, repairs).",
        ),
        "levels": Param(
            list(levels),
            type="array",
            items={"type": "string", "enum": list(levels)},
            uniqueItems=True,
            minItems=1,
            title="Levels",
            description="Sync only these levels (e.g. to repair one). Parents are still looked up in A: "
            "a record whose parent A does not have waits as pending.",
        ),
        "since": Param(
            None,
            type=["null", "string"],
            format="date-time",
            title="Since (repair window)",
            description="With 'until': sync exactly [since, until) of the source's updated_at, no lookback. "
            "Moves no watermark. Leave both empty for the run's own window.",
        ),
        "until": Param(
            None,
            type=["null", "string"],
            format="date-time",
            title="Until (repair window)",
            description="End of the repair window (exclusive); needs 'since'.",
        ),
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Pull, validate and stage, and report what would be inserted, updated and deleted; "
            "write nothing to A's tables and move no watermark.",
        ),
    }


def build_dag(cfg: SourceConfig) -> DAG:  # noqa: PLR0915 (a DAG's tasks are declared in one place)
    source = cfg.name
    timeouts = cfg.task_timeouts
    on_task_failure, on_run_failure = _failure_callbacks(source)
    default_args = {
        "owner": cfg.owner,
        "retries": cfg.retries,
        "retry_delay": timedelta(minutes=cfg.retry_delay_minutes),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=cfg.max_retry_delay_minutes),
        "on_failure_callback": on_task_failure,
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
        params=_params(LEVELS),
        on_failure_callback=on_run_failure,
        doc_md=DOC.format(
            name=source,
            description=cfg.description,
            lookback=cfg.lookback_minutes,
            mapping=cfg.mapping_file,
            db=cfg.connections.db_conn_id,
            api=cfg.connections.api_conn_id,
            aws=cfg.storage.aws_conn_id,
            asset_prefix=ASSET_PREFIX,
        ),
    ) as dag:

        @task(task_id="prepare", execution_timeout=timedelta(minutes=timeouts.prepare_minutes))
        def prepare(**context: Any) -> dict[str, Any]:
            from medsync import tasks

            params = context["params"]
            with _fail_fast():
                return tasks.prepare(
                    source,
                    dag_run_id=context["dag_run"].run_id,
                    facts=_run_facts(context),
                    levels=params.get("levels") or None,
                    dry_run=bool(params.get("dry_run", False)),
                    airflow_run_state=_airflow_run_state(context),
                )

        def pull_task(level: str) -> Any:
            slices = cfg.instance_slices if level == "instance" else 1

            @task(task_id=f"pull_{PLURAL[level]}", execution_timeout=timedelta(minutes=timeouts.pull_minutes))
            def pull(plan: dict[str, Any], slice_index: int = 0) -> dict[str, Any]:
                from medsync import tasks

                with _fail_fast():
                    return tasks.pull(source, level, plan["run_id"], slice_index, slices)

            return pull

        def merge_task(level: str) -> Any:
            alias = merge_alias(source, level)
            asset = a_table_asset(spec(level).table)

            @task(
                task_id=f"merge_{PLURAL[level]}",
                execution_timeout=timedelta(minutes=timeouts.merge_minutes),
                outlets=[alias],
            )
            def merge(plan: dict[str, Any], **context: Any) -> dict[str, Any]:
                from medsync import tasks

                with _fail_fast():
                    figures = tasks.merge(source, level, plan["run_id"])
                if not figures.get("skipped") and not figures.get("dry_run"):
                    context["outlet_events"][alias].add(asset, extra={"source": source, **figures,
                                                                       "run_id": plan["run_id"]})  # fmt: skip
                return figures

            return merge

        @task(task_id="mirror_files", execution_timeout=timedelta(minutes=timeouts.mirror_files_minutes))
        def mirror_files(plan: dict[str, Any]) -> dict[str, Any]:
            from medsync import tasks

            with _fail_fast():
                return tasks.mirror_files(source, plan["run_id"])

        @task(task_id="check_files", execution_timeout=timedelta(minutes=timeouts.check_files_minutes))
        def check_files(plan: dict[str, Any]) -> dict[str, Any]:
            from medsync import tasks

            with _fail_fast():
                return tasks.check_files(source, plan["run_id"])

        @task(task_id="report", execution_timeout=timedelta(minutes=timeouts.report_minutes))
        def report(plan: dict[str, Any]) -> dict[str, Any]:
            from medsync import tasks

            with _fail_fast():
                return tasks.report(source, plan["run_id"])

        @task(task_id="finish", execution_timeout=timedelta(minutes=timeouts.finish_minutes))
        def finish(plan: dict[str, Any]) -> dict[str, Any]:
            from medsync import tasks

            with _fail_fast():
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
        if open_source(cfg).file_mirror is not None:
            # A source without a bucket A can read: its files are copied into A's before they are checked.
            previous_merge >> mirror_files(plan) >> checked
        previous_merge >> checked >> reported >> finish(plan)
    return dag


def build_dags() -> list[DAG]:
    """One DAG per ``include/sources/*.yaml``; a broken config fails loudly, naming its file."""
    return [build_dag(cfg) for cfg in load_source_configs()]
