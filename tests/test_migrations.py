"""Migrations are append-only: what shipped never changes, a changed file is refused, old databases upgrade."""

from __future__ import annotations

import shutil
from datetime import datetime, UTC
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SMALL_MODEL, seed_small
from recmodel import db, registry

SHIPPED = REPO_ROOT / "sql" / "SHA256SUMS"  # `sha256sum -c` format: what each shipped migration must stay
FIRST_RELEASE = ("001_source_tables", "002_pipeline_state", "003_serving_views")  # the walking skeleton's
NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)


def shipped() -> dict[str, str]:
    return {name: digest for digest, name in (line.split() for line in SHIPPED.read_text().splitlines() if line)}


def test_no_shipped_migration_has_changed_and_every_one_is_listed() -> None:
    listed = shipped()
    files = {path.name: db.checksum(path) for path in db.migration_files()}
    changed = sorted(name for name, digest in listed.items() if files.get(name) != digest)
    assert not changed, (f"shipped migrations changed or removed: {', '.join(changed)}. Databases already applied "
                         "them; restore each file and put the change in a new numbered migration")
    unlisted = sorted(set(files) - set(listed))
    assert not unlisted, (f"new migrations not in sql/SHA256SUMS: {', '.join(unlisted)}. Once final, add them: "
                          f"(cd sql && sha256sum {' '.join(unlisted)} >> SHA256SUMS)")


def test_a_changed_migration_is_refused_before_anything_is_applied(db_url: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    edited = tmp_path / "sql"
    shutil.copytree(db.SQL_DIR, edited)
    target = edited / "004_run_kinds_and_alerts.sql"
    target.write_text(target.read_text().replace("'freshness')", "'freshness', 'something_new')"))
    (edited / "099_later.sql").write_text("CREATE TABLE recsys.should_not_exist (a int);")
    monkeypatch.setattr(db, "SQL_DIR", edited)
    with pytest.raises(db.MigrationChanged) as refused:
        db.migrate(db_url)
    assert "004_run_kinds_and_alerts.sql" in str(refused.value) and "append-only" in str(refused.value)
    with db.connect(db_url) as conn:
        assert conn.execute("SELECT to_regclass('recsys.should_not_exist')").fetchone()[0] is None


@pytest.mark.slow
def test_a_first_release_database_upgrades_to_today_and_retrains(airflow_ready: dict[str, str], pg_server_url: str,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database the first release created (its three migrations, its bookkeeping table without
    checksums) and filled, then upgraded by today's `migrate` and retrained through Airflow."""
    import uuid

    from psycopg import sql

    from recmodel.runner import database_environment, run_dag

    name = f"upgrade_{uuid.uuid4().hex[:8]}"
    db.ensure_database(pg_server_url, name)
    url = db.with_database(pg_server_url, name)
    try:
        with db.connect(url, autocommit=True) as conn:  # what the first release's `migrate` did
            conn.execute(db.CREATE_MIGRATIONS_TABLE)
            for version in FIRST_RELEASE:
                conn.execute((db.SQL_DIR / f"{version}.sql").read_text())
                conn.execute("INSERT INTO public.recsys_schema_migrations (version) VALUES (%s)", (version,))
        seed_small(url, NOW)
        applied = db.migrate(url)
        assert applied == [path.stem for path in db.migration_files()][len(FIRST_RELEASE):]
        with db.connect(url) as conn:
            recorded = dict(conn.execute("SELECT version, checksum FROM public.recsys_schema_migrations").fetchall())
        assert recorded == {path.stem: db.checksum(path) for path in db.migration_files()}  # old rows backfilled
        assert db.migrate(url) == []
        registry.record_event(url, "fresh-data-check", kind="fresh_data", status="failed", stage="count",
                              message="the kind 004 shipped without, allowed by 009")
        for variable, value in database_environment(url).items():
            monkeypatch.setenv(variable, value)
        monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
        outcome = run_dag("recsys_retrain", conf={**SMALL_MODEL, "as_of": NOW.isoformat()}, logical_date=NOW)
        assert outcome.succeeded, outcome.task_states
        with db.connect(url) as conn:
            assert conn.execute("SELECT count(DISTINCT user_id) FROM recsys.user_recommendations").fetchone()[0] > 0
    finally:
        with db.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
