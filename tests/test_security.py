"""Security against a real Postgres: the reader role, hostile strings as data, artifacts, credentials."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta, UTC
from pathlib import Path

import uuid

import psycopg
import pytest
from psycopg import errors, sql
from sqlalchemy.engine import make_url

from conftest import seed_small
from recmodel import dashboard, db, pipeline, registry
from recmodel.publish import publish, table_name
from test_publish import INSERT_MODEL, frames, register

pytestmark = pytest.mark.reliability

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
HOSTILE = ["Robert'); DROP TABLE items; --", 'quote " and \\ backslash', "tab\tnew\nline", "☃ 雪 \u202e rtl",
           "semi;colon", "\\N", "%s %(name)s {}"]


def test_reader_role_reads_the_serving_views_and_nothing_else(db_url: str) -> None:
    register(db_url, "v20261101000000")
    publish(db_url, "v20261101000000", frames(5, 3, seed=1), generated_at=NOW, keep_versions=3)
    with db.connect(db_url, autocommit=True) as conn:
        conn.execute("SET ROLE recsys_reader")
        for view in ("user_recommendations", "similar_items", "popular_items"):
            assert conn.execute(f"SELECT count(*) FROM recsys.{view}").fetchone()[0] > 0
        assert conn.execute("SELECT count(*) FROM recsys.item_catalog").fetchone()[0] == 0  # readable (no items here)
        refused = [
            "SELECT * FROM interactions LIMIT 1", "SELECT * FROM items LIMIT 1",
            "SELECT * FROM recsys.model_registry", "SELECT * FROM recsys.pipeline_runs",
            "SELECT * FROM recsys.quarantine", "SELECT * FROM recsys.published_versions",
            f"SELECT * FROM recsys.{table_name('user_recommendations', 'v20261101000000')}",
            "INSERT INTO recsys.popular_items VALUES (1, 1, 1.0, 'v')", "DELETE FROM recsys.user_recommendations",
            "UPDATE interactions SET user_id = 0", "CREATE TABLE recsys.mine (a int)", "CREATE TABLE public.mine (a int)",
        ]
        for statement in refused:
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)


def test_an_app_login_reads_recommendations_with_titles_and_nothing_else(db_url: str) -> None:
    """The login the demo prints (and the README's one statement creates) is all an app needs."""
    register(db_url, "v20261101000000")
    publish(db_url, "v20261101000000", frames(5, 3, seed=1), generated_at=NOW, keep_versions=3)
    with db.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO items (item_id, title, description) SELECT item_id, 'title ' || item_id, 'secret' "
                     "FROM recsys.popular_items")
    role = f"app_{uuid.uuid4().hex[:8]}"
    app_url = db.reader_login(db_url, role, "first password")
    again = db.reader_login(db_url, role, "new password")  # a second call sets a new password
    assert make_url(again).username == role and make_url(again).password == "new password"
    try:
        with psycopg.connect(again) as app:
            assert app.execute("SELECT current_user").fetchone()[0] == role
            titled = app.execute("SELECT p.item_id, c.title FROM recsys.popular_items p "
                                 "JOIN recsys.item_catalog c USING (item_id) ORDER BY p.rank").fetchall()
            assert titled and all(title == f"title {item_id}" for item_id, title in titled)
            columns = app.execute("SELECT * FROM recsys.item_catalog LIMIT 0").description
            assert [c.name for c in columns] == ["item_id", "title"]  # not the description an app should not see
            for statement in ("SELECT * FROM items", "SELECT * FROM recsys.model_registry"):
                with pytest.raises(errors.InsufficientPrivilege):
                    app.execute(statement)
                app.rollback()
    finally:
        with db.connect(db_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert app_url != again


def test_a_reader_login_gets_nothing_in_the_embedded_servers_maintenance_databases(tmp_path: Path) -> None:
    """The embedded server's `postgres` (and `template1`) grant PUBLIC neither CONNECT nor TEMPORARY, from its
    first start on, and again at the next start of a server where they were granted back."""
    from recmodel.config import Settings

    home = tmp_path / "home"
    url = db.resolve_url(Settings(home=home, database_url=None))  # starts the embedded server
    try:
        db.migrate(url)
        role = f"app_{uuid.uuid4().hex[:8]}"
        app_url = db.reader_login(url, role, "pw")
        server_url = db.start_embedded(home)  # a second start: already closed, nothing to do
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(db.with_database(app_url, "postgres")).close()
        with psycopg.connect(db.libpq_url(server_url), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname IN ('postgres', 'template1') AND "
                                "(has_database_privilege('public', oid, 'CONNECT') OR "
                                "has_database_privilege('public', oid, 'TEMPORARY'))").fetchone()[0] == 0
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))  # in `postgres`, as the login
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("CREATE TEMPORARY TABLE mine (a int)")
            conn.execute("RESET ROLE")
            conn.execute("GRANT CONNECT, TEMPORARY ON DATABASE postgres TO PUBLIC")  # a server set up before
        db.start_embedded(home)
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(db.with_database(app_url, "postgres")).close()
        with psycopg.connect(db.libpq_url(server_url)) as conn:  # the superuser still works there
            conn.execute("CREATE TEMPORARY TABLE ours (a int)")
    finally:
        db.stop_embedded(home)


