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
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import psycopg
from psycopg.rows import dict_row

from recmodel import db
from recmodel.config import ENV_VARIABLE, settings
from recmodel.errors import PermanentError
from recmodel.locks import AdvisoryLock, TRANSACTION_LOCK, TRY_KEYED_SESSION_LOCK

log = logging.getLogger(__name__)

UPSERT_RUN = """
INSERT INTO recsys.pipeline_runs (run_key, dag_run_id, as_of, status, stage, message, heartbeat_at, active_step,
                                  claim_generation)
VALUES (%(run_key)s, %(dag_run_id)s, %(as_of)s, 'running', 'extract', NULL, now(), 'extract', 1)
ON CONFLICT (run_key) DO UPDATE
SET dag_run_id = EXCLUDED.dag_run_id, started_at = now(), finished_at = NULL, status = 'running',
    stage = 'extract', message = NULL, heartbeat_at = now(), active_step = 'extract', manifest = '{}'::jsonb,
    claim_generation = recsys.pipeline_runs.claim_generation + 1
RETURNING claim_generation
"""
# The row of the run key being claimed, when it is running and was active lately under another Airflow run:
# a second run of the same as-of, refused. The same Airflow run claims again on a retry of its extract (and a
# local run on a rerun): the earlier try, dead or a zombie, is fenced off by the new generation.
SELECT_SAME_KEY_ELSEWHERE = """
SELECT dag_run_id, COALESCE(active_step, stage), extract(epoch FROM now() - heartbeat_at)
FROM recsys.pipeline_runs
WHERE run_key = %(run_key)s AND kind = 'retrain' AND status = 'running'
  AND dag_run_id IS DISTINCT FROM %(dag_run_id)s
  AND heartbeat_at >= now() - make_interval(secs => %(stale)s)
"""
# What a step checks before it writes: the run's claim, locked against a concurrent "declare dead" until the
# writing transaction ends.
HOLD_CLAIM = """
SELECT status, claim_generation, dag_run_id, message FROM recsys.pipeline_runs WHERE run_key = %s FOR SHARE
"""
SELECT_CLAIM = "SELECT status, claim_generation, dag_run_id, message FROM recsys.pipeline_runs WHERE run_key = %s"
SELECT_RECENT_ALERTS = """
SELECT r.run_key, r.kind, a.alert
FROM recsys.pipeline_runs r CROSS JOIN LATERAL jsonb_array_elements(r.alerts) AS a(alert)
ORDER BY (a.alert ->> 'at')::timestamptz DESC LIMIT %(limit)s
"""
# Liveness: a step stamps its run every HEARTBEAT_SECONDS while it executes (active_step names it).
# Only a running run's row is stamped: a refused rerun must not touch the row of the run it would repeat.
# A run the gate rejected goes on through its remaining (no-op) steps under the same claim: still its own.
BEAT = """
UPDATE recsys.pipeline_runs SET heartbeat_at = now(), active_step = %(step)s
WHERE run_key = %(run_key)s AND status IN ('running', 'rejected') AND claim_generation = %(generation)s
"""
CLEAR_STEP = """
UPDATE recsys.pipeline_runs SET active_step = NULL
WHERE run_key = %(run_key)s AND active_step IS NOT NULL AND claim_generation = %(generation)s
"""
# Other retrain runs alive now: what `one run at a time` is checked against. Alive is a step executing
# (fresh heartbeat), or a run between its extract and the end of its validation, whose window is read
# but not yet committed: another run reading it then would take the same rows.
LIVE = """kind = 'retrain' AND status = 'running' AND (active_step IS NOT NULL OR stage = 'extract')"""
SELECT_LIVE_RUNS = f"""
SELECT run_key, COALESCE(active_step, 'between extract and validate'), started_at,
       extract(epoch FROM now() - heartbeat_at)
FROM recsys.pipeline_runs
WHERE {LIVE} AND run_key <> %(run_key)s AND heartbeat_at >= now() - make_interval(secs => %(stale)s)
ORDER BY started_at
"""
# Runs whose step stopped stamping (killed, worker lost), or that have not moved for a day: failed, with
# the reason, instead of `running` forever.
MARK_DEAD_RUNS = f"""
UPDATE recsys.pipeline_runs
SET status = 'failed', finished_at = now(), active_step = NULL, claim_generation = claim_generation + 1,
    message = format('the run died: no heartbeat from step %%s since %%s UTC (its process was killed or lost its '
                     'worker); nothing it had not committed was kept, and the next run reads its rows',
                     COALESCE(active_step, stage), to_char(heartbeat_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'))
WHERE kind = 'retrain' AND status = 'running'
  AND (({LIVE} AND heartbeat_at < now() - make_interval(secs => %(stale)s))
       OR COALESCE(heartbeat_at, started_at) < now() - interval '1 day')
RETURNING run_key
"""
# The newest data whose run settled: a version built on it was published, or its model was judged and not
# accepted with nothing published instead (the champion kept serving). A retrain is due only when a snapshot
# is newer than this. An accepted model (or a baseline) that never published, its run killed in refit,
# scoring or publish, settled nothing: the next run trains on its snapshot again.
SELECT_TRAINED_THROUGH = """
SELECT max(r.watermark) FROM recsys.model_registry r
WHERE EXISTS (SELECT 1 FROM recsys.published_versions p WHERE p.version = r.version)
   OR (r.kind = 'model' AND r.decision IS NOT NULL AND r.decision <> 'accepted'
       AND NOT EXISTS (SELECT 1 FROM recsys.model_registry b WHERE b.kind = 'baseline' AND b.run_key = r.run_key))
"""
# Versions a rerun must not overwrite: published once, or serving.
SELECT_IMMUTABLE = """
SELECT r.version, r.status, p.published_at FROM recsys.model_registry r
LEFT JOIN recsys.published_versions p USING (version)
WHERE r.version = ANY(%(versions)s) AND (p.version IS NOT NULL OR r.status = 'champion')
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

# One stage's entry and the artifacts it made, merged into the run's manifest; returns the whole manifest.
MERGE_MANIFEST = """
UPDATE recsys.pipeline_runs
SET manifest = manifest || %(run)s::jsonb
    || jsonb_build_object('stages', COALESCE(manifest -> 'stages', '{}'::jsonb) || %(stages)s::jsonb,
                          'artifacts', COALESCE(manifest -> 'artifacts', '{}'::jsonb) || %(artifacts)s::jsonb)
