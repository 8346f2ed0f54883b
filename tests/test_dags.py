"""The DAGs in real Airflow: fast, clean parsing and whole runs through `DAG.test()`."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, UTC
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SMALL_MODEL, seed_small
from recmodel import db, manifest, registry, stages

HEAVY_MODULES = ("torch", "great_expectations", "transformers", "onnxruntime", "onnx", "pandas")
NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)


def test_dag_files_parse_fast_without_heavy_imports() -> None:
    probe = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "import importlib.util\n"
        "for name in ('recsys_retrain', 'recsys_rollback', 'recsys_freshness', 'recsys_fresh_data', 'recsys_outcomes'):\n"
        f"    spec = importlib.util.spec_from_file_location(name, r'{REPO_ROOT / 'dags'}/' + name + '.py')\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "elapsed = time.perf_counter() - t\n"
        f"print(elapsed, [m for m in {HEAVY_MODULES!r} if m in sys.modules])\n"
    )
    # Airflow's own import is paid once per DAG processor, so it is loaded before the clock starts.
    out = subprocess.run([sys.executable, "-c", "import airflow.sdk\n" + probe], capture_output=True, text=True,
                         cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=True)
    elapsed, heavy = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert heavy == "[]", f"DAG files import heavy modules at parse time: {heavy}"
    assert float(elapsed) < 1.0


def airflow_json(env: dict[str, str], *args: str) -> list[dict]:
    """Run an `airflow` CLI command with --output json; warnings may precede the JSON line."""
    out = subprocess.run([sys.executable, "-m", "airflow", *args, "--output", "json"], capture_output=True,
                         text=True, env={**os.environ, **env}, check=True)
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("[")))


def test_running_stages_without_airflow_never_imports_it() -> None:
    """`run_all`, `bench` and the CLI run stages (a gate rejection's alert included) without Airflow; importing
    it would fix its configuration before a command or test sets it up."""
    probe = ("import sys\nimport recmodel.alerts, recmodel.bench, recmodel.cli, recmodel.pipeline\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_scoring_tasks_never_import_torch() -> None:
    """The scoring shards and the item tables run ONNX Runtime and numpy; importing torch or transformers
    would add seconds to every such task on a worker (`score_items` paid 6 of its 7.7 s for it)."""
    probe = ("import sys\nimport recmodel.pipeline, recmodel.score, recmodel.longtail, recmodel.artifacts\n"
             "from recmodel.data import Vocab, inactive_mask, vocab_text_matrix\n"
             "print([m for m in ('torch', 'transformers') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_airflow_reports_no_import_errors(airflow_ready: dict[str, str]) -> None:
    assert airflow_json(airflow_ready, "dags", "list-import-errors", "--local") == []
    listed = airflow_json(airflow_ready, "dags", "list", "--local")
    assert {"recsys_retrain", "recsys_rollback", "recsys_freshness", "recsys_fresh_data"} <= {d["dag_id"] for d in listed}


def test_the_retrain_dag_is_built_from_the_stage_list(airflow_ready: dict[str, str]) -> None:
    """Tasks in the order of `recmodel.stages`, each chain stage fed by the one before it, training on the
    training queue: the DAG and `pipeline.run_all` follow one list."""
    from airflow.dag_processing.dagbag import DagBag

    from recmodel import pipeline, stages
    from recmodel.config import settings

    dag = DagBag(str(REPO_ROOT / "dags")).dags["recsys_retrain"]
    chain = [stage.name for stage in stages.CHAIN]
    assert dag.task_ids == [*chain, "plan_scoring", *(s.name for s in stages.STAGES[len(chain):])]
    for before, after in itertools.pairwise(chain):
        assert dag.get_task(after).upstream_task_ids == {before}
    assert dag.get_task("score_users").upstream_task_ids == {"plan_scoring", chain[-1]}
    assert dag.get_task("publish").upstream_task_ids == {"score_users", "score_items"}
    assert {s.name for s in stages.STAGES if dag.get_task(s.name).queue == settings().train_queue} >= {"train", "refit"}
    assert all(callable(getattr(pipeline, stage.step)) for stage in stages.STAGES)


def test_tasks_find_the_database_through_the_recsys_db_connection(airflow_ready: dict[str, str]) -> None:
    """The connection wins over RECSYS_DATABASE_URL where both are set; without it, tasks use the latter."""
    probe = "from recmodel import taskenv; print(taskenv.database_url())"
    env = {**os.environ, **airflow_ready, "PYTHONPATH": str(REPO_ROOT),
           "RECSYS_DATABASE_URL": "postgresql://cli@h1:5432/recsys"}

    def url_seen(**extra: str) -> str:
        variables = {k: v for k, v in {**env, **extra}.items() if v is not None}
        done = subprocess.run([sys.executable, "-c", probe], env=variables, capture_output=True, text=True, check=True)
        return done.stdout.strip().splitlines()[-1]

    assert url_seen(AIRFLOW_CONN_RECSYS_DB="postgresql://task:p%40ss@h2:5433/recsys?sslmode=require") == \
        "postgresql://task:p%40ss@h2:5433/recsys?sslmode=require"
    assert url_seen(AIRFLOW_CONN_RECSYS_DB=None) == "postgresql://cli@h1:5432/recsys"


@pytest.mark.slow
def test_retrain_dag_end_to_end(airflow_ready: dict[str, str], recsys_env: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from recmodel.runner import run_dag

    seed_small(recsys_env, NOW)
    first = run_dag("recsys_retrain", conf={**SMALL_MODEL, "as_of": NOW.isoformat()}, logical_date=NOW)
    assert first.succeeded, first.task_states
    assert set(first.task_states.values()) == {"success"}
    with db.connect(recsys_env) as conn:
        counts = conn.execute("SELECT (SELECT count(*) FROM recsys.user_recommendations), "
                              "(SELECT count(DISTINCT user_id) FROM recsys.user_recommendations), "
                              "(SELECT count(*) FROM recsys.similar_items), "
                              "(SELECT count(*) FROM recsys.popular_items)").fetchone()
        run = conn.execute("SELECT status, dag_run_id FROM recsys.pipeline_runs").fetchone()
    assert counts[0] == counts[1] * 20 and counts[1] >= 190
    assert counts[2] > 0 and counts[3] > 0
    assert run == ("success", first.run_id)
    # Its manifest: every stage's typed output as XCom carried it, the settings and the artifacts' sha256.
    run_key = NOW.strftime("%Y%m%dT%H%M%SZ")
    recorded = registry.run_manifest(recsys_env, run_key)
    assert json.loads((Path(os.environ["RECSYS_HOME"]) / "runs" / run_key / "manifest.json").read_text()) == recorded
    assert set(recorded["stages"]) == {*(s.name for s in stages.CHAIN), "score_users.0", "score_items", "publish"}
    assert {entry["outcome"] for entry in recorded["stages"].values()} == {"done"}
    assert recorded["dag_run_id"] == first.run_id and recorded["config"]["epochs"] == SMALL_MODEL["epochs"]
    served = manifest.from_json(manifest.Gated, recorded["stages"]["refit"]["output"])
    assert served.serve == "model" and served.model.onnx_sha256 == recorded["artifacts"]["serving_onnx"]["sha256"]

    # Nothing new since the watermark: a successful run that trains and publishes nothing.
    idle_at = NOW + timedelta(hours=1)
    idle = run_dag("recsys_retrain", conf={**SMALL_MODEL, "as_of": idle_at.isoformat()}, logical_date=idle_at)
    assert idle.succeeded and idle.task_states["train"] == "skipped"

    # New activity: the next run extracts only it, warm-starts from the champion and publishes.
    later = NOW + timedelta(days=1)
    appended = seed_small(recsys_env, later, events=1500, seed=2)
    lenient = {**SMALL_MODEL, "gate_champion_tolerance": 1.0, "score_shards": 4, "as_of": later.isoformat()}
    second = run_dag("recsys_retrain", conf=lenient, logical_date=later)
    assert second.succeeded, second.task_states
    first_version, second_version = ("v" + t.strftime("%Y%m%d%H%M%S") for t in (NOW, later))
    with db.connect(recsys_env) as conn:
        extracted, = conn.execute("SELECT rows_extracted FROM recsys.pipeline_runs WHERE model_version = %s",
                                  (second_version,)).fetchone()
        parent, = conn.execute("SELECT parent_version FROM recsys.model_registry WHERE version = %s",
                               (second_version,)).fetchone()
    assert extracted == appended.events_added and parent == first_version
    assert serving(recsys_env) == second_version
    with db.connect(recsys_env) as conn:  # scored by 4 mapped tasks, published as one table
        scored, = conn.execute("SELECT details -> 'score' FROM recsys.pipeline_runs WHERE model_version = %s",
                               (second_version,)).fetchone()
        rows, users = conn.execute("SELECT count(*), count(DISTINCT user_id) FROM recsys.user_recommendations").fetchone()
    assert scored["shards"] == 4 and scored["users"] == users and rows == users * 20

    # A scheduled interval that ends before the champion's data (the DAG unpaused after a manual
    # run, or a backfill) builds its snapshot but trains nothing and publishes nothing.
    earlier = NOW + timedelta(hours=12)
    behind = run_dag("recsys_retrain", conf={**SMALL_MODEL, "as_of": earlier.isoformat()}, logical_date=earlier)
    assert behind.succeeded and behind.task_states["validate"] == "success"
    assert [behind.task_states[t] for t in ("train", "gate", "publish")] == ["skipped"] * 3
    with db.connect(recsys_env) as conn:
        status, message = conn.execute("SELECT status, message FROM recsys.pipeline_runs WHERE run_key = %s",
                                       (earlier.strftime("%Y%m%dT%H%M%SZ"),)).fetchone()
    assert status == "skipped" and message.startswith(f"superseded: {second_version}, which serves,")
    assert serving(recsys_env) == second_version

    # Rerunning the interval of the version that serves is refused without retry; its run and model rows stay.
    with db.connect(recsys_env) as conn:
        before = conn.execute("SELECT r.status, r.message, m.status, m.onnx_sha256 FROM recsys.pipeline_runs r "
                              "JOIN recsys.model_registry m ON m.version = r.model_version WHERE m.version = %s",
                              (second_version,)).fetchone()
    rerun = run_dag("recsys_retrain", conf=lenient, logical_date=later + timedelta(minutes=30))
    assert not rerun.succeeded and rerun.task_states["extract"] == "failed"
    with db.connect(recsys_env) as conn:
        after = conn.execute("SELECT r.status, r.message, m.status, m.onnx_sha256 FROM recsys.pipeline_runs r "
                             "JOIN recsys.model_registry m ON m.version = r.model_version WHERE m.version = %s",
                             (second_version,)).fetchone()
    assert after == before and before[0] == "success"

    # The rollback DAG serves the first version again; asking again is refused and changes nothing.
    rollback = run_dag("recsys_rollback", conf={"version": first_version}, logical_date=later + timedelta(hours=1))
    assert rollback.succeeded, rollback.task_states
    assert serving(recsys_env) == first_version
    again = run_dag("recsys_rollback", conf={"version": first_version}, logical_date=later + timedelta(hours=2))
    assert not again.succeeded
    assert serving(recsys_env) == first_version


def serving(url: str) -> str:
    with db.connect(url) as conn:
        return conn.execute("SELECT max(model_version) FROM recsys.user_recommendations").fetchone()[0]


@pytest.mark.slow
@pytest.mark.reliability
def test_bad_data_fails_the_run_without_retry_and_publishes_nothing(airflow_ready: dict[str, str], recsys_env: str) -> None:
    from recmodel.runner import run_dag

    seed_small(recsys_env, NOW, events=800)
    with db.transaction(recsys_env) as conn:
        conn.execute("INSERT INTO interactions (user_id, item_id, event_type, occurred_at, ingested_at) "
                     "SELECT 5, 900000 + g, 'view', %(at)s, %(at)s FROM generate_series(1, 400) g",
                     {"at": NOW - timedelta(minutes=1)})
    outcome = run_dag("recsys_retrain", conf={**SMALL_MODEL, "as_of": NOW.isoformat()}, logical_date=NOW)
    assert not outcome.succeeded
    assert outcome.task_states["validate"] == "failed"  # AirflowFailException: no retry for bad data
    assert outcome.task_states["train"] == "upstream_failed"
    with db.connect(recsys_env) as conn:
        status, message, recorded = conn.execute("SELECT status, message, alerts FROM recsys.pipeline_runs").fetchone()
        models = conn.execute("SELECT count(*) FROM recsys.model_registry").fetchone()[0]
        served = conn.execute("SELECT count(*) FROM recsys.user_recommendations").fetchone()[0]
        unknown = conn.execute("SELECT count(*) FROM recsys.quarantine WHERE reason = 'unknown_item'").fetchone()[0]
    assert status == "failed" and "quarantine_share" in message  # written by the failure callback
    assert [(a["kind"], a["channels"]) for a in recorded] == [("task_failed", ["log", "pipeline_runs"])]
    assert (models, served, unknown) == (0, 0, 400)
