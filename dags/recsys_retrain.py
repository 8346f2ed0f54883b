"""recsys_retrain: extract -> validate -> train -> export -> gate -> refit -> score (mapped over shards) -> publish.

Thin wiring only: the tasks are built from the ordered stage list in `recmodel.stages`, the same
list `recmodel.pipeline.run_all` follows, and each calls its stage through `pipeline.run_task`,
which builds the run's context and does the stage's bookkeeping. Heavy libraries (torch, GX,
transformers, onnxruntime) are imported inside the steps, so this file parses in milliseconds.
Tasks pass each stage's typed result (`recmodel.manifest`) through XCom as JSON, one XCom per task
(`multiple_outputs=False`: the value whole, not one row per key as a `-> dict` annotation would infer).

The run's data ends at `conf["as_of"]` when given (the CLI and the UI pass it), else at the end
of the scheduled data interval; everything else in `conf` overrides `recmodel.config.PipelineConfig`.
Tasks find the database through the Airflow connection `recsys_db`. A failed task and a rejected
candidate raise alerts (`recmodel.alerts`): a log line, an entry in `recsys.pipeline_runs`, and an
e-mail when `RECSYS_ALERT_EMAIL` is set.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task

from recmodel import stages
from recmodel.notifier import RecsysNotifier
from recmodel.assets import FRESH_INTERACTIONS, PUBLISHED_RECOMMENDATIONS
from recmodel.config import settings

ENV = settings()  # the environment, checked: a bad variable is an import error that names it
# A task that fails on a transient fault (a dropped connection, a restarted database) runs once more.
RETRY_DELAY = timedelta(seconds=ENV.retry_delay_seconds)


def queue_of(stage: stages.Stage) -> dict[str, str]:
    # On a Celery deployment the GPU worker listens on the train queue (docker-compose.yaml: `gpu`);
    # every other task, the scoring shards included, stays on Airflow's default queue.
    return {"queue": ENV.train_queue} if stage.train_queue else {}


def chain_task(stage: stages.Stage, first: bool):
    """The task of a `stages.CHAIN` stage: its input is the upstream task's XCom (none for the first)."""
    options = {"task_id": stage.name, "doc_md": stage.doc, "multiple_outputs": False, **queue_of(stage)}
    if first:
        @task(**options)
        def run_first(**context: Any) -> Any:
            from recmodel.pipeline import run_task

            return run_task(stage.name, context)

        return run_first

    @task(**options)
    def run_next(upstream: dict, **context: Any) -> Any:
        from recmodel.pipeline import run_task

        return run_task(stage.name, context, upstream)

    return run_next


@dag(
    dag_id=stages.RETRAIN_DAG_ID,
    # On the cron schedule, and also as soon as recsys_fresh_data reports enough new interactions.
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(ENV.retrain_schedule, timezone="UTC"),
                                 assets=FRESH_INTERACTIONS),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["recsys"],
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": RETRY_DELAY, "on_failure_callback": RecsysNotifier()},
)
def recsys_retrain():
    gated = None
    for position, stage in enumerate(stages.CHAIN):
        gated = chain_task(stage, first=True)() if position == 0 else chain_task(stage, first=False)(gated)

    @task
    def plan_scoring(gated: dict, **context) -> list[int]:
        """One mapped `score_users` task per user shard (`score_shards` in the run's conf)."""
        from recmodel.pipeline import plan_scoring_task

        return plan_scoring_task(context, gated)

    @task(task_id=stages.SCORE_USERS.name, doc_md=stages.SCORE_USERS.doc, multiple_outputs=False)
    def score_users(gated: dict, shard: int, **context) -> dict:
        from recmodel.pipeline import run_task

        return run_task(stages.SCORE_USERS.name, context, gated, shard)

    @task(task_id=stages.SCORE_ITEMS.name, doc_md=stages.SCORE_ITEMS.doc, multiple_outputs=False)
    def score_items(gated: dict, **context) -> dict:
        from recmodel.pipeline import run_task

        return run_task(stages.SCORE_ITEMS.name, context, gated)

    # outlets: consumers can schedule on a new version serving
    @task(task_id=stages.PUBLISH.name, doc_md=stages.PUBLISH.doc, multiple_outputs=False,
          outlets=[PUBLISHED_RECOMMENDATIONS])
    def publish(user_shards: list[dict], item_tables: dict, **context) -> dict:
        from recmodel.pipeline import run_task

        # One slice request: iterating the lazy sequence probes one index past its end, which Airflow
        # logs as an "XCom not found" error in every successful run.
        return run_task(stages.PUBLISH.name, context, user_shards[:], item_tables)

    user_shards = score_users.partial(gated=gated).expand(shard=plan_scoring(gated))
    publish(user_shards, score_items(gated))


recsys_retrain()
