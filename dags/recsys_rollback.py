"""recsys_rollback: serve an earlier published version again (manual; param `version`).

Runs through Airflow so a rollback is logged, audited and visible like any other run; it also
gets a `kind = 'rollback'` row in `recsys.pipeline_runs`. The UI's rollback button triggers it.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from recmodel.notifier import RecsysNotifier


@dag(
    dag_id="recsys_rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["recsys"],
    doc_md=__doc__,
    params={"version": Param(type="string", pattern=r"^v[0-9]{14}(-baseline)?$",
                             description="published version to serve again, e.g. v20261123120000 "
                                         "(or a baseline, v20261123120000-baseline)")},
    default_args={"on_failure_callback": RecsysNotifier()},
)
def recsys_rollback():
    @task(multiple_outputs=False)
    def rollback(**context) -> dict:
        from recmodel import registry, taskenv
        from recmodel.publish import rollback as switch

        url = taskenv.database_url()
        version = context["params"]["version"]
        run_key = f"rollback:{context['run_id']}"
        registry.record_event(url, run_key, kind="rollback", status="running", stage="rollback",
                              message=f"rolling back to {version}", dag_run_id=context["run_id"])
        previous = switch(url, version)
        registry.record_event(url, run_key, kind="rollback", status="success", stage="rollback",
                              message=f"{version} now serves (was {previous or 'nothing'})",
                              dag_run_id=context["run_id"], model_version=version)
        return {"serving": version, "previous": previous}

    rollback()


recsys_rollback()
