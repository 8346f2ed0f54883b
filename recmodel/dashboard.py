"""What the "Recommender" page in the Airflow UI shows: plain queries returning JSON-ready dicts.

The plugin (`plugins/recommender_plugin.py`) only adds HTTP, authentication and the page; each
function here takes a database URL and can be called from a test or a notebook.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from recmodel import db, registry as model_registry
from recmodel.config import GATE_METRICS
from recmodel.publish import VERSION_PATTERN

GX_SITE = Path("gx") / "gx" / "uncommitted" / "data_docs" / "local_site"  # GX's local site under $RECSYS_HOME

SELECT_MODELS = """
SELECT r.version, r.parent_version, r.run_key, r.created_at, r.kind, r.status, r.decision, r.reasons, r.metrics,
       r.train_rows, r.n_items, r.device, r.watermark, r.lineage,
       w.low_watermark, w.high_watermark, w.dataset_rows,
       p.published_at, COALESCE(p.serving, false) AS serving, p.pruned_at
FROM recsys.model_registry r
LEFT JOIN recsys.extract_watermarks w USING (run_key)
LEFT JOIN recsys.published_versions p USING (version)
ORDER BY r.created_at DESC, r.version DESC
LIMIT %(limit)s
"""
SELECT_LATEST_VALIDATION = """
SELECT run_key, as_of, details -> 'validate' AS validate
FROM recsys.pipeline_runs
WHERE kind = 'retrain' AND details ? 'validate'
ORDER BY as_of DESC LIMIT 1
"""
SELECT_QUARANTINE_BY_REASON = """
WITH recent AS (
    SELECT run_key, as_of FROM recsys.pipeline_runs WHERE kind = 'retrain' ORDER BY as_of DESC LIMIT %(runs)s
)
SELECT recent.run_key, recent.as_of, q.reason, count(*) AS rows
FROM recent JOIN recsys.quarantine q USING (run_key)
GROUP BY recent.run_key, recent.as_of, q.reason
ORDER BY recent.as_of, q.reason
"""
SELECT_PUBLISHED = """
SELECT version, published_at, serving, pruned_at, row_counts, tables
FROM recsys.published_versions ORDER BY published_at DESC
"""
SELECT_PUBLICATION = "SELECT serving, pruned_at FROM recsys.published_versions WHERE version = %s"
COUNT_USERS_COVERED = "SELECT count(*) FROM recsys.{} WHERE rank = 1"  # one rank-1 row per covered user
SELECT_HISTORY = """
SELECT x.item_id, i.title, x.event_type, x.value, x.occurred_at
FROM interactions x LEFT JOIN items i USING (item_id)
WHERE x.user_id = %(user_id)s
ORDER BY x.occurred_at DESC, x.event_id DESC
LIMIT %(limit)s
"""
SELECT_USER_RECOMMENDATIONS = """
SELECT r.rank, r.item_id, i.title, r.score, r.model_version, r.generated_at, r.because_item_id,
       b.title AS because_title
FROM recsys.user_recommendations r LEFT JOIN items i USING (item_id) LEFT JOIN items b ON b.item_id = r.because_item_id
WHERE r.user_id = %(user_id)s ORDER BY r.rank LIMIT %(limit)s
"""
SELECT_POPULAR = """
SELECT p.rank, p.item_id, i.title, p.score, p.model_version, NULL::timestamptz AS generated_at,
       NULL::bigint AS because_item_id, NULL::text AS because_title
FROM recsys.popular_items p LEFT JOIN items i USING (item_id)
ORDER BY p.rank LIMIT %(limit)s
"""


class NotFound(LookupError):
    """The thing asked for does not exist; the message says what."""


class Conflict(ValueError):
    """The action cannot be taken in the current state; the message says why."""


def registry(url: str, limit: int = 50) -> list[dict[str, Any]]:
    """Model versions, newest first: lineage, data window, gate metrics with intervals, decision, status."""
    with db.connect(url) as conn:
        rows = conn.cursor(row_factory=dict_row).execute(SELECT_MODELS, {"limit": limit}).fetchall()
    return [_model(row) for row in rows]


def _model(row: dict[str, Any]) -> dict[str, Any]:
    metrics = row["metrics"] or {}
    return {
        "version": row["version"], "parent_version": row["parent_version"], "run_key": row["run_key"],
        "kind": row["kind"], "lineage": row["lineage"] or {},
        "created_at": row["created_at"], "status": row["status"], "decision": row["decision"],
        "reasons": row["reasons"] or [], "serving": row["serving"], "published_at": row["published_at"],
        "pruned_at": row["pruned_at"], "device": row["device"], "train_rows": row["train_rows"],
        "n_items": row["n_items"],
        "data_window": {"ingested_after": row["low_watermark"], "ingested_until": row["high_watermark"] or row["watermark"],
                        "dataset_rows": row["dataset_rows"]},
        "metrics": {name: metrics[name] for name in ("candidate", "champion", "popularity", "baseline")
                    if metrics.get(name)},
        "ratios": {name: _ratio(metrics.get("candidate", {}), name) for name in ("vs_champion", "vs_popularity")},
        "holdout": metrics.get("holdout"),
    }


def _ratio(candidate: dict[str, Any], versus: str) -> dict[str, Any] | None:
    """The gate's paired ratio `<metric>_<versus>` = [ratio, low, high] as {metric, ratio, ci} (the overall
    metric's, not a slice's such as `cold_item_ndcg@10_vs_champion`)."""
    for key, value in candidate.items():
        if key.endswith("_" + versus) and key.removesuffix("_" + versus) in GATE_METRICS:
            return {"metric": key.removesuffix("_" + versus), "ratio": value[0], "ci": value[1:]}
    return None


def outcomes(url: str, limit: int = 20) -> dict[str, Any]:
    """Each served version's realized figures, gate figures and long tail, and its realized hit rate per day."""
    from recmodel import outcomes as realized

    return {"versions": realized.versions(url, limit), "daily": [asdict(day) for day in realized.daily(url)]}


