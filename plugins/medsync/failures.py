"""What happens when a task or a run fails: no retry of what cannot succeed, a true ledger, an alert.

- ``fail_fast`` wraps every task body: a permanent ``MedsyncError`` (``errors.is_permanent``)
  becomes Airflow's ``AirflowFailException`` with the same message, so the task fails at
  once instead of sitting out its retries; anything else is left to Airflow's retries. A
  database error leaves it with its text cut to what cannot quote a record
  (``database_error_text``), as it is about to be printed in the task log.
- ``task_failed`` is every task's ``on_failure_callback`` (called once the task has failed
  for good, in the task's process, or by Airflow for a task whose process died): it marks
  the run ``failed`` in ``medsync.sync_run`` with the task, the error's class and message,
  and sends the failure alert. A run that failed before prepare registered it (refused
  params, mapping or A's tables) gets its row then, failed, with what the callback knows.
- ``run_failed`` is the DAG's ``on_failure_callback`` (the run failed, was marked failed or
  timed out): it marks the run failed if no task did, drops the run's staging and work
  tables (no task of the run runs any more), and alerts if no task-level alert went out.

Messages come only from medsync's own errors, which carry no record contents. Any other
exception (a database error may quote a row) is recorded by class (and SQLSTATE) only.

Both callbacks write the ledger on a best-effort basis: when A's database cannot be reached or
written, the alert still goes out and says so, because then it is the only news of the failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg

from medsync.errors import MedsyncError, is_permanent

if TYPE_CHECKING:
    from medsync.config import SourceConfig
    from medsync.ledger import Failed

log = logging.getLogger(__name__)


# SQLSTATE classes whose primary message names the server, a lock or a constraint, never a value:
# connection, resources, operator intervention (timeouts), rollbacks (deadlocks), locks,
# integrity (the values are in DETAIL), syntax and access. A data exception's (22) quotes the
# value it could not read; a trigger's RAISE (P0) says whatever it was written to say.
_PRIMARY_MESSAGE_SAFE = frozenset({"08", "23", "40", "42", "53", "55", "57"})


def database_error_text(exc: psycopg.Error) -> str:
    """A database error's text without record contents: class, SQLSTATE, the table, column and
    constraint it names, and its primary message where that cannot quote a value. DETAIL and
    CONTEXT ("Failing row contains (...)", "Key (...)=(...)", "COPY ..., line 3: ...") never."""
    diag = exc.diag
    sqlstate = diag.sqlstate
    text = f"{type(exc).__name__} (SQLSTATE {sqlstate})" if sqlstate else type(exc).__name__
    if sqlstate is None and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        first_line = str(exc).partition("\n")[0]
        text += f": {first_line}"  # the client's own words on a connection that failed
    elif sqlstate and sqlstate[:2] in _PRIMARY_MESSAGE_SAFE and diag.message_primary:
        text += f": {diag.message_primary}"
    for label, name in (("table", diag.table_name), ("column", diag.column_name), ("constraint", diag.constraint_name)):
        if name:
            text += f"; {label} {name}"
    return text + "; DETAIL and CONTEXT not shown (they may quote a record)"


@contextmanager
def fail_fast() -> Iterator[None]:
    """Turns a permanent ``MedsyncError`` raised in the block into ``AirflowFailException`` (no retries);
    a database error leaves the block with its text cut to ``database_error_text``."""
    try:
        yield
    except psycopg.Error as exc:
        # Same exception, class and traceback (Airflow retries it as before); only the text that
        # Airflow prints with the traceback changes, as a DETAIL may carry a name or an MRN.
        exc.args = (database_error_text(exc),)
        raise
    except MedsyncError as exc:
        if not is_permanent(exc):
            raise
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def describe_error(exc: BaseException | str | None) -> tuple[str, str, bool | None]:
    """(class, message, permanent) of a task's error, safe for the ledger and alerts."""
    if exc is None:
        return "Unknown", "Airflow gave no error (the task's process died, or it was marked failed)", None
    if isinstance(exc, str):
        # Airflow passes a text for a task whose process it lost (heartbeat timeout).
        return "TaskLost", exc[:500], None
    from airflow.sdk.exceptions import AirflowFailException, AirflowTaskTerminated, AirflowTaskTimeout

    if isinstance(exc, AirflowFailException) and isinstance(exc.__cause__, MedsyncError):
        exc = exc.__cause__
    if isinstance(exc, MedsyncError):
        return type(exc).__name__, str(exc), exc.permanent
    if isinstance(exc, AirflowTaskTimeout):
        message = "the task ran longer than its execution_timeout (task_timeouts in the config)"
        return "AirflowTaskTimeout", message, False
    if isinstance(exc, AirflowTaskTerminated):
        return "AirflowTaskTerminated", "the task was terminated (marked failed, or its run was stopped)", None
    sqlstate = getattr(getattr(exc, "diag", None), "sqlstate", None) or getattr(exc, "sqlstate", None)
    detail = f" (SQLSTATE {sqlstate})" if sqlstate else ""
    return (
        type(exc).__name__,
        f"{type(exc).__module__}.{type(exc).__name__}{detail}; its text may quote record contents, "
        "so it is only in the task log",
        False,
    )


