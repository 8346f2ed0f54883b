"""The model registry and the run log: what was trained on what, how it scored, what serves.

Statuses: candidate (trained, not yet decided or not yet published) -> champion (serving) or
rejected (failed the gate); a champion replaced by a newer one (or rolled back from) is retired.
A partial unique index allows one champion at most.

Kinds: a `model` (trained, exported to ONNX, gated) or a `baseline` (popularity, no artifact),
published when there is no model champion and the candidate was not accepted, so the serving
views are never empty after a run with valid data. Only a model champion is warm-started from
and gated against; the first accepted model replaces a serving baseline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from recmodel import db

UPSERT_RUN = """
INSERT INTO recsys.pipeline_runs (run_key, dag_run_id, as_of, status, stage, message)
VALUES (%(run_key)s, %(dag_run_id)s, %(as_of)s, 'running', 'extract', NULL)
ON CONFLICT (run_key) DO UPDATE
SET dag_run_id = EXCLUDED.dag_run_id, started_at = now(), finished_at = NULL, status = 'running',
    stage = 'extract', message = NULL
"""

UPDATE_RUN = """
UPDATE recsys.pipeline_runs
SET stage = COALESCE(%(stage)s, stage),
    status = COALESCE(%(status)s, status),
    rows_extracted = COALESCE(%(rows_extracted)s, rows_extracted),
    rows_quarantined = COALESCE(%(rows_quarantined)s, rows_quarantined),
    model_version = COALESCE(%(model_version)s, model_version),
    message = COALESCE(%(message)s, message),
    details = details || %(details)s::jsonb,
    finished_at = CASE WHEN %(status)s IN ('success', 'failed', 'skipped', 'rejected') THEN now() ELSE finished_at END
WHERE run_key = %(run_key)s
"""

UPSERT_CANDIDATE = """
INSERT INTO recsys.model_registry (version, parent_version, run_key, dataset_path, watermark, train_rows,
    n_items, device, artifact_dir, onnx_path, onnx_sha256, status)
VALUES (%(version)s, %(parent_version)s, %(run_key)s, %(dataset_path)s, %(watermark)s, %(train_rows)s,
    %(n_items)s, %(device)s, %(artifact_dir)s, %(onnx_path)s, %(onnx_sha256)s, 'candidate')
ON CONFLICT (version) DO UPDATE
SET parent_version = EXCLUDED.parent_version, dataset_path = EXCLUDED.dataset_path,
    watermark = EXCLUDED.watermark, train_rows = EXCLUDED.train_rows, n_items = EXCLUDED.n_items,
    device = EXCLUDED.device, artifact_dir = EXCLUDED.artifact_dir, onnx_path = EXCLUDED.onnx_path,
    onnx_sha256 = EXCLUDED.onnx_sha256, decision = NULL, reasons = '[]'::jsonb, metrics = '{}'::jsonb,
    lineage = '{}'::jsonb,
    status = CASE WHEN recsys.model_registry.status = 'champion' THEN 'champion' ELSE 'candidate' END
"""

RECORD_DECISION = """
UPDATE recsys.model_registry
SET decision = %(decision)s, reasons = %(reasons)s::jsonb, metrics = %(metrics)s::jsonb,
    status = CASE WHEN %(decision)s <> 'accepted' AND status <> 'champion' THEN 'rejected' ELSE status END
WHERE version = %(version)s
"""
# The accepted model is refit on the whole snapshot: the row then describes the refit (what serves),
# and `lineage` keeps both models.
RECORD_REFIT = """
UPDATE recsys.model_registry
SET artifact_dir = %(artifact_dir)s, onnx_path = %(onnx_path)s, onnx_sha256 = %(onnx_sha256)s,
    train_rows = %(train_rows)s, lineage = %(lineage)s::jsonb
WHERE version = %(version)s
"""
UPSERT_BASELINE = """
INSERT INTO recsys.model_registry (version, parent_version, run_key, dataset_path, watermark, train_rows,
    n_items, device, artifact_dir, kind, reasons, metrics, lineage, status)
VALUES (%(version)s, NULL, %(run_key)s, %(dataset_path)s, %(watermark)s, %(train_rows)s, %(n_items)s, 'cpu',
    %(artifact_dir)s, 'baseline', %(reasons)s::jsonb, %(metrics)s::jsonb, %(lineage)s::jsonb, 'candidate')
ON CONFLICT (version) DO UPDATE
SET dataset_path = EXCLUDED.dataset_path, watermark = EXCLUDED.watermark, train_rows = EXCLUDED.train_rows,
    n_items = EXCLUDED.n_items, artifact_dir = EXCLUDED.artifact_dir, reasons = EXCLUDED.reasons,
    metrics = EXCLUDED.metrics, lineage = EXCLUDED.lineage
