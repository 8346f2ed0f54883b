"""Extract against a real Postgres: every row once, late rows caught, used and quarantined rows skipped."""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timedelta, UTC
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from recmodel import db
from recmodel.config import PipelineConfig
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


# --- every value the source's column types accept: extracted, then trained on or quarantined -------------------

POSTGRES_TIMESTAMP_EXTREMES = ("infinity", "-infinity", "0001-01-01 BC", "4713-01-01 00:00:00+00 BC",
                               "294276-12-31 23:59:59+00", "12000-01-01", "0001-01-01 00:00:00+00",
                               "9999-12-31 23:59:59.999999+00")
BIGINT = (-(2**63), 2**63 - 1)
# Postgres text holds any character but NUL; Hypothesis's text may also draw lone surrogates, which UTF-8 cannot.
PG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


def _timestamps() -> st.SearchStrategy[str]:
    """A timestamptz as SQL text: the extremes Postgres accepts, or any moment of the years 1..9999."""
    moments = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59),
                           timezones=st.just(UTC)).map(lambda t: t.isoformat())
    return st.one_of(st.sampled_from(POSTGRES_TIMESTAMP_EXTREMES), moments)


def _long_text(length: int) -> str:
    return "long " * (length // 5)


INTERACTION_ROWS = st.lists(st.tuples(
    st.one_of(st.integers(1, 3), st.integers(*BIGINT)),  # user_id
    st.one_of(st.integers(1, 3), st.integers(*BIGINT)),  # item_id (1..3 are in the catalog)
    st.one_of(st.sampled_from(["view", "click", "rating"]), PG_TEXT,
              st.sampled_from([300, 9_000_000]).map(_long_text)),  # event_type, also wider than a read block
    st.one_of(st.none(), st.floats(width=32)),  # value real: NaN and infinities included
    _timestamps(),  # occurred_at
), min_size=1, max_size=12)
CATALOG_ROWS = st.lists(st.tuples(
    st.one_of(PG_TEXT, st.sampled_from([9_000_000]).map(_long_text)),  # title, also wider than a read block
    st.one_of(st.none(), PG_TEXT),  # description
    st.one_of(st.none(), st.lists(st.one_of(PG_TEXT, st.just(_long_text(5_000))), max_size=80)),  # tags
    st.one_of(st.none(), _timestamps()),  # created_at
    st.one_of(st.none(), st.booleans()),  # active
), min_size=0, max_size=3)


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("RECSYS_HYPOTHESIS_EXAMPLES", "20")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(events=INTERACTION_ROWS, items=CATALOG_ROWS)
def test_no_value_the_schema_accepts_stops_extract_or_validation(db_url: str, tmp_path: Path, events, items) -> None:
    """Rows over the full range of every interactions/items column type: the extract and validation complete,
    every extracted row is either clean or quarantined with a named reason, and the snapshot holds the clean."""
    from recmodel.data import extend_dataset
    from recmodel.extract import read_catalog, read_increment
    from recmodel.validate import REASONS, validate_increment

    with db.transaction(db_url) as conn:
        conn.execute("TRUNCATE interactions, items, recsys.extract_watermarks, recsys.quarantine")
        conn.execute("INSERT INTO items (item_id, title) VALUES (1, 'one'), (2, 'two'), (3, 'three')")
        for n, (title, description, tags, created_at, active) in enumerate(items, start=4):
            conn.execute("INSERT INTO items (item_id, title, description, tags, created_at, active) "
                         "VALUES (%s, %s, %s, %s, %s::timestamptz, %s)", (n, title, description, tags, created_at,
                                                                           active))
        for user_id, item_id, event_type, value, occurred_at in events:
            conn.execute("INSERT INTO interactions (user_id, item_id, event_type, value, occurred_at, ingested_at) "
                         "VALUES (%s, %s, %s, %s, %s::timestamptz, %s)",
                         (user_id, item_id, event_type, value, occurred_at, T0 - timedelta(minutes=5)))
    run_dir = Path(tempfile.mkdtemp(dir=tmp_path))
    extracted = extract(db_url, "run-a", T0, run_dir, lookback=LOOKBACK)
    assert extracted.rows == len(events)
    assert extracted.catalog_items == 3 + len(items)
    increment = read_increment(extracted.increment_path)
    catalog = read_catalog(extracted.catalog_path)
    assert catalog["title"].str.len().max() <= PipelineConfig.item_text_max_chars
    report = validate_increment(increment, catalog["item_id"].to_numpy(), as_of=T0, config=PipelineConfig(),
                                gx_dir=tmp_path / "gx", run_key="run-a")
    quarantined = set(report.quarantined["event_id"])
    assert len(report.clean) + len(quarantined) == extracted.rows
    assert set(report.quarantined["reason"]) <= set(REASONS)
    assert not quarantined & set(report.clean["event_id"])
    assert report.clean["occurred_at"].notna().all()
    dataset = extend_dataset(None, report.clean)
    dataset.to_parquet(run_dir / "dataset.parquet")  # the clean rows make a snapshot as they are
