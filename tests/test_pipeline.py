"""Each pipeline step against a real Postgres, without Airflow: bad data, empty increments, lineage."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, UTC
from pathlib import Path

import pandas as pd
import pytest

from conftest import SMALL_MODEL, seed_small
from recmodel import artifacts, db, manifest, pipeline, registry, stages
from recmodel.errors import NothingNew
from recmodel.extract import ExtractError
from recmodel.registry import RunRefused
from recmodel.validate import DataValidationError

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)

INSERT_EVENT = """
INSERT INTO interactions (user_id, item_id, event_type, value, occurred_at, ingested_at)
VALUES (%s, %s, %s, %s, %s, %s)
"""


def serving_version(url: str) -> str | None:
    with db.connect(url) as conn:
        row = conn.execute("SELECT max(model_version) FROM recsys.user_recommendations").fetchone()
    return row[0]


def add_events(url: str, rows: list[tuple]) -> None:
    with db.transaction(url) as conn:
        conn.cursor().executemany(INSERT_EVENT, rows)


@pytest.mark.slow
def test_bad_rows_are_quarantined_and_the_rest_trains(recsys_env: str) -> None:
    seed_small(recsys_env, NOW)
    ingested = NOW - timedelta(minutes=5)
    occurred = NOW - timedelta(hours=1)
    add_events(recsys_env, [
        (5, 999_999, "view", None, occurred, ingested),  # unknown item
        (5, 3, "view", None, NOW + timedelta(days=2), ingested),  # future timestamp
        (5, 3, "teleport", None, occurred, ingested),  # event type outside the set
        (5, 3, "rating", 11.0, occurred, ingested),  # value out of range
        (-4, 3, "view", None, occurred, ingested),  # non-positive id
        (6, 4, "click", None, occurred, ingested),  # a clean row ...
        (6, 4, "click", None, occurred, ingested),  # ... and its exact duplicate
    ])
    ctx = pipeline.make_context(NOW, SMALL_MODEL)
    result = pipeline.run_all(ctx)
    assert result.version == ctx.version
    with db.connect(recsys_env) as conn:
        reasons = dict(conn.execute("SELECT reason, count(*) FROM recsys.quarantine GROUP BY reason").fetchall())
        run = conn.execute("SELECT status, rows_quarantined FROM recsys.pipeline_runs").fetchone()
        registry = conn.execute("SELECT status, decision, parent_version FROM recsys.model_registry").fetchone()
    assert reasons == {"unknown_item": 1, "future_timestamp": 1, "bad_event_type": 1, "value_out_of_range": 1,
                       "non_positive_id": 1, "duplicate": 1}
    assert run == ("success", 6)
    assert registry == ("champion", "accepted", None)
    assert serving_version(recsys_env) == ctx.version


@pytest.mark.slow
def test_a_run_of_mostly_bad_data_fails_before_training_and_publishes_nothing(recsys_env: str) -> None:
    seed_small(recsys_env, NOW)
    first = pipeline.make_context(NOW, SMALL_MODEL)
    pipeline.run_all(first)
    later = NOW + timedelta(hours=6)
    add_events(recsys_env, [(7, 888_000 + i, "view", None, later - timedelta(hours=1), later - timedelta(minutes=1))
                            for i in range(20)] +
               [(7, 3, "view", None, later - timedelta(hours=1), later - timedelta(minutes=1))])
    second = pipeline.make_context(later, SMALL_MODEL)
    with pytest.raises(DataValidationError, match="quarantine_share"):
        pipeline.step_validate(second, pipeline.step_extract(second))
    with db.connect(recsys_env) as conn:
        status, message = conn.execute("SELECT status, message FROM recsys.pipeline_runs WHERE run_key = %s",
                                       (second.run_key,)).fetchone()
        watermark = conn.execute("SELECT count(*) FROM recsys.extract_watermarks WHERE run_key = %s",
                                 (second.run_key,)).fetchone()[0]
    assert status == "failed" and "quarantine_share" in message
    assert watermark == 0  # the bad increment is not folded in; the next run reads it again
    assert serving_version(recsys_env) == first.version


@pytest.mark.slow
def test_incremental_runs_warm_start_and_reruns_are_idempotent(recsys_env: str) -> None:
    seed_small(recsys_env, NOW)
    first = pipeline.make_context(NOW, SMALL_MODEL)
    pipeline.run_all(first)

    # Nothing new: the run stops after validation and says so.
    idle = pipeline.make_context(NOW + timedelta(hours=1), SMALL_MODEL)
    with pytest.raises(NothingNew, match="no new interactions"):
        pipeline.step_validate(idle, pipeline.step_extract(idle))

    appended = seed_small(recsys_env, NOW + timedelta(days=2), events=1500, seed=2)
    second = pipeline.make_context(NOW + timedelta(days=2), SMALL_MODEL)
    extracted = pipeline.step_extract(second)
    assert extracted.rows == appended.events_added  # only the new rows
    outcome = pipeline.run_all(second)
    with db.connect(recsys_env) as conn:
        parent, status = conn.execute("SELECT parent_version, status FROM recsys.model_registry WHERE version = %s",
                                      (second.version,)).fetchone()
        dataset_rows = conn.execute("SELECT dataset_rows FROM recsys.extract_watermarks WHERE run_key = %s",
                                    (second.run_key,)).fetchone()[0]
    assert parent == first.version  # warm-started from the champion
    with db.connect(recsys_env) as conn:
        trained = conn.execute("SELECT details -> 'train' FROM recsys.pipeline_runs WHERE run_key = %s",
                               (second.run_key,)).fetchone()[0]
    # The record says how training went: epochs, the kept epoch, what stopped it, and its curve.
    assert trained["warm_started_items"] > 0 and trained["loss"] == "softmax"
    assert trained["stopped_by"] in ("early_stopping", "time_budget", "epochs")
    assert 1 <= trained["best_epoch"] <= trained["epochs"] == len(trained["curve"])
    assert isinstance(trained["still_improving"], bool)
    assert dataset_rows == 8000 + appended.events_added
    assert status in ("champion", "rejected")
    if status == "champion":
        assert outcome.version == second.version == serving_version(recsys_env)
    else:
        assert serving_version(recsys_env) == first.version

    # The same interval again: refused when it was published (published versions are immutable),
    # else the same snapshot; either way no duplicate registry rows or recommendations.
    dataset_before = pd.read_parquet(second.files.dataset)
    if status == "champion":
        with pytest.raises(RunRefused, match="published versions are immutable"):
            pipeline.run_all(second)
    else:
        pipeline.run_all(second)
    dataset_after = pd.read_parquet(second.files.dataset)
    pd.testing.assert_frame_equal(dataset_before, dataset_after)
    with db.connect(recsys_env) as conn:
        assert conn.execute("SELECT count(*) FROM recsys.model_registry").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM recsys.pipeline_runs").fetchone()[0] == 3
        duplicates = conn.execute("SELECT count(*) FROM (SELECT user_id, rank FROM recsys.user_recommendations "
                                  "GROUP BY 1, 2 HAVING count(*) > 1) d").fetchone()[0]
    assert duplicates == 0


def test_an_empty_interactions_table_is_a_clear_error(recsys_env: str) -> None:
    with db.transaction(recsys_env) as conn:
        conn.execute("INSERT INTO items (item_id, title) VALUES (1, 'x')")
    ctx = pipeline.make_context(NOW, SMALL_MODEL)
    with pytest.raises(ExtractError, match="interactions table is empty"):
        pipeline.step_validate(ctx, pipeline.step_extract(ctx))


def test_an_empty_catalog_is_a_clear_error(recsys_env: str) -> None:
    ctx = pipeline.make_context(NOW, SMALL_MODEL)
    with pytest.raises(ExtractError, match="items table is empty"):
        pipeline.step_extract(ctx)


@pytest.mark.reliability
def test_quarantine_replay_readmits_fixed_rows_exactly_once(recsys_env: str) -> None:
    from recmodel.extract import request_replay

    seed_small(recsys_env, NOW)
    at = NOW - timedelta(hours=1)
    add_events(recsys_env, [(3, 990_001, "view", None, at, at), (3, 990_002, "click", None, at, at),
                            (4, 990_003, "view", None, at, at),
                            (4, 990_001, "teleport", None, at, at)])  # two reasons: waits for both
    first = pipeline.make_context(NOW, SMALL_MODEL)
    pipeline.step_validate(first, pipeline.step_extract(first))
    with db.transaction(recsys_env) as conn:  # the catalog catches up with the events
        conn.execute("INSERT INTO items (item_id, title) SELECT g, 'late item ' || g FROM generate_series(990001, 990003) g")
        waiting = {r[0] for r in conn.execute("SELECT event_id FROM recsys.quarantine WHERE reason = 'unknown_item'")}
        two_reasons, = conn.execute("SELECT event_id FROM recsys.quarantine WHERE reason = 'bad_event_type'").fetchone()

    assert request_replay(recsys_env, "unknown_item") == (4, 3)
    assert request_replay(recsys_env, "unknown_item") == (0, 3)  # asking twice changes nothing

    later = pipeline.make_context(NOW + timedelta(days=10), SMALL_MODEL)  # far past the lookback window
    validated = pipeline.step_validate(later, pipeline.step_extract(later))
    readmitted = waiting - {two_reasons}
    dataset = pd.read_parquet(validated.snapshot.dataset_path)
    assert validated.new_rows == 3 and readmitted <= set(dataset["event_id"])
    assert two_reasons not in set(dataset["event_id"])
    rerun = pipeline.step_validate(later, pipeline.step_extract(later))  # the same rows again, no more
    assert rerun.new_rows == 3 and len(pd.read_parquet(rerun.snapshot.dataset_path)) == len(dataset)
    with db.connect(recsys_env) as conn:
        replayed = dict(conn.execute("SELECT event_id, replayed_by FROM recsys.quarantine WHERE reason = 'unknown_item'"))
    assert replayed == {**{e: later.run_key for e in readmitted}, two_reasons: None}

    after = pipeline.make_context(NOW + timedelta(days=11), SMALL_MODEL)
    assert pipeline.step_validate(after, pipeline.step_extract(after)).new_rows == 0  # exactly once


@pytest.mark.slow
def test_scoring_in_four_shards_equals_scoring_in_one(recsys_env: str) -> None:
    seed_small(recsys_env, NOW)
    ctx = pipeline.make_context(NOW, SMALL_MODEL)
    gated = pipeline.step_gate(ctx, pipeline.step_export(ctx, pipeline.step_train(
        ctx, pipeline.step_validate(ctx, pipeline.step_extract(ctx)))))
    whole = pd.read_parquet(pipeline.step_score_users(ctx, gated, 0, 1).path)
    shards = [pipeline.step_score_users(ctx, gated, shard, 4) for shard in range(4)]
    parts = [pd.read_parquet(s.path) for s in shards]
    assert all(len(p) for p in parts)
    users = [set(p["user_id"]) for p in parts]
    assert sum(map(len, users)) == len(set().union(*users)) == whole["user_id"].nunique()  # disjoint, complete
    assembled = pd.concat(parts).sort_values(["user_id", "rank"]).reset_index(drop=True)
    whole = whole.sort_values(["user_id", "rank"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(assembled[["user_id", "rank", "item_id"]], whole[["user_id", "rank", "item_id"]])
    assert (assembled["score"] - whole["score"]).abs().max() < 1e-4

    with pytest.raises(ValueError, match=r"scoring shards \[0, 1, 3\] do not cover 0..3"):
        pipeline.step_publish(ctx, [s for s in shards if s.shard != 2], pipeline.step_score_items(ctx, gated))
    published = pipeline.step_publish(ctx, shards, pipeline.step_score_items(ctx, gated))
    assert published.row_counts["user_recommendations"] == len(whole)


@pytest.mark.slow
def test_a_rejected_first_candidate_serves_a_labelled_baseline_until_a_model_is_accepted(recsys_env: str) -> None:
    from recmodel.publish import rollback

    seed_small(recsys_env, NOW)
    first = pipeline.make_context(NOW, {**SMALL_MODEL, "gate_min_metric": 1.0})  # no model reaches this floor
    result = pipeline.run_all(first)
    baseline = first.version + "-baseline"
    assert result.version == baseline
    with db.connect(recsys_env) as conn:
        labels = {view: conn.execute(f"SELECT DISTINCT model_version, served_by FROM recsys.{view}").fetchall()
                  for view in ("user_recommendations", "similar_items", "popular_items")}
        users = {u for (u,) in conn.execute("SELECT DISTINCT user_id FROM interactions")}
        served_users = {u for (u,) in conn.execute("SELECT DISTINCT user_id FROM recsys.user_recommendations")}
        seen = conn.execute("SELECT count(*) FROM recsys.user_recommendations r JOIN interactions i "
                            "USING (user_id, item_id)").fetchone()[0]
        registry = dict(conn.execute("SELECT version, (kind, status, decision) FROM recsys.model_registry").fetchall())
        message = conn.execute("SELECT message FROM recsys.pipeline_runs").fetchone()[0]
    assert all(rows == [(baseline, "baseline")] for rows in labels.values()), labels
    assert served_users == users and seen == 0  # every known user, never an item they already had
    assert registry == {first.version: ("model", "rejected", "rejected"), baseline: ("baseline", "champion", None)}
    assert message == f"published the popularity baseline {baseline}"

    later = NOW + timedelta(days=1)
    seed_small(recsys_env, later, events=3000, seed=2)
    second = pipeline.make_context(later, SMALL_MODEL)
    assert pipeline.run_all(second).version == second.version
    with db.connect(recsys_env) as conn:
        labels = conn.execute("SELECT DISTINCT model_version, served_by FROM recsys.user_recommendations").fetchall()
        statuses = dict(conn.execute("SELECT version, status FROM recsys.model_registry").fetchall())
        parent, lineage = conn.execute("SELECT parent_version, lineage FROM recsys.model_registry WHERE version = %s",
                                       (second.version,)).fetchone()
    assert labels == [(second.version, "model")]
    assert statuses[baseline] == "retired" and statuses[second.version] == "champion"
    assert parent is None  # a baseline is nothing to warm-start from
    assert lineage["refit"]["train_rows"] > lineage["gated"]["train_rows"]  # the refit saw the holdout too

    rollback(recsys_env, baseline)  # one step back, and the label follows
    with db.connect(recsys_env) as conn:
        assert conn.execute("SELECT DISTINCT served_by FROM recsys.popular_items").fetchall() == [("baseline",)]


@pytest.mark.slow
def test_a_first_run_that_cannot_train_still_serves_every_user(recsys_env: str) -> None:
    """One interaction per user: nothing to learn a sequence from, but every user is known and served."""
    from recmodel.synth import seed_database

    seed_database(recsys_env, users=5, items=30, events=20, seed=4, now=NOW)  # the catalog
    with db.transaction(recsys_env) as conn:
        conn.execute("DELETE FROM interactions")
    add_events(recsys_env, [(100 + user, 1 + user % 7, "view", None, NOW - timedelta(hours=user),
                             NOW - timedelta(hours=1)) for user in range(40)])
    ctx = pipeline.make_context(NOW, SMALL_MODEL)
    assert pipeline.run_all(ctx).version == ctx.version + "-baseline"
    with db.connect(recsys_env) as conn:
        served = dict(conn.execute("SELECT user_id, count(*) FROM recsys.user_recommendations GROUP BY user_id"))
        reasons, = conn.execute("SELECT reasons FROM recsys.model_registry WHERE kind = 'baseline'").fetchone()
    assert set(served) == set(range(100, 140)) and set(served.values()) == {6}  # 7 items with events, minus one seen
    assert reasons[0] == ("no model could be trained: no user has two or more interactions outside the gate's "
                          "holdout; nothing to learn from")


@pytest.mark.slow
def test_a_runs_manifest_records_every_stage_and_rebuilds_its_model(recsys_env: str, tmp_path: Path) -> None:
    seed_small(recsys_env, NOW)
    ctx = pipeline.make_context(NOW, SMALL_MODEL)
    assert pipeline.run_all(ctx).version == ctx.version
    recorded = registry.run_manifest(recsys_env, ctx.run_key)
    assert json.loads(ctx.files.manifest.read_text()) == recorded  # the file and the registry's copy agree
    assert set(recorded["stages"]) == {*(s.name for s in stages.CHAIN), "score_users.0", "score_items", "publish"}
    assert recorded["config"] == ctx.config.as_dict() and recorded["software"]["torch"]
    assert manifest.from_json(manifest.Validated, recorded["stages"]["validate"]["output"]).snapshot.dataset_path == \
        str(ctx.files.dataset)
    assert {"increment", "catalog", "dataset", "model_weights", "model_onnx", "serving_onnx", "serving_weights",
            "user_shard_0_of_1", "similar_items", "popular_items"} == set(recorded["artifacts"])
    for artifact in recorded["artifacts"].values():
        assert artifacts.sha256_file(Path(artifact["path"])) == artifact["sha256"]

    rebuilt = pipeline.reproduce(recsys_env, ctx.run_key, tmp_path / "rebuilt")
    assert rebuilt.identical and rebuilt.max_weight_diff == 0.0, rebuilt

    dataset = pd.read_parquet(ctx.files.dataset)
    dataset.iloc[1:].to_parquet(ctx.files.dataset, index=False)  # the snapshot is no longer the one trained on
    with pytest.raises(pipeline.ReproductionError, match="is not the dataset run .* trained on"):
        pipeline.reproduce(recsys_env, ctx.run_key, tmp_path / "again")


@pytest.mark.slow
def test_every_recommendation_names_the_closest_history_item_and_every_version_its_long_tail(
        recsys_env: str) -> None:
    import numpy as np

    from recmodel import longtail, score
    from recmodel.data import user_sequences

    seed_small(recsys_env, NOW)
    ctx = pipeline.make_context(NOW, SMALL_MODEL)
    gated = pipeline.run_chain(ctx)
    pipeline.step_publish(ctx, *pipeline.score_all(ctx, gated))
    with db.connect(recsys_env) as conn:
        served = pd.DataFrame(conn.execute("SELECT user_id, rank, item_id, because_item_id "
                                           "FROM recsys.user_recommendations").fetchall(),
                              columns=["user_id", "rank", "item_id", "because_item_id"])
        long_tail = conn.execute("SELECT long_tail FROM recsys.model_registry WHERE version = %s",
                                 (ctx.version,)).fetchone()[0]
    assert len(served) and served["because_item_id"].notna().all()
    model_dir = Path(gated.model.model_dir)
    vocab = artifacts.load_vocab(model_dir)
    histories = user_sequences(pipeline.read_interactions(gated.snapshot.dataset_path), vocab)
    vectors = artifacts.load_item_vectors(model_dir)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    for user, rows in served.groupby("user_id"):
        window = histories[user][-ctx.config.max_history:]
        assert set(rows["because_item_id"]) <= set(vocab.item_ids[window])  # an item the user had
        for item, because in zip(rows["item_id"].head(3), rows["because_item_id"].head(3)):  # and the closest one
            closeness = unit[window] @ unit[vocab.index_of(np.array([item]))[0]]
            assert vocab.item_ids[window[int(np.argmax(closeness))]] == because

    assert set(long_tail) == {"coverage", "tail_share", "novelty", "items", "recommendable", "slots", "new_item_share",
                              "new_items"}
    never_touched = set(pipeline.read_catalog(gated.snapshot.catalog_path)["item_id"]) - set(
        pipeline.read_interactions(gated.snapshot.dataset_path)["item_id"])
    assert long_tail["new_item_share"] == pytest.approx(served["item_id"].isin(never_touched).mean())
    assert long_tail["new_items"] == served.loc[served["item_id"].isin(never_touched), "item_id"].nunique()
    assert 0 < long_tail["coverage"] <= 1 and 0 <= long_tail["tail_share"] <= 1 and long_tail["novelty"] > 0
    assert long_tail["slots"] == len(served)

    # tail_boost re-ranks the same model's candidates further into the tail
    dataset = pipeline.read_interactions(gated.snapshot.dataset_path)
    catalog = pipeline.read_catalog(gated.snapshot.catalog_path)
    recommendable = catalog.loc[catalog["active"].fillna(True).astype(bool), "item_id"].to_numpy()
    tail_shares = []
    for boost in (0.0, 3.0):
        lists, _ = score.recommend(Path(gated.model.onnx_path), vocab, dataset, top_k=ctx.config.top_k,
                                   batch_size=256, tail=longtail.TailBoost.of(boost, dataset, vocab))
        tail_shares.append(longtail.measure(lists, dataset, recommendable).tail_share)
    assert tail_shares[0] == pytest.approx(long_tail["tail_share"])  # 0 serves the model's own order
    assert tail_shares[1] > tail_shares[0]
