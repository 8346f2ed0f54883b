"""Unit tests for the pure logic: vocabulary, sequences, metrics, gate decisions, config."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recmodel.config import ConfigError, PipelineConfig
from recmodel.data import (Vocab, extend_dataset, left_pad, length_sorted_batches, training_windows, user_sequences,
                           within_training_window)
from recmodel.gate import (LAST_PER_USER, TIME_WINDOW, CatalogStats, GateError, HoldoutPlan, bootstrap_interval,
                           build_holdout, catalog_stats, cold_users, decide, evaluate_lists, held_out_mask, plan_holdout,
                           summarize)


def events(rows: list[tuple[int, int, int, str]]) -> pd.DataFrame:
    """(event_id, user_id, item_id, 'YYYY-MM-DD') -> an interactions frame."""
    frame = pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "day"])
    frame["occurred_at"] = pd.to_datetime(frame.pop("day"), utc=True)
    frame["ingested_at"] = frame["occurred_at"]
    frame["event_type"] = "view"
    frame["value"] = np.nan
    return frame


def test_vocab_maps_unknown_ids_to_padding() -> None:
    vocab = Vocab.from_catalog(np.array([30, 10, 20, 10]))
    assert vocab.item_ids.tolist() == [-1, 10, 20, 30]
    assert vocab.index_of(np.array([20, 99, 10, 5])).tolist() == [2, 0, 1, 0]


def test_user_sequences_sort_by_time_and_collapse_repeats() -> None:
    vocab = Vocab.from_catalog(np.array([1, 2, 3]))
    frame = events([(1, 7, 2, "2026-01-02"), (2, 7, 1, "2026-01-01"), (3, 7, 1, "2026-01-01"),
                    (4, 7, 3, "2026-01-03"), (5, 8, 3, "2026-01-01")])
    sequences = user_sequences(frame, vocab)
    assert sequences[7].tolist() == [1, 2, 3]  # the repeated item 1 collapses to one step
    assert sequences[8].tolist() == [3]


def test_training_windows_cover_every_transition_once() -> None:
    sequences = {1: np.arange(1, 8)}  # 7 items -> 6 transitions
    inputs, targets = training_windows(sequences, max_history=3)
    pairs = {(int(i), int(t)) for row_in, row_out in zip(inputs, targets)
             for i, t in zip(row_in, row_out) if t != 0}
    assert pairs == {(k, k + 1) for k in range(1, 7)}
    assert sum(int((row != 0).sum()) for row in targets) == 6


def test_shifted_windows_still_predict_every_transition_once_and_the_latest_from_a_full_window() -> None:
    sequences = {1: np.arange(1, 30), 2: np.arange(100, 103), 3: np.array([200])}  # 28, 2 and 0 transitions
    transitions = {(k, k + 1) for k in range(1, 29)} | {(100, 101), (101, 102)}
    shifts, first_targets = np.random.default_rng(0), set()
    for _ in range(20):
        inputs, targets = training_windows(sequences, max_history=5, shifts=shifts)
        pairs = [(int(i), int(t)) for row_in, row_out in zip(inputs, targets) for i, t in zip(row_in, row_out) if t]
        assert sorted(pairs) == sorted(transitions)  # each once, each after its own predecessor
        latest = next(row for row, out in enumerate(targets) if out[-1] == 29)
        assert inputs[latest].tolist() == [24, 25, 26, 27, 28]  # the next recommendation's context, in full
        first_targets |= {int(row[row != 0][0]) for row in targets}
    assert len(first_targets) > 10  # the cuts move: items are predicted after different stretches of their past


def test_left_pad_keeps_the_most_recent_items() -> None:
    assert left_pad([np.array([1, 2, 3, 4]), np.array([5])], 3).tolist() == [[2, 3, 4], [0, 0, 5]]


def test_ranking_metrics_match_hand_computed_values() -> None:
    recommended = {1: np.array([10, 20, 30]), 2: np.array([40, 50, 60]), 3: np.array([70, 10, 20])}
    targets = {1: {20, 99}, 2: {70}, 3: {10}}
    stats = CatalogStats(n_items=10, head_items=frozenset({10, 40}), new_items=frozenset({20}),
                         rare_items=frozenset({70}), warm_items=frozenset({10, 99}))
    got = evaluate_lists(recommended, targets, stats, k=3, cold=frozenset({3}))
    dcg_user1 = 1 / math.log2(3)  # hit at rank 2
    idcg_user1 = 1 / math.log2(2) + 1 / math.log2(3)  # two relevant items
    assert got["ndcg@3"] == pytest.approx((dcg_user1 / idcg_user1 + 0.0 + 1 / math.log2(3)) / 3)
    assert got["recall@3"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert got["hr@3"] == pytest.approx(2 / 3)
    assert got["mrr@3"] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)
    assert got["coverage@3"] == pytest.approx(7 / 10)
    assert got["tail_share@3"] == pytest.approx(6 / 9)  # 10 (twice) and 40 are head items
    assert got["new_item_share@3"] == pytest.approx(2 / 9)  # item 20, twice
    # New items: only user 1 has one (20), hit at rank 2 as the only relevant item of the slice.
    assert (got["cold_item_users"], got["cold_item_ndcg@3"], got["cold_item_hr@3"]) == (1, pytest.approx(1 / math.log2(3)), 1)
    # Rare items: user 2's 70 is missed.
    assert (got["rare_item_users"], got["rare_item_ndcg@3"], got["rare_item_hr@3"]) == (1, 0.0, 0.0)
    # Warm items: user 1's 99 (missed) and user 3's 10 (rank 2).
    assert got["warm_item_users"] == 2 and got["warm_item_ndcg@3"] == pytest.approx(1 / math.log2(3) / 2)
    # Cold users: user 3 with all their targets.
    assert (got["cold_user_users"], got["cold_user_hr@3"]) == (1, 1.0)
    summary = summarize(got, k=3)
    assert "per_slice" not in summary and summary["warm_item_ndcg@3_ci"][0] <= summary["warm_item_ndcg@3"]


def test_an_empty_slice_scores_zero_over_zero_users() -> None:
    stats = CatalogStats(n_items=3, head_items=frozenset({1}), new_items=frozenset(), rare_items=frozenset(),
                         warm_items=frozenset({1, 2}))
    got = evaluate_lists({1: np.array([1, 2])}, {1: {2}}, stats, k=2)
    assert (got["cold_item_users"], got["cold_item_ndcg@2"], got["cold_user_users"]) == (0, 0.0, 0)
    assert "cold_item_ndcg@2_ci" not in summarize(got, k=2)


def test_catalog_stats_split_head_new_and_rare_items() -> None:
    train = np.array([1] * 9 + [2] * 6 + [3] * 5 + [4] * 4 + [5])
    stats = catalog_stats(train, np.arange(1, 11))
    assert stats.head_items == {1, 2}  # 20% of 10 recommendable items
    assert stats.rare_items == {4, 5}  # 1 to 4 interactions
    assert stats.new_items == {6, 7, 8, 9, 10}  # none
    assert stats.warm_items == {1, 2, 3}
    # An item that is not recommendable (inactive) is in no item slice unless training saw it often.
    assert catalog_stats(np.array([11] * 6 + [12]), np.arange(1, 11)).warm_items == {11}


def test_cold_users_have_one_or_two_training_interactions() -> None:
    histories = {1: np.array([5]), 2: np.array([5, 6]), 3: np.array([5, 6, 7]), 4: np.array([], dtype=np.int64)}
    assert cold_users(histories) == {1, 2}


def test_bootstrap_interval_brackets_the_mean_and_pairs_ratios() -> None:
    rng = np.random.default_rng(0)
    values = rng.random(2000)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high and high - low < 0.05
    same_low, same_high = bootstrap_interval(values, reference=values)
    assert same_low == pytest.approx(1.0) and same_high == pytest.approx(1.0)  # paired: identical users
    better_low, _ = bootstrap_interval(values + 0.1, reference=values)
    assert better_low > 1.0


def window(cutoff: str) -> HoldoutPlan:
    return HoldoutPlan(kind=TIME_WINDOW, cutoff=pd.Timestamp(cutoff, tz="UTC").isoformat(), window_days=4.0,
                       users=1, targets=1, held_out_rows=1, share=0.1, min_users=1)


def test_holdout_targets_are_new_items_after_the_cutoff() -> None:
    frame = events([(1, 1, 10, "2026-01-01"), (2, 1, 11, "2026-01-02"), (3, 1, 10, "2026-01-09"),
                    (4, 1, 12, "2026-01-09"), (5, 2, 13, "2026-01-09"), (6, 3, 10, "2026-01-01")])
    holdout = build_holdout(frame, held_out_mask(frame, window("2026-01-05")))
    assert holdout.targets == {1: {12}}  # item 10 was seen before; user 2 has no history; user 3 no new items
    assert holdout.histories[1].tolist() == [10, 11]


def test_empty_holdout_is_a_clear_error() -> None:
    frame = events([(1, 1, 10, "2026-01-01")])
    with pytest.raises(GateError, match="no user has new items"):
        build_holdout(frame, held_out_mask(frame, window("2026-01-05")))


def bursty_log(users: int) -> pd.DataFrame:
    """Each user active on one day only, one day after the other (like MovieLens): 3 new items each."""
    rows = []
    for user in range(1, users + 1):
        day = (pd.Timestamp("2020-01-01") + pd.Timedelta(days=user)).strftime("%Y-%m-%d")
        rows += [(user * 10 + n, user, n + user % 7, day) for n in range(3)]
    return events(rows)


def test_holdout_window_grows_until_enough_users() -> None:
    frame = events([(u * 10 + n, u, n + 1, f"2026-01-{d:02d}") for u in range(1, 41) for n, d in ((0, 1), (1, 2))]
                   + [(1000 + u, u, 99, f"2026-01-{10 + u % 20:02d}") for u in range(1, 41)])
    plan = plan_holdout(frame, PipelineConfig(holdout_days=2.0, gate_min_users=30, gate_max_holdout_share=0.5))
    assert plan.kind == TIME_WINDOW and plan.enough
    assert plan.window_days == 16.0  # 2, 4 and 8 days held 6, 10 and 18 users
    assert plan.users == 34 and plan.users == len(build_holdout(frame, held_out_mask(frame, plan)).targets)
    assert plan.share <= 0.5


def test_bursty_log_falls_back_to_each_users_last_interaction() -> None:
    frame = bursty_log(120)  # any window of <= 20% of rows holds users with no history before it
    plan = plan_holdout(frame, PipelineConfig(gate_min_users=100))
    assert plan.kind == LAST_PER_USER and plan.cutoff is None
    assert plan.users == 120 and plan.enough and plan.held_out_rows == 120
    mask = held_out_mask(frame, plan)
    last = frame.sort_values(["user_id", "occurred_at", "event_id"]).groupby("user_id").tail(1)
    assert sorted(frame.loc[mask, "event_id"]) == sorted(last["event_id"])
    holdout = build_holdout(frame, mask)
    assert all(len(holdout.histories[u]) == 2 for u in holdout.targets)


def test_the_fallback_holds_out_each_users_last_new_item_and_what_followed() -> None:
    # user 1: 10, 11, 12 (new), then 10 again (a repeat); user 2: 20, 20 (nothing new after the first)
    frame = events([(1, 1, 10, "2026-01-01"), (2, 1, 11, "2026-01-02"), (3, 1, 12, "2026-01-03"),
                    (4, 1, 10, "2026-01-04"), (5, 2, 20, "2026-01-01"), (6, 2, 20, "2026-01-02")])
    plan = plan_holdout(frame, PipelineConfig(gate_min_users=1, gate_max_holdout_share=0.1))
    assert plan.kind == LAST_PER_USER and (plan.users, plan.held_out_rows) == (1, 2)
    assert frame.loc[held_out_mask(frame, plan), "event_id"].tolist() == [3, 4]
    assert build_holdout(frame, held_out_mask(frame, plan)).targets == {1: {12}}


def test_a_burst_at_the_end_narrows_the_window_first() -> None:
    # 40 users on three days, then a backfill of 60 events, one an hour, over the last two and a half days
    rows = [(u * 10 + n, u, n + 1, f"2026-01-{1 + n:02d}") for u in range(1, 41) for n in range(3)]
    burst = events([(5000 + i, 1 + i % 40, 50 + i, "2026-01-08") for i in range(60)])
    burst["occurred_at"] += pd.to_timedelta(np.arange(60), unit="h")
    frame = pd.concat([events(rows), burst], ignore_index=True)
    plan = plan_holdout(frame, PipelineConfig(holdout_days=7.0, gate_min_users=30, gate_max_holdout_share=0.25))
    # 7 and 3.5 days hold the whole burst (33% of the rows); 1.75 days hold 43 of its events (24%)
    assert plan.kind == TIME_WINDOW and plan.window_days == 1.75 and plan.held_out_rows == 43 and plan.enough


def test_too_few_users_is_not_enough_evidence() -> None:
    plan = plan_holdout(bursty_log(30), PipelineConfig(gate_min_users=100))
    assert plan.users == 30 and not plan.enough
    assert "each user's last new item: 30 rows (33.3%), 30 users with 30 new items" in plan.describe()


def per_user(ndcg: np.ndarray) -> dict[str, object]:
    return {"ndcg@10": float(ndcg.mean()), "hr@10": float((ndcg > 0).mean()),
            "per_user": {"ndcg@10": ndcg, "hr@10": (ndcg > 0).astype(float)}}


def test_gate_uses_paired_intervals() -> None:
    config = PipelineConfig()
    rng = np.random.default_rng(0)
    base = rng.random(500) * 0.2
    popularity = per_user(base * 0.4)
    accepted = decide(per_user(base), per_user(base * 0.98), popularity, config)
    assert accepted.accepted, accepted.reasons  # 2% below the champion is within noise and tolerance
    assert accepted.metrics["candidate"]["ndcg@10_vs_champion"][0] == pytest.approx(1 / 0.98)
    worse = decide(per_user(base * 0.7), per_user(base), popularity, config)
    assert not worse.accepted and "champion" in worse.reasons[0]
    tied = decide(per_user(rng.permutation(base * 0.4)), None, popularity, config)  # same mean, other users
    assert not tied.accepted and "does not clearly beat popularity" in tied.reasons[0]
    below_floor = decide(per_user(base * 0.01), None, per_user(base * 0.001), config)
    assert not below_floor.accepted and "below the floor" in below_floor.reasons[0]


def with_new_items(ndcg: np.ndarray, new_item_ndcg: np.ndarray) -> dict[str, object]:
    evaluation = per_user(ndcg)
    evaluation.update({"cold_item_ndcg@10": float(new_item_ndcg.mean()), "cold_item_users": len(new_item_ndcg),
                       "per_slice": {"cold_item": {"ndcg@10": new_item_ndcg, "hr@10": (new_item_ndcg > 0) * 1.0}}})
    return evaluation


def test_an_accepted_candidate_much_worse_on_new_items_says_so() -> None:
    config = PipelineConfig()
    rng = np.random.default_rng(1)
    base, new = rng.random(500) * 0.2, rng.random(60) * 0.2
    popularity = per_user(base * 0.4)
    worse_on_new = decide(with_new_items(base, new * 0.3), with_new_items(base, new), popularity, config)
    assert worse_on_new.accepted
    assert "new items ranked worse than by the champion" in worse_on_new.reasons[1]
    assert worse_on_new.metrics["candidate"]["cold_item_ndcg@10_vs_champion"][0] == pytest.approx(0.3)
    as_good = decide(with_new_items(base, new * 0.98), with_new_items(base, new), popularity, config)
    assert as_good.accepted and len(as_good.reasons) == 1
    too_few = decide(with_new_items(base, new[:10] * 0.3), with_new_items(base, new[:10]), popularity, config)
    assert len(too_few.reasons) == 1  # 10 users whose next item is new: too thin to compare
    none_either = decide(with_new_items(base, new * 0), with_new_items(base, new * 0), popularity, config)
    assert len(none_either.reasons) == 1  # the champion ranked no new item either: nothing fell behind
    by_hits = decide(with_new_items(base, new * 0.3 * (np.arange(60) % 3 == 0)), with_new_items(base, new), popularity,
                     PipelineConfig(gate_metric="hr@10"))
    assert any("cold-item hr@10" in reason for reason in by_hits.reasons)  # any gate metric, read per slice


def test_extend_dataset_deduplicates_and_keeps_all_history_while_training_sees_the_window() -> None:
    base = events([(1, 1, 10, "2026-01-01"), (2, 1, 11, "2026-03-01")])
    increment = events([(2, 1, 11, "2026-03-01"), (3, 2, 12, "2026-03-02")])
    merged = extend_dataset(base, increment)
    assert merged["event_id"].tolist() == [1, 2, 3]  # a window set once must not drop history for later runs
    assert within_training_window(merged, 30)["event_id"].tolist() == [2, 3]
    assert within_training_window(merged, None)["event_id"].tolist() == [1, 2, 3]


def test_config_overrides_are_checked() -> None:
    assert PipelineConfig.from_overrides({"epochs": 2}).epochs == 2
    with pytest.raises(ConfigError, match="unknown pipeline setting"):
        PipelineConfig.from_overrides({"epoch": 2})
    with pytest.raises(ConfigError, match="expects int"):
        PipelineConfig.from_overrides({"epochs": "two"})
    with pytest.raises(ConfigError, match="divisible"):
        PipelineConfig.from_overrides({"d_model": 30, "n_heads": 4})


def test_a_json_boolean_is_refused_for_every_numeric_setting() -> None:
    from recmodel.config import SETTING_RANGES

    for name in SETTING_RANGES:  # bool is an int subclass: float(True) == 1.0 and [0, 100] contains True
        with pytest.raises(ConfigError, match=rf"^setting '{name}' expects (int|float), got True$"):
            PipelineConfig.from_overrides({name: True})
        with pytest.raises(ConfigError, match=rf"^{name} must be a number, got False$"):
            dataclasses.replace(PipelineConfig(), **{name: False}).check()


def test_event_types_must_be_distinct_and_min_epochs_at_most_epochs() -> None:
    with pytest.raises(ConfigError, match=r"^event_types lists 'click' more than once$"):
        PipelineConfig.from_overrides({"event_types": ["view", "click", "rating", "click"]})
    with pytest.raises(ConfigError, match=r"^min_epochs \(5\) must not exceed epochs \(3\)$"):
        PipelineConfig.from_overrides({"epochs": 3, "min_epochs": 5})
    assert PipelineConfig.from_overrides({"epochs": 3, "min_epochs": 3}).min_epochs == 3


def test_length_sorted_batches_cover_every_sequence_once_with_little_padding() -> None:
    sequences = [np.arange(1, n + 1) for n in (5, 1, 9, 2, 5, 3, 8)]
    batches = list(length_sorted_batches(sequences, 3))
    positions = np.concatenate([p for p, _ in batches])
    assert sorted(positions.tolist()) == list(range(len(sequences)))
    assert [h.shape for _, h in batches] == [(3, 3), (3, 8), (1, 9)]  # lengths 1,2,3 | 5,5,8 | 9
    for chosen, histories in batches:
        for row, position in enumerate(chosen):
            seq = sequences[position]
            assert histories[row, -len(seq):].tolist() == seq.tolist()
            assert not histories[row, :-len(seq)].any()  # left padding only
    fixed = list(length_sorted_batches(sequences, 4, length=4))
    assert all(h.shape[1] == 4 for _, h in fixed)


def test_every_setting_and_its_range_is_documented() -> None:
    from recmodel.config import SETTING_RANGES

    numeric = {f.name for f in dataclasses.fields(PipelineConfig) if f.type in ("int", "float", "float | None")}
    assert numeric == set(SETTING_RANGES), "every numeric setting has a range"
    guide = (Path(__file__).resolve().parent.parent / "docs" / "OPERATIONS.md").read_text()
    for field in dataclasses.fields(PipelineConfig):
        assert f"| `{field.name}` |" in guide, f"{field.name} is missing from the settings table"
    defaults = PipelineConfig()
    for name, allowed in SETTING_RANGES.items():
        default = "null" if getattr(defaults, name) is None else getattr(defaults, name)
        assert f"| `{name}` | {default} | {allowed} |" in guide, f"{name}: the documented range is not {allowed}"


def test_every_environment_variable_is_checked_once_and_documented_in_one_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from recmodel.config import ENVIRONMENT, settings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for setting in ENVIRONMENT:
        shown = f"`{setting.default}`" if setting.default else "unset"
        assert f"| `{setting.variable}` | {setting.meaning} | {shown} |" in readme, f"{setting.variable} in README"
    bad = {"RECSYS_RETRAIN_MIN_NEW_ROWS": ["many", "0"], "RECSYS_RETRY_DELAY_SECONDS": ["soon", "-1", "nan"],
           "RECSYS_LIVE_RUN_WAIT_MINUTES": ["-5"], "RECSYS_MAX_SERVING_AGE_HOURS": ["0", "inf"],
           "RECSYS_ALERT_EMAIL": ["ops"], "RECSYS_TRAIN_QUEUE": ["  "], "RECSYS_RETRAIN_SCHEDULE": [""],
           "RECSYS_UNDERPERFORM_DAYS": ["-1", "often"]}
    for variable, values in bad.items():
        for value in values:
            monkeypatch.setenv(variable, value)
            with pytest.raises(ConfigError, match=variable):
                settings()
        monkeypatch.delenv(variable)
    monkeypatch.setenv("RECSYS_ALERT_EMAIL", "ops@example.com, oncall@example.com")
    monkeypatch.setenv("RECSYS_MAX_SERVING_AGE_HOURS", "12.5")
    monkeypatch.setenv("RECSYS_UNDERPERFORM_DAYS", "0")
    env = settings()
    assert env.alert_emails == ("ops@example.com", "oncall@example.com") and env.max_serving_age_hours == 12.5
    assert env.underperform_days == 0


def test_progress_logs_only_when_due_with_an_estimate_capped_by_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from recmodel.progress import Progress

    now = [0.0]
    progress = Progress(logging.getLogger("recmodel.test"), "train", 100, "steps", limit_seconds=30.0, every=8.0,
                        clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="recmodel"):
        for step in range(1, 101):
            now[0] = step * 0.5  # 0.5 s a step: 50 s for all of them
            progress.advance(1, f"epoch {1 + step // 50}/2")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6  # at 8, 16, 24, 32, 40 and 48 s: one line per 8 s, none in between
    assert lines[0] == "train: 16/100 steps (16%), epoch 1/2, 8 s, ~22 s left"  # 42 s at this pace, 22 s of budget
    assert lines[-1].startswith("train: 96/100 steps (96%), epoch 2/2, 48 s, ~0 s left")


def test_the_cli_heartbeat_speaks_only_when_the_terminal_was_quiet(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import time

    from recmodel.cli import heartbeat, quiet_watch

    with caplog.at_level(logging.INFO, logger="recmodel"):
        with heartbeat(lambda: "train is running", every=1.5):
            time.sleep(3.6)  # quiet: the heartbeat fills the silence
        quiet = [r.getMessage() for r in caplog.records if r.getMessage().startswith("…")]
        caplog.clear()
        with heartbeat(lambda: "train is running", every=1.5):
            for _ in range(12):  # a stage logging every 0.3 s keeps it silent
                quiet_watch.filter(logging.makeLogRecord({"msg": "epoch"}))
                time.sleep(0.3)
        busy = [r.getMessage() for r in caplog.records if r.getMessage().startswith("…")]
    assert 1 <= len(quiet) <= 2 and quiet[0].startswith("… train is running (")
    assert busy == []


def test_stage_outputs_survive_xcom_json_and_a_renamed_field_is_named() -> None:
    import json
    from datetime import UTC, datetime

    from recmodel.extract import ExtractResult
    from recmodel.manifest import (ContractError, Exported, Gated, ItemTables, ModelFiles, ScoredShard, Snapshot,
                                   Trained, from_json, to_json)
    from recmodel.publish import PublishResult

    plan = HoldoutPlan(kind=TIME_WINDOW, cutoff="2026-11-01T00:00:00+00:00", window_days=7.0, users=120, targets=300,
                       held_out_rows=900, share=0.1, min_users=100)
    snapshot = Snapshot("runs/r/dataset.parquet", "runs/r/catalog.parquet")
    trained = Trained(snapshot=snapshot, holdout=plan, parent_version=None, model_dir="models/v1", device="cpu",
                      train_events=5000, n_items=40)
    model = ModelFiles(model_dir="models/v1", onnx_path="models/v1/model.onnx", onnx_sha256="ab" * 32, train_rows=5000)
    values = [
        ExtractResult(increment_path="i.parquet", catalog_path="c.parquet", rows=10, rows_already_seen=2,
                      low_watermark=None, high_watermark=datetime(2026, 11, 1, 12, tzinfo=UTC),
                      base_dataset_path=None, catalog_items=40),
        trained, Exported(trained=trained, model=model, provider="CPUExecutionProvider"),
        Gated(snapshot=snapshot, decision="accepted", reasons=("ndcg@10 0.3 vs popularity 0.1",), serve="model",
              publish_version="v20261101120000", model=model),
        ScoredShard(shard=2, shards=4, path="s.parquet", provider="CPUExecutionProvider", users=50, rows=1000),
        ItemTables(version="v20261101120000", similar_items="si.parquet", popular_items="pi.parquet",
                   snapshot=snapshot),
        PublishResult(version="v20261101120000", row_counts={"user_recommendations": 1000}, swap_seconds=0.01,
                      lock_waits=0, pruned=[]),
    ]
    for value in values:  # through JSON, as XCom stores it
        assert from_json(type(value), json.loads(json.dumps(to_json(value)))) == value

    renamed = to_json(values[2])
    renamed["trained"]["model_path"] = renamed["trained"].pop("model_dir")
    with pytest.raises(ContractError, match="Trained cannot be read: missing model_dir; unknown model_path"):
        from_json(Exported, renamed)


def test_long_tail_figures_are_coverage_tail_share_and_novelty_in_bits() -> None:
    from recmodel.longtail import measure

    # Ten recommendable items, four users; the head is the top 20% by interactions: items 1 (4) and 3 (3).
    dataset = pd.DataFrame({"user_id": [1, 2, 3, 4, 1, 2, 3, 1, 1],
                            "item_id": [1, 1, 1, 1, 2, 2, 3, 3, 3]})  # item 3 twice by user 1: reach counts once
    recommendations = pd.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [2, 4, 1, 4]})
    figures = measure(recommendations, dataset, np.arange(1, 11))
    assert (figures.coverage, figures.items, figures.recommendable, figures.slots) == (0.3, 3, 10, 4)
    assert figures.tail_share == 0.75  # 2, 4 and 4 are outside the head
    # self-information: item 2 reached 2 of 4 users (1 bit), item 4 none (counted as one user: 2 bits), item 1 all (0)
    assert figures.novelty == pytest.approx((1 + 2 + 0 + 2) / 4)


def test_tail_boost_zero_keeps_the_model_order_and_a_boost_lifts_unpopular_candidates() -> None:
    from recmodel.longtail import TailBoost

    vocab = Vocab(np.array([-1, 10, 20, 30, 40], dtype=np.int64))
    events = pd.DataFrame({"item_id": [10] * 100 + [20] * 10 + [30]})  # 40: never seen
    items = np.array([[1, 2, 3, 4], [4, 3, 0, 0]])  # vocabulary indices; the second row has two empty slots
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [2.0, 1.0, -np.inf, -np.inf]], dtype=np.float32)
    same_items, same_scores = TailBoost.of(0.0, events, vocab).apply(items, scores, 3)
    assert same_items.tolist() == [[1, 2, 3], [4, 3, 0]] and np.array_equal(same_scores, scores[:, :3])
    boosted, adjusted = TailBoost.of(5.0, events, vocab).apply(items, scores, 3)
    assert boosted[0].tolist() == [3, 4, 2]  # the most popular item fell out of the top 3
    assert boosted[1].tolist()[:2] == [4, 3] and adjusted[1, 2] == -np.inf  # empty slots stay empty and last
    assert np.all(np.diff(adjusted[0]) <= 0)  # the published score follows the published order


def test_the_explanation_is_the_history_item_closest_to_the_recommended_one() -> None:
    from recmodel.score import _unit_rows, explain

    vectors = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [-1, 0]], dtype=np.float32)  # index 0 is PAD
    histories = np.array([[0, 1, 2], [4, 4, 2]])  # left-padded
    recommended = np.array([[3, 4], [1, 2]])
    # [1,1] is as close to 1 as to 2: the first (oldest) wins; [-1,0] is closest to 2 (cosine 0, not -1), and
    # to PAD never, though PAD's zero vector would score 0 too
    assert explain(_unit_rows(vectors), histories, recommended).tolist() == [[1, 2], [2, 2]]


def test_the_popular_list_grows_its_window_until_enough_users_are_in_it() -> None:
    from datetime import UTC, datetime, timedelta

    from recmodel.score import popular_items

    newest = datetime(2026, 11, 1, tzinfo=UTC)
    # One user in the last 14 days, who loves item 9; 30 users a year ago, who loved item 1.
    dataset = pd.DataFrame({"user_id": [0, 0] + list(range(1, 31)), "item_id": [9, 9] + [1] * 30,
                            "occurred_at": [newest, newest] + [newest - timedelta(days=365)] * 30})
    catalog = pd.DataFrame({"item_id": [1, 9], "active": [True, True]})
    one_user = popular_items(dataset, catalog, k=2, window_days=14, min_users=1)
    assert one_user["item_id"].tolist() == [9]  # the window held enough users already
    many = popular_items(dataset, catalog, k=2, window_days=14, min_users=20)
    assert many["item_id"].tolist() == [1, 9] and many["score"].tolist() == pytest.approx([30 / 32, 2 / 32])
    too_few = popular_items(dataset, catalog, k=2, window_days=14, min_users=100)  # all of it
    assert too_few["item_id"].tolist() == [1, 9]


def test_a_parquet_file_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet

    from recmodel.artifacts import write_parquet

    path = tmp_path / "shard.parquet"
    write_parquet(pd.DataFrame({"user_id": [1, 2]}), path)

    def dies_part_way(table, sink, **options) -> None:  # a writer killed after its first bytes
        sink.write(b"PAR1 torn")  # pandas hands pyarrow the file it opened
        raise OSError("killed")

    monkeypatch.setattr(pyarrow.parquet, "write_table", dies_part_way)
    with pytest.raises(OSError, match="killed"):
        write_parquet(pd.DataFrame({"user_id": [3, 4]}), path)
    monkeypatch.undo()
    assert pd.read_parquet(path)["user_id"].tolist() == [1, 2]  # the earlier file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["shard.parquet"]  # and no partial file left behind


def test_seed_summary_gives_the_mean_and_a_t_interval_over_seeds() -> None:
    from recmodel.accuracy import seed_summary

    def run(ndcg: float) -> dict:
        published = {"ndcg@10": ndcg, "hr@10": 2 * ndcg, "cold_item_ndcg@10": 0.0, "warm_item_ndcg@10": ndcg}
        return {"models": {"published view": published, "ease": {"ndcg@10": 0.0411}, "gated model": {"ndcg@10": 0.05}},
                "retrain_seconds": 400.0,
                "published_training": {"epochs": 30, "best_epoch": 28, "kept_epochs": [26, 27, 28],
                                       "stopped_by": "epochs"}}

    summary = seed_summary([13, 14, 15], [run(0.0544), run(0.0687), run(0.0610)])
    figure = summary["published_view"]["ndcg@10"]
    assert figure["mean"] == pytest.approx(0.061367, abs=1e-6)
    assert figure["ci"] == pytest.approx([0.0436, 0.0792], abs=1e-4)  # t(2) = 4.303 x sd / sqrt(3)
    assert summary["ndcg@10_ratio_to_ease"] == pytest.approx(1.493, abs=1e-3)
    assert [row["seed"] for row in summary["runs"]] == [13, 14, 15] and summary["runs"][0]["epochs"] == 30
    assert summary["runs"][0]["kept_epochs"] == [26, 27, 28]
    assert summary["published_view"]["gated_ndcg@10"]["mean"] == pytest.approx(0.05)
    assert seed_summary([13], [run(0.05)])["published_view"]["ndcg@10"]["ci"] is None


def test_the_seeds_training_curves_plot_marks_the_kept_epochs(tmp_path: Path) -> None:
    from recmodel.accuracy import plot_training_curves

    curve = [{"epoch": e, "validation_ndcg": 0.01 * e, "learning_rate": 1e-3, "seconds": e} for e in range(1, 9)]
    training = {"curve": curve, "epochs": 8, "best_epoch": 8, "kept_epochs": [6, 7, 8], "stopped_by": "epochs"}
    path = tmp_path / "curves.png"
    plot_training_curves([13, 14], [training, training], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
