"""Realized outcomes: what the lists each version served achieved, and what its popularity list would have.

For every version, over the interactions that occurred while it served (`recsys.serving_periods`,
dated by publish and rollback), each user's first *new* item (one they had never touched) is looked
up in the list that version served them and in its popularity list, skipping in both the items the
user had touched before it (an app hides what a user already has). Hit rate@10 and NDCG@10 follow;
the popularity list's are the counterfactual floor on the same users.

Incremental and idempotent: a user's first new item for a version depends on all their interactions up
to the end of its periods, so each update finds the users with interactions ingested since the last one
(by the `ingested_at` index, re-reading `LOOKBACK` for rows that committed late) and, for each version
that served at or after the earliest of those rows, recomputes that user's first new item from all the
user's interactions (`interactions_user_item_idx`): the row in `recsys.outcome_events` is inserted,
changed (a late row may make the recorded item not new, move it earlier or later, or change its rank)
or removed. The cost follows the users touched, and for every version whose tables are kept the result
is the one an update from scratch (outcome tables and progress emptied) records. Users without new
interactions are not counted, and a version that served for minutes has few users or none: its figures
are NULL, not zero.

A version whose tables were pruned cannot be judged any more: what was recorded for it stays as it was
judged, and a first new item that differs from it (or that appeared since) is kept, once per version and
user, in `recsys.outcome_unjudged`; re-reading the same interactions counts nothing again. What no update
sees: a row that commits more than `LOOKBACK` after its `ingested_at`, rows updated or deleted in place,
and serving periods re-dated afterwards; after those, recompute from scratch (delete the outcome tables'
rows and the progress row), which records a pruned version's first new items as unjudged.

This is an observational measure, not an A/B test: the served lists shaped what users did, so a
model is compared with a popularity list nobody was shown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from recmodel import db
from recmodel.locks import AdvisoryLock, TRANSACTION_LOCK

log = logging.getLogger(__name__)

LOOKBACK = timedelta(minutes=10)  # rows stamped with ingested_at before the last update committed after it

SELECT_PROGRESS = "SELECT ingested_through FROM recsys.outcome_progress"
SELECT_FIRST_PERIOD = "SELECT min(started_at) FROM recsys.serving_periods"
SAVE_PROGRESS = """
INSERT INTO recsys.outcome_progress (singleton, ingested_through, updated_at) VALUES (true, %(through)s, now())
ON CONFLICT (singleton) DO UPDATE SET ingested_through = EXCLUDED.ingested_through, updated_at = now()
"""
# Versions that served and still have their tables.
SELECT_JUDGEABLE_VERSIONS = """
SELECT DISTINCT s.version, p.tables
FROM recsys.serving_periods s JOIN recsys.published_versions p USING (version)
WHERE p.pruned_at IS NULL
ORDER BY s.version
"""
# The (version, user) pairs whose first new item the interactions read by this update (ingested in the
# window) can change, and that first new item recomputed from ALL the user's interactions (none: it has none).
# A row can change the pairs of the versions that served at or after it occurred (where it is the new item,
# or a touch that makes a later item not new). The window's rows are found by the `ingested_at` index, each
# touched user's history by `interactions_user_item_idx`; `{versions}` restricts the versions.
FIRST_NEW_ITEMS = """
WITH read_users AS (
    SELECT user_id, min(occurred_at) AS earliest FROM interactions
    WHERE ingested_at > %(since)s AND ingested_at <= %(until)s
    GROUP BY user_id
), touched AS (
    SELECT DISTINCT p.version, r.user_id
    FROM read_users r JOIN recsys.serving_periods p ON p.ended_at IS NULL OR p.ended_at > r.earliest
    WHERE {versions}
), new_items AS (  -- each touched user's first touch of each item
    SELECT DISTINCT ON (e.user_id, e.item_id) e.user_id, e.item_id, e.event_id, e.occurred_at
    FROM interactions e WHERE e.user_id IN (SELECT user_id FROM read_users)
    ORDER BY e.user_id, e.item_id, e.occurred_at, e.event_id
), firsts AS (
    SELECT DISTINCT ON (p.version, n.user_id) p.version, n.user_id, n.item_id, n.event_id, n.occurred_at
    FROM new_items n
    JOIN recsys.serving_periods p
      ON n.occurred_at >= p.started_at AND (p.ended_at IS NULL OR n.occurred_at < p.ended_at)
    WHERE (p.version, n.user_id) IN (SELECT version, user_id FROM touched)
    ORDER BY p.version, n.user_id, n.occurred_at, n.event_id
)"""
# `f`'s user touched list item `a` before its new item: such items are skipped when ranking a list for it.
SEEN_BEFORE = """EXISTS (SELECT 1 FROM interactions h WHERE h.user_id = f.user_id AND h.item_id = a.item_id
                    AND (h.occurred_at, h.event_id) < (f.occurred_at, f.event_id))"""
# One judgeable version's touched pairs: their rows become the recomputed first new items, ranked in its lists
# (a pair without one loses its row). Returns how many rows were inserted, changed or removed.
RECORD_FIRST_NEW_ITEMS = """
{first_new_items}, removed AS (
    DELETE FROM recsys.outcome_events o USING touched t
    WHERE o.version = t.version AND o.user_id = t.user_id
      AND NOT EXISTS (SELECT 1 FROM firsts f WHERE f.version = t.version AND f.user_id = t.user_id)
    RETURNING 1
), recorded AS (
    INSERT INTO recsys.outcome_events AS o (version, user_id, item_id, event_id, occurred_at, had_list, served_rank,
                                            popular_rank)
    SELECT f.version, f.user_id, f.item_id, f.event_id, f.occurred_at,
           EXISTS (SELECT 1 FROM recsys.{served} r WHERE r.user_id = f.user_id),
           (SELECT r.rank - (SELECT count(*) FROM recsys.{served} a
                             WHERE a.user_id = f.user_id AND a.rank < r.rank AND {seen})
            FROM recsys.{served} r WHERE r.user_id = f.user_id AND r.item_id = f.item_id),
           (SELECT p.rank - (SELECT count(*) FROM recsys.{popular} a WHERE a.rank < p.rank AND {seen})
            FROM recsys.{popular} p WHERE p.item_id = f.item_id)
    FROM firsts f
    ON CONFLICT (version, user_id) DO UPDATE
    SET item_id = EXCLUDED.item_id, event_id = EXCLUDED.event_id, occurred_at = EXCLUDED.occurred_at,
        had_list = EXCLUDED.had_list, served_rank = EXCLUDED.served_rank, popular_rank = EXCLUDED.popular_rank
    WHERE (o.item_id, o.event_id, o.occurred_at, o.had_list, o.served_rank, o.popular_rank)
          IS DISTINCT FROM (EXCLUDED.item_id, EXCLUDED.event_id, EXCLUDED.occurred_at, EXCLUDED.had_list,
                            EXCLUDED.served_rank, EXCLUDED.popular_rank)
    RETURNING 1
)
SELECT (SELECT count(*) FROM removed) + (SELECT count(*) FROM recorded)
"""
# Every touched pair of a version whose tables are gone: a recomputed first new item that outcome_events does not
# hold as judged (before the tables went) is kept as unjudged, once; any other unjudged row of a touched pair goes
# (that of a version republished since, too). Returns, per version, the unjudged items inserted or changed.
RECORD_UNJUDGED = """
{first_new_items}, unjudged AS (
    SELECT f.* FROM firsts f
    WHERE NOT EXISTS (SELECT 1 FROM recsys.published_versions v WHERE v.version = f.version AND v.pruned_at IS NULL)
      AND NOT EXISTS (SELECT 1 FROM recsys.outcome_events o
                      WHERE o.version = f.version AND o.user_id = f.user_id AND o.event_id = f.event_id)
), removed AS (
    DELETE FROM recsys.outcome_unjudged u USING touched t
    WHERE u.version = t.version AND u.user_id = t.user_id
      AND NOT EXISTS (SELECT 1 FROM unjudged n WHERE n.version = t.version AND n.user_id = t.user_id)
), recorded AS (
    INSERT INTO recsys.outcome_unjudged AS u (version, user_id, item_id, event_id, occurred_at)
    SELECT version, user_id, item_id, event_id, occurred_at FROM unjudged
    ON CONFLICT (version, user_id) DO UPDATE
    SET item_id = EXCLUDED.item_id, event_id = EXCLUDED.event_id, occurred_at = EXCLUDED.occurred_at
    WHERE u.event_id <> EXCLUDED.event_id
    RETURNING u.version
)
SELECT version, count(*) FROM recorded GROUP BY version ORDER BY version
"""
# Per version, newest first: realized figures, serving periods, the gate's holdout figures, long tail.
SELECT_VERSION_OUTCOMES = """
SELECT r.version, r.kind, r.metrics, r.long_tail, s.first_served, s.last_served, s.serving,
       o.users, o.users_without_list, o.hit_rate_at_10, o.ndcg_at_10, o.popular_hit_rate_at_10,
       o.popular_ndcg_at_10, o.first_event_at, o.last_event_at