"""

SELECT_CHAMPION = "SELECT * FROM recsys.model_registry WHERE status = 'champion' AND kind = 'model'"
SELECT_VERSION = "SELECT * FROM recsys.model_registry WHERE version = %s"
SELECT_SERVING_WATERMARK = """
SELECT r.version, r.watermark FROM recsys.published_versions p JOIN recsys.model_registry r USING (version)
WHERE p.serving
"""
SELECT_REGISTRY = """
SELECT r.version, r.parent_version, r.run_key, r.created_at, r.kind, r.status, r.decision, r.reasons, r.metrics,
       r.train_rows, r.n_items, r.device, r.lineage, p.published_at, p.serving, p.pruned_at, p.row_counts
FROM recsys.model_registry r LEFT JOIN recsys.published_versions p USING (version)
ORDER BY r.created_at DESC LIMIT %s
"""
SELECT_RUNS = "SELECT * FROM recsys.pipeline_runs ORDER BY as_of DESC LIMIT %s"
# Rollbacks and freshness checks get their own rows, keyed by kind and Airflow run id.
UPSERT_EVENT = """
INSERT INTO recsys.pipeline_runs (run_key, kind, dag_run_id, as_of, status, stage, model_version, message, finished_at)
VALUES (%(run_key)s, %(kind)s, %(dag_run_id)s, now(), %(status)s, %(stage)s, %(model_version)s, %(message)s,
        CASE WHEN %(status)s = 'running' THEN NULL ELSE now() END)
ON CONFLICT (run_key) DO UPDATE
SET status = EXCLUDED.status, stage = EXCLUDED.stage, model_version = COALESCE(EXCLUDED.model_version,
    recsys.pipeline_runs.model_version), message = EXCLUDED.message, finished_at = EXCLUDED.finished_at
