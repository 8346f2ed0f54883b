"""Realized outcomes: the recsys_outcomes DAG in real Airflow reads back exactly what served lists achieved."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, UTC

import numpy as np
import pandas as pd
import pytest

from recmodel import db
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
