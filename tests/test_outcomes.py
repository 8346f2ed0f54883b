"""Realized outcomes: the recsys_outcomes DAG in real Airflow reads back exactly what served lists achieved."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta, UTC

import numpy as np
import pandas as pd
import pytest
from psycopg import sql

from recmodel import db, outcomes
from recmodel.publish import publish
from test_publish import register

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
USERS = range(1, 21)
POPULAR = [50_001 + i for i in range(20)]


def served_list(user: int) -> list[int]:
    """What the version serves `user`: items 1000·user + 1..10, except user 2's first slot, which holds an
    item user 2 touched before (the skip-what-was-seen rule moves its later items up one)."""
    items = [1000 * user + rank for rank in range(1, 11)]
    if user == 2:
        items[0] = 555
    return items


def outcome_frames() -> dict[str, pd.DataFrame]:
    rows = [(user, rank, item) for user in USERS for rank, item in enumerate(served_list(user), start=1)]
    users, ranks, items = (np.array(column, dtype=np.int64) for column in zip(*rows))
    return {
        "user_recommendations": pd.DataFrame({"user_id": users, "rank": ranks.astype(np.int32), "item_id": items,
                                              "score": np.linspace(1, 0, len(items), dtype=np.float32)}),
        "similar_items": pd.DataFrame({"item_id": [1], "rank": [1], "similar_item_id": [2], "score": [0.5]}),
        "popular_items": pd.DataFrame({"rank": np.arange(1, 21, dtype=np.int32), "item_id": POPULAR,
                                       "score": np.linspace(0.2, 0.01, 20, dtype=np.float32)}),
    }


def add_events(url: str, events: list[tuple[int, int, datetime]]) -> None:
    copy_sql = "COPY interactions (user_id, item_id, event_type, value, occurred_at) FROM STDIN"
    with db.transaction(url) as conn, conn.cursor().copy(copy_sql) as copy:
        for user, item, when in events:
            copy.write_row((user, item, "view", 1.0, when))


def realized(url: str, version: str) -> dict:
    with db.connect(url) as conn:
        cursor = conn.execute("SELECT * FROM recsys.realized_outcomes WHERE version = %s", (version,))
        row = cursor.fetchone()
        return dict(zip([c.name for c in cursor.description], row)) if row else {}


def ndcg(rank: int) -> float:
    return 1 / math.log2(rank + 1)


@pytest.mark.slow
def test_outcomes_dag_reads_back_the_share_of_new_items_the_served_lists_held(
        airflow_ready: dict[str, str], recsys_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from recmodel import outcomes
    from recmodel.publish import publish
    from recmodel.runner import run_dag

    url = recsys_env
    nothing = run_dag("recsys_outcomes", conf={}, logical_date=NOW)
    assert nothing.task_states == {"measure_outcomes": "skipped"}  # nothing has served yet

    week_ago = datetime.now(UTC) - timedelta(days=7)
    add_events(url, [(user, 100 + user, week_ago) for user in USERS]  # every user's history
               + [(2, 555, week_ago), (10, POPULAR[0], week_ago)])  # items their lists rank first
    register(url, "v20261101000000")
    publish(url, "v20261101000000", outcome_frames(), generated_at=NOW, keep_versions=3)
    with db.transaction(url) as conn:  # it has served for an hour (the interactions below happened meanwhile)
        served_from = conn.execute("UPDATE recsys.serving_periods SET started_at = now() - interval '1 hour' "
                                   "RETURNING started_at").fetchone()[0]
    t = [served_from + timedelta(minutes=m) for m in range(1, 10)]
    add_events(url, [
        *[(user, served_list(user)[2], t[1]) for user in range(1, 9)],  # 1-8: the item at rank 3 (user 2: rank 2)
        (9, POPULAR[1], t[1]), (10, POPULAR[1], t[1]),  # popularity's rank 2 (user 10 has seen its rank 1)
        *[(user, 77_000 + user, t[1]) for user in range(11, 21) if user != 12],  # an item neither list holds
        (11, served_list(11)[0], t[2]),  # a later hit is not the *first* new item
        (12, 100 + 12, t[0]), (12, served_list(12)[4], t[1]),  # an item it had (not new), then rank 5 of its list
        (99, POPULAR[0], t[1]),  # a user the version had no list for
        (14, 88_888, served_from - timedelta(hours=1)),  # before the version served: not its outcome
    ])

    first = run_dag("recsys_outcomes", conf={}, logical_date=NOW + timedelta(hours=1))
    assert first.succeeded, first.task_states
    hits = {**{user: 3 for user in (1, *range(3, 9))}, 2: 2, 12: 5}  # user -> rank after skipping seen items
    popular_hits = {9: 2, 10: 1}
    expected = {"users": 20, "users_without_list": 1, "hit_rate_at_10": len(hits) / 20,
                "ndcg_at_10": sum(map(ndcg, hits.values())) / 20, "popular_hit_rate_at_10": len(popular_hits) / 20,
                "popular_ndcg_at_10": sum(map(ndcg, popular_hits.values())) / 20}
    got = realized(url, "v20261101000000")
    assert {name: got[name] for name in expected} == pytest.approx(expected)

    again = run_dag("recsys_outcomes", conf={}, logical_date=NOW + timedelta(hours=2))
    assert again.succeeded and realized(url, "v20261101000000") == got  # re-reading the lookback changes nothing

    # A row that arrives late but occurred first replaces user 11's first new item: a hit at rank 1.
    add_events(url, [(11, served_list(11)[0], t[0])])
    late = run_dag("recsys_outcomes", conf={}, logical_date=NOW + timedelta(hours=3))
    assert late.succeeded
    assert realized(url, "v20261101000000")["hit_rate_at_10"] == pytest.approx((len(hits) + 1) / 20)

    # The next version starts its own period; one that has just started has no outcomes, not zeros.
    register(url, "v20261102000000")
    publish(url, "v20261102000000", outcome_frames(), generated_at=NOW, keep_versions=3)
    [newest, older] = outcomes.versions(url)[:2]
    assert (newest["version"], newest["serving"], newest["realized"]["users"]) == ("v20261102000000", True, 0)
    assert newest["realized"]["hr@10"] is None
    assert older["version"] == "v20261101000000" and older["last_served"] is not None
    assert older["realized"]["hr@10"] == pytest.approx((len(hits) + 1) / 20)

    # Popularity beats the serving version today: with a one-day threshold the check alerts.
    with db.connect(url) as conn:
        served_from = conn.execute("SELECT started_at FROM recsys.serving_periods WHERE ended_at IS NULL").fetchone()[0]
    add_events(url, [(user, POPULAR[5], served_from + timedelta(seconds=1)) for user in range(1, 11)])
    monkeypatch.setenv("RECSYS_UNDERPERFORM_DAYS", "1")
    alerting = run_dag("recsys_outcomes", conf={}, logical_date=NOW + timedelta(hours=4))
    assert alerting.task_states == {"measure_outcomes": "failed"}
    assert realized(url, "v20261102000000")["popular_hit_rate_at_10"] == pytest.approx(1.0)  # recorded all the same
    with db.connect(url) as conn:
        [(status, message, alerts)] = conn.execute(
            "SELECT status, message, alerts FROM recsys.pipeline_runs WHERE kind = 'outcomes'").fetchall()
    assert status == "failed" and "v20261102000000's realized hit rate@10 was below" in message
    assert [a["kind"] for a in alerts] == ["underperforming"]
    monkeypatch.setenv("RECSYS_UNDERPERFORM_DAYS", "0")
    assert outcomes.underperformance(url, 0) is None

    # Once a version's tables are pruned it cannot be judged: a late row of its time is counted, not guessed.
    register(url, "v20261103000000")
    publish(url, "v20261103000000", outcome_frames(), generated_at=NOW, keep_versions=1)
    add_events(url, [(15, served_list(15)[0], t[0] - timedelta(seconds=30))])
    assert outcomes.update(url).unjudged == {"v20261101000000": 1}
    assert realized(url, "v20261101000000")["hit_rate_at_10"] == pytest.approx((len(hits) + 1) / 20)  # kept


# What an update leaves behind: each judged first new item, each unjudged one.
RECORDED = "SELECT version, user_id, item_id, event_id, occurred_at, had_list, served_rank, popular_rank " \
           "FROM recsys.outcome_events"
UNJUDGED = "SELECT version, user_id, item_id, event_id, occurred_at FROM recsys.outcome_unjudged"
OUTCOME_STATE = ("outcome_events", "outcome_unjudged", "outcome_progress")


def recorded(url: str) -> tuple[set[tuple], set[tuple]]:
    with db.connect(url) as conn:
        return set(conn.execute(RECORDED).fetchall()), set(conn.execute(UNJUDGED).fetchall())


def recomputed_from_scratch(url: str) -> tuple[set[tuple], set[tuple]]:
    """What one update records with no outcomes and no progress kept (as after deleting them); what the
    incremental updates recorded is put back afterwards, so they can go on."""
    with db.transaction(url) as conn:
        for table in OUTCOME_STATE:
            conn.execute(sql.SQL("CREATE TABLE recsys.{} AS SELECT * FROM recsys.{}").format(
                sql.Identifier(f"saved_{table}"), sql.Identifier(table)))
            conn.execute(sql.SQL("DELETE FROM recsys.{}").format(sql.Identifier(table)))
    outcomes.update(url)
    scratch = recorded(url)
    with db.transaction(url) as conn:
        for table in OUTCOME_STATE:
            conn.execute(sql.SQL("DELETE FROM recsys.{}").format(sql.Identifier(table)))
            conn.execute(sql.SQL("INSERT INTO recsys.{} SELECT * FROM recsys.{}").format(
                sql.Identifier(table), sql.Identifier(f"saved_{table}")))
            conn.execute(sql.SQL("DROP TABLE recsys.{}").format(sql.Identifier(f"saved_{table}")))
    return scratch


def serve(url: str, version: str, started_at: datetime, *, keep_versions: int = 3) -> None:
    """Publish `version` and date its serving period from `started_at` (ending the previous one there)."""
    register(url, version)
    publish(url, version, outcome_frames(), generated_at=NOW, keep_versions=keep_versions)
    with db.transaction(url) as conn:
        conn.execute("UPDATE recsys.serving_periods SET ended_at = %s WHERE version <> %s AND ended_at >= %s",
                     (started_at, version, started_at))
        conn.execute("UPDATE recsys.serving_periods SET started_at = %s WHERE version = %s", (started_at, version))


def first_new_items(url: str, version: str) -> dict[int, tuple[int, int | None]]:
    """user -> (first new item, its rank in the served list after skipping seen items)."""
    with db.connect(url) as conn:
        rows = conn.execute("SELECT user_id, item_id, served_rank FROM recsys.outcome_events WHERE version = %s",
                            (version,)).fetchall()
    return {user: (item, rank) for user, item, rank in rows}


def test_a_late_row_that_makes_the_first_new_item_seen_moves_it_to_the_next_new_item(db_url: str) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    serve(db_url, "v20261101000000", start)
    at = [start + timedelta(minutes=m) for m in range(1, 10)]
    add_events(db_url, [(1, served_list(1)[2], at[1]), (1, served_list(1)[4], at[2]),  # ranks 3, then 5
                        (2, served_list(2)[6], at[1])])  # user 2's only new item
    outcomes.update(db_url)
    assert first_new_items(db_url, "v20261101000000") == {1: (served_list(1)[2], 3), 2: (served_list(2)[6], 7)}

    # Rows that arrive late: both users had touched those items before the version served.
    add_events(db_url, [(1, served_list(1)[2], start - timedelta(days=1)),
                        (2, served_list(2)[6], start - timedelta(days=1))])
    result = outcomes.update(db_url)
    # User 1's first new item is the next one, rank 5 less the item at rank 3 now seen; user 2 has none.
    assert first_new_items(db_url, "v20261101000000") == {1: (served_list(1)[4], 4)}
    assert result.users_recorded == 2  # one moved, one removed
    assert recorded(db_url) == recomputed_from_scratch(db_url)


def test_first_new_items_that_cannot_be_judged_are_kept_once_not_counted_on_every_update(db_url: str) -> None:
    start = datetime.now(UTC) - timedelta(hours=2)
    serve(db_url, "v20261101000000", start)
    at = [start + timedelta(minutes=m) for m in range(1, 10)]
    add_events(db_url, [(1, 77_001, at[2]), (2, served_list(2)[0], at[2])])
    outcomes.update(db_url)
    judged_before = first_new_items(db_url, "v20261101000000")
    serve(db_url, "v20261102000000", start + timedelta(hours=1))
    serve(db_url, "v20261103000000", start + timedelta(hours=1, minutes=30), keep_versions=1)  # prunes the first

    # Late rows of the first version's time: user 1's first new item changes, user 3 has one at last.
    add_events(db_url, [(1, served_list(1)[0], at[1]), (3, 77_003, at[1])])
    assert outcomes.update(db_url).unjudged == {"v20261101000000": 2}
    for _ in range(2):  # the same rows read again (the lookback) and nothing new: nothing more to count
        assert outcomes.update(db_url).unjudged == {}
    _, unjudged = recorded(db_url)
    assert sorted((v, user, item) for v, user, item, _, _ in unjudged) == [
        ("v20261101000000", 1, served_list(1)[0]), ("v20261101000000", 3, 77_003)]
    assert first_new_items(db_url, "v20261101000000") == judged_before  # what was judged stays as judged

    # An even earlier row of user 3 moves its unjudged item: still one, counted as changed once.
    add_events(db_url, [(3, 77_333, at[0])])
    assert outcomes.update(db_url).unjudged == {"v20261101000000": 1}
    assert len(recorded(db_url)[1]) == 2


def test_incremental_updates_record_what_one_update_from_scratch_does(db_url: str) -> None:
    """Batches of rows, many of them late (occurred before rows already read), over two versions' periods:
    after each update, the outcomes recorded are those a recompute from scratch records."""
    rng = random.Random(28)
    start = datetime.now(UTC) - timedelta(hours=3)
    serve(db_url, "v20261101000000", start)
    serve(db_url, "v20261102000000", start + timedelta(hours=1))
    users = range(1, 9)
    items = {user: [*served_list(user)[:6], *POPULAR[:4], 90_000 + user, 90_100] for user in users}
    for batch in range(6):
        add_events(db_url, [(user, rng.choice(items[user]), start + timedelta(minutes=rng.uniform(-60, 150)))
                            for user in rng.sample(users, 4) for _ in range(rng.randint(1, 3))])
        outcomes.update(db_url)
        assert recorded(db_url) == recomputed_from_scratch(db_url), f"after batch {batch}"
    assert {version for version, *_ in recorded(db_url)[0]} == {"v20261101000000", "v20261102000000"}
