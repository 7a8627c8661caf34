"""Telling someone: a run failed, or its report crossed a threshold (``alerts`` in the source config).

An ``Alert`` says the source, the run, what happened and where to look; it is built only
from ids, counts, task names and medsync's own error messages (which carry no record
contents), never from a record or a connection. ``send`` hands it to the Airflow notifiers
the source's ``alerts`` section names: e-mail through the smtp provider's ``SmtpNotifier``,
a JSON POST through ``WebhookNotifier`` (an ``HttpHook``), Slack through the slack
provider's ``SlackWebhookNotifier`` where that provider is installed. Addresses, URLs and
keys live in the notifiers' Airflow connections.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

from airflow.sdk import BaseNotifier

from medsync.config import LEVELS, AlertsConfig, AlertThresholds, SourceConfig

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)

FAILURE, REPORT = "failure", "report"
ONCALL_DOC = "README.md, section 'On call'"


@dataclass(frozen=True)
class Alert:
    event: str
    """``failure`` or ``report``."""
    source: str
    dag_id: str
    dag_run_id: str
    run_id: int | None
    summary: str
    details: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    @property
    def subject(self) -> str:
        return f"[medsync] {self.summary}"

    def text(self) -> str:
        lines = [self.summary, "", *self.details, "", "Where to look:", *(f"- {w}" for w in self.where)]
        return "\n".join(lines)

    def html(self) -> str:
        return f"<pre>{html.escape(self.text())}</pre>"

    def as_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "source": self.source,
            "dag_id": self.dag_id,
            "dag_run_id": self.dag_run_id,
            "run_id": self.run_id,
            "summary": self.summary,
            "details": self.details,
            "where": self.where,
        }


def ui_base_url(alerts: AlertsConfig) -> str:
    if alerts.ui_base_url:
        return alerts.ui_base_url.rstrip("/")
    from airflow.sdk.configuration import conf

    return str(conf.get("api", "base_url", fallback="http://localhost:8080/")).rstrip("/")


def run_url(alerts: AlertsConfig, dag_id: str, dag_run_id: str, task_id: str | None = None) -> str:
    url = f"{ui_base_url(alerts)}/dags/{dag_id}/runs/{quote(dag_run_id, safe='')}"
    return f"{url}/tasks/{task_id}" if task_id else url


def _ledger_query(run_id: int | None, source: str, dag_run_id: str) -> str:
    where = f"id = {run_id}" if run_id is not None else f"source_system = '{source}' AND dag_run_id = '{dag_run_id}'"
    columns = "status, failed_task, error_class, error_message, report"
    return f"A's database: SELECT {columns} FROM medsync.sync_run WHERE {where}"


def failure_alert(
    cfg: SourceConfig,
    *,
    dag_run_id: str,
    run_id: int | None,
    task_id: str | None,
    error_class: str,
    message: str,
    try_number: int | None = None,
    max_tries: int | None = None,
    permanent: bool | None = None,
    ledger_written: bool = True,
) -> Alert:
    """``ledger_written`` False: A's database could not be reached or written when the run failed."""
    where_failed = f"task {task_id}" if task_id else "the run (no task named: killed, timed out or marked failed)"
    details = [
        f"source: {cfg.name} (DAG {cfg.dag_id})",
        f"run: {dag_run_id}" + (f" (medsync run {run_id})" if run_id is not None else ""),
        f"failed: {where_failed}" + (f", try {try_number} of {max_tries}" if try_number and max_tries else ""),
        f"error: {error_class}: {message}",
    ]
    if not ledger_written:
        details.append(
            "ledger not written: A's database could not be reached or written, so medsync.sync_run does not "
            "say this (the run may still say running there); this alert may come once per failed task"
        )
    if permanent is True:
        details.append("not retried: retrying cannot fix this error; fix its cause, then clear the run from prepare")
    elif permanent is False:
        details.append("transient error: retried until the task's retries ran out")
    where = [
        f"task log: {run_url(cfg.alerts, cfg.dag_id, dag_run_id, task_id)}",
        _ledger_query(run_id, cfg.name, dag_run_id),
        f"what to do, and repairs from the trigger form: {ONCALL_DOC}",
    ]
    summary = f"{cfg.name}: run {dag_run_id} failed in {task_id or 'the run'}: {error_class}"
    return Alert(FAILURE, cfg.name, cfg.dag_id, dag_run_id, run_id, summary, details, where)