FROM (SELECT version, min(started_at) AS first_served,
             CASE WHEN bool_or(ended_at IS NULL) THEN NULL ELSE max(ended_at) END AS last_served,
             bool_or(ended_at IS NULL) AS serving
      FROM recsys.serving_periods GROUP BY version) s
JOIN recsys.model_registry r USING (version)
LEFT JOIN recsys.realized_outcomes o USING (version)
ORDER BY s.first_served DESC
LIMIT %(limit)s
"""
SELECT_DAILY = """
SELECT version, (occurred_at AT TIME ZONE 'UTC')::date AS day, count(*) AS users,
       avg(coalesce(served_rank <= 10, false)::int)::float8 AS hit_rate_at_10,
       avg(coalesce(popular_rank <= 10, false)::int)::float8 AS popular_hit_rate_at_10
FROM recsys.outcome_events
WHERE had_list AND (%(version)s::text IS NULL OR version = %(version)s)
GROUP BY version, day
ORDER BY day, version
"""
SELECT_SERVING_VERSION = "SELECT version FROM recsys.serving_periods WHERE ended_at IS NULL"


@dataclass(frozen=True)
class OutcomeUpdate:
    """What one update read and changed."""

    read_after: datetime | None  # None: nothing has served yet, so nothing was read
    read_through: datetime | None
    users_recorded: int  # (version, user) first new items inserted, changed or removed
    unjudged: dict[str, int]  # version -> first new items newly kept as unjudged (tables pruned), or changed

    @property
    def message(self) -> str:
        if self.read_after is None:
            return "nothing has served yet: no outcomes to measure"
        text = (f"read interactions ingested {self.read_after:%Y-%m-%d %H:%M:%S} .. {self.read_through:%H:%M:%S} UTC: "
                f"{self.users_recorded} users' first new items recorded, changed or removed")
        if self.unjudged:
            text += "; not judged (tables pruned): " + ", ".join(f"{v} {n}" for v, n in self.unjudged.items())
        return text


def update(url: str) -> OutcomeUpdate:
    """Recompute the first new items of the (version, user) pairs that the interactions ingested since the last
    update can change, in one transaction: judged in `recsys.outcome_events`, unjudged in `recsys.outcome_unjudged`."""
    with db.transaction(url) as conn:
        conn.execute(TRANSACTION_LOCK, (AdvisoryLock.OUTCOMES,))
        progress = conn.execute(SELECT_PROGRESS).fetchone()
        start = progress[0] if progress else conn.execute(SELECT_FIRST_PERIOD).fetchone()[0]
        if start is None:
            return OutcomeUpdate(None, None, 0, {})
        since = start - LOOKBACK
        until = conn.execute("SELECT now()").fetchone()[0]
        window = {"since": since, "until": until}
        recorded = sum(_record_first_new_items(conn, version, tables, window)
                       for version, tables in conn.execute(SELECT_JUDGEABLE_VERSIONS).fetchall())
        unjudged = _record_unjudged(conn, window)
        conn.execute(SAVE_PROGRESS, {"through": until})
    result = OutcomeUpdate(since, until, recorded, unjudged)
    (log.warning if unjudged else log.info)("outcomes: %s", result.message)
    return result


def _first_new_items(versions: sql.Composable) -> sql.Composed:
    return sql.SQL(FIRST_NEW_ITEMS).format(versions=versions)


def _record_first_new_items(conn: psycopg.Connection, version: str, tables: dict[str, str],
                            window: dict[str, Any]) -> int:
    statement = sql.SQL(RECORD_FIRST_NEW_ITEMS).format(
        first_new_items=_first_new_items(sql.SQL("p.version = %(version)s")),
        served=sql.Identifier(tables["user_recommendations"]), popular=sql.Identifier(tables["popular_items"]),
        seen=sql.SQL(SEEN_BEFORE))
    return conn.execute(statement, {**window, "version": version}).fetchone()[0]


def _record_unjudged(conn: psycopg.Connection, window: dict[str, Any]) -> dict[str, int]:
    statement = sql.SQL(RECORD_UNJUDGED).format(
        first_new_items=_first_new_items(sql.SQL("true")))
    return dict(conn.execute(statement, window).fetchall())


@dataclass(frozen=True)
class DayOutcome:
    version: str
    day: date
    users: int
    hit_rate: float
    popular_hit_rate: float


def versions(url: str, limit: int = 20) -> list[dict[str, Any]]:
    """Every version that served, newest first: when, its realized figures beside its popularity list's,
    the gate's holdout figures for the same metrics, and the long tail of its lists."""
    with db.connect(url) as conn:
        rows = conn.cursor(row_factory=dict_row).execute(SELECT_VERSION_OUTCOMES, {"limit": limit}).fetchall()
    return [_version(row) for row in rows]