"""
APPEND_ALERT = "UPDATE recsys.pipeline_runs SET alerts = alerts || %(alert)s::jsonb WHERE run_key = %(run_key)s"
RUN_KEY_FORMAT = "%Y%m%dT%H%M%SZ"
SELECT_SERVING_PUBLICATION = "SELECT version, published_at FROM recsys.published_versions WHERE serving"
MAX_AGE_ENV = "RECSYS_MAX_SERVING_AGE_HOURS"
DEFAULT_MAX_AGE_HOURS = 36.0  # a daily schedule plus half a day of slack


@dataclass(frozen=True)
class ArtifactRef:
    """One exported model on disk, with the sha256 its ONNX file had when it was registered."""

    artifact_dir: Path
    onnx_path: Path
    onnx_sha256: str


@dataclass(frozen=True)
class ModelRecord:
    version: str
    served: ArtifactRef  # what was scored and published: the refit when there is one
    # The model the gate judged, trained without its holdout. The next run warm-starts from it and
    # gates against it: the refit has seen data up to its as_of, which may fall in the next holdout.
    gated: ArtifactRef
    status: str
    watermark: datetime  # the as-of time of the data it was trained on


def as_of_now() -> datetime:
    """The as-of time of a run started now: runs are keyed by whole seconds, and rounding up keeps
    rows ingested earlier in this second inside the run instead of leaving them for the next one."""
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)


def run_key_for(as_of: datetime) -> str:
    """The key of the retraining run whose data ends at `as_of` (also its run folder's name)."""
    return as_of.astimezone(timezone.utc).strftime(RUN_KEY_FORMAT)


def record_event(url: str, run_key: str, *, kind: str, status: str, stage: str, message: str,
                 dag_run_id: str | None = None, model_version: str | None = None) -> None:
    """Create or update the pipeline_runs row of a rollback or a freshness check."""
    with db.transaction(url) as conn:
        conn.execute(UPSERT_EVENT, {"run_key": run_key, "kind": kind, "dag_run_id": dag_run_id, "status": status,
                                    "stage": stage, "model_version": model_version, "message": message})


def append_alert(url: str, run_key: str, alert: dict[str, Any]) -> bool:
    """Add one alert to a run's row; False when the row does not exist (yet)."""
    with db.transaction(url) as conn:
        updated = conn.execute(APPEND_ALERT, {"run_key": run_key, "alert": json.dumps([alert], default=str)})
        return updated.rowcount == 1


@dataclass(frozen=True)
class Freshness:
    version: str | None  # None: nothing published yet
    published_at: datetime | None
    age_hours: float | None
    max_age_hours: float

    @property
    def stale(self) -> bool:
        return self.age_hours is not None and self.age_hours > self.max_age_hours

    @property
    def message(self) -> str:
        if self.version is None:
            return "nothing published yet: the serving views are empty"
        state = "STALE" if self.stale else "fresh"
        return (f"serving tables are {state}: {self.version} was published {self.age_hours:.1f} h ago "
                f"({self.published_at:%Y-%m-%d %H:%M} UTC; limit {self.max_age_hours:g} h, {MAX_AGE_ENV})")


def max_serving_age_hours() -> float:
    raw = os.environ.get(MAX_AGE_ENV)
    if not raw:
        return DEFAULT_MAX_AGE_HOURS
    try:
        hours = float(raw)
    except ValueError:
        raise ValueError(f"{MAX_AGE_ENV} must be a number of hours, got {raw!r}") from None
    if hours <= 0:
        raise ValueError(f"{MAX_AGE_ENV} must be > 0, got {raw!r}")
    return hours


def serving_freshness(url: str, max_age_hours: float | None = None, now: datetime | None = None) -> Freshness:
    """How old the serving tables are (time since the serving version was published)."""
    limit = max_serving_age_hours() if max_age_hours is None else max_age_hours
    with db.connect(url) as conn:
        row = conn.execute(SELECT_SERVING_PUBLICATION).fetchone()
    if row is None:
        return Freshness(version=None, published_at=None, age_hours=None, max_age_hours=limit)
    version, published_at = row
    age = ((now or datetime.now(timezone.utc)) - published_at).total_seconds() / 3600
    return Freshness(version=version, published_at=published_at, age_hours=age, max_age_hours=limit)


def start_run(url: str, run_key: str, as_of: datetime, dag_run_id: str | None) -> None:
    with db.transaction(url) as conn:
        conn.execute(UPSERT_RUN, {"run_key": run_key, "as_of": as_of, "dag_run_id": dag_run_id})


def update_run(url: str, run_key: str, *, stage: str | None = None, status: str | None = None,
               rows_extracted: int | None = None, rows_quarantined: int | None = None,
               model_version: str | None = None, message: str | None = None,
               details: dict[str, Any] | None = None) -> None:
    with db.transaction(url) as conn:
        conn.execute(UPDATE_RUN, {
            "run_key": run_key, "stage": stage, "status": status, "rows_extracted": rows_extracted,
            "rows_quarantined": rows_quarantined, "model_version": model_version, "message": message,
            "details": json.dumps(details or {}, default=str),
        })


def register_candidate(url: str, **fields: Any) -> None:
    with db.transaction(url) as conn:
        conn.execute(UPSERT_CANDIDATE, fields)


def record_decision(url: str, version: str, *, decision: str, reasons: list[str],
                    metrics: dict[str, Any]) -> None:
    """The gate's outcome (accepted, rejected or undecided), its reasons and metrics."""
    with db.transaction(url) as conn:
        conn.execute(RECORD_DECISION, {"version": version, "decision": decision, "reasons": json.dumps(reasons),
                                       "metrics": json.dumps(metrics)})


def record_refit(url: str, version: str, *, artifact_dir: str, onnx_path: str, onnx_sha256: str, train_rows: int,
                 lineage: dict[str, Any]) -> None:
    with db.transaction(url) as conn:
        conn.execute(RECORD_REFIT, {"version": version, "artifact_dir": artifact_dir, "onnx_path": onnx_path,
                                    "onnx_sha256": onnx_sha256, "train_rows": train_rows,
                                    "lineage": json.dumps(lineage, default=str)})


def register_baseline(url: str, *, version: str, run_key: str, dataset_path: str, watermark: datetime,
                      train_rows: int, n_items: int, artifact_dir: str, reasons: list[str], metrics: dict[str, Any],
                      lineage: dict[str, Any]) -> None:
    with db.transaction(url) as conn:
        conn.execute(UPSERT_BASELINE, {
            "version": version, "run_key": run_key, "dataset_path": dataset_path, "watermark": watermark,
            "train_rows": train_rows, "n_items": n_items, "artifact_dir": artifact_dir,
            "reasons": json.dumps(reasons), "metrics": json.dumps(metrics, default=str),
            "lineage": json.dumps(lineage, default=str)})


def champion(url: str) -> ModelRecord | None:
    """The serving model (a serving baseline is not one: nothing to warm-start from or gate against)."""
    with db.connect(url) as conn:
        row = conn.cursor(row_factory=dict_row).execute(SELECT_CHAMPION).fetchone()
    return _record(row) if row else None


def exists(conn: psycopg.Connection, version: str) -> bool:
    return conn.execute(SELECT_VERSION, (version,)).fetchone() is not None


def serving_watermark(url: str) -> tuple[str, datetime] | None:
    """(version, as-of time of its data) of what serves now, a model or a baseline; None before any publish."""
    with db.connect(url) as conn:
        return conn.execute(SELECT_SERVING_WATERMARK).fetchone()


def _record(row: dict[str, Any]) -> ModelRecord:
    """A model's registry row (kind 'model': it has an ONNX file)."""
    served = ArtifactRef(Path(row["artifact_dir"]), Path(row["onnx_path"]), row["onnx_sha256"])
    gated = (row["lineage"] or {}).get("gated")
    return ModelRecord(version=row["version"], served=served, status=row["status"], watermark=row["watermark"],
                       gated=ArtifactRef(Path(gated["artifact_dir"]), Path(gated["onnx_path"]), gated["onnx_sha256"])
                       if gated else served)


def overview(url: str, limit: int = 20) -> dict[str, list[dict[str, Any]]]:
    """Registry rows with their publication state, and recent runs, newest first."""
    with db.connect(url) as conn:
        cursor = conn.cursor(row_factory=dict_row)
        models = cursor.execute(SELECT_REGISTRY, (limit,)).fetchall()
        runs = cursor.execute(SELECT_RUNS, (limit,)).fetchall()
    return {"models": models, "runs": runs}