def report_findings(report: dict[str, Any], thresholds: AlertThresholds) -> list[str]:
    """What in a run's report crosses the source's thresholds, one line each (counts only)."""
    levels = report.get("levels") or {}
    ordered = [(level, levels[level]) for level in LEVELS if level in levels]
    found: list[str] = []
    quarantined = sum(int(f.get("newly_quarantined") or 0) for _, f in ordered)
    if thresholds.quarantined is not None and quarantined >= thresholds.quarantined:
        per_level = ", ".join(f"{lv} {f['newly_quarantined']}" for lv, f in ordered if f.get("newly_quarantined"))
        found.append(f"quarantine grew: {quarantined} records newly held back ({per_level})")
    if thresholds.pending_older_than_days is not None:
        for level, f in ordered:
            days = f.get("oldest_pending_days")
            if days is not None and days > thresholds.pending_older_than_days:
                found.append(
                    f"{level}: {f.get('pending')} records pending, the oldest for {days:.1f} days "
                    f"(more than {thresholds.pending_older_than_days:g}): their parents never arrived"
                )
    files = report.get("files") or {}
    unreadable = sum(int(files.get(k) or 0) for k in ("missing", "denied", "refused", "errors"))
    if thresholds.file_check_failures is not None and unreadable >= thresholds.file_check_failures:
        found.append(f"file check: {unreadable} of {files.get('checked')} sampled files not readable")
    if thresholds.reconciliation_drift is not None:
        for level, f in ordered:
            drift = f.get("live_count_drift")
            if drift and abs(int(drift)) >= thresholds.reconciliation_drift:
                found.append(f"{level}: A's kept live count was off by {drift} rows (rows changed outside medsync?)")
    older = sum(int(f.get("older_than_a") or 0) for _, f in ordered)
    if thresholds.older_than_a is not None and older >= thresholds.older_than_a:
        per_level = ", ".join(f"{lv} {f['older_than_a']}" for lv, f in ordered if f.get("older_than_a"))
        found.append(f"the source sent {older} records older than A holds ({per_level}): did it go back in time?")
    return found


def report_alert(cfg: SourceConfig, report: dict[str, Any], findings: list[str]) -> Alert:
    dag_run_id = str(report.get("dag_run_id") or "")
    run_id = report.get("run_id")
    where = [
        f"report task log: {run_url(cfg.alerts, cfg.dag_id, dag_run_id, 'report')}",
        _ledger_query(run_id, cfg.name, dag_run_id),
        "held back: SELECT level, source_key, reason FROM medsync.quarantine WHERE resolved_at IS NULL",
        f"what to do: {ONCALL_DOC}",
    ]
    summary = f"{cfg.name}: run {dag_run_id} succeeded, but its report needs a look ({len(findings)} findings)"
    details = [f"source: {cfg.name} (DAG {cfg.dag_id})", f"run: {dag_run_id} (medsync run {run_id})", *findings]
    return Alert(REPORT, cfg.name, cfg.dag_id, dag_run_id, run_id, summary, details, where)


class WebhookNotifier(BaseNotifier):
    """POSTs an alert as JSON to an HTTP connection (host = the receiver's base URL)."""

    template_fields = ()

    def __init__(self, *, http_conn_id: str, endpoint: str, payload: dict[str, Any], timeout: float) -> None:
        super().__init__()
        self.http_conn_id = http_conn_id
        self.endpoint = endpoint
        self.payload = payload
        self.timeout = timeout

    def notify(self, context: Any) -> None:
        from airflow.providers.http.hooks.http import HttpHook

        HttpHook(method="POST", http_conn_id=self.http_conn_id).run(
            self.endpoint,
            json=self.payload,
            headers={"Content-Type": "application/json"},
            extra_options={"timeout": self.timeout, "check_response": True},
        )


def notifiers(alerts: AlertsConfig, alert: Alert) -> list[BaseNotifier]:
    """The notifiers the config names, each carrying this alert."""
    out: list[BaseNotifier] = []
    if alerts.email is not None:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        out.append(
            SmtpNotifier(
                to=list(alerts.email.to),
                from_email=alerts.email.from_email,
                subject=alert.subject,
                html_content=alert.html(),
                smtp_conn_id=alerts.email.smtp_conn_id,
            )
        )
    if alerts.webhook is not None:
        out.append(
            WebhookNotifier(
                http_conn_id=alerts.webhook.http_conn_id,
                endpoint=alerts.webhook.endpoint,
                payload=alert.as_json(),
                timeout=alerts.webhook.timeout_seconds,
            )
        )
    if alerts.slack is not None:
        from airflow.providers.slack.notifications.slack_webhook import (  # type: ignore[import-not-found]
            SlackWebhookNotifier,
        )

        out.append(SlackWebhookNotifier(slack_webhook_conn_id=alerts.slack.slack_webhook_conn_id, text=alert.text()))
    return out


def send(alerts: AlertsConfig, alert: Alert, context: Any = None) -> list[str]:
    """Sends the alert through every configured notifier; returns the names of those that failed.

    A notifier that fails is logged and the others still run: an alert channel being down
    must not hide the alert from the other channels, nor fail the run it reports on.
    """
    failed: list[str] = []
    for notifier in notifiers(alerts, alert):
        name = type(notifier).__name__
        try:
            # notify(), not __call__: the message is final text, not a template to render.
            notifier.notify(cast("Context", context or {}))
        except Exception as exc:  # noqa: BLE001  (any notifier, any transport: logged, the others still run)
            failed.append(name)
            log.error("alert %r not sent through %s: %s", alert.summary, name, type(exc).__name__)
        else:
            log.info("alert sent through %s: %s", name, alert.summary)
    return failed