def test_hostile_strings_are_data_everywhere(recsys_env: str) -> None:
    seed_small(recsys_env, NOW, events=800)
    at = NOW - timedelta(hours=1)
    with db.transaction(recsys_env) as conn:
        for n, text in enumerate(HOSTILE):
            conn.execute("UPDATE items SET title = %s WHERE item_id = %s", (text, n + 1))
            conn.execute("INSERT INTO interactions (user_id, item_id, event_type, occurred_at, ingested_at) "
                         "VALUES (5, 1, %s, %s, %s)", (text, at, at))
    context = pipeline.make_context(NOW, {})
    pipeline.step_validate(context, pipeline.step_extract(context))
    with db.connect(recsys_env) as conn:
        quarantined = {r[0] for r in conn.execute(
            "SELECT row_data ->> 'event_type' FROM recsys.quarantine WHERE reason = 'bad_event_type'")}
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 150  # nothing dropped
    assert quarantined == set(HOSTILE)  # stored as data, byte for byte

    register(recsys_env, "v20261101120000")
    recommended = frames(5, len(HOSTILE), seed=3)
    recommended["user_recommendations"]["item_id"] = list(range(1, len(HOSTILE) + 1)) * 5
    publish(recsys_env, "v20261101120000", recommended, generated_at=NOW, keep_versions=3)
    titles = [r["title"] for r in dashboard.user(recsys_env, 1)["recommendations"]]
    assert titles == HOSTILE


def test_a_tampered_or_missing_champion_artifact_is_refused(recsys_env: str, tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"the exported graph")
    with db.transaction(recsys_env) as conn:
        conn.execute(INSERT_MODEL, ("v20261101000000", "r"))
        conn.execute("UPDATE recsys.model_registry SET status = 'champion', onnx_path = %s, onnx_sha256 = %s",
                     (str(onnx), hashlib.sha256(onnx.read_bytes()).hexdigest()))
    assert pipeline.verified_champion(recsys_env).served.onnx_path == onnx
    onnx.write_bytes(b"the exported graph, edited")
    with pytest.raises(RuntimeError, match="has sha256 .* the registry recorded .*; refusing to use it"):
        pipeline.verified_champion(recsys_env)
    onnx.unlink()
    with pytest.raises(registry.ArtifactError, match="v20261101000000: artifact .* is missing"):
        pipeline.verified_champion(recsys_env)


def test_the_database_password_never_reaches_logs_tables_or_the_api(recsys_env: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    secret = "pw-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    with_password = make_url(recsys_env).set(password=secret).render_as_string(hide_password=False)
    with psycopg.connect(db.libpq_url(with_password)):  # the test server trusts local users: any password works
        pass
    monkeypatch.setenv("RECSYS_DATABASE_URL", with_password)
    seed_small(with_password, NOW, events=800)
    with caplog.at_level(logging.DEBUG):
        context = pipeline.make_context(NOW, {})
        pipeline.step_validate(context, pipeline.step_extract(context))
        with pytest.raises(db.DatabaseError) as failure:
            db.connect(make_url(with_password).set(port=1, host="127.0.0.1").render_as_string(hide_password=False))
    assert secret not in str(failure.value) and "***" in str(failure.value)
    assert not [r for r in caplog.records if secret in r.getMessage()]
    with db.connect(recsys_env) as conn:
        stored = conn.execute("SELECT string_agg(details::text || coalesce(message, ''), '') "
                              "FROM recsys.pipeline_runs").fetchone()[0]
    assert stored and secret not in stored
    answers = [dashboard.runs(recsys_env), dashboard.data_quality(recsys_env, Path(context.home)),
               dashboard.serving(recsys_env)]
    assert secret not in repr(answers)
