"""recsys_fresh_data: update the `recsys_fresh_interactions` asset when enough new interactions arrived.

A lightweight check (one indexed count) every RECSYS_FRESH_DATA_SCHEDULE (default 15 minutes). When
at least RECSYS_RETRAIN_MIN_NEW_ROWS (default 10,000) rows were ingested since the newest snapshot
and no retrain is running, the task succeeds and Airflow records an asset event, which starts
`recsys_retrain` ahead of its cron schedule. Otherwise the task is skipped, which records nothing.
"""

from __future__ import annotations

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowSkipException

from recmodel.notifier import check_dag_arguments
from recmodel.assets import FRESH_INTERACTIONS
from recmodel.config import settings


@dag(dag_id="recsys_fresh_data", schedule=settings().fresh_data_schedule, doc_md=__doc__, **check_dag_arguments())
def recsys_fresh_data():
    @task(multiple_outputs=False, outlets=[FRESH_INTERACTIONS])
    def count_fresh_interactions() -> dict:
        from recmodel import taskenv
        from recmodel.extract import fresh_interactions

        threshold = settings().retrain_min_new_rows
        rows, running = fresh_interactions(taskenv.database_url())
        if running:
            raise AirflowSkipException(f"{rows:,} new interactions, but a retrain is running; it will read them")
        if rows < threshold:
            raise AirflowSkipException(f"{rows:,} new interactions since the last snapshot; a retrain waits for "
                                       f"{threshold:,} (RECSYS_RETRAIN_MIN_NEW_ROWS) or its schedule")
        return {"new_rows": rows, "threshold": threshold}

    count_fresh_interactions()


recsys_fresh_data()
