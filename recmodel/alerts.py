"""Alerts: a failed task, a rejected candidate or a stale serving table reaches an operator.

Every alert is, always, a log line starting ``RECSYS ALERT`` and an entry in the ``alerts`` list
of its ``recsys.pipeline_runs`` row (the UI lists them). When ``RECSYS_ALERT_EMAIL`` is set it is
also an e-mail through Airflow's SMTP notifier, using the Airflow connection named by
``RECSYS_SMTP_CONN_ID`` (default ``smtp_default``, e.g. ``AIRFLOW_CONN_SMTP_DEFAULT=smtp://host:25``).
A broken mail server never hides an alert: the failure is logged and recorded with the alert.

`recmodel.notifier.RecsysNotifier` is the Airflow notifier the DAGs use as ``on_failure_callback``;
the gate stage raises `gate_rejection` (sent by the stage's bookkeeping, `pipeline.recorded`); the
``recsys_freshness`` DAG fails (and so alerts) when `registry.serving_freshness` finds the serving
tables older than ``RECSYS_MAX_SERVING_AGE_HOURS``; the ``recsys_outcomes`` DAG fails (``underperforming``)
when `outcomes.underperformance` finds the serving version below its popularity list for
``RECSYS_UNDERPERFORM_DAYS`` days. This module imports Airflow only to send e-mail.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from datetime import datetime, UTC
from typing import TYPE_CHECKING, Any

from recmodel import db, registry
from recmodel.config import ENV_VARIABLE, ConfigError, Settings, settings

if TYPE_CHECKING:
    from recmodel.manifest import Gated

log = logging.getLogger(__name__)

ALERT_EMAIL_ENV = ENV_VARIABLE["alert_emails"]  # comma-separated recipients; unset: log + table only


@dataclass(frozen=True)
class Alert:
    kind: str  # task_failed | gate_rejected | serving_stale | underperforming
    subject: str
    message: str


def send(url: str, run_key: str, alert: Alert, context: dict[str, Any] | None = None, *,
         record: bool = True) -> list[str]:
    """Deliver one alert on every configured channel (and, with `record`, on the run's pipeline_runs row);
    returns the channels that took it."""
    # A rejected candidate is a run that succeeded at its job (nothing worse serves): a warning, not an error.
    log.log(logging.WARNING if alert.kind == "gate_rejected" else logging.ERROR, "RECSYS ALERT [%s] %s: %s",
            alert.kind, alert.subject, alert.message)
    channels = ["log"]
    try:
        env = settings()
    except ConfigError as exc:  # the alert still reaches the log and the run's row
        log.error("RECSYS ALERT e-mail not attempted: %s", exc)
        env = None
    recipients = list(env.alert_emails) if env else []
    email_error = None
    if recipients:
        try:
            _email(env, alert, context or {})
            channels.append("email:" + ",".join(recipients))
        except Exception as exc:  # noqa: BLE001 - the alert must still be logged and recorded
            email_error = f"{type(exc).__name__}: {exc}"
            log.error("RECSYS ALERT e-mail to %s failed (%s); the alert is in recsys.pipeline_runs",
                      ",".join(recipients), email_error)
    entry = {"kind": alert.kind, "at": datetime.now(UTC).isoformat(), "subject": alert.subject,
             "message": alert.message, "channels": [*channels, "pipeline_runs"]}
    if email_error:
        entry["email_error"] = email_error
    if not record:
        entry["channels"].remove("pipeline_runs")
        return entry["channels"]
    try:
        if not registry.append_alert(url, run_key, entry):
            log.error("RECSYS ALERT not recorded: no recsys.pipeline_runs row %r", run_key)
            entry["channels"].remove("pipeline_runs")
    except db.DatabaseError as exc:
        log.error("RECSYS ALERT not recorded in recsys.pipeline_runs: %s", exc)
        entry["channels"].remove("pipeline_runs")
    return entry["channels"]


def _email(env: Settings, alert: Alert, context: dict[str, Any]) -> None:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    body = f"<p>{html.escape(alert.message)}</p>"
    if ti := context.get("task_instance"):
        body += f"<p>Airflow: {html.escape(ti.dag_id)} / {html.escape(ti.task_id)}, run {html.escape(ti.run_id)}</p>"
    notifier = SmtpNotifier(to=list(env.alert_emails), from_email=env.alert_from, subject=f"[recsys] {alert.subject}",
                            html_content=body, smtp_conn_id=env.smtp_conn_id)
    notifier.notify(context)


class StaleServingError(RuntimeError):
    """The serving tables are older than the configured age."""

    alert_kind = "serving_stale"


def gate_rejection(url: str, version: str, gated: Gated) -> Alert:
    """The alert for a candidate that was not accepted (rejected, or undecided on too little evidence)."""
    if gated.serve == "baseline":
        serving = f"the popularity baseline {gated.publish_version} will serve"
    else:
        current = registry.serving_watermark(url)
        serving = f"{current[0]} keeps serving" if current else "nothing is published yet"
    message = f"gate {gated.decision} {version}; {serving}: " + "; ".join(gated.reasons)
    return Alert("gate_rejected", f"candidate {version} {gated.decision} by the gate", message)
