"""The Airflow side of alerting: the recsys DAGs' ``on_failure_callback`` and the check DAGs' arguments.

Kept apart from `recmodel.alerts` so that code running stages without Airflow (`pipeline.run_all`,
`bench`) never imports Airflow: Airflow reads its configuration once, when first imported.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseNotifier

from recmodel import registry, taskenv
from recmodel.alerts import Alert, send
from recmodel.stages import RETRAIN_DAG_ID

# The pipeline_runs kind of the other DAGs' rows (a retrain run reports to its own run's row).
EVENT_KINDS = {"recsys_rollback": "rollback", "recsys_freshness": "freshness", "recsys_fresh_data": "fresh_data",
               "recsys_outcomes": "outcomes"}


def run_key_of(context: dict[str, Any]) -> tuple[str, str]:
    """(run_key, kind) of the pipeline_runs row an Airflow run reports to."""
    dag_run = context["dag_run"]
    if dag_run.dag_id == RETRAIN_DAG_ID:
        return registry.run_key_for(taskenv.as_of_and_conf(context)[0]), "retrain"
    kind = EVENT_KINDS[dag_run.dag_id]
    return f"{kind}:{dag_run.run_id}", kind



class RecsysNotifier(BaseNotifier):
    """``on_failure_callback`` of the recsys DAGs: marks the run failed and sends a `task_failed` alert.

    A check's own finding (a stale serving table, an underperforming version: an exception with an
    ``alert_kind``) is reported as that kind, with its message.
    """

    def notify(self, context: dict[str, Any]) -> None:
        url = taskenv.database_url()
        ti = context["task_instance"]
        error = context.get("exception")
        run_key, kind = run_key_of(context)
        detail = f"{type(error).__name__}: {error}" if error else "no exception recorded"
        message = f"{ti.task_id} failed: {detail}"
        # A rerun refused because its version was published never claimed its row: the row under its
        # key is the published run's own, and stays as it is.
        refused = isinstance(error, registry.VersionIsPublished) or isinstance(getattr(error, "__cause__", None),
                                                                               registry.VersionIsPublished)
        if kind == "retrain" and not refused:
            registry.update_run(url, run_key, status="failed", stage=ti.task_id, message=message)
        elif kind != "retrain":
            registry.record_event(url, run_key, kind=kind, status="failed", stage=ti.task_id, message=message,
                                  dag_run_id=ti.run_id)
        alert_kind = getattr(error, "alert_kind", "task_failed")
        send(url, run_key, Alert(alert_kind, f"{ti.dag_id}.{ti.task_id} failed (run {ti.run_id})", message), context,
             record=not refused)



def check_dag_arguments() -> dict[str, Any]:
    """`@dag` arguments of the small periodic checks (`recsys_fresh_data`, `recsys_freshness`, `recsys_outcomes`) besides
    their schedule: from 2026, no catch-up, one run at a time, no retries (the next check comes soon),
    and a failure alerts like any other task's."""
    import pendulum

    return {"start_date": pendulum.datetime(2026, 1, 1, tz="UTC"), "catchup": False,
            "max_active_runs": 1, "tags": ["recsys"],
            "default_args": {"retries": 0, "on_failure_callback": RecsysNotifier()}}
