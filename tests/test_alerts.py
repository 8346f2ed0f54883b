"""Alerts: the freshness DAG in real Airflow, and an alert that must survive a dead mail server."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, UTC

import pytest

from recmodel import db, registry
from recmodel.manifest import Gated, Snapshot
from recmodel.runner import free_port
from test_publish import frames, register

# recmodel.alerts imports Airflow, which reads its configuration once: only after `airflow_ready`.

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)


def publish_version(url: str, version: str, age: timedelta) -> None:
    from recmodel.publish import publish

    register(url, version)
    publish(url, version, frames(5, 3, seed=1), generated_at=NOW, keep_versions=3)
    with db.transaction(url) as conn:
        conn.execute("UPDATE recsys.published_versions SET published_at = now() - %s WHERE version = %s", (age, version))


def freshness_rows(url: str) -> list[tuple]:
    with db.connect(url) as conn:
        return conn.execute("SELECT status, message, alerts FROM recsys.pipeline_runs WHERE kind = 'freshness' "
                            "ORDER BY started_at").fetchall()


@pytest.mark.slow
def test_freshness_dag_skips_empty_serving_passes_fresh_and_alerts_on_stale(airflow_ready: dict[str, str],
                                                                           recsys_env: str) -> None:
    from recmodel.runner import run_dag

    nothing = run_dag("recsys_freshness", conf={}, logical_date=NOW)
    assert nothing.task_states == {"check_serving_freshness": "skipped"}

    publish_version(recsys_env, "v20261101120000", timedelta(hours=2))
    fresh = run_dag("recsys_freshness", conf={}, logical_date=NOW + timedelta(hours=1))
    assert fresh.succeeded and freshness_rows(recsys_env) == []  # a fresh table is not an alert

    with db.transaction(recsys_env) as conn:
        conn.execute("UPDATE recsys.published_versions SET published_at = now() - interval '40 hours'")
    stale = run_dag("recsys_freshness", conf={}, logical_date=NOW + timedelta(hours=2))
    assert stale.task_states == {"check_serving_freshness": "failed"}  # no retry: staleness does not fix itself
    [(status, message, recorded)] = freshness_rows(recsys_env)
    assert status == "failed" and "STALE" in message and "40.0 h ago" in message and "limit 36 h" in message
    [alert] = recorded
    assert alert["kind"] == "serving_stale" and alert["channels"] == ["log", "pipeline_runs"]


@pytest.mark.reliability
def test_an_alert_survives_a_dead_mail_server(airflow_ready: dict[str, str], recsys_env: str,
                                              monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from recmodel import alerts

    registry.claim_run(recsys_env, "20261101T120000Z", NOW, "manual__x", [])
    # Airflow's logging setup may have replaced the root handlers (pytest's capture among them) earlier
    # in the session, depending on which tests ran first: listen on the logger itself.
    monkeypatch.setattr(logging.getLogger("recmodel.alerts"), "handlers", [caplog.handler])
    monkeypatch.setenv(alerts.ALERT_EMAIL_ENV, "ops@example.com, oncall@example.com")
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT",
                       f"smtp://127.0.0.1:{free_port()}?disable_ssl=true&disable_tls=true&retry_limit=1&timeout=5")
    with caplog.at_level(logging.WARNING, logger="recmodel.alerts"):  # a rejection warns; the failed e-mail is an error
        rejected = Gated(snapshot=Snapshot("dataset.parquet", "catalog.parquet"), decision="rejected",
                         reasons=("ndcg@10 0.0100 is below the floor 0.0200",), serve="baseline",
                         publish_version="v20261101120000-baseline", model=None)
        channels = alerts.send(recsys_env, "20261101T120000Z", alerts.gate_rejection(recsys_env, "v20261101120000",
                                                                                     rejected))
    assert channels == ["log", "pipeline_runs"]
    assert any("RECSYS ALERT [gate_rejected]" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert any("e-mail to ops@example.com,oncall@example.com failed" in r.getMessage() for r in caplog.records)
    with db.connect(recsys_env) as conn:
        [alert] = conn.execute("SELECT alerts FROM recsys.pipeline_runs").fetchone()[0]
    assert alert["kind"] == "gate_rejected" and "below the floor" in alert["message"]
    assert "the popularity baseline v20261101120000-baseline will serve" in alert["message"]
    assert "email_error" in alert


def test_an_alert_for_a_run_without_a_row_is_still_logged(airflow_ready: dict[str, str], recsys_env: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from recmodel import alerts

    with caplog.at_level(logging.ERROR, logger="recmodel.alerts"):
        channels = alerts.send(recsys_env, "no-such-run", alerts.Alert("task_failed", "extract failed", "boom"))
    assert channels == ["log"]
    assert any("not recorded: no recsys.pipeline_runs row 'no-such-run'" in r.getMessage() for r in caplog.records)


def test_each_dag_reports_to_a_row_of_its_own_kind(airflow_ready: dict[str, str], recsys_env: str) -> None:
    from types import SimpleNamespace

    from recmodel import notifier

    for dag_id, kind in (("recsys_rollback", "rollback"), ("recsys_freshness", "freshness"),
                         ("recsys_fresh_data", "fresh_data"), ("recsys_outcomes", "outcomes")):
        run_key, found = notifier.run_key_of({"dag_run": SimpleNamespace(dag_id=dag_id, run_id="manual__1")})
        assert (run_key, found) == (f"{kind}:manual__1", kind)
        registry.record_event(recsys_env, run_key, kind=found, status="failed", stage="t", message="boom")
    with db.connect(recsys_env) as conn:
        kinds = {r[0] for r in conn.execute("SELECT kind FROM recsys.pipeline_runs")}
    assert kinds == {"rollback", "freshness", "fresh_data", "outcomes"}
