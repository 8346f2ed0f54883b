"""The model registry and the run log: what was trained on what, how it scored, what serves.

Statuses: candidate (trained, not yet decided or not yet published) -> champion (serving) or
rejected (failed the gate); a champion replaced by a newer one (or rolled back from) is retired.
A partial unique index allows one champion at most.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
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
    status = CASE WHEN recsys.model_registry.status = 'champion' THEN 'champion' ELSE 'candidate' END
"""

RECORD_DECISION = """
UPDATE recsys.model_registry
SET decision = %(decision)s, reasons = %(reasons)s::jsonb, metrics = %(metrics)s::jsonb,
    status = CASE WHEN %(decision)s = 'rejected' AND status <> 'champion' THEN 'rejected' ELSE status END
WHERE version = %(version)s
"""

SELECT_CHAMPION = "SELECT * FROM recsys.model_registry WHERE status = 'champion'"
SELECT_VERSION = "SELECT * FROM recsys.model_registry WHERE version = %s"
SELECT_REGISTRY = """
SELECT r.version, r.parent_version, r.created_at, r.status, r.decision, r.reasons, r.metrics, r.train_rows,
       r.n_items, r.device, p.published_at, p.serving, p.pruned_at, p.row_counts
FROM recsys.model_registry r LEFT JOIN recsys.published_versions p USING (version)
ORDER BY r.created_at DESC LIMIT %s
"""
SELECT_RUNS = "SELECT * FROM recsys.pipeline_runs ORDER BY as_of DESC LIMIT %s"


@dataclass(frozen=True)
class ModelRecord:
    version: str
    artifact_dir: Path
    onnx_path: Path
    onnx_sha256: str
    status: str


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


def record_decision(url: str, version: str, *, accepted: bool, reasons: list[str],
                    metrics: dict[str, Any]) -> None:
    with db.transaction(url) as conn:
        conn.execute(RECORD_DECISION, {
            "version": version, "decision": "accepted" if accepted else "rejected",
            "reasons": json.dumps(reasons), "metrics": json.dumps(metrics),
        })


def champion(url: str) -> ModelRecord | None:
    with db.connect(url) as conn:
        row = conn.cursor(row_factory=dict_row).execute(SELECT_CHAMPION).fetchone()
    return _record(row) if row else None


def get(conn: psycopg.Connection, version: str) -> ModelRecord | None:
    row = conn.cursor(row_factory=dict_row).execute(SELECT_VERSION, (version,)).fetchone()
    return _record(row) if row else None


def _record(row: dict[str, Any]) -> ModelRecord:
    return ModelRecord(version=row["version"], artifact_dir=Path(row["artifact_dir"]),
                       onnx_path=Path(row["onnx_path"]), onnx_sha256=row["onnx_sha256"], status=row["status"])


def overview(url: str, limit: int = 20) -> dict[str, list[dict[str, Any]]]:
    """Registry rows with their publication state, and recent runs, newest first."""
    with db.connect(url) as conn:
        cursor = conn.cursor(row_factory=dict_row)
        models = cursor.execute(SELECT_REGISTRY, (limit,)).fetchall()
        runs = cursor.execute(SELECT_RUNS, (limit,)).fetchall()
    return {"models": models, "runs": runs}
