"""New items: the cold split of `bench accuracy`, and what keeps an untouched item rankable by its text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SMALL_MODEL, seed_small
from recmodel import db, pipeline
from recmodel.accuracy import split_for_accuracy
from recmodel.model import ModelConfig, SequentialRecommender, bounded
from recmodel.train import ExactSoftmax, SampledSoftmax


def log(users: int = 50, items: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [(u, int(rng.integers(1, items + 1)), pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(minutes=m))
            for u in range(users) for m in range(int(rng.integers(3, 12)))]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "occurred_at"])


def test_no_event_of_a_cold_item_reaches_training() -> None:
    interactions = log()
    split = split_for_accuracy(interactions, cold_share=0.1, cold_seed=3)
    touched = interactions["item_id"].nunique()
    assert len(split.cold_items) == round(0.1 * touched)
    assert not split.imported["item_id"].isin(split.cold_items).any()
    # The targets are every user's last interaction, cold or not; nothing else was dropped.
    last = interactions.sort_values(["user_id", "occurred_at", "item_id"]).groupby("user_id").tail(1)
    assert sorted(map(tuple, split.removed.to_numpy().tolist())) == sorted(map(tuple, last.to_numpy().tolist()))
    kept = interactions.drop(last.index)
    assert len(split.imported) == int((~kept["item_id"].isin(split.cold_items)).sum())
    again = split_for_accuracy(interactions, cold_share=0.1, cold_seed=3)
    assert np.array_equal(again.cold_items, split.cold_items)  # seeded: every model meets the same new items
    assert not np.array_equal(split_for_accuracy(interactions, 0.1, 4).cold_items, split.cold_items)
    assert len(split_for_accuracy(interactions, 0.0, 3).cold_items) == 0


def test_the_delta_bound_caps_each_item_and_keeps_gradients() -> None:
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], requires_grad=True)
    capped = bounded(rows, 1.0)
    torch.testing.assert_close(capped.norm(dim=1), torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(capped[0], torch.tensor([0.6, 0.8]))  # scaled down, direction kept
    capped.sum().backward()
    assert torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0
    assert bounded(rows, 0.0) is rows  # 0: unbounded


def test_item_vectors_bound_the_id_part_only() -> None:
    torch.manual_seed(0)
    config = ModelConfig(n_items=20, max_history=4, d_model=8, n_heads=2, delta_max_norm=0.5)
    model = SequentialRecommender(config, torch.randn(20, 384)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.id_embedding.weight, std=3.0)
        deltas = model.item_vectors() - model.text_projection(model.text_matrix)
    assert float(deltas[1:].norm(dim=1).max()) <= 0.5 + 1e-5


def test_an_item_no_sequence_leads_to_is_never_a_negative() -> None:
    """Its vector stays what its text gives it: pushed down as a negative at every step, a new item would rank
    below the whole catalog."""
    torch.manual_seed(0)
    model = SequentialRecommender(ModelConfig(n_items=12, max_history=4, d_model=8, n_heads=2),
                                  torch.randn(12, 384)).train()
    history = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    targets = torch.tensor([[0, 2, 3, 4], [5, 6, 7, 8]])
    positives = torch.bincount(targets[targets > 0], minlength=12)  # items 9, 10, 11: never a target
    for loss in (ExactSoftmax(positives), SampledSoftmax(positives, negatives=6, generator=torch.Generator())):
        model.zero_grad()
        loss(model, history, targets).backward()
        untouched = model.id_embedding.weight.grad[9:]
        assert float(untouched.abs().sum()) == 0.0, loss.name
    sampled = SampledSoftmax(positives, negatives=6, generator=torch.Generator().manual_seed(1))
    drawn = torch.cat([sampled.draw(torch.device("cpu")) for _ in range(200)])
    assert not set(drawn.tolist()) & {0, 1, 9, 10, 11}  # item 1 is only ever history, never a target


NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
NEW_ITEM = 10_000


@pytest.mark.slow
def test_an_item_published_today_is_in_tomorrows_lists_beside_its_text_twin(recsys_env: str) -> None:
    """A new item nobody has touched, whose text is that of an item the model recommends, lands in the next
    run's lists where its twin does: it is ranked by its text, not buried as an unseen negative."""
    seed_small(recsys_env, NOW)
    pipeline.run_all(pipeline.make_context(NOW, SMALL_MODEL))
    with db.connect(recsys_env) as conn:
        twin = conn.execute("SELECT item_id FROM recsys.user_recommendations GROUP BY item_id "
                            "ORDER BY count(*) DESC, item_id LIMIT 1").fetchone()[0]
    with db.transaction(recsys_env) as conn:
        conn.execute("INSERT INTO items (item_id, title, description, tags, created_at, active) "
                     "SELECT %s, title, description, tags, %s, true FROM items WHERE item_id = %s",
                     (NEW_ITEM, NOW + timedelta(hours=1), twin))
    tomorrow = NOW + timedelta(days=1)
    seed_small(recsys_env, tomorrow, events=1500, seed=2)
    pipeline.run_all(pipeline.make_context(tomorrow, {**SMALL_MODEL, "gate_enforced": False}))
    with db.connect(recsys_env) as conn:
        lists = conn.execute("SELECT user_id, array_agg(item_id) FROM recsys.user_recommendations "
                             "GROUP BY user_id").fetchall()
        long_tail = conn.execute("SELECT r.long_tail FROM recsys.model_registry r "
                                 "JOIN recsys.published_versions p USING (version) WHERE p.serving").fetchone()[0]
    with_twin = [items for _, items in lists if twin in items]
    assert with_twin, "the twin is still recommended"
    beside = sum(NEW_ITEM in items for items in with_twin)
    assert beside >= len(with_twin) / 2, f"the new item is in {beside} of the {len(with_twin)} lists its twin is in"
    assert long_tail["new_items"] >= 1 and long_tail["new_item_share"] > 0


