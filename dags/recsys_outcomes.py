"""recsys_outcomes: what the lists each served version showed its users achieved.

Runs on its own schedule (RECSYS_OUTCOMES_SCHEDULE, default hourly). It reads only the interactions
ingested since its last run and records, per served version and user, the first new item the user
touched and where it stood in the list served to them and in the popularity list
(`recsys.outcome_events`; per version: the `recsys.realized_outcomes` view). When the serving
version's realized hit rate@10 was below its popularity list's on each of the last
RECSYS_UNDERPERFORM_DAYS days with outcomes (default 3), the task fails with an `underperforming`
alert; the outcomes are recorded either way. This is an observational measure, not an A/B test.
"""

from __future__ import annotations

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowSkipException

from recmodel.config import settings
from recmodel.notifier import check_dag_arguments


@dag(dag_id="recsys_outcomes", schedule=settings().outcomes_schedule, doc_md=__doc__, **check_dag_arguments())
def recsys_outcomes():
    @task(multiple_outputs=False)
    def measure_outcomes() -> dict:
        from recmodel import outcomes, taskenv
        from recmodel.config import settings

        url = taskenv.database_url()
        result = outcomes.update(url)
        if result.read_after is None:
            raise AirflowSkipException(result.message)
        if why := outcomes.underperformance(url, settings().underperform_days):
            raise outcomes.UnderperformingError(why)
        return {"users_recorded": result.users_recorded, "unjudged": result.unjudged,
                "read_through": result.read_through.isoformat()}

    measure_outcomes()


recsys_outcomes()