def _version(row: dict[str, Any]) -> dict[str, Any]:
    metrics = row["metrics"] or {}
    gate = metrics.get("candidate") or metrics.get("baseline") or {}
    return {
        "version": row["version"], "kind": row["kind"], "serving": row["serving"],
        "first_served": row["first_served"], "last_served": row["last_served"],
        "realized": {"users": row["users"] or 0, "users_without_list": row["users_without_list"] or 0,
                     "hr@10": row["hit_rate_at_10"], "ndcg@10": row["ndcg_at_10"],
                     "popular_hr@10": row["popular_hit_rate_at_10"], "popular_ndcg@10": row["popular_ndcg_at_10"],
                     "first_event_at": row["first_event_at"], "last_event_at": row["last_event_at"]},
        "gate": {name: gate.get(name) for name in ("hr@10", "ndcg@10")},
        "long_tail": row["long_tail"] or {},
    }


def daily(url: str, version: str | None = None) -> list[DayOutcome]:
    """Realized hit rate@10 per UTC day (by when the new item was touched), of one version or of all."""
    with db.connect(url) as conn:
        rows = conn.execute(SELECT_DAILY, {"version": version}).fetchall()
    return [DayOutcome(v, day, users, hit, popular) for v, day, users, hit, popular in rows]


class UnderperformingError(RuntimeError):
    """The serving version's lists did worse than its popularity list on each of the last days measured."""

    alert_kind = "underperforming"


def underperformance(url: str, days: int) -> str | None:
    """Why the serving version underperforms popularity, or None: its realized hit rate@10 was below its
    popularity list's on each of the last `days` UTC days that have outcomes (0 turns the check off)."""
    if days == 0:
        return None
    with db.connect(url) as conn:
        row = conn.execute(SELECT_SERVING_VERSION).fetchone()
    if row is None:
        return None
    recent = daily(url, row[0])[-days:]
    if len(recent) < days or any(d.hit_rate >= d.popular_hit_rate for d in recent):
        return None
    figures = ", ".join(f"{d.day:%Y-%m-%d} {d.hit_rate:.3f} vs {d.popular_hit_rate:.3f} ({d.users} users)"
                        for d in recent)
    return (f"{row[0]}'s realized hit rate@10 was below its popularity list's on each of the last {days} days "
            f"with outcomes ({figures}): retrain, or roll back to a version that did better")
