"""A team's first runs on its own, real-shaped data with default settings: old, bursty, sparse logs.

The fixture is a MovieLens ml-100k folder (u.data + u.item) whose ratings all fall in 1997-98 and
whose users each rate in one short burst, as in the real ml-100k: no calendar window at the end of
the log holds enough users for the gate.
"""

from __future__ import annotations

from datetime import datetime, timedelta, UTC
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recmodel import db

AS_OF = datetime(2026, 11, 1, 12, tzinfo=UTC)
FIRST_DAY, LAST_DAY = pd.Timestamp("1997-09-20", tz="UTC"), pd.Timestamp("1998-04-22", tz="UTC")
FLOOR_2000 = "2000-01-01T00:00:00+00:00"


def write_ml100k_1997(folder: Path, users: int = 150, items: int = 120, events: int = 4500, seed: int = 5) -> Path:
    """A u.data/u.item folder: synthetic tastes, each user's ratings squeezed into a burst of at most 3 days
    that starts on a random day between 1997-09-20 and 1998-04-22."""
    from recmodel.importers import ML100K_GENRES
    from recmodel.synth import generate

    data = generate(users, items, events, seed=seed, days=90, end=datetime(1998, 1, 1, tzinfo=UTC))
    ratings = data.interactions.drop_duplicates(["user_id", "item_id"]).copy()
    rng = np.random.default_rng(seed)
    starts = pd.Series(FIRST_DAY + pd.to_timedelta(rng.uniform(0, (LAST_DAY - FIRST_DAY).days - 3, users), unit="D"),
                       index=np.arange(1, users + 1))
    first = ratings.groupby("user_id")["occurred_at"].transform("min")
    squeezed = (ratings["occurred_at"] - first) / 30  # 90 days of activity into 3
    ratings["occurred_at"] = ratings["user_id"].map(starts) + squeezed
    folder.mkdir(parents=True)
    seconds = (ratings["occurred_at"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    pd.DataFrame({"user": ratings["user_id"], "item": ratings["item_id"],
                  "rating": rng.integers(1, 6, len(ratings)), "timestamp": seconds}).to_csv(
        folder / "u.data", sep="\t", header=False, index=False)
    flags = "|".join("0" for _ in ML100K_GENRES)
    lines = [f"{item}|{title}|01-Jan-1997||http://example.invalid/{item}|{flags}"
             for item, title in zip(data.items["item_id"], data.items["title"])]
    (folder / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return folder


@pytest.fixture
def ml100k_1997(tmp_path: Path) -> Path:
    return write_ml100k_1997(tmp_path / "ml-100k-1997")


def served(url: str) -> pd.DataFrame:
    with db.connect(url) as conn:
        rows = conn.execute("SELECT user_id, rank, item_id, model_version, served_by "
                            "FROM recsys.user_recommendations").fetchall()
    return pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "model_version", "served_by"])


@pytest.mark.slow
def test_first_default_retrain_on_a_1997_dataset_serves_every_user(
        airflow_ready: dict[str, str], recsys_env: str, ml100k_1997: Path, capsys: pytest.CaptureFixture) -> None:
    from recmodel.cli import run_retrain
    from recmodel.importers import import_movielens

    summary = import_movielens(recsys_env, ml100k_1997)
    assert summary.first_event_at.year == 1997 and summary.last_event_at.year == 1998
    assert run_retrain({}, AS_OF) == 0
    out = capsys.readouterr().out
    with db.connect(recsys_env) as conn:
        users = {u for (u,) in conn.execute(
            "SELECT user_id FROM interactions GROUP BY user_id HAVING count(*) >= 2").fetchall()}
        quarantined = conn.execute("SELECT count(*) FROM recsys.quarantine").fetchone()[0]
        holdout, _kinds = conn.execute(
            "SELECT metrics -> 'holdout', array_agg(kind) OVER () FROM recsys.model_registry "
            "WHERE kind = 'model'").fetchone()
    assert quarantined == 0  # old timestamps are history, not errors
    view = served(recsys_env)
    assert users and users <= set(view["user_id"])  # every user with two or more ratings is served
    assert view["model_version"].nunique() == 1 and view["served_by"].nunique() == 1
    # No calendar window of <= 20% of the rows holds 100 users in this bursty log: the gate held out each
    # user's last rating instead, and says so.
    assert holdout["kind"] == "last_per_user" and holdout["users"] >= 100
    assert "each user's last new item" in out
    if view["served_by"].iloc[0] == "baseline":
        assert "serving the popularity baseline" in out
    else:
        assert view["model_version"].iloc[0] == "v" + AS_OF.strftime("%Y%m%d%H%M%S")


@pytest.mark.slow
def test_a_quarantine_reason_is_named_with_count_example_and_setting(
        airflow_ready: dict[str, str], recsys_env: str, ml100k_1997: Path, capsys: pytest.CaptureFixture) -> None:
    from recmodel import dashboard
    from recmodel.cli import main, run_retrain
    from recmodel.config import settings
    from recmodel.importers import import_movielens

    import_movielens(recsys_env, ml100k_1997)
    with db.connect(recsys_env) as conn:
        total, first_event = conn.execute("SELECT count(*), min(event_id) FROM interactions").fetchone()
    assert run_retrain({"min_occurred_at": FLOOR_2000, "epochs": 1}, AS_OF) == 1  # a floor set by hand: every row
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    for expected in (f"quarantined timestamp_before_floor: {total:,} rows", "occurred_at is before min_occurred_at",
                     f"e.g. event_id={first_event},", f"min_occurred_at='{FLOOR_2000}'",
                     "quarantine_share) failed: observed 1 > max 0.2", "max_quarantine_share=0.2"):
        assert expected in out, expected
    with db.connect(recsys_env) as conn:
        alerts = conn.execute("SELECT alerts FROM recsys.pipeline_runs WHERE kind = 'retrain'").fetchone()[0]
    [alert] = [a for a in alerts if a["kind"] == "task_failed"]
    for expected in (f"timestamp_before_floor: {total:,} rows", f"e.g. event_id={first_event},",
                     f"min_occurred_at='{FLOOR_2000}'", "max_quarantine_share=0.2"):
        assert expected in alert["message"], expected
    [reason] = dashboard.data_quality(recsys_env, settings().home)["latest_validation"]["reasons"]  # the UI's page
    assert (reason["reason"], reason["rows"], reason["example"]["event_id"]) == ("timestamp_before_floor", total,
                                                                                  first_event)
    assert reason["settings"] == {"min_occurred_at": FLOOR_2000}
    assert main(["status"]) == 0
    status = " ".join(capsys.readouterr().out.split())
    assert f"quarantined timestamp_before_floor: {total:,} rows" in status and "min_occurred_at=" in status

    # Quarantined rows stay out until re-admitted; with the default (no floor) they all come back, once.
    assert run_retrain({"epochs": 1}, AS_OF + timedelta(minutes=30)) == 1
    assert f"all {total:,} interactions with ingested_at" in capsys.readouterr().out
    assert main(["quarantine", "replay", "--reason", "timestamp_before_floor"]) == 0
    assert run_retrain({"epochs": 1}, AS_OF + timedelta(hours=1)) == 0
    with db.connect(recsys_env) as conn:
        rows = conn.execute("SELECT dataset_rows FROM recsys.extract_watermarks").fetchone()[0]
    assert rows == total


@pytest.mark.slow
def test_ml_latest_small_minus_last_ratings_is_served_and_beats_ease(movielens_dir: Path, db_url: str,
                                                                      tmp_path: Path) -> None:
    """The acceptance check on real data, through `bench accuracy`, which imports ml-latest-small minus each
    user's last rating, runs one default retrain through Airflow and scores the published view."""
    import json

    from test_cli import recmodel

    output = tmp_path / "accuracy.json"
    out = recmodel("bench", "accuracy", "--movielens", str(movielens_dir), "--output", str(output), url=db_url,
                   home=tmp_path, timeout=2400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(output.read_text())["accuracy"]
    assert result["users"] == 610 and result["served_share"] >= 0.95
    assert result["served_by"] == ["model"] and result["holdout"]["kind"] == "last_per_user"
    view, ease = result["models"]["published view"], result["models"]["ease"]
    assert view["ndcg@10"] >= 1.3 * ease["ndcg@10"], (view["ndcg@10"], ease["ndcg@10"])
    assert {"gated model", "refit model"} <= set(result["models"])
    low, high = result["refit_gain"]["ci"]
    assert low <= result["refit_gain"]["ndcg@10_ratio"] <= high
    # the tail_boost trade-off curve starts at the published lists and reaches further into the tail
    curve = result["tail_boost_curve"]
    assert [point["tail_boost"] for point in curve] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert curve[0]["ndcg@10"] == pytest.approx(view["ndcg@10"])
    assert curve[-1]["tail_share@10"] > curve[0]["tail_share@10"] and curve[-1]["novelty"] > curve[0]["novelty"]
