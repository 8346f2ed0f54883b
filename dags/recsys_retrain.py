"""recsys_retrain: extract -> validate -> train -> export -> gate -> refit -> score (mapped over shards) -> publish.

Thin wiring only: each task builds the run's context and calls one `recmodel.pipeline` step.
Heavy libraries (torch, GX, transformers, onnxruntime) are imported inside the steps, so this
file parses in milliseconds. Tasks pass small dicts (paths, counts) through XCom, one XCom per task
(`multiple_outputs=False`: the dict whole, not one row per key as a `-> dict` annotation would infer).

The run's data ends at `conf["as_of"]` when given (the CLI and the UI pass it), else at the end
of the scheduled data interval; everything else in `conf` overrides `recmodel.config.PipelineConfig`.
A failed task and a rejected candidate raise alerts (`recmodel.alerts`): a log line, a row entry in
`recsys.pipeline_runs`, and an e-mail when `RECSYS_ALERT_EMAIL` is set.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from recmodel.alerts import RecsysNotifier
from recmodel.assets import FRESH_INTERACTIONS, PUBLISHED_RECOMMENDATIONS
from recmodel.config import settings

ENV = settings()  # the environment, checked: a bad variable is an import error that names it
SCHEDULE = ENV.retrain_schedule
# A task that fails on a transient fault (a dropped connection, a restarted database) runs once more.
RETRY_DELAY = timedelta(seconds=ENV.retry_delay_seconds)
# On a Celery deployment the GPU worker listens on this queue (docker-compose.yaml: `gpu`); every
# other task, the scoring shards included, stays on Airflow's default queue.
TRAIN_QUEUE = ENV.train_queue
# A scheduled run (or a backfill's) that finds another retrain alive on the database waits this long
# for it before failing: one run at a time per database, whoever started the other one.
LIVE_RUN_WAIT = timedelta(minutes=ENV.live_run_wait_minutes)


def _context(context: dict[str, Any]):
    from recmodel.pipeline import context_from_airflow

    return context_from_airflow(context)


@dag(
    dag_id="recsys_retrain",
    # On the cron schedule, and also as soon as recsys_fresh_data reports enough new interactions.
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(SCHEDULE, timezone="UTC"), assets=FRESH_INTERACTIONS),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["recsys"],
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": RETRY_DELAY, "on_failure_callback": RecsysNotifier()},
)
def recsys_retrain():
    @task(multiple_outputs=False)
    def extract(**context) -> dict:
        from recmodel.config import ConfigError
        from recmodel.extract import ExtractError
        from recmodel.pipeline import step_extract
        from recmodel.registry import RunRefused

        try:
            return step_extract(_context(context), dag_run_id=context["run_id"],
                                wait_seconds=LIVE_RUN_WAIT.total_seconds())
        except (ExtractError, ConfigError, RunRefused) as exc:
            # a changed schema, an empty catalog, a bad setting or as-of, another live run, a published
            # version: a retry would fail the same way
            raise AirflowFailException(str(exc)) from exc

    @task(multiple_outputs=False)
    def validate(extracted: dict, **context) -> dict:
        from recmodel.extract import ExtractError
        from recmodel.pipeline import step_validate
        from recmodel.validate import DataValidationError

        try:
            validated = step_validate(_context(context), extracted)
        except (DataValidationError, ExtractError) as exc:
            raise AirflowFailException(str(exc)) from exc  # bad data: a retry would fail the same way
        if validated["dataset_path"] is None:
            raise AirflowSkipException(validated["message"])
        return validated

    @task(multiple_outputs=False, queue=TRAIN_QUEUE)
    def train(validated: dict, **context) -> dict:
        from recmodel.pipeline import SupersededRun, step_train

        try:
            return step_train(_context(context), validated)
        except SupersededRun as exc:
            raise AirflowSkipException(str(exc)) from exc

    @task(multiple_outputs=False)
    def export(trained: dict, **context) -> dict:
        from recmodel.pipeline import step_export

        return step_export(_context(context), trained)

    @task(multiple_outputs=False)
    def gate(exported: dict, **context) -> dict:
        from recmodel.alerts import notify_gate_rejection
        from recmodel.pipeline import step_gate

        ctx = _context(context)
        gated = step_gate(ctx, exported)
        if gated["decision"] != "accepted":
            notify_gate_rejection(ctx.url, ctx.run_key, ctx.version, gated, context)
        return gated

    @task(multiple_outputs=False, queue=TRAIN_QUEUE)
    def refit(gated: dict, **context) -> dict:
        """The accepted model trained on the whole snapshot, holdout included (a no-op otherwise)."""
        from recmodel.pipeline import step_refit

        return step_refit(_context(context), gated)

    @task
    def plan_scoring(gated: dict, **context) -> list[int]:
        """One mapped `score_users` task per user shard (`score_shards` in the run's conf)."""
        if gated["serve"] is None:
            raise AirflowSkipException(f"gate {gated['decision']}; nothing new to publish: "
                                       + "; ".join(gated["reasons"]))
        return list(range(_context(context).config.score_shards))

    @task(multiple_outputs=False)
    def score_users(gated: dict, shard: int, **context) -> dict:
        from recmodel.pipeline import step_score_users

        ctx = _context(context)
        return step_score_users(ctx, gated, shard, ctx.config.score_shards)

    @task(multiple_outputs=False)
    def score_items(gated: dict, **context) -> dict:
        from recmodel.pipeline import step_score_items

        if gated["serve"] is None:
            raise AirflowSkipException(f"gate {gated['decision']}; nothing to score")
        return step_score_items(_context(context), gated)

    @task(multiple_outputs=False, outlets=[PUBLISHED_RECOMMENDATIONS])  # consumers can schedule on a new version serving
    def publish(user_shards: list[dict], item_tables: dict, **context) -> dict:
        from recmodel.pipeline import scored_tables, step_publish

        ctx = _context(context)
        # One slice request: iterating the lazy sequence probes one index past its end, which Airflow
        # logs as an "XCom not found" error in every successful run.
        return step_publish(ctx, scored_tables(ctx, user_shards[:], item_tables))

    gated = refit(gate(export(train(validate(extract())))))
    user_shards = score_users.partial(gated=gated).expand(shard=plan_scoring(gated))
    publish(user_shards, score_items(gated))


recsys_retrain()
