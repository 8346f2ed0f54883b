"""recsys_freshness: flag serving tables older than RECSYS_MAX_SERVING_AGE_HOURS (default 36 h).

Runs on its own schedule (RECSYS_FRESHNESS_SCHEDULE, default hourly), independent of retraining,
so a retrain DAG that stopped running is noticed too. A stale table fails the task, which sends a
`serving_stale` alert (log line, `recsys.pipeline_runs` row of kind 'freshness', e-mail when
RECSYS_ALERT_EMAIL is set). Nothing published yet is a skip, not an alert.
"""

from __future__ import annotations

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowSkipException

from recmodel.notifier import check_dag_arguments
from recmodel.config import settings


@dag(dag_id="recsys_freshness", schedule=settings().freshness_schedule, doc_md=__doc__, **check_dag_arguments())
def recsys_freshness():
    @task(multiple_outputs=False)
    def check_serving_freshness() -> dict:
        from recmodel import alerts, registry, taskenv

        freshness = registry.serving_freshness(taskenv.database_url())
        if freshness.version is None:
            raise AirflowSkipException(freshness.message)
        if freshness.stale:
            raise alerts.StaleServingError(freshness.message)
        return {"version": freshness.version, "age_hours": round(freshness.age_hours, 2)}

    check_serving_freshness()


recsys_freshness()