WHERE run_key = %(run_key)s
RETURNING manifest
"""
# A stage starting moves a running run on; a run whose status is settled (rejected, skipped) keeps its stage.
ENTER_STAGE = "UPDATE recsys.pipeline_runs SET stage = %(stage)s WHERE run_key = %(run_key)s AND status = 'running'"
RETIRE_CHAMPION = "UPDATE recsys.model_registry SET status = 'retired' WHERE status = 'champion' AND version <> %(version)s"
PROMOTE = "UPDATE recsys.model_registry SET status = 'champion' WHERE version = %(version)s"
# What serves is dated: the outcomes task attributes each interaction to the version serving when it occurred.
END_SERVING_PERIOD = "UPDATE recsys.serving_periods SET ended_at = now() WHERE ended_at IS NULL AND version <> %(version)s"
START_SERVING_PERIOD = """
INSERT INTO recsys.serving_periods (version, started_at)
SELECT %(version)s, now() WHERE NOT EXISTS (SELECT 1 FROM recsys.serving_periods WHERE ended_at IS NULL)
"""
RECORD_LONG_TAIL = "UPDATE recsys.model_registry SET long_tail = %(long_tail)s::jsonb WHERE version = %(version)s"
SELECT_MANIFEST = "SELECT manifest FROM recsys.pipeline_runs WHERE run_key = %s"

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
# What ran most recently first: `status` and the Recommender page both list runs through this.
SELECT_RUNS = "SELECT * FROM recsys.pipeline_runs ORDER BY started_at DESC, run_key DESC LIMIT %s"
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
VERSION_FORMAT = "%Y%m%d%H%M%S"
SELECT_SERVING_PUBLICATION = "SELECT version, published_at FROM recsys.published_versions WHERE serving"
MAX_AGE_ENV = ENV_VARIABLE["max_serving_age_hours"]
HEARTBEAT_SECONDS = 10.0
# A step silent this long is dead: many missed beats, so a busy machine, a slow query or a task queued for
# a worker between extract and validate is not mistaken for one.
STALE_AFTER_SECONDS = 300.0


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
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)


def version_for(as_of: datetime) -> str:
    """The model version a retraining run whose data ends at `as_of` registers (publish checks the form)."""
    return "v" + as_of.astimezone(UTC).strftime(VERSION_FORMAT)


def run_key_for(as_of: datetime) -> str:
    """The key of the retraining run whose data ends at `as_of` (also its run folder's name)."""
    return as_of.astimezone(UTC).strftime(RUN_KEY_FORMAT)


def record_event(url: str, run_key: str, *, kind: str, status: str, stage: str, message: str,
                 dag_run_id: str | None = None, model_version: str | None = None) -> None:
    """Create or update the pipeline_runs row of a rollback or a freshness check."""
    with db.transaction(url) as conn:
        conn.execute(UPSERT_EVENT, {"run_key": run_key, "kind": kind, "dag_run_id": dag_run_id, "status": status,
                                    "stage": stage, "model_version": model_version, "message": message})


@dataclass(frozen=True)
class RecordedAlert:
    at: datetime
    kind: str  # task_failed | gate_rejected | serving_stale
    subject: str
    message: str
    channels: list[str]
    run_key: str
    run_kind: str  # retrain | rollback | freshness | fresh_data


def recent_alerts(url: str, limit: int = 10) -> list[RecordedAlert]:
    """The newest alerts of every run, newest first: what `status` and the Recommender page list."""
    with db.connect(url) as conn:
        rows = conn.execute(SELECT_RECENT_ALERTS, {"limit": limit}).fetchall()
    return [RecordedAlert(at=datetime.fromisoformat(alert["at"]), kind=alert["kind"], subject=alert.get("subject", ""),
                          message=alert["message"], channels=alert.get("channels", []), run_key=run_key,
                          run_kind=run_kind)
            for run_key, run_kind, alert in rows]


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


def serving_freshness(url: str, max_age_hours: float | None = None, now: datetime | None = None) -> Freshness:
    """How old the serving tables are (time since the serving version was published)."""
    limit = settings().max_serving_age_hours if max_age_hours is None else max_age_hours
    with db.connect(url) as conn:
        row = conn.execute(SELECT_SERVING_PUBLICATION).fetchone()
    if row is None:
        return Freshness(version=None, published_at=None, age_hours=None, max_age_hours=limit)
    version, published_at = row
    age = ((now or datetime.now(UTC)) - published_at).total_seconds() / 3600
    return Freshness(version=version, published_at=published_at, age_hours=age, max_age_hours=limit)


class RunRefused(PermanentError, RuntimeError):
    """A run that must not start: another is live on this database, or its version is already published."""


class AnotherRunIsLive(RunRefused):
    """Another retrain is alive on this database; this one may start once it is done."""


class VersionIsPublished(RunRefused):
    """The run's version was published: a rerun would overwrite an immutable version."""


class RunKeyTaken(RunRefused):
    """Another process (or Airflow run) is running the same run key: the same as-of claimed twice."""


class LostClaim(PermanentError, RuntimeError):
    """This process's run no longer holds its claim (declared dead, or claimed again by another run): it must
    write nothing more."""


@dataclass(frozen=True)
class Claim:
    """A run's claim as one process holds it: writes that matter check that `generation` is still current."""

    run_key: str
    generation: int


def _lost_claim(run_key: str, row: tuple | None, held: int | None = None) -> LostClaim:
    """Why a process of run `run_key` (holding generation `held`, None: none yet) may not write: its row now."""
    if row is None:
        return LostClaim(f"run {run_key} lost its claim: its row in recsys.pipeline_runs is gone; it writes nothing "
                         "more")
    status, generation, dag_run_id, message = row
    if status == "failed":
        why = f"it was marked failed ({message})"
    else:
        why = f"the run key was claimed again (by Airflow run {dag_run_id or 'of the CLI'})"
    holds = f" (this process holds generation {held})" if held is not None else ""
    return LostClaim(f"run {run_key} lost the claim to generation {generation} of its key{holds}: {why}. It writes "
                     "nothing more; the run that holds the claim (or the next one) reads its rows")


def check_claim(conn: psycopg.Connection, claim: Claim | None) -> None:
    """In the caller's transaction: refuse (`LostClaim`) unless `claim` is still the run's current claim, and
    hold it (a row lock) until the transaction ends. None: a write outside a run (tests, operator tools)."""
    if claim is None:
        return
    row = conn.execute(HOLD_CLAIM, (claim.run_key,)).fetchone()
    if row is None or row[0] == "failed" or row[1] != claim.generation:
        raise _lost_claim(claim.run_key, row, claim.generation)


@contextmanager
def fenced_transaction(url: str, claim: Claim | None) -> Iterator[psycopg.Connection]:
    """A transaction whose writes land only while `claim` is current (see `check_claim`)."""
    with db.transaction(url) as conn:
        check_claim(conn, claim)
        yield conn


def resume_claim(url: str, run_key: str, dag_run_id: str | None) -> Claim:
    """The claim a step of an already claimed run works under: the run's current generation, refused when the
    run was declared dead (or failed) or another Airflow run has claimed its key since."""
    with db.connect(url) as conn:
        row = conn.execute(SELECT_CLAIM, (run_key,)).fetchone()
    if row is None:
        raise LostClaim(f"run {run_key} was never claimed (its extract did not start): nothing to resume")
    status, generation, owner, _ = row
    if status == "failed" or (dag_run_id is not None and owner is not None and owner != dag_run_id):
        raise _lost_claim(run_key, row)
    return Claim(run_key, generation)


def claim_run(url: str, run_key: str, as_of: datetime, dag_run_id: str | None,
              versions: list[str]) -> tuple[Claim, list[str]]:
    """Start (or restart) run `run_key`, one at a time per database; returns its claim and the dead runs
    marked failed.

    Refuses while another retrain is alive (see LIVE; its heartbeat is fresh); while another Airflow run
    holds the same run key (a double click, or an `--as-of` equal to a scheduled interval's end); and
    when one of `versions` (the run's model and
    baseline versions) was published or serves: published versions are immutable, and a rerun of their
    interval would overwrite their files and registry row. Each claim is a new generation (`Claim`).
    """
    with db.transaction(url) as conn:
        conn.execute(TRANSACTION_LOCK, (AdvisoryLock.RUN_CLAIM,))
        dead = [row[0] for row in conn.execute(MARK_DEAD_RUNS, {"stale": STALE_AFTER_SECONDS})]
        live = conn.execute(SELECT_LIVE_RUNS, {"run_key": run_key, "stale": STALE_AFTER_SECONDS}).fetchone()
        if live is not None:
            raise AnotherRunIsLive(_another_run_is_live(*live))
        same_key = conn.execute(SELECT_SAME_KEY_ELSEWHERE, {"run_key": run_key, "dag_run_id": dag_run_id,
                                                             "stale": STALE_AFTER_SECONDS}).fetchone()
        if same_key is not None:
            owner, step, silent = same_key
            raise RunKeyTaken(f"run {run_key} (as-of {as_of:%Y-%m-%d %H:%M:%S} UTC) is already running"
                              f"{f' as Airflow run {owner}' if owner else ''} (step {step}, last heartbeat "
                              f"{silent:.0f} s ago); the same as-of is claimed once. Wait for it, or retrain another "
                              f"as-of; a run whose process died is released after {STALE_AFTER_SECONDS:.0f} s")
        published = conn.execute(SELECT_IMMUTABLE, {"versions": versions}).fetchone()
        if published is not None:
            version, status, published_at = published
            when = f"published {published_at:%Y-%m-%d %H:%M} UTC" if published_at else f"the {status}"
            raise VersionIsPublished(f"{version} ({when}) was built from the interval ending "
                                     f"{as_of:%Y-%m-%d %H:%M:%S} UTC; published versions are immutable, so this "
                                     "rerun is refused. Retrain a new interval (retrain without --as-of), or roll "
                                     "back to serve an earlier version")
        generation = conn.execute(UPSERT_RUN, {"run_key": run_key, "as_of": as_of,
                                               "dag_run_id": dag_run_id}).fetchone()[0]
    return Claim(run_key, generation), dead


@contextmanager
def command_holds_as_of(url: str, as_of: datetime) -> Iterator[None]:
    """While the block runs, this process is the only `retrain` command for `as_of` on the database.

    Two `retrain --as-of A` started together both pass every check before their DAG runs exist; the
    second's `DAG.test` would then clear the first run's task instances or fail on Airflow's unique
    logical date. A session lock per run key, taken before Airflow starts, refuses the second at once
    (`RunKeyTaken`); it is released when this process ends, however it ends.
    """
    run_key = run_key_for(as_of)
    with db.connect(url, autocommit=True) as conn:
        if not conn.execute(TRY_KEYED_SESSION_LOCK, (AdvisoryLock.RETRAIN_COMMAND, run_key)).fetchone()[0]:
            raise RunKeyTaken(f"another `retrain` of as-of {as_of:%Y-%m-%d %H:%M:%S} UTC (run {run_key}) is running "
                              "on this database: the same as-of is run once. Wait for it, or retrain another as-of")
        yield


def live_runs(url: str) -> list[tuple[str, str, datetime, float]]:
    """Retrain runs alive now (a step executing, or between extract and validation; see LIVE):
    (run_key, step, started_at, seconds since the last heartbeat)."""
    with db.connect(url) as conn:
        return conn.execute(SELECT_LIVE_RUNS, {"run_key": "", "stale": STALE_AFTER_SECONDS}).fetchall()


def refuse_if_another_run_is_live(url: str) -> None:
    """The CLI's early check (before starting Airflow); `claim_run` enforces it again, atomically."""
    live = live_runs(url)
    if live:
        raise AnotherRunIsLive(_another_run_is_live(*live[0]))


def _another_run_is_live(run_key: str, step: str, started: datetime, silent: float) -> str:
    return (f"another retrain is running on this database: run {run_key} (step {step}, started "
            f"{started:%Y-%m-%d %H:%M:%S} UTC, last heartbeat {silent:.0f} s ago); one run at a time. Wait for it "
            f"to finish; a run whose process died counts as dead after {STALE_AFTER_SECONDS:.0f} s without a heartbeat")


def trained_through(conn: psycopg.Connection) -> datetime | None:
    """The as-of time of the newest data a model was judged on (or a baseline built from)."""
    return conn.execute(SELECT_TRAINED_THROUGH).fetchone()[0]


@contextmanager
def heartbeat(url: str, claim: Claim, step: str) -> Iterator[None]:
    """Stamp the run as alive, executing `step`, every HEARTBEAT_SECONDS until the block ends.

    On the way out the step is cleared: between steps the run holds no claim on the database, except
    between extract and validation (see LIVE), which lasts until its heartbeat is STALE_AFTER_SECONDS
    old (covering Airflow's retry delay). A killed process simply stops stamping and counts as dead.
    A beat that finds the claim gone (the run was declared dead while this process was paused) says so
    once; the step's next fenced write then fails with `LostClaim`.
    """
    stop = threading.Event()
    run_key = claim.run_key
    lost = threading.Event()

    def beat() -> None:
        with db.transaction(url) as conn:
            stamped = conn.execute(BEAT, {"run_key": run_key, "step": step, "generation": claim.generation}).rowcount
        if not stamped and not lost.is_set():
            lost.set()
            log.error("run %s lost its claim while step %s ran (declared dead, or claimed again): its writes will be "
                      "refused", run_key, step)

    def keep_beating() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                beat()
            except Exception as exc:  # noqa: BLE001 - a missed beat is logged; the step's own work decides
                log.warning("heartbeat of run %s failed: %s", run_key, exc)

    beat()
    thread = threading.Thread(target=keep_beating, name=f"heartbeat-{run_key}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            with db.transaction(url) as conn:
                conn.execute(CLEAR_STEP, {"run_key": run_key, "generation": claim.generation})
        except Exception as exc:  # noqa: BLE001 - never mask the step's own outcome
            log.warning("could not clear the active step of run %s: %s", run_key, exc)


def enter_stage(url: str, claim: Claim, stage: str) -> None:
    with fenced_transaction(url, claim) as conn:
        conn.execute(ENTER_STAGE, {"run_key": claim.run_key, "stage": stage})


def update_run(url: str, run_key: str, *, stage: str | None = None, status: str | None = None,
               rows_extracted: int | None = None, rows_quarantined: int | None = None,
               model_version: str | None = None, message: str | None = None,
               details: dict[str, Any] | None = None, claim: Claim | None = None) -> None:
    with fenced_transaction(url, claim) as conn:
        conn.execute(UPDATE_RUN, {
            "run_key": run_key, "stage": stage, "status": status, "rows_extracted": rows_extracted,
            "rows_quarantined": rows_quarantined, "model_version": model_version, "message": message,
            "details": json.dumps(details or {}, default=str),
        })


def merge_manifest(url: str, run_key: str, *, run: dict[str, Any], stages: dict[str, Any],
                   artifacts: dict[str, Any], claim: Claim | None = None) -> dict[str, Any]:
    """Merge into the run's manifest (top-level fields, stage entries, artifacts) and return all of it."""
    with fenced_transaction(url, claim) as conn:
        row = conn.execute(MERGE_MANIFEST, {
            "run_key": run_key, "run": json.dumps(run, default=str), "stages": json.dumps(stages, default=str),
            "artifacts": json.dumps(artifacts, default=str)}).fetchone()
    return row[0] if row else {}


def run_manifest(url: str, run_key: str) -> dict[str, Any] | None:
    with db.connect(url) as conn:
        row = conn.execute(SELECT_MANIFEST, (run_key,)).fetchone()
    return row[0] if row and row[0] else None


def register_candidate(url: str, *, claim: Claim | None = None, **fields: Any) -> None:
    with fenced_transaction(url, claim) as conn:
        conn.execute(UPSERT_CANDIDATE, fields)


def record_decision(url: str, version: str, *, decision: str, reasons: list[str],
                    metrics: dict[str, Any], claim: Claim | None = None) -> None:
    """The gate's outcome (accepted, rejected or undecided), its reasons and metrics."""
    with fenced_transaction(url, claim) as conn:
        conn.execute(RECORD_DECISION, {"version": version, "decision": decision, "reasons": json.dumps(reasons),
                                       "metrics": json.dumps(metrics)})


def record_refit(url: str, version: str, *, artifact_dir: str, onnx_path: str, onnx_sha256: str, train_rows: int,
                 lineage: dict[str, Any], claim: Claim | None = None) -> None:
    with fenced_transaction(url, claim) as conn:
        conn.execute(RECORD_REFIT, {"version": version, "artifact_dir": artifact_dir, "onnx_path": onnx_path,
                                    "onnx_sha256": onnx_sha256, "train_rows": train_rows,
                                    "lineage": json.dumps(lineage, default=str)})


def register_baseline(url: str, *, version: str, run_key: str, dataset_path: str, watermark: datetime,
                      train_rows: int, n_items: int, artifact_dir: str, reasons: list[str], metrics: dict[str, Any],
                      lineage: dict[str, Any], claim: Claim | None = None) -> None:
    with fenced_transaction(url, claim) as conn:
        conn.execute(UPSERT_BASELINE, {
            "version": version, "run_key": run_key, "dataset_path": dataset_path, "watermark": watermark,
            "train_rows": train_rows, "n_items": n_items, "artifact_dir": artifact_dir,
            "reasons": json.dumps(reasons), "metrics": json.dumps(metrics, default=str),
            "lineage": json.dumps(lineage, default=str)})


def promote(conn: psycopg.Connection, version: str) -> None:
    """Make `version` the champion and start its serving period, in the caller's transaction (publish and
    rollback swap the views in the same one). The retire comes first: the one-champion index would refuse
    two at once. Publishing the version that already serves again keeps its period open."""
    conn.execute(RETIRE_CHAMPION, {"version": version})
    conn.execute(PROMOTE, {"version": version})
    conn.execute(END_SERVING_PERIOD, {"version": version})
    conn.execute(START_SERVING_PERIOD, {"version": version})


def record_long_tail(url: str, version: str, long_tail: dict[str, Any], claim: Claim | None = None) -> None:
    """The long-tail figures of the lists `version` publishes (`recmodel.longtail.LongTail`)."""
    with fenced_transaction(url, claim) as conn:
        conn.execute(RECORD_LONG_TAIL, {"version": version, "long_tail": json.dumps(long_tail)})


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


class ArtifactError(RuntimeError):
    """A model's files are missing or differ from what the registry recorded."""


def check_artifacts(record: ModelRecord) -> None:
    """Each ONNX file of `record` (served and gated) exists and has the sha256 recorded at registration."""
    from recmodel.artifacts import sha256_file

    for artifact in {record.served, record.gated}:
        if not artifact.onnx_path.exists():
            raise ArtifactError(f"{record.version}: artifact {artifact.onnx_path} is missing")
        actual = sha256_file(artifact.onnx_path)
        if actual != artifact.onnx_sha256:
            raise ArtifactError(f"{record.version}: {artifact.onnx_path} has sha256 {actual[:12]}…, the registry "
                                f"recorded {artifact.onnx_sha256[:12]}…; refusing to use it")


def verify_artifacts(url: str, version: str) -> None:
    """`check_artifacts` for a registered version; a baseline has no files to check."""
    with db.connect(url) as conn:
        row = conn.cursor(row_factory=dict_row).execute(SELECT_VERSION, (version,)).fetchone()
    if row is not None and row["kind"] == "model":
        check_artifacts(_record(row))


def recent_runs(url: str, limit: int = 30) -> list[dict[str, Any]]:
    """Retraining runs, rollbacks, freshness and fresh-data checks, the most recently started first."""
    with db.connect(url) as conn:
        return conn.cursor(row_factory=dict_row).execute(SELECT_RUNS, (limit,)).fetchall()


def overview(url: str, limit: int = 20) -> dict[str, list[dict[str, Any]]]:
    """Registry rows with their publication state, and recent runs (as `recent_runs` lists them), newest first."""
    with db.connect(url) as conn:
        cursor = conn.cursor(row_factory=dict_row)
        models = cursor.execute(SELECT_REGISTRY, (limit,)).fetchall()
        runs = cursor.execute(SELECT_RUNS, (limit,)).fetchall()
    return {"models": models, "runs": runs}
