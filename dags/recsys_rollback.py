"""recsys_rollback: serve an earlier published version again (manual; param `version`).

Runs through Airflow so a rollback is logged, audited and visible like any other run.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task


@dag(
    dag_id="recsys_rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["recsys"],
    doc_md=__doc__,
    params={"version": Param(type="string", pattern=r"^v[0-9]{14}$",
                             description="published version to serve again, e.g. v20261123120000")},
)
def recsys_rollback():
    @task
    def rollback(**context) -> dict:
        from recmodel import db
        from recmodel.config import settings
        from recmodel.publish import rollback as switch

        version = context["params"]["version"]
        previous = switch(db.resolve_url(settings()), version)
        return {"serving": version, "previous": previous}

    rollback()


recsys_rollback()
