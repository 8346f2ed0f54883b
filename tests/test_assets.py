"""Data-aware scheduling in real Airflow: the fresh-data asset, the retrain DAG's schedule, the published asset."""

from __future__ import annotations

from datetime import datetime, timedelta, UTC

import pytest

from conftest import REPO_ROOT, SMALL_MODEL, seed_small
from recmodel import db

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)


def asset_events(uri: str) -> int:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).filter(
            AssetModel.uri == uri).count()


def test_retrain_runs_on_its_cron_or_on_fresh_data_and_publish_updates_an_asset(airflow_ready: dict[str, str]) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import AssetOrTimeSchedule

    from recmodel.assets import FRESH_INTERACTIONS, PUBLISHED_RECOMMENDATIONS

    dag = DagBag(str(REPO_ROOT / "dags")).dags["recsys_retrain"]
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert dag.timetable.timetable.expression == "0 0 * * *"  # RECSYS_RETRAIN_SCHEDULE, default @daily
    assert dag.timetable.asset_condition.uri == FRESH_INTERACTIONS.uri
    assert [a.uri for a in dag.get_task("publish").outlets] == [PUBLISHED_RECOMMENDATIONS.uri]


@pytest.mark.slow
def test_fresh_data_updates_its_asset_only_past_the_threshold(airflow_ready: dict[str, str], recsys_env: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from recmodel.assets import FRESH_INTERACTIONS, PUBLISHED_RECOMMENDATIONS
    from recmodel.runner import run_dag

    seed_small(recsys_env, NOW)  # 8,000 interactions, no snapshot yet
    fresh_before, published_before = asset_events(FRESH_INTERACTIONS.uri), asset_events(PUBLISHED_RECOMMENDATIONS.uri)
    monkeypatch.setenv("RECSYS_RETRAIN_MIN_NEW_ROWS", "10000")
    quiet = run_dag("recsys_fresh_data", conf={}, logical_date=NOW)
    assert quiet.task_states == {"count_fresh_interactions": "skipped"}
    assert asset_events(FRESH_INTERACTIONS.uri) == fresh_before  # a skipped task records no event

    monkeypatch.setenv("RECSYS_RETRAIN_MIN_NEW_ROWS", "5000")
    enough = run_dag("recsys_fresh_data", conf={}, logical_date=NOW + timedelta(minutes=15))
    assert enough.succeeded and asset_events(FRESH_INTERACTIONS.uri) == fresh_before + 1

    retrain = run_dag("recsys_retrain", conf={**SMALL_MODEL, "as_of": NOW.isoformat()}, logical_date=NOW)
    assert retrain.succeeded and asset_events(PUBLISHED_RECOMMENDATIONS.uri) == published_before + 1
    after = run_dag("recsys_fresh_data", conf={}, logical_date=NOW + timedelta(minutes=30))
    assert after.task_states == {"count_fresh_interactions": "skipped"}  # the snapshot took them all
    with db.connect(recsys_env) as conn:
        assert conn.execute("SELECT count(*) FROM recsys.extract_watermarks").fetchone()[0] == 1


@pytest.mark.slow
def test_backfill_builds_past_snapshots_without_publishing_over_the_champion(airflow_ready: dict[str, str],
                                                                             recsys_env: str, tmp_path) -> None:
    import os
    import subprocess
    import sys
    import time

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    from airflow.models.asset import AssetDagRunQueue

    from recmodel.runner import database_environment, free_port, run_dag, set_paused, start_stack

    seed_small(recsys_env, NOW)
    champion = run_dag("recsys_retrain", conf={**SMALL_MODEL, "as_of": NOW.isoformat()}, logical_date=NOW)
    assert champion.succeeded
    with create_session() as session:  # other tests' fresh-data events must not start a run here
        session.query(AssetDagRunQueue).filter_by(target_dag_id="recsys_retrain").delete()
    set_paused(("recsys_retrain",), False)  # the scheduler runs no queued run of a paused DAG, backfills included
    env = {**airflow_ready, **database_environment(recsys_env), "RECSYS_HOME": os.environ["RECSYS_HOME"]}
    stack = start_stack(env, free_port(), tmp_path / "airflow-logs", components=("api-server", "scheduler"))
    try:
        subprocess.run([sys.executable, "-m", "airflow", "backfill", "create", "--dag-id", "recsys_retrain",
                        "--from-date", "2026-10-30", "--to-date", "2026-10-31", "--max-active-runs", "1"],
                       env={**os.environ, **env}, check=True, capture_output=True, text=True)
        deadline = time.monotonic() + 300
        while True:
            with create_session() as session:
                runs = session.query(DagRun).filter(DagRun.dag_id == "recsys_retrain",
                                                    DagRun.backfill_id.isnot(None)).all()
                states = sorted((run.logical_date.date().isoformat(), str(run.state)) for run in runs)
            if len(states) == 2 and all(s in ("success", "failed") for _, s in states):
                break
            assert time.monotonic() < deadline, f"backfill runs still {states}; logs in {stack.log_dir}"
            time.sleep(2)
    finally:
        stack.stop()
        set_paused(("recsys_retrain",), True)
    assert states == [("2026-10-30", "success"), ("2026-10-31", "success")]
    with db.connect(recsys_env) as conn:
        snapshots = conn.execute("SELECT run_key, dataset_rows FROM recsys.extract_watermarks ORDER BY run_key").fetchall()
        runs = dict(conn.execute("SELECT run_key, message FROM recsys.pipeline_runs WHERE status = 'skipped'"))
        models, serving = conn.execute("SELECT (SELECT count(*) FROM recsys.model_registry), "
                                       "(SELECT version FROM recsys.published_versions WHERE serving)").fetchone()
        at = {day: conn.execute("SELECT count(*) FROM interactions WHERE ingested_at <= %s", (day,)).fetchone()[0]
              for day in ("2026-10-30T00:00:00Z", "2026-10-31T00:00:00Z")}
    assert [key for key, _ in snapshots] == ["20261030T000000Z", "20261031T000000Z", "20261101T120000Z"]
    rows = dict(snapshots)  # each past snapshot holds exactly the data ingested up to its time
    assert (rows["20261030T000000Z"], rows["20261031T000000Z"]) == (at["2026-10-30T00:00:00Z"], at["2026-10-31T00:00:00Z"])
    for key in ("20261030T000000Z", "20261031T000000Z"):
        assert runs[key].startswith("superseded: v20261101120000, which serves,"), runs
    assert (models, serving) == (1, "v20261101120000")  # nothing trained, nothing published over the champion