def _write_ledger(
    cfg: SourceConfig, dag_run_id: str, write: Callable[[psycopg.Connection], Failed | None]
) -> tuple[Failed | None, bool]:
    """``write``'s result on A's database and True; (None, False) when A cannot be reached or written.

    A failure callback must tell someone even when A's database is down (that may be why the
    run failed), so the ledger is best effort here and the caller alerts regardless.
    """
    from medsync.tasks import connect_a

    try:
        with connect_a(cfg) as conn:
            return write(conn), True
    except psycopg.Error as exc:
        # By class only: a database error's text may quote a row or name the server.
        log.error("run %s of %s: the ledger could not be written (%s); alerting without it",
                  dag_run_id, cfg.name, type(exc).__name__)  # fmt: skip
        return None, False


def run_kind(context: Any) -> str:
    """The run's kind (``medsync.windows``) as far as a callback can tell, for a run that failed
    before prepare registered it. Its params are read as given: they may be what was refused."""
    from medsync.windows import REPAIR, RunFacts, sync_kind

    params = context.get("params") or {}
    full_refresh = bool(params.get("full_refresh"))
    if not full_refresh and (params.get("since") or params.get("until")):
        return REPAIR
    run_type = getattr(context["dag_run"], "run_type", None)  # Airflow's DagRunType, a str Enum
    airflow_run_type = str(getattr(run_type, "value", run_type) or "unknown")
    return sync_kind(RunFacts(airflow_run_type, None, None, datetime.now(UTC), full_refresh=full_refresh))


def task_failed(source: str, context: Any) -> None:
    """A task failed for good: the ledger says so now, and someone is told."""
    from medsync import alerts, ledger
    from medsync.config import get_source_config

    ti = context.get("ti") or context.get("task_instance")
    dag_run = context["dag_run"]
    task_id = getattr(ti, "task_id", None)
    error_class, message, permanent = describe_error(context.get("exception"))
    cfg = get_source_config(source)

    def fail(conn: psycopg.Connection) -> Failed | None:
        return ledger.fail(conn, source, dag_run.run_id, task_id=task_id, error_class=error_class, message=message,
                           run_type=run_kind(context))  # fmt: skip

    failed, ledger_written = _write_ledger(cfg, dag_run.run_id, fail)
    run_id = failed.run.id if failed else None
    log.error("run %s of %s failed in %s: %s: %s", dag_run.run_id, source, task_id, error_class, message)
    # Unwritten, the ledger cannot say whether another callback alerted already: alert again.
    if cfg.alerts.on_failure and (failed is None or failed.first):
        alert = alerts.failure_alert(
            cfg,
            dag_run_id=dag_run.run_id,
            run_id=run_id,
            task_id=task_id,
            error_class=error_class,
            message=message,
            try_number=getattr(ti, "try_number", None),
            max_tries=getattr(ti, "max_tries", None),
            permanent=permanent,
            ledger_written=ledger_written,
        )
        alerts.send(cfg.alerts, alert, context)


def run_failed(source: str, context: Any) -> None:
    """The whole run failed: the ledger says so if no task did, the run's staging is dropped."""
    from medsync import alerts, ledger, merge, staging
    from medsync.config import get_source_config

    dag_run = context["dag_run"]
    reason = str(context.get("reason") or "the run failed")
    cfg = get_source_config(source)

    def fail_and_drop_staging(conn: psycopg.Connection) -> Failed | None:
        failed = ledger.fail(conn, source, dag_run.run_id, task_id=None, error_class="RunFailed", message=reason,
                             run_type=run_kind(context))  # fmt: skip
        if failed is not None:
            staging.drop_staging_tables(conn, source, failed.run.id)
            merge.drop_work_tables(conn, source, failed.run.id)
        return failed

    failed, ledger_written = _write_ledger(cfg, dag_run.run_id, fail_and_drop_staging)
    log.error("run %s of %s failed (%s)%s", dag_run.run_id, source, reason,
              "; its staging is dropped" if ledger_written else "")  # fmt: skip
    if cfg.alerts.on_failure and (not ledger_written or (failed is not None and failed.first)):
        alert = alerts.failure_alert(
            cfg,
            dag_run_id=dag_run.run_id,
            run_id=failed.run.id if failed else None,
            task_id=None,
            error_class="RunFailed",
            message=reason,
            ledger_written=ledger_written,
        )
        alerts.send(cfg.alerts, alert, context)
