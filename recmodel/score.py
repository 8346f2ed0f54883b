"""Scoring: top-K recommendations for every known user with ONNX Runtime, plus the item-to-item
and popularity tables that ship beside them.

Each recommendation carries the history item that explains it: of the last `max_history` items the
user touched (what the transformer reads), the one whose item vector is closest to the recommended
item's, computed on the batch right after the ONNX pass.

ONNX Runtime takes the CUDA provider when its libraries load, else the CPU provider; which one
ran is logged and returned, because `onnxruntime-gpu` falls back to CPU silently.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from recmodel.artifacts import open_session
from recmodel.data import PAD, Vocab, is_active, length_sorted_batches, user_sequences
from recmodel.longtail import TailBoost
from recmodel.progress import Progress

log = logging.getLogger(__name__)
NO_TAIL_BOOST = TailBoost(boost=0.0, penalty=np.zeros(0, dtype=np.float32))  # the model's own order

def recommend(onnx_path: Path, vocab: Vocab, dataset: pd.DataFrame, *, top_k: int, batch_size: int,
              tail: TailBoost | None = None, explain_with: np.ndarray | None = None,
              explain_window: int = 200) -> tuple[pd.DataFrame, str]:
    """Top-K for every user in `dataset`: columns user_id, rank, item_id, score, and because_item_id when
    `explain_with` (the model's item vectors) is given; `tail` re-ranks the graph's candidate pool."""
    sequences = user_sequences(dataset, vocab)
    user_ids = np.fromiter(sequences.keys(), dtype=np.int64, count=len(sequences))
    session, provider = open_session(onnx_path)
    unit = None if explain_with is None else _unit_rows(explain_with)
    frames = []
    batches = length_sorted_batches(list(sequences.values()), batch_size)  # whole histories, (B, T)
    progress = Progress(log, f"score ({provider})", len(user_ids), "users")
    for positions, histories in batches:
        item_index, scores = session.run(None, {"history": histories})  # (B, pool) each
        item_index, scores = (tail or NO_TAIL_BOOST).apply(item_index, scores, top_k)
        because = None if unit is None else vocab.item_ids[explain(unit, histories[:, -explain_window:], item_index)]
        frames.append(_ranked(user_ids[positions], vocab.item_ids[item_index], scores, because))
        progress.advance(len(positions))
    if not frames:
        columns = ["user_id", "rank", "item_id", "score"] + ([] if unit is None else ["because_item_id"])
        return pd.DataFrame({name: [] for name in columns}), provider
    return pd.concat(frames, ignore_index=True), provider


def explain(unit_vectors: np.ndarray, histories: np.ndarray, recommended: np.ndarray) -> np.ndarray:
    """For each recommended item (B, K), the history item (an index of `histories`, (B, T), PAD-padded)
    whose vector is closest to it by cosine: what an app shows as "because you watched X"."""
    similarity = np.einsum("bkd,btd->bkt", unit_vectors[recommended], unit_vectors[histories])  # (B, K, T)
    similarity[np.broadcast_to((histories == PAD)[:, None, :], similarity.shape)] = -np.inf
    picked = similarity.argmax(axis=2)  # (B, K): the first (oldest) of equally close items
    return np.take_along_axis(histories, picked, axis=1)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def baseline_recommendations(dataset: pd.DataFrame, users: pd.DataFrame, catalog: pd.DataFrame, *,
                             top_k: int) -> pd.DataFrame:
    """The popularity baseline for every user in `users`: the most-interacted active items of the whole
    `dataset` they have not interacted with. Columns user_id, rank, item_id, score (the item's share)."""
    from recmodel.gate import popularity_ranking, unseen_top

    active = catalog.loc[is_active(catalog), "item_id"].to_numpy()
    counts = popularity_ranking(dataset, active)
    ranked, shares = counts.index.to_numpy(np.int64), (counts / max(len(dataset), 1)).astype(np.float32)
    user_ids, picks = [], []
    for user, items in users.groupby("user_id", sort=True)["item_id"]:
        user_ids.append(user)
        picks.append(unseen_top(ranked, set(items.tolist()), top_k))
    item_ids = np.concatenate(picks) if picks else np.array([], dtype=np.int64)
    frame = pd.DataFrame({"user_id": np.repeat(np.array(user_ids, dtype=np.int64), [len(p) for p in picks]),
                          "item_id": item_ids, "score": shares.reindex(item_ids).to_numpy(np.float32)})
    frame.insert(1, "rank", (frame.groupby("user_id").cumcount() + 1).astype(np.int32))
    return frame


def _ranked(user_ids: np.ndarray, items: np.ndarray, scores: np.ndarray,
            because: np.ndarray | None = None) -> pd.DataFrame:
    """Long format from (B, K) arrays, dropping slots the model could not fill (score -inf)."""
    b, k = items.shape
    frame = pd.DataFrame({
        "user_id": np.repeat(user_ids, k),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), b),
        "item_id": items.reshape(-1).astype(np.int64),
        "score": scores.reshape(-1).astype(np.float32),
    })
    if because is not None:
        frame["because_item_id"] = because.reshape(-1).astype(np.int64)
    return frame[np.isfinite(frame["score"])]


