"""Data-aware scheduling in real Airflow: the fresh-data asset, the retrain DAG's schedule, the published asset."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from conftest import REPO_ROOT, SMALL_MODEL, seed_small
from recmodel import db

NOW = datetime(2026, 11, 1, 12, tzinfo=timezone.utc)


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


def test_the_threshold_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from recmodel.assets import MIN_NEW_ROWS_ENV, min_new_rows

    for bad in ("many", "0"):
        monkeypatch.setenv(MIN_NEW_ROWS_ENV, bad)
        with pytest.raises(ValueError, match=MIN_NEW_ROWS_ENV):
            min_new_rows()
