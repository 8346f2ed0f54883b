"""The retrain's stages in order: the one list that the DAG's tasks and `pipeline.run_all` are built from.

Stage `name` is the task id, the key of the stage in the run manifest and in
``recsys.pipeline_runs.details``, and the step that does the work is ``recmodel.pipeline.step_<name>``.
`CHAIN` stages each take the previous one's output; after them, the users are scored in shards
(mapped tasks in Airflow, one after another in `run_all`) beside the item tables, and publish
gathers both. This module imports nothing heavy, so a DAG file can loop over it at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass


RETRAIN_DAG_ID = "recsys_retrain"  # the DAG these stages make (dags/recsys_retrain.py)


@dataclass(frozen=True)
class Stage:
    name: str
    doc: str
    train_queue: bool = False  # runs on the training queue (the GPU worker of a Celery deployment)
    records_as: str = ""  # the `pipeline_runs.stage` it reports (default: its name)

    @property
    def step(self) -> str:
        return "step_" + self.name

    @property
    def run_stage(self) -> str:
        return self.records_as or self.name


CHAIN: tuple[Stage, ...] = (
    Stage("extract", "Claim the run (one at a time per database), then stream the new interactions since the "
                     "watermark and a catalog snapshot to Parquet."),
    Stage("validate", "Quarantine bad rows with Great Expectations, fail on dataset-level problems, and fold the "
                      "clean rows into a new dataset snapshot."),
    Stage("train", "Plan the gate's holdout, then fine-tune from the champion on everything else.",
          train_queue=True),
    Stage("export", "Export the candidate to ONNX with a parity check, and register it."),
    Stage("gate", "Candidate vs champion vs popularity on the holdout: decide what this run publishes."),
    Stage("refit", "Train the accepted model on for refit_epochs on the whole snapshot, holdout included.",
          train_queue=True),
)
SCORE_USERS = Stage("score_users", "Top-K for one shard of the users with ONNX Runtime.", records_as="score")
SCORE_ITEMS = Stage("score_items", "The item tables every user shares: similar items and popular items.",
                    records_as="score")
PUBLISH = Stage("publish", "Load every shard and item table into one versioned table set and switch the views to it.")
STAGES: tuple[Stage, ...] = (*CHAIN, SCORE_USERS, SCORE_ITEMS, PUBLISH)
BY_NAME = {stage.name: stage for stage in STAGES}
