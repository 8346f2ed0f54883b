"""Publishing and rollback against a real Postgres: atomic swaps, checks, pruning, locks."""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from datetime import datetime, UTC
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest

from recmodel import db
from recmodel.publish import PublishError, publish, rollback

NOW = datetime(2026, 11, 1, tzinfo=UTC)
INSERT_MODEL = """
INSERT INTO recsys.model_registry (version, run_key, dataset_path, watermark, train_rows, n_items, device,
    artifact_dir, onnx_path, onnx_sha256, decision)
VALUES (%s, %s, '/d', now(), 1, 1, 'cpu', '/a', '/a/model.onnx', 'x', 'accepted')
"""


def frames(users: int, k: int, seed: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    return {
        "user_recommendations": pd.DataFrame({
            "user_id": np.repeat(np.arange(1, users + 1), k), "rank": np.tile(np.arange(1, k + 1), users),
            "item_id": rng.integers(1, 1000, users * k), "score": rng.random(users * k).astype(np.float32)}),
        "similar_items": pd.DataFrame({"item_id": [1, 1, 2], "rank": [1, 2, 1], "similar_item_id": [2, 3, 1],
                                       "score": [0.9, 0.5, 0.9]}),
        "popular_items": pd.DataFrame({"rank": [1, 2], "item_id": [5, 6], "score": [0.2, 0.1]}),
    }


def register(url: str, *versions: str) -> None:
    """Registry rows of accepted models, each with a small ONNX file and its sha256 (rollback checks them)."""
    with db.transaction(url) as conn:
        for version in versions:
            onnx = Path(tempfile.mkdtemp(prefix=f"{version}-")) / "model.onnx"
            onnx.write_bytes(f"the graph of {version}".encode())
            conn.execute(INSERT_MODEL, (version, version))
            conn.execute("UPDATE recsys.model_registry SET onnx_path = %s, onnx_sha256 = %s WHERE version = %s",
                         (str(onnx), hashlib.sha256(onnx.read_bytes()).hexdigest(), version))


def serving(url: str) -> tuple[str, int]:
    with db.connect(url) as conn:
        versions = conn.execute("SELECT DISTINCT model_version FROM recsys.user_recommendations").fetchall()
        count = conn.execute("SELECT count(*) FROM recsys.user_recommendations").fetchone()[0]
    assert len(versions) == 1
    return versions[0][0], count


def test_publish_switches_views_and_promotes_champion(db_url: str) -> None:
    register(db_url, "v20261101000000", "v20261102000000")
    publish(db_url, "v20261101000000", frames(50, 10, 0), generated_at=NOW, keep_versions=3)
    assert serving(db_url) == ("v20261101000000", 500)
    publish(db_url, "v20261102000000", frames(60, 10, 1), generated_at=NOW, keep_versions=3)
    assert serving(db_url) == ("v20261102000000", 600)
    with db.connect(db_url) as conn:
        statuses = dict(conn.execute("SELECT version, status FROM recsys.model_registry").fetchall())
        popular = conn.execute("SELECT rank, item_id, model_version FROM recsys.popular_items ORDER BY rank").fetchall()
    assert statuses == {"v20261101000000": "retired", "v20261102000000": "champion"}
    assert popular == [(1, 5, "v20261102000000"), (2, 6, "v20261102000000")]


def test_republishing_a_version_replaces_it_without_duplicates(db_url: str) -> None:
    register(db_url, "v20261101000000")
    for _ in range(2):
        publish(db_url, "v20261101000000", frames(30, 5, 0), generated_at=NOW, keep_versions=3)
    assert serving(db_url) == ("v20261101000000", 150)
    with db.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM recsys.published_versions").fetchone()[0] == 1


READER_QUERIES = 10_000
USERS = 200


@pytest.mark.reliability
def test_readers_never_see_a_mix_or_an_empty_table(db_url: str) -> None:
    """Two app-like readers (a user's list; now and then the whole table) across publishes and rollbacks."""
    versions = [f"v2026110{d}000000" for d in range(1, 6)]
    register(db_url, *versions)
    publish(db_url, versions[0], frames(USERS, 20, 0), generated_at=NOW, keep_versions=2)
    stop = threading.Event()
    reads: list[tuple[int, int, str | None]] = []  # (rows, distinct versions, version) per query
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with psycopg.connect(db.libpq_url(db_url), autocommit=True) as conn:
                while not stop.is_set():
                    if rng.random() < 0.02:
                        row = conn.execute("SELECT count(*), count(DISTINCT model_version), min(model_version) "
                                           "FROM recsys.user_recommendations").fetchone()
                    else:
                        row = conn.execute("SELECT count(*), count(DISTINCT model_version), min(model_version) "
                                           "FROM recsys.user_recommendations WHERE user_id = %s",
                                           (int(rng.integers(1, USERS + 1)),)).fetchone()
                    reads.append(row)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    switches = 0
    try:
        for number, version in enumerate(versions[1:], start=1):
            publish(db_url, version, frames(USERS, 20, number), generated_at=NOW, keep_versions=2)
            switches += 1
        target = versions[-2]
        while len(reads) < READER_QUERIES:  # then back and forth until the readers have read enough
            rollback(db_url, target)
            target = versions[-1] if target == versions[-2] else versions[-2]
            switches += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    mixed = [r for r in reads if r[1] != 1]
    wrong_size = [r for r in reads if r[0] not in (20, USERS * 20)]
    print(f"\nreaders: {len(reads):,} queries across {switches} switches; errors {len(errors)}, "
          f"mixed-version reads {len(mixed)}, empty or partial reads {len(wrong_size)}")
    assert not errors and len(reads) >= READER_QUERIES
    assert mixed == [] and wrong_size == []
    assert len({r[2] for r in reads}) >= 3  # the readers really saw the switches


@pytest.mark.reliability
def test_two_publishes_at_once_serialise_and_the_newer_data_wins(db_url: str) -> None:
    register(db_url, "v20261101000000", "v20261102000000")
    with db.transaction(db_url) as conn:
        conn.execute("UPDATE recsys.model_registry SET watermark = to_timestamp(substr(version, 2), 'YYYYMMDDHH24MISS')")
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def run(version: str, seed: int) -> None:
        barrier.wait()
        try:
            publish(db_url, version, frames(50, 20, seed), generated_at=NOW, keep_versions=3)
            outcomes[version] = "published"
        except PublishError as exc:
            outcomes[version] = str(exc)

    threads = [threading.Thread(target=run, args=(v, n)) for n, v in enumerate(("v20261101000000", "v20261102000000"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes["v20261102000000"] == "published"
    assert outcomes["v20261101000000"] == "published" or outcomes["v20261101000000"].startswith("refusing to publish")
    with db.connect(db_url) as conn:
        assert serving(db_url) == ("v20261102000000", 50 * 20)
        assert conn.execute("SELECT count(*) FROM recsys.published_versions WHERE serving").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM recsys.model_registry WHERE status = 'champion'").fetchone()[0] == 1


@pytest.mark.reliability
def test_a_failed_check_leaves_the_serving_version_alone(db_url: str) -> None:
    register(db_url, "v20261101000000", "v20261102000000")
    publish(db_url, "v20261101000000", frames(20, 5, 0), generated_at=NOW, keep_versions=3)
    broken = frames(20, 5, 1)
    broken["user_recommendations"].loc[3, "rank"] = 9  # a gap in user 1's ranks
    with pytest.raises(PublishError, match="ranks are not contiguous"):
        publish(db_url, "v20261102000000", broken, generated_at=NOW, keep_versions=3)
    empty = frames(20, 5, 1)
    empty["popular_items"] = empty["popular_items"].iloc[0:0]
    with pytest.raises(PublishError, match="popular_items: the new table is empty"):
        publish(db_url, "v20261102000000", empty, generated_at=NOW, keep_versions=3)
    assert serving(db_url) == ("v20261101000000", 100)


@pytest.mark.reliability
def test_an_older_model_is_never_published_over_a_newer_one(db_url: str) -> None:
    register(db_url, "v20261102000000", "v20261101000000")
    with db.transaction(db_url) as conn:  # the watermark is the as-of time of the model's data
        conn.execute("UPDATE recsys.model_registry SET watermark = to_timestamp(substr(version, 2), 'YYYYMMDDHH24MISS')")
    publish(db_url, "v20261102000000", frames(5, 3, seed=1), generated_at=NOW, keep_versions=3)
    with pytest.raises(PublishError, match="refusing to publish v20261101000000 .* over v20261102000000"):
        publish(db_url, "v20261101000000", frames(5, 3, seed=2), generated_at=NOW, keep_versions=3)
    with db.connect(db_url) as conn:
        assert conn.execute("SELECT DISTINCT model_version FROM recsys.user_recommendations").fetchall() == \
            [("v20261102000000",)]
        staging = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE %s", ("%staging",)).fetchone()[0]
    assert staging == 0  # refused before loading anything


@pytest.mark.reliability
def test_rollback_and_its_refusals(db_url: str) -> None:
    versions = ["v20261101000000", "v20261102000000", "v20261103000000"]
    register(db_url, *versions, "v20261104000000")
    for version in versions:
        publish(db_url, version, frames(10, 5, 0), generated_at=NOW, keep_versions=2)
    assert rollback(db_url, "v20261102000000") == "v20261103000000"
    assert serving(db_url)[0] == "v20261102000000"
    with db.connect(db_url) as conn:
        assert conn.execute("SELECT version FROM recsys.model_registry WHERE status = 'champion'").fetchone()[0] \
            == "v20261102000000"
    with pytest.raises(PublishError, match="tables were pruned"):
        rollback(db_url, "v20261101000000")
    with pytest.raises(PublishError, match="never published"):
        rollback(db_url, "v20261104000000")
    with pytest.raises(PublishError, match="no such version"):
        rollback(db_url, "v20990101000000")
    with pytest.raises(PublishError, match="already serving"):
        rollback(db_url, "v20261102000000")
    assert serving(db_url)[0] == "v20261102000000"


@pytest.mark.reliability
def test_hostile_version_names_are_refused(db_url: str) -> None:
    with pytest.raises(PublishError, match="is not of the form"):
        publish(db_url, 'v1"; DROP TABLE items; --', frames(5, 2, 0), generated_at=NOW, keep_versions=2)
    with db.connect(db_url) as conn:
        assert conn.execute("SELECT to_regclass('public.items')").fetchone()[0] is not None


def test_migration_006_labels_what_already_serves(pg_server_url: str) -> None:
    """A deployment upgraded while a version serves: its views gain served_by and keep rows and grants."""
    import uuid

    from psycopg import sql as pgsql

    from recmodel.publish import SERVING_TABLES, table_name

    name = f"t_{uuid.uuid4().hex[:12]}"
    db.ensure_database(pg_server_url, name)
    url = db.with_database(pg_server_url, name)
    version = "v20261101000000"
    try:
        with db.connect(url, autocommit=True) as conn:  # the schema as of migration 005, and a 005-era publish
            conn.execute(db.CREATE_MIGRATIONS_TABLE)
            for path in db.migration_files()[:5]:
                conn.execute(path.read_text())
                conn.execute("INSERT INTO public.recsys_schema_migrations (version) VALUES (%s)", (path.stem,))
            conn.execute(INSERT_MODEL, (version, version))
            for table in SERVING_TABLES:
                final = pgsql.Identifier(table_name(table.view, version))
                columns = pgsql.SQL(", ").join(pgsql.SQL("{} {}").format(pgsql.Identifier(n), pgsql.SQL(t))
                                               for n, t in table.columns)
                conn.execute(pgsql.SQL("CREATE TABLE recsys.{} ({})").format(final, columns))
                conn.execute(pgsql.SQL("CREATE OR REPLACE VIEW recsys.{} AS SELECT * FROM recsys.{}").format(
                    pgsql.Identifier(table.view), final))
            conn.execute(pgsql.SQL("INSERT INTO recsys.{} VALUES (1, 1, 7, 0.5, %s, now())").format(
                pgsql.Identifier(table_name("user_recommendations", version))), (version,))
            conn.execute("INSERT INTO recsys.published_versions (version, tables, row_counts, serving) "
                         "VALUES (%s, %s, '{}', true)", (version, json.dumps(
                             {t.view: table_name(t.view, version) for t in SERVING_TABLES})))
        assert db.migrate(url)[0] == "006_baselines_and_refit"
        with db.connect(url) as conn:
            rows = conn.execute("SELECT user_id, item_id, model_version, served_by "
                                "FROM recsys.user_recommendations").fetchall()
            readable = conn.execute("SELECT has_table_privilege('recsys_reader', 'recsys.popular_items', "
                                    "'SELECT')").fetchone()[0]
            kind = conn.execute("SELECT kind FROM recsys.model_registry").fetchone()[0]
        assert rows == [(1, 7, version, "model")] and readable and kind == "model"
    finally:
        with psycopg.connect(db.libpq_url(pg_server_url), autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))
