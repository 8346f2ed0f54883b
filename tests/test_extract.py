"""Extract against a real Postgres: every row once, late rows caught, used and quarantined rows skipped."""

from __future__ import annotations

from datetime import datetime, timedelta, UTC
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recmodel import db
from recmodel.extract import ExtractError, commit_watermark, extract

pytestmark = pytest.mark.reliability  # late rows, reruns, changed schemas

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
LOOKBACK = timedelta(hours=48)


def _insert(url: str, rows: list[tuple[int, str, datetime]]) -> None:
    """(event_id, event_type, ingested_at) rows for user 1 and item 1."""
    with db.transaction(url) as conn:
        conn.execute("INSERT INTO items (item_id, title) VALUES (1, 'one') ON CONFLICT DO NOTHING")
        for event_id, event_type, ingested in rows:
            conn.execute("INSERT INTO interactions (event_id, user_id, item_id, event_type, value, occurred_at, "
                         "ingested_at) VALUES (%s, 1, 1, %s, NULL, %s, %s)",
                         (event_id, event_type, ingested - timedelta(minutes=1), ingested))


def test_extract_reads_each_row_once_across_runs(db_url: str, tmp_path: Path) -> None:
    _insert(db_url, [(1, "view", T0), (2, "tab\there\\N", T0), (3, "click", T0 + timedelta(minutes=1))])
    first = extract(db_url, "run-a", T0 + timedelta(hours=1), tmp_path / "a", lookback=LOOKBACK)
    increment = pq.read_table(first.increment_path).to_pandas()
    assert first.rows == 3 and first.rows_already_seen == 0
    assert sorted(increment["event_type"]) == ["click", "tab\there\\N", "view"]  # strings survive COPY unchanged
    assert increment["value"].isna().all()

    # Run A quarantined event 2 and folded 1 and 3 into its dataset.
    dataset = tmp_path / "a" / "dataset.parquet"
    pq.write_table(pq.read_table(first.increment_path).filter(increment["event_id"].to_numpy() != 2), dataset)
    with db.transaction(db_url) as conn:
        conn.execute("INSERT INTO recsys.quarantine (run_key, event_id, reason, row_data) "
                     "VALUES ('run-a', 2, 'bad_event_type', '{}')")
        commit_watermark(conn, "run-a", first, rows_clean=2, dataset_path=str(dataset), dataset_rows=2)

    # A row that committed late (ingested before A's watermark) and a new one.
    _insert(db_url, [(4, "view", T0 + timedelta(minutes=30)), (5, "view", T0 + timedelta(hours=2))])
    second = extract(db_url, "run-b", T0 + timedelta(hours=3), tmp_path / "b", lookback=LOOKBACK)
    assert second.base_dataset_path == str(dataset)
    assert sorted(pq.read_table(second.increment_path).column("event_id").to_pylist()) == [4, 5]
    assert second.rows == 2 and second.rows_already_seen == 3

    rerun = extract(db_url, "run-b", T0 + timedelta(hours=3), tmp_path / "b", lookback=LOOKBACK)
    assert rerun.rows == 2 and rerun.rows_already_seen == 3  # a rerun reads the same rows again


def test_catalog_snapshot_keeps_tags_nulls_and_the_active_flag(db_url: str, tmp_path: Path) -> None:
    _insert(db_url, [(1, "view", T0)])
    with db.transaction(db_url) as conn:
        conn.execute("INSERT INTO items (item_id, title, description, tags, active) VALUES "
                     "(2, 'two', NULL, ARRAY['a,b', 'quote\"', 'back\\slash'], false), "
                     "(3, 'tab\there', 'd', '{}', NULL)")
    result = extract(db_url, "run-a", T0 + timedelta(hours=1), tmp_path, lookback=LOOKBACK)
    rows = pq.read_table(result.catalog_path).to_pylist()
    assert [(r["item_id"], r["title"], r["description"], r["tags"], r["active"]) for r in rows] == [
        (1, "one", None, None, True), (2, "two", None, ["a,b", 'quote"', "back\\slash"], False),
        (3, "tab\there", "d", [], None)]


def test_a_changed_source_schema_stops_the_extract_with_each_problem_named(db_url: str, tmp_path: Path) -> None:
    _insert(db_url, [(1, "view", T0)])
    with db.transaction(db_url) as conn:
        conn.execute("ALTER TABLE interactions ALTER COLUMN user_id TYPE text")
        conn.execute("ALTER TABLE items DROP COLUMN active")
    with pytest.raises(ExtractError) as failure:
        extract(db_url, "run-a", T0 + timedelta(hours=1), tmp_path, lookback=LOOKBACK)
    assert str(failure.value) == ("the source tables changed schema: interactions.user_id is text, expected bigint or "
                                  "integer; items.active is missing (docs/ARCHITECTURE.md lists the columns the pipeline reads)")
