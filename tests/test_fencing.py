"""A run claims its as-of once, and a run that lost its claim writes nothing; no validated row is stranded.

Attacks of the adversarial round behind issue 28: the same as-of claimed by two Airflow runs (a double
click), a run paused past the liveness limit that woke up and published beside the next one, a run
killed in refit whose snapshot the next run took as trained, and rows appended with an `ingested_at`
already behind the watermark (a historical import after the first run).
"""

from __future__ import annotations

import re
import threading
from datetime import datetime, timedelta, UTC

import psycopg
import pytest

from conftest import REPO_ROOT, SMALL_MODEL, seed_small, serving_state, staged_tables
from recmodel import db, pipeline, registry
from recmodel.errors import NothingNew
from recmodel.extract import fresh_interactions
from recmodel.locks import TRANSACTION_LOCK, AdvisoryLock
from recmodel.publish import publish

pytestmark = pytest.mark.reliability

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)


def run_row(url: str, run_key: str) -> tuple:
    with db.connect(url) as conn:
        return conn.execute("SELECT status, dag_run_id, claim_generation FROM recsys.pipeline_runs WHERE run_key = %s",
                            (run_key,)).fetchone()


def declare_stale(url: str, run_key: str, step: str) -> None:
    """What a paused (SIGSTOP, VM pause) or killed process looks like to the next run: no heartbeat for an hour."""
    with db.transaction(url) as conn:
        conn.execute("UPDATE recsys.pipeline_runs SET active_step = %s, heartbeat_at = now() - interval '1 hour' "
                     "WHERE run_key = %s", (step, run_key))


def test_the_same_as_of_under_a_second_airflow_run_is_refused_and_the_first_keeps_its_claim(recsys_env: str) -> None:
    seed_small(recsys_env, NOW)
    first = pipeline.make_context(NOW, SMALL_MODEL, dag_run_id="manual__first")
    extracted = pipeline.step_extract(first)
    claimed = run_row(recsys_env, first.run_key)
    double_click = pipeline.make_context(NOW, SMALL_MODEL, dag_run_id="manual__second")
    with pytest.raises(registry.RunKeyTaken, match=f"run {first.run_key} .* is already running as Airflow run "
                                                   "manual__first"):
        pipeline.step_extract(double_click)
    assert run_row(recsys_env, first.run_key) == claimed  # not reset to the second run
    with pytest.raises(registry.LostClaim, match=r"claimed again \(by Airflow run manual__first\)"):
        pipeline.step_validate(double_click, extracted)  # nor can it work under the first run's claim
    assert pipeline.step_validate(first, extracted).new_rows == 8000


def test_the_steps_after_a_gate_rejection_still_hold_the_runs_claim(recsys_env: str, caplog) -> None:
    """A rejected run walks through refit, scoring and publish as no-ops; its heartbeat must not call that a
    lost claim (an ERROR line in every rejected run's log)."""
    seed_small(recsys_env, NOW)
    ctx = pipeline.make_context(NOW, SMALL_MODEL)
    pipeline.step_extract(ctx)
    claim = registry.resume_claim(recsys_env, ctx.run_key, ctx.dag_run_id)
    with db.transaction(recsys_env) as conn:
        conn.execute("UPDATE recsys.pipeline_runs SET status = 'rejected' WHERE run_key = %s", (ctx.run_key,))
    with registry.heartbeat(recsys_env, claim, "refit"):
        pass
    assert "lost its claim" not in caplog.text


def test_a_run_declared_dead_while_paused_writes_nothing_when_it_wakes(recsys_env: str) -> None:
    from test_publish import frames, register

    seed_small(recsys_env, NOW)
    paused = pipeline.make_context(NOW, SMALL_MODEL, dag_run_id="scheduled__paused")
    extracted = pipeline.step_extract(paused)
    register(recsys_env, paused.version)
    before = serving_state(recsys_env)
    lost = pytest.raises(registry.LostClaim, match=f"run {paused.run_key} lost the claim .*: it was marked failed")
    with lost, pipeline.recorded(paused, "validate") as record:  # the process stops inside a step ...
        declare_stale(recsys_env, paused.run_key, "validate")
        following = pipeline.make_context(NOW + timedelta(hours=1), SMALL_MODEL, dag_run_id="scheduled__next")
        pipeline.step_extract(following)  # ... the next run declares it dead ...
        stale_claim = record.claim
        # ... and it wakes up: a publish under its claim switches nothing, not even its staging tables load
        publish(recsys_env, paused.version, frames(50, 5, seed=1), generated_at=NOW, keep_versions=3,
                claim=stale_claim)
    status, _, _ = run_row(recsys_env, paused.run_key)
    assert status == "failed"  # its stage record did not turn the row back to running or success
    assert serving_state(recsys_env) == before and staged_tables(recsys_env) == 0
    with pytest.raises(registry.LostClaim):
        registry.record_decision(recsys_env, paused.version, decision="accepted", reasons=[], metrics={},
                                 claim=stale_claim)
    with pytest.raises(registry.LostClaim, match="marked failed"):
        pipeline.step_validate(paused, extracted)  # its next task is refused before it starts
    with db.connect(recsys_env) as conn:
        assert conn.execute("SELECT count(*) FROM recsys.extract_watermarks WHERE run_key = %s",
                            (paused.run_key,)).fetchone() == (0,)