def test_similar_items_agreement_tells_co_occurrence_from_text_neighbours() -> None:
    """Lists that follow what users do agree with co-occurrence neighbours; lists that follow the text agree with
    text neighbours (with placeholder titles: the digits)."""
    from recmodel.accuracy import neighbours_agreement
    from recmodel.data import Vocab

    rng = np.random.default_rng(0)
    n_items, clusters = 60, 6
    rows = [(user, int(item)) for user in range(600)
            for item in rng.choice(np.arange(1, n_items + 1)[np.arange(1, n_items + 1) % clusters == user % clusters],
                                   size=5, replace=False)]
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id"])
    vocab = Vocab.from_catalog(np.arange(1, n_items + 1))
    text = np.zeros((n_items + 1, 8), dtype=np.float32)
    text[1:] = rng.normal(size=(n_items, 8))  # text unrelated to taste

    def lists(neighbours_of) -> pd.DataFrame:
        return pd.DataFrame([(item, other) for item in range(1, n_items + 1) for other in neighbours_of(item)],
                            columns=["item_id", "similar_item_id"])

    same_cluster = lists(lambda item: [o for o in range(1, n_items + 1) if o % clusters == item % clusters and o != item])
    unit = text[1:] / np.linalg.norm(text[1:], axis=1, keepdims=True)
    by_text = lists(lambda item: (np.argsort(-(unit @ unit[item - 1]))[1:11] + 1).tolist())
    follows_users = neighbours_agreement(same_cluster, interactions, text, vocab, k=9)
    follows_text = neighbours_agreement(by_text, interactions, text, vocab, k=10)
    assert follows_users["items"] == n_items
    assert follows_users["cooccurrence_overlap"] > 0.9 and follows_users["text_overlap"] < 0.3
    assert follows_text["text_overlap"] == 1.0 and follows_text["cooccurrence_overlap"] < 0.4