def similar_items(item_vectors: np.ndarray, vocab: Vocab, excluded: np.ndarray, *, k: int,
                  block: int = 2048) -> pd.DataFrame:
    """Cosine nearest neighbours among recommendable items: item_id, rank, similar_item_id, score."""
    vectors = _unit_rows(item_vectors)
    candidates = np.flatnonzero(~excluded & (np.arange(len(vocab)) != PAD))
    k = min(k, len(candidates) - 1)
    if k < 1:
        return pd.DataFrame({"item_id": [], "rank": [], "similar_item_id": [], "score": []})
    frames = []
    for start in range(0, len(candidates), block):
        rows = candidates[start:start + block]
        sims = vectors[rows] @ vectors[candidates].T  # (block, n_candidates)
        sims[np.arange(len(rows)), start + np.arange(len(rows))] = -np.inf  # not similar to itself
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (block, k), unordered
        top_scores = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top, top_scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)
        frames.append(pd.DataFrame({
            "item_id": np.repeat(vocab.item_ids[rows], k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(rows)),
            "similar_item_id": vocab.item_ids[candidates[top.reshape(-1)]],
            "score": top_scores.reshape(-1).astype(np.float32),
        }))
    return pd.concat(frames, ignore_index=True)


def popular_items(dataset: pd.DataFrame, catalog: pd.DataFrame, *, k: int, window_days: float,
                  min_users: int) -> pd.DataFrame:
    """Most-interacted active items over the last `window_days` of the data, or over as much more as it
    takes for `min_users` users to have interacted (or all of it): rank, item_id, score.

    The window grows because real logs are old and sparse: the last 14 days of ml-latest-small hold 12
    users, whose taste would be every new user's fallback. The score is the item's share of
    interactions in the window, so it reads the same across runs.
    """
    if dataset.empty:
        return pd.DataFrame({"rank": [], "item_id": [], "score": []})
    since = dataset["occurred_at"].max() - timedelta(days=window_days)
    newest_first = dataset.sort_values("occurred_at", ascending=False, kind="stable")
    first_seen = newest_first.drop_duplicates("user_id")["occurred_at"]  # each user's newest interaction
    if len(first_seen) >= min_users:
        since = min(since, first_seen.iloc[min_users - 1])
    else:
        since = dataset["occurred_at"].min()
    recent = dataset.loc[dataset["occurred_at"] >= since, "item_id"]
    active = set(catalog.loc[is_active(catalog), "item_id"].tolist())
    counts = recent[recent.isin(active)].value_counts()
    counts = counts.sort_index().sort_values(ascending=False, kind="stable").head(k)
    return pd.DataFrame({
        "rank": np.arange(1, len(counts) + 1, dtype=np.int32),
        "item_id": counts.index.to_numpy(np.int64),
        "score": (counts.to_numpy() / max(len(recent), 1)).astype(np.float32),
    })