def test_a_snapshot_whose_accepted_model_never_published_is_trained_again(recsys_env: str) -> None:
    seed_small(recsys_env, NOW)
    died = pipeline.make_context(NOW, SMALL_MODEL)
    validated = pipeline.step_validate(died, pipeline.step_extract(died))
    # The gate accepted its candidate (the registry writes it made), then the run was killed in refit.
    registry.register_candidate(recsys_env, version=died.version, parent_version=None, run_key=died.run_key,
                                dataset_path=validated.snapshot.dataset_path, watermark=NOW, train_rows=8000,
                                n_items=150, device="cpu", artifact_dir="/nonexistent", onnx_path="/nonexistent",
                                onnx_sha256="0" * 64)
    registry.record_decision(recsys_env, died.version, decision="accepted", reasons=["better"], metrics={})
    declare_stale(recsys_env, died.run_key, "refit")
    assert fresh_interactions(recsys_env) == (8000, False)  # due: nothing of it serves
    following = pipeline.make_context(NOW + timedelta(hours=1), SMALL_MODEL)
    again = pipeline.step_validate(following, pipeline.step_extract(following))
    assert again.new_rows == 0 and again.snapshot.dataset_path == str(died.files.dataset)


def test_rows_appended_behind_the_watermark_are_read_by_the_next_run(recsys_env: str) -> None:
    seed_small(recsys_env, NOW)
    first = pipeline.make_context(NOW, SMALL_MODEL)
    pipeline.step_validate(first, pipeline.step_extract(first))
    history = NOW - timedelta(days=30)  # what a historical import writes: ingested when it occurred
    with db.transaction(recsys_env) as conn:
        conn.execute("INSERT INTO interactions (user_id, item_id, event_type, occurred_at, ingested_at) "
                     "SELECT 1000 + n, 1 + n %% 100, 'view', %s, %s FROM generate_series(1, 40) AS n",
                     (history, history))
    assert fresh_interactions(recsys_env)[0] >= 40  # the fresh-data check counts them
    following = pipeline.make_context(NOW + timedelta(hours=1), SMALL_MODEL)
    extracted = pipeline.step_extract(following)
    assert extracted.rows == 40 and extracted.rows_behind_watermark == 40
    assert pipeline.step_validate(following, extracted).new_rows == 40
    after = pipeline.make_context(NOW + timedelta(hours=2), SMALL_MODEL)
    assert pipeline.step_extract(after).rows == 0  # read once


@pytest.mark.slow
def test_with_nothing_new_and_nothing_stranded_the_run_ends(recsys_env: str) -> None:
    """The other side of the stranded-data fix: a snapshot whose version was published is not trained again."""
    seed_small(recsys_env, NOW)
    first = pipeline.make_context(NOW, SMALL_MODEL)
    assert pipeline.run_all(first).status == "success"
    following = pipeline.make_context(NOW + timedelta(hours=1), SMALL_MODEL)
    with pytest.raises(NothingNew):
        pipeline.step_validate(following, pipeline.step_extract(following))


def test_a_long_outcomes_update_does_not_hold_up_a_runs_claim(recsys_env: str) -> None:
    """The outcomes update and the run claim once shared one advisory-lock key: a 25 s outcomes transaction
    blocked `claim_run` for 23.5 s, silently."""
    claimed = threading.Event()

    def claim() -> None:
        registry.claim_run(recsys_env, registry.run_key_for(NOW), NOW, None, [])
        claimed.set()

    with psycopg.connect(recsys_env) as outcomes_update:  # holds the outcomes lock in its open transaction
        outcomes_update.execute(TRANSACTION_LOCK, (AdvisoryLock.OUTCOMES,))
        claimer = threading.Thread(target=claim)
        claimer.start()
        claimer.join(timeout=10)
        assert claimed.is_set(), "claim_run waited on the outcomes update's lock"
    claimer.join()


def test_every_advisory_lock_takes_its_key_from_one_place() -> None:
    """No module passes a key of its own: each `pg_advisory*` call gets an `AdvisoryLock` member."""
    calls = []
    for path in sorted((REPO_ROOT / "recmodel").rglob("*.py")):
        source = path.read_text()
        calls += [(path.name, line) for line in source.splitlines() if re.search(r"pg_(try_)?advisory", line)]
        calls += [(path.name, line) for line in source.splitlines() if "TRANSACTION_LOCK, (" in line]
    assert calls
    for name, line in calls:
        if "execute(" in line:
            assert "AdvisoryLock." in line, f"{name}: {line.strip()}"
        else:
            assert not re.search(r"\d{4}", line), f"{name} names a lock key of its own: {line.strip()}"
    assert len(set(AdvisoryLock)) == len(AdvisoryLock.__members__)


@pytest.mark.slow
def test_two_retrains_of_the_same_as_of_at_once_run_it_once(recsys_env: str, tmp_path) -> None:
    """Two `retrain --as-of A` started together: one runs, the other is refused with a clear message (it died
    on SQLAlchemy's IntegrityError for the DAG run's logical date, or cleared the first run's tasks)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    seed_small(recsys_env, NOW)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "recmodel", "retrain", "--as-of", NOW.isoformat(), "--conf", json.dumps(SMALL_MODEL)]
    both = [subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]
    try:
        while all(p.poll() is None for p in both):
            threading.Event().wait(0.2)
        [refused] = [p for p in both if p.poll() is not None]
        output = refused.stdout.read()
        assert refused.returncode == 2, output
        assert re.search(r"another `retrain` of as-of .* is running on this database", output), output
        assert "IntegrityError" not in output and "Traceback" not in output
    finally:
        for process in both:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.wait(timeout=120)
