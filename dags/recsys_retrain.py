"""recsys_retrain: extract -> validate -> train -> export -> gate -> score -> publish.

Thin wiring only: each task builds the run's context and calls one `recmodel.pipeline` step.
Heavy libraries (torch, GX, transformers, onnxruntime) are imported inside the steps, so this
file parses in milliseconds. Tasks pass small dicts (paths, counts) through XCom.

The run's data ends at `conf["as_of"]` when given (the CLI passes it), else at the end of the
scheduled data interval; everything else in `conf` overrides `recmodel.config.PipelineConfig`.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

SCHEDULE = os.environ.get("RECSYS_RETRAIN_SCHEDULE", "@daily")


def _context(context: dict[str, Any]):
    from recmodel.pipeline import make_context

    conf = dict(context["dag_run"].conf or {})
    as_of = conf.pop("as_of", None)
    when = pendulum.parse(as_of) if as_of else (context.get("data_interval_end") or context["dag_run"].run_after)
    return make_context(when, conf)


def _record_failure(context: dict[str, Any]) -> None:
    from recmodel.pipeline import record_failure

    ctx = _context(context)
    record_failure(ctx.url, ctx.run_key, context["task_instance"].task_id, context.get("exception"))


@dag(
    dag_id="recsys_retrain",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["recsys"],
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2), "on_failure_callback": _record_failure},
)
def recsys_retrain():
    @task
    def extract(**context) -> dict:
        from recmodel.pipeline import step_extract

        return step_extract(_context(context), dag_run_id=context["run_id"])

    @task
    def validate(extracted: dict, **context) -> dict:
        from recmodel.extract import ExtractError
        from recmodel.pipeline import step_validate
        from recmodel.validate import DataValidationError

        try:
            validated = step_validate(_context(context), extracted)
        except (DataValidationError, ExtractError) as exc:
            raise AirflowFailException(str(exc)) from exc  # bad data: a retry would fail the same way
        if not validated["new_rows"]:
            raise AirflowSkipException(validated["message"])
        return validated

    @task
    def train(validated: dict, **context) -> dict:
        from recmodel.pipeline import step_train

        return step_train(_context(context), validated)

    @task
    def export(trained: dict, **context) -> dict:
        from recmodel.pipeline import step_export

        return step_export(_context(context), trained)

    @task
    def gate(exported: dict, **context) -> dict:
        from recmodel.pipeline import step_gate

        return step_gate(_context(context), exported)

    @task
    def score(gated: dict, **context) -> dict:
        from recmodel.pipeline import step_score

        if not gated["accepted"]:
            raise AirflowSkipException("gate rejected the candidate; the champion keeps serving: "
                                       + "; ".join(gated["reasons"]))
        return step_score(_context(context), gated)

    @task
    def publish(scored: dict, **context) -> dict:
        from recmodel.pipeline import step_publish

        return step_publish(_context(context), scored)

    publish(score(gate(export(train(validate(extract()))))))


recsys_retrain()
