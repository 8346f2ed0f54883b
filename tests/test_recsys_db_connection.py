"""Every DAG and the Recommender page act on the database of the Airflow connection `recsys_db`.

Each test sets the connection to one database and RECSYS_DATABASE_URL to another (migrated, so code that
read the wrong one would succeed there quietly rather than fail loudly): whatever acts must act on the
connection's database and leave the other untouched.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, UTC
from pathlib import Path

import pytest

from recmodel import db
from recmodel.publish import publish
from recmodel.runner import database_environment
from conftest import migrated_database
from test_publish import frames, register

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
FIRST, SECOND = "v20261101000000", "v20261102000000"
PASSWORD = "admin-secret"


@pytest.fixture
def elsewhere(pg_server_url: str) -> Iterator[str]:
    """A second migrated database: where RECSYS_DATABASE_URL points while the connection names another."""
    with migrated_database(pg_server_url) as url:
        yield url


def connection_uri(url: str) -> str:
    """`url` as Airflow's connection URI (the form AIRFLOW_CONN_RECSYS_DB takes)."""
    return database_environment(url)["AIRFLOW_CONN_RECSYS_DB"]


def run_rows(url: str) -> list[tuple[str, str]]:
    with db.connect(url) as conn:
        return conn.execute("SELECT kind, status FROM recsys.pipeline_runs ORDER BY started_at").fetchall()


def serving_version(url: str) -> str | None:
    with db.connect(url) as conn:
        row = conn.execute("SELECT version FROM recsys.published_versions WHERE serving").fetchone()
    return row[0] if row else None


def publish_two(url: str) -> None:
    register(url, FIRST, SECOND)
    publish(url, FIRST, frames(5, 3, seed=1), generated_at=NOW, keep_versions=3)
    publish(url, SECOND, frames(5, 3, seed=2), generated_at=NOW, keep_versions=3)


def test_rollback_freshness_and_fresh_data_dags_act_on_the_connections_database(
        airflow_ready: dict[str, str], db_url: str, elsewhere: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from recmodel.runner import run_dag

    monkeypatch.setenv("AIRFLOW_CONN_RECSYS_DB", connection_uri(db_url))
    monkeypatch.setenv("RECSYS_DATABASE_URL", elsewhere)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_RETRAIN_MIN_NEW_ROWS", "50")
    publish_two(db_url)

    rollback = run_dag("recsys_rollback", conf={"version": FIRST}, logical_date=NOW)
    assert rollback.succeeded, rollback.task_states
    assert serving_version(db_url) == FIRST
    assert run_rows(db_url) == [("rollback", "success")]

    with db.transaction(db_url) as conn:  # published long ago: the check must find it stale
        conn.execute("UPDATE recsys.published_versions SET published_at = now() - interval '100 hours'")
    freshness = run_dag("recsys_freshness", conf={}, logical_date=NOW + timedelta(hours=1))
    assert freshness.task_states == {"check_serving_freshness": "failed"}  # elsewhere, nothing published: a skip
    with db.connect(db_url) as conn:
        kinds = conn.execute("SELECT a ->> 'kind' FROM recsys.pipeline_runs, jsonb_array_elements(alerts) a "
                             "WHERE kind = 'freshness'").fetchall()
    assert kinds == [("serving_stale",)]

    with db.transaction(db_url) as conn:  # ingested after the registered models' watermark
        conn.execute("INSERT INTO interactions (user_id, item_id, event_type, occurred_at, ingested_at) "
                     "SELECT g, 1, 'view', clock_timestamp(), clock_timestamp() FROM generate_series(1, 60) g")
    fresh = run_dag("recsys_fresh_data", conf={}, logical_date=NOW + timedelta(hours=2))
    assert fresh.task_states == {"count_fresh_interactions": "success"}, fresh.task_states

    assert run_rows(elsewhere) == [] and serving_version(elsewhere) is None


@pytest.fixture
def api_client(airflow_ready: dict[str, str], tmp_path: Path) -> Iterator:
    """Airflow's API app (plugins mounted) in-process, with one SimpleAuthManager admin."""
    from fastapi.testclient import TestClient

    from airflow.api_fastapi.app import create_app

    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"admin": PASSWORD}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
        patch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
        patch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", uuid.uuid4().hex * 2)
        with TestClient(create_app()) as client:
            yield client


def served_on_the_page(client) -> list[tuple[str, bool]]:
    token = client.post("/auth/token", json={"username": "admin", "password": PASSWORD})
    assert token.status_code == 201, token.text
    answer = client.get("/recommender/api/serving", headers={"Authorization": f"Bearer {token.json()['access_token']}"})
    assert answer.status_code == 200, answer.text
    return [(v["version"], v["serving"]) for v in answer.json()["versions"]]


def test_the_page_reads_the_connections_database_from_the_environment_or_the_metadata_db(
        api_client, db_url: str, elsewhere: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the api-server finds it: an AIRFLOW_CONN_ variable, or a connection defined in the Airflow UI (the
    metadata DB), which the Task SDK's lookup does not search outside a task."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    publish_two(db_url)
    expected = [(SECOND, True), (FIRST, False)]
    monkeypatch.setenv("RECSYS_DATABASE_URL", elsewhere)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))

    monkeypatch.setenv("AIRFLOW_CONN_RECSYS_DB", connection_uri(db_url))
    assert served_on_the_page(api_client) == expected

    monkeypatch.delenv("AIRFLOW_CONN_RECSYS_DB")
    assert served_on_the_page(api_client) == []  # no connection: RECSYS_DATABASE_URL, as before
    with create_session() as session:
        session.add(Connection(conn_id="recsys_db", uri=connection_uri(db_url)))
    try:
        assert served_on_the_page(api_client) == expected
    finally:
        with create_session() as session:
            session.query(Connection).filter(Connection.conn_id == "recsys_db").delete()
