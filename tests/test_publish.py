"""Publishing and rollback against a real Postgres: atomic swaps, checks, pruning, locks."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import psycopg
import pytest

from recmodel import db
from recmodel.publish import PublishError, publish, rollback

NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
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
    with db.transaction(url) as conn:
        for version in versions:
            conn.execute(INSERT_MODEL, (version, version))


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


@pytest.mark.reliability
def test_readers_never_see_a_mix_or_an_empty_table(db_url: str) -> None:
    versions = [f"v2026110{d}000000" for d in range(1, 6)]
    register(db_url, *versions)
    publish(db_url, versions[0], frames(200, 20, 0), generated_at=NOW, keep_versions=2)
    stop = threading.Event()
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with psycopg.connect(db.libpq_url(db_url), autocommit=True) as conn:
                while not stop.is_set():
                    seen.append(conn.execute(
                        "SELECT count(*), count(DISTINCT model_version) FROM recsys.user_recommendations").fetchone())
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for number, version in enumerate(versions[1:], start=1):
            publish(db_url, version, frames(200 + number, 20, number), generated_at=NOW, keep_versions=2)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert len(seen) > 50
    valid_counts = {(200 + n) * 20 for n in range(len(versions))}
    assert all(count in valid_counts and distinct == 1 for count, distinct in seen), set(seen) - {(c, 1) for c in valid_counts}


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


def test_hostile_version_names_are_refused(db_url: str) -> None:
    with pytest.raises(PublishError, match="is not of the form"):
        publish(db_url, 'v1"; DROP TABLE items; --', frames(5, 2, 0), generated_at=NOW, keep_versions=2)
    with db.connect(db_url) as conn:
        assert conn.execute("SELECT to_regclass('public.items')").fetchone()[0] is not None
