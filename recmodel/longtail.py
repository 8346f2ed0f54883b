"""The long tail: how far a version's lists reach beyond the most popular items, and an opt-in
re-ranking (`tail_boost`) that reaches further.

Figures over every list a version publishes (every slot of every user's top-K):
- coverage: distinct recommended items / recommendable (active) catalog items;
- tail_share: share of slots holding an item outside the 20% most-interacted items (`HEAD_SHARE`), the
  same head the gate's tail_share@10 uses;
- new_item_share: share of slots holding an item nobody interacted with in the snapshot (a new item,
  ranked by its text alone); `tail_boost` raises it, as such items carry no popularity penalty;
- novelty: mean self-information of a recommended item, -log2(share of users who interacted with it),
  in bits: recommending what everybody has seen scores near 0, a niche item scores high.

Re-ranking: the exported graph returns `CANDIDATE_POOL_FACTOR` × top_k candidates per user. With
`tail_boost` = b > 0 each candidate's score is standardised over the user's pool (z) and it gives up
b · log(1 + count) / log(1 + the largest count) of those standard deviations, so the most popular item
loses b and an item nobody interacted with loses nothing; the top_k of the result are served. b = 0
serves the model's own order. docs/MODEL.md has the measured accuracy/coverage trade-off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from recmodel.data import PAD, Vocab

CANDIDATE_POOL_FACTOR = 5  # the graph's top-K is this many times top_k: the pool re-ranking chooses from
HEAD_SHARE = 0.2  # the most-interacted 20% of recommendable items are the head; the rest is the tail


@dataclass(frozen=True)
class TailBoost:
    """`tail_boost` for one model: each vocabulary index's popularity penalty in [0, 1]."""

    boost: float
    penalty: np.ndarray  # (n_items,) float32, PAD 0

    @classmethod
    def of(cls, boost: float, events: pd.DataFrame, vocab: Vocab) -> TailBoost:
        counts = np.bincount(vocab.index_of(events["item_id"].to_numpy(np.int64)), minlength=len(vocab))
        counts[PAD] = 0
        scale = np.log1p(max(int(counts.max(initial=0)), 1))
        return cls(boost=boost, penalty=(np.log1p(counts) / scale).astype(np.float32))

    def apply(self, items: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-rank (B, P) candidates (-inf: an empty slot) and keep each row's best `k`."""
        if self.boost == 0 or items.shape[1] == 0:
            return items[:, :k], scores[:, :k]
        finite = np.isfinite(scores)
        filled = np.where(finite, scores, 0.0)
        count = np.maximum(finite.sum(axis=1, keepdims=True), 1)
        mean = filled.sum(axis=1, keepdims=True) / count
        spread = np.sqrt((np.where(finite, scores - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / count)
        adjusted = (scores - mean) / np.maximum(spread, 1e-6) - self.boost * self.penalty[items]
        adjusted = np.where(finite, adjusted, -np.inf).astype(np.float32)
        order = np.argsort(-adjusted, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(items, order, axis=1), np.take_along_axis(adjusted, order, axis=1)


@dataclass(frozen=True)
class LongTail:
    """How far one version's published lists reach into the catalog."""

    coverage: float
    tail_share: float
    novelty: float  # bits
    items: int  # distinct items recommended
    recommendable: int  # active catalog items
    slots: int  # recommendations counted
    new_item_share: float  # share of slots holding an item with no interaction in the snapshot
    new_items: int  # distinct such items recommended

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def measure(recommendations: pd.DataFrame, dataset: pd.DataFrame, recommendable_ids: np.ndarray) -> LongTail:
    """`recommendations` (user_id, item_id: every slot) against the interactions of `dataset`."""
    from recmodel.gate import catalog_stats  # gate imports this module: the head is the gate's head

    recommendable_ids = np.unique(np.asarray(recommendable_ids, dtype=np.int64))
    slots = recommendations["item_id"].to_numpy(np.int64)
    head_items = catalog_stats(dataset["item_id"].to_numpy(), recommendable_ids).head_items
    head = np.fromiter(head_items, dtype=np.int64, count=len(head_items))
    users = max(dataset["user_id"].nunique(), 1)
    reach = dataset.drop_duplicates(["user_id", "item_id"])["item_id"].value_counts()
    share = reach.reindex(slots, fill_value=0).to_numpy(np.float64) / users
    information = -np.log2(np.maximum(share, 1 / users))  # an item nobody touched counts as one user's
    new = share == 0
    return LongTail(coverage=float(len(np.unique(slots)) / max(len(recommendable_ids), 1)),
                    tail_share=float(np.mean(~np.isin(slots, head))) if len(slots) else 0.0,
                    novelty=float(information.mean()) if len(slots) else 0.0,
                    items=len(np.unique(slots)), recommendable=len(recommendable_ids), slots=len(slots),
                    new_item_share=float(new.mean()) if len(slots) else 0.0, new_items=len(np.unique(slots[new])))
