"""Faults against a real Postgres: a run's process killed (SIGKILL) during extract, training and publish.

The run executes in a child process, exactly as an Airflow task process would. To kill it at a
known point, the test holds a lock the stage needs (the `interactions` table for extract, the
serving view for publish's swap) or waits until the run reports the stage (training), then sends
SIGKILL. Afterwards the serving views must still show the complete earlier version, the registry
must hold no dangling champion, and the same run, started again (an Airflow retry), must complete
and lose no row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, UTC

import pandas as pd
import pytest

from conftest import REPO_ROOT, SMALL_MODEL, blocked, seed_small, serving_state, staged_tables
from recmodel import db, pipeline

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
LATER = NOW + timedelta(days=1)
LENIENT = {**SMALL_MODEL, "gate_champion_tolerance": 1.0}
CHILD = ("import json, sys\nfrom datetime import datetime\nfrom recmodel import pipeline\n"
         "pipeline.run_all(pipeline.make_context(datetime.fromisoformat(sys.argv[1]), json.loads(sys.argv[2])))\n")


def start_run(as_of: datetime) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, as_of.isoformat(), json.dumps(LENIENT)], env=env,
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def stage_of(url: str, run_key: str) -> str | None:
    with db.connect(url) as conn:
        row = conn.execute("SELECT stage FROM recsys.pipeline_runs WHERE run_key = %s", (run_key,)).fetchone()
    return row[0] if row else None


@pytest.fixture
def served_once(recsys_env: str) -> tuple:
    """A first version serving, and a day of new events waiting for the next run."""
    seed_small(recsys_env, NOW)
    first = pipeline.make_context(NOW, SMALL_MODEL)
    pipeline.run_all(first)
    seed_small(recsys_env, LATER, events=1500, seed=2)
    state = serving_state(recsys_env)
    assert state[0] == [first.version] and state[3] == [first.version] == state[4]
    return recsys_env, first.version, state


def assert_recovers(url: str, before: tuple, first_version: str) -> None:
    """Nothing half-published after the kill; the same run started again completes, losing no row."""
    assert serving_state(url) == before
    retry = pipeline.make_context(LATER, LENIENT)
    outcome = pipeline.run_all(retry)
    assert outcome.version == retry.version
    versions, rows, users, champions, serving = serving_state(url)
    assert versions == [retry.version] and champions == [retry.version] == serving and rows == users * 20
    dataset = pd.read_parquet(retry.files.dataset)
    with db.connect(url) as conn:
        stored, quarantined = conn.execute(
            "SELECT (SELECT count(*) FROM interactions), (SELECT count(DISTINCT event_id) FROM recsys.quarantine)"
        ).fetchone()
    assert len(dataset) + quarantined == stored and dataset["event_id"].is_unique  # no row lost, none twice


def test_sigkill_during_extract(served_once: tuple) -> None:
    url, first_version, before = served_once
    with db.connect(url) as holder:
        holder.execute("LOCK TABLE interactions IN ACCESS EXCLUSIVE MODE")  # the extract's COPY waits here
        run = start_run(LATER)
        wait_for(lambda: blocked(url), run, "the extract to wait on interactions")
        kill(run)
    with db.connect(url) as conn:
        watermark = conn.execute("SELECT count(*) FROM recsys.extract_watermarks WHERE run_key = %s",
                                 (pipeline.make_context(LATER, {}).run_key,)).fetchone()[0]
    assert watermark == 0  # nothing recorded as read
    assert_recovers(url, before, first_version)


def test_sigkill_during_training(served_once: tuple) -> None:
    url, first_version, before = served_once
    run_key = pipeline.make_context(LATER, {}).run_key
    run = start_run(LATER)
    wait_for(lambda: stage_of(url, run_key) == "train", run, "training to start")
    time.sleep(0.3)  # inside the training loop (a few seconds long here), before export registers anything
    kill(run)
    with db.connect(url) as conn:
        candidates = conn.execute("SELECT count(*) FROM recsys.model_registry").fetchone()[0]
    assert candidates == 1  # the killed run registered nothing
    assert_recovers(url, before, first_version)


def test_sigkill_during_publish(served_once: tuple) -> None:
    url, first_version, before = served_once
    run_key = pipeline.make_context(LATER, {}).run_key
    with db.connect(url) as holder:
        # The swap's CREATE OR REPLACE VIEW needs this lock after the new tables were loaded; it gives
        # way and retries (so readers do not queue behind it) until the kill.
        holder.execute("LOCK TABLE recsys.user_recommendations IN ACCESS EXCLUSIVE MODE")
        run = start_run(LATER)
        wait_for(lambda: stage_of(url, run_key) == "publish" and staged_tables(url) == 3, run,
                 "publish's swap to wait", 300)
        kill(run)
    assert staged_tables(url) == 3  # loaded and committed, never switched: what a kill here leaves
    assert_recovers(url, before, first_version)
    assert staged_tables(url) == 0  # the next publish cleared them


def test_a_dropped_connection_fails_the_task_and_airflow_retries_it(airflow_ready: dict[str, str], recsys_env: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from recmodel.runner import run_dag

    monkeypatch.setenv("RECSYS_RETRY_DELAY_SECONDS", "1")
    seed_small(recsys_env, NOW)
    dropped: list[int] = []

    def drop_the_extract_connection() -> None:
        with db.connect(recsys_env) as holder:
            holder.execute("LOCK TABLE interactions IN ACCESS EXCLUSIVE MODE")
            deadline = time.monotonic() + 120
            while not dropped and time.monotonic() < deadline:
                with db.connect(recsys_env, autocommit=True) as admin:
                    pids = [r[0] for r in admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")]
                    for pid in pids:
                        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    dropped.extend(pids)
                time.sleep(0.1)

    saboteur = threading.Thread(target=drop_the_extract_connection)
    saboteur.start()
    outcome = run_dag("recsys_retrain", conf={**SMALL_MODEL, "as_of": NOW.isoformat()}, logical_date=NOW)
    saboteur.join()
    assert dropped, "the extract never waited on the locked table"
    assert outcome.succeeded, outcome.task_states
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        extract_ti = session.query(TaskInstance).filter_by(dag_id="recsys_retrain", run_id=outcome.run_id,
                                                           task_id="extract").one()
        assert extract_ti.try_number == 2  # failed once on the dropped connection, then succeeded
    with db.connect(recsys_env) as conn:
        assert conn.execute("SELECT status FROM recsys.pipeline_runs").fetchone()[0] == "success"