def alerts(url: str, limit: int = 10) -> list[dict[str, Any]]:
    """The newest alerts of every run (the same list `python -m recmodel status` prints)."""
    return [asdict(alert) for alert in model_registry.recent_alerts(url, limit)]


def runs(url: str, limit: int = 30) -> list[dict[str, Any]]:
    """Recent runs with their alerts, in the order `python -m recmodel status` lists them."""
    return model_registry.recent_runs(url, limit)


def data_quality(url: str, home: Path, runs_back: int = 20) -> dict[str, Any]:
    """The latest validation (one outcome per expectation), quarantine counts by reason per run."""
    with db.connect(url) as conn:
        cursor = conn.cursor(row_factory=dict_row)
        latest = cursor.execute(SELECT_LATEST_VALIDATION).fetchone()
        quarantine = cursor.execute(SELECT_QUARANTINE_BY_REASON, {"runs": runs_back}).fetchall()
    validation = None
    if latest is not None:
        report = latest["validate"] or {}
        validation = {"run_key": latest["run_key"], "as_of": latest["as_of"],
                      "clean_rows": report.get("clean"), "quarantined_rows": report.get("quarantined_rows"),
                      "expectations": report.get("expectations", []),
                      "reasons": report.get("reasons", []),
                      "docs": data_docs_pages(home, latest["run_key"])}
    return {"latest_validation": validation, "quarantine_by_reason": quarantine}


def data_docs_pages(home: Path, run_key: str) -> list[str]:
    """Paths (relative to the Data Docs site) of the validation pages GX rendered for `run_key`."""
    site = home / GX_SITE
    pages = sorted(site.glob(f"validations/*/{run_key}/*/*.html"))
    return [page.relative_to(site).as_posix() for page in pages]


def data_docs_file(home: Path, relative: str) -> Path:
    """A file of the local Data Docs site, refusing any path that leaves the site folder."""
    site = (home / GX_SITE).resolve()
    target = (site / relative).resolve()
    if not target.is_relative_to(site) or not target.is_file():
        raise NotFound(f"no Data Docs page {relative!r}")
    return target


def serving(url: str, max_age_hours: float | None = None) -> dict[str, Any]:
    """Published versions (row counts, users covered, kept or pruned) and the serving table's freshness."""
    freshness = model_registry.serving_freshness(url, max_age_hours)
    versions = []
    with db.connect(url) as conn:
        for row in conn.cursor(row_factory=dict_row).execute(SELECT_PUBLISHED).fetchall():
            users = None
            if row["pruned_at"] is None:
                table = row["tables"]["user_recommendations"]
                users = conn.execute(sql.SQL(COUNT_USERS_COVERED).format(sql.Identifier(table))).fetchone()[0]
            versions.append({"version": row["version"], "published_at": row["published_at"],
                             "serving": row["serving"], "pruned_at": row["pruned_at"],
                             "row_counts": row["row_counts"], "users_covered": users,
                             "can_roll_back": row["pruned_at"] is None and not row["serving"]})
    return {
        "freshness": {"version": freshness.version, "published_at": freshness.published_at,
                      "age_hours": freshness.age_hours, "max_age_hours": freshness.max_age_hours,
                      "stale": freshness.stale, "message": freshness.message},
        "versions": versions,
    }


def user(url: str, user_id: int, history: int = 20, k: int = 20) -> dict[str, Any]:
    """A user's recent history and what the serving tables recommend them, with titles.

    A user without recommendations (new, or unseen by the last model) gets the popular items,
    which is what a downstream app falls back to; `source` says which table answered.
    """
    with db.connect(url) as conn:
        cursor = conn.cursor(row_factory=dict_row)
        events = cursor.execute(SELECT_HISTORY, {"user_id": user_id, "limit": history}).fetchall()
        recommendations = cursor.execute(SELECT_USER_RECOMMENDATIONS, {"user_id": user_id, "limit": k}).fetchall()
        source = "user_recommendations"
        if not recommendations:
            recommendations = cursor.execute(SELECT_POPULAR, {"limit": k}).fetchall()
            source = "popular_items"
    if not events and source == "popular_items" and not recommendations:
        raise NotFound(f"user {user_id} has no interactions and nothing is published yet")
    return {"user_id": user_id, "known": bool(events), "history": events, "source": source,
            "recommendations": recommendations}


def rollback_target(url: str, version: str) -> None:
    """Check that `version` can be served again before a rollback run is queued for it."""
    if not VERSION_PATTERN.match(version):
        raise NotFound(f"{version!r} is not a model version (expected v followed by 14 digits, or that and -baseline)")
    with db.connect(url) as conn:
        row = conn.execute(SELECT_PUBLICATION, (version,)).fetchone()
    if row is None:
        raise NotFound(f"{version} was never published (or does not exist)")
    serving_now, pruned_at = row
    if serving_now:
        raise Conflict(f"{version} is already serving; nothing to roll back")
    if pruned_at is not None:
        raise Conflict(f"cannot roll back to {version}: its tables were pruned on {pruned_at:%Y-%m-%d %H:%M}")
