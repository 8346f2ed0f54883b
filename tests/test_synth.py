from __future__ import annotations

from datetime import datetime, timedelta, UTC

import pandas as pd
import psycopg
import pytest

from recmodel import synth

END = datetime(2025, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def demo() -> synth.SyntheticData:
    return synth.generate(2_000, 1_000, 100_000, end=END)


def test_same_seed_gives_identical_frames() -> None:
    first = synth.generate(50, 40, 600, seed=7, end=END)
    second = synth.generate(50, 40, 600, seed=7, end=END)
    other = synth.generate(50, 40, 600, seed=8, end=END)
    pd.testing.assert_frame_equal(first.items, second.items)
    pd.testing.assert_frame_equal(first.interactions, second.interactions)
    assert not first.interactions["item_id"].equals(other.interactions["item_id"])


def test_sizes_ids_and_columns(demo: synth.SyntheticData) -> None:
    items, events = demo.items, demo.interactions
    assert list(items.columns) == list(synth.ITEM_COLUMNS)
    assert list(events.columns) == list(synth.INTERACTION_COLUMNS)
    assert items["item_id"].tolist() == list(range(1, 1_001))
    assert len(events) == 100_000
    assert set(events["user_id"]) == set(range(1, 2_001))
    assert events.groupby("user_id").size().min() >= 3
    assert items["title"].is_unique
    assert events["occurred_at"].is_monotonic_increasing
    assert events["occurred_at"].min() >= pd.Timestamp(END - timedelta(days=90))
    assert (events["ingested_at"] >= events["occurred_at"]).all()
    assert (events["ingested_at"] - events["occurred_at"]).max() <= pd.Timedelta(minutes=5)
    assert events["ingested_at"].max() <= pd.Timestamp(END)


def test_event_types_values_and_text(demo: synth.SyntheticData) -> None:
    events = demo.interactions
    shares = events["event_type"].value_counts(normalize=True)
    assert set(shares.index) == set(synth.EVENT_TYPES)
    assert shares.idxmax() == "view"
    ratings = events.loc[events["event_type"] == "rating", "value"]
    assert ratings.between(0.5, 5.0).all() and ((ratings * 2) % 1 == 0).all()
    assert events.loc[events["event_type"] != "rating", "value"].isna().all()
    topic_names = {topic.name for topic in synth.TOPICS}
    assert all(tags[0] in topic_names and tags[0] in text for tags, text in zip(demo.items["tags"],
                                                                               demo.items["description"]))
    assert 0.005 <= (~demo.items["active"]).mean() <= 0.04


def test_popularity_has_a_long_tail(demo: synth.SyntheticData) -> None:
    counts = demo.interactions["item_id"].value_counts()
    assert counts.iloc[:100].sum() > 0.4 * len(demo.interactions)
    activity = demo.interactions.groupby("user_id").size()
    assert activity.max() > 5 * activity.median()


def test_late_items_have_no_events_before_creation(demo: synth.SyntheticData) -> None:
    start = pd.Timestamp(END - timedelta(days=90))
    late = demo.items[demo.items["created_at"] > start]
    assert 0.05 <= len(late) / len(demo.items) <= 0.15
    assert (late["created_at"] > pd.Timestamp(END - timedelta(days=7))).any()
    joined = demo.interactions.merge(demo.items[["item_id", "created_at"]], on="item_id")
    assert (joined["occurred_at"] >= joined["created_at"]).all()
    assert joined["item_id"].isin(late["item_id"]).any()


def test_next_event_follows_the_previous_item(demo: synth.SyntheticData) -> None:
    """Sequence structure: the previous item predicts the next far better than global popularity."""
    events = demo.interactions.sort_values(["user_id", "occurred_at"], kind="stable")
    previous = events.groupby("user_id")["item_id"].shift()
    pairs = pd.DataFrame({"previous": previous, "item": events["item_id"]}).dropna()
    top_followers = pairs.groupby(["previous", "item"]).size().groupby(level=0).nlargest(3).droplevel(0)
    follower_share = top_followers.sum() / len(pairs)
    popular_share = events["item_id"].value_counts().iloc[:3].sum() / len(events)
    assert follower_share > 3 * popular_share


@pytest.mark.parametrize(("users", "items", "events", "message"), [
    (0, 10, 100, "users must be a positive count"),
    (10, -1, 100, "items must be a positive count"),
    (10, 10, 29, "at least 3 per user"),
])
def test_bad_counts_are_refused(users: int, items: int, events: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synth.generate(users, items, events, end=END)


def test_seed_database_loads_then_appends_only_newer_rows(db_url: str) -> None:
    first = synth.seed_database(db_url, users=200, items=100, events=5_000, now=END)
    assert (first.appended, first.items_added, first.events_added, first.users) == (False, 100, 5_000, 200)
    with psycopg.connect(db_url) as conn:
        count, newest_occurred, newest_ingested = conn.execute(synth.SELECT_INTERACTION_STATE).fetchone()
        assert count == 5_000
        tags, null_values = conn.execute(
            "SELECT (SELECT tags FROM items WHERE item_id = 1),"
            " (SELECT count(*) FROM interactions WHERE value IS NULL AND event_type <> 'rating')").fetchone()
        assert tags[0] in {topic.name for topic in synth.TOPICS} and null_values > 0

    later = END + timedelta(days=3)
    second = synth.seed_database(db_url, users=200, items=100, events=900, now=later)
    assert second.appended and second.events_added == 900 and second.items_added == 5
    with psycopg.connect(db_url) as conn:
        count, new_rows, new_min_user, new_max_user, new_items_used, early_rows = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE ingested_at > %(ingested)s),"
            " min(user_id) FILTER (WHERE ingested_at > %(ingested)s),"
            " max(user_id) FILTER (WHERE ingested_at > %(ingested)s),"
            " count(DISTINCT item_id) FILTER (WHERE item_id > 100),"
            " count(*) FILTER (WHERE event_id > 5000 AND occurred_at <= %(occurred)s)"
            " FROM interactions", {"ingested": newest_ingested, "occurred": newest_occurred}).fetchone()
        new_items = conn.execute("SELECT item_id, created_at FROM items WHERE item_id > 100 ORDER BY 1").fetchall()
        before_creation = conn.execute(
            "SELECT count(*) FROM interactions e JOIN items i USING (item_id) WHERE e.occurred_at < i.created_at"
        ).fetchone()[0]
    assert count == 5_900 and new_rows == 900 and early_rows == 0
    assert new_min_user >= 1 and new_max_user > 200  # returning users plus a few new ones
    assert [row[0] for row in new_items] == [101, 102, 103, 104, 105]
    assert all(newest_occurred < created <= later for _, created in new_items)
    assert new_items_used > 0 and before_creation == 0
    assert second.first_event_at > newest_ingested and second.last_event_at <= later


def test_append_needs_time_after_the_newest_event(db_url: str) -> None:
    synth.seed_database(db_url, users=20, items=10, events=100, now=END)
    with pytest.raises(ValueError, match="nothing can be appended"):
        synth.seed_database(db_url, users=20, items=10, events=100, now=END - timedelta(days=1))


@pytest.mark.reliability
def test_seed_appends_after_rows_whose_times_python_cannot_hold(db_url: str) -> None:
    """An `infinity` or BC occurred_at (validation quarantines such rows) must not stop `seed`."""
    synth.seed_database(db_url, users=20, items=10, events=100, now=END - timedelta(days=2))
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO items (item_id, title, created_at) VALUES (1000, 'odd', '-infinity')")
        conn.execute("INSERT INTO interactions (user_id, item_id, event_type, occurred_at, ingested_at) "
                     "SELECT 1, 1, 'view', t::timestamptz, %s FROM unnest(ARRAY['infinity', '0001-01-01 BC', "
                     "'12000-01-01']) AS t", (END - timedelta(days=1),))
    appended = synth.seed_database(db_url, users=20, items=10, events=100, now=END)
    assert appended.appended and appended.events_added == 100
