"""The accuracy gate: candidate vs champion vs popularity on a time-based holdout.

The holdout is every interaction in the last `holdout_days` of the snapshot. For each user
with history before the cutoff, the targets are the items they touched after it that they had
not touched before (seen items are never recommended, so they cannot count). Metrics rank the
full catalog: the ONNX graph returns its top-K over every item, not a sampled subset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import pandas as pd

from recmodel.config import PipelineConfig
from recmodel.data import Vocab, left_pad, user_sequences

log = logging.getLogger(__name__)

K = 10


class GateError(RuntimeError):
    """The gate cannot be evaluated (e.g. an empty holdout)."""


@dataclass(frozen=True)
class Holdout:
    cutoff: pd.Timestamp
    histories: dict[int, np.ndarray]  # user_id -> item_ids before the cutoff, time order
    targets: dict[int, set[int]]  # user_id -> new item_ids after the cutoff


@dataclass
class GateDecision:
    accepted: bool
    reasons: list[str]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # model name -> metric -> value


def holdout_cutoff(dataset: pd.DataFrame, holdout_days: float) -> pd.Timestamp:
    if dataset.empty:
        raise GateError("the dataset is empty; there is nothing to hold out")
    return dataset["occurred_at"].max() - timedelta(days=holdout_days)


def build_holdout(dataset: pd.DataFrame, cutoff: pd.Timestamp) -> Holdout:
    before = dataset[dataset["occurred_at"] < cutoff].sort_values(["user_id", "occurred_at", "event_id"])
    after = dataset[dataset["occurred_at"] >= cutoff]
    histories = {int(u): g["item_id"].to_numpy(np.int64) for u, g in before.groupby("user_id", sort=False)}
    targets: dict[int, set[int]] = {}
    for user, group in after.groupby("user_id", sort=False):
        seen = histories.get(int(user))
        if seen is None:
            continue  # a user new in the holdout gets popular items, not the model
        new_items = set(group["item_id"].tolist()) - set(seen.tolist())
        if new_items:
            targets[int(user)] = new_items
    if not targets:
        raise GateError(f"no user has new items after the holdout cutoff {cutoff:%Y-%m-%d %H:%M}; "
                        "increase holdout_days or wait for more data")
    return Holdout(cutoff=cutoff, histories={u: histories[u] for u in targets}, targets=targets)


def ranking_metrics(recommended: dict[int, np.ndarray], targets: dict[int, set[int]], n_items: int,
                    k: int = K) -> dict[str, float]:
    """Mean NDCG@k, Recall@k, HR@k and MRR@k over users, plus catalog coverage@k.

    Binary relevance; the ideal DCG places min(|targets|, k) hits at the top. Recall divides by
    min(|targets|, k) so a perfect list scores 1 even when a user has more than k targets.
    """
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ndcg, recall, hit, rr = [], [], [], []
    shown: set[int] = set()
    for user, relevant in targets.items():
        top = recommended.get(user, np.array([], dtype=np.int64))[:k]
        shown.update(top.tolist())
        gains = np.array([item in relevant for item in top.tolist()], dtype=float)
        ideal = discounts[:min(len(relevant), k)].sum()
        ndcg.append(float((gains * discounts[:len(gains)]).sum() / ideal))
        recall.append(float(gains.sum() / min(len(relevant), k)))
        hit.append(float(gains.any()))
        first = np.flatnonzero(gains)
        rr.append(float(1.0 / (first[0] + 1)) if len(first) else 0.0)
    return {
        f"ndcg@{k}": float(np.mean(ndcg)),
        f"recall@{k}": float(np.mean(recall)),
        f"hr@{k}": float(np.mean(hit)),
        f"mrr@{k}": float(np.mean(rr)),
        f"coverage@{k}": len(shown) / max(n_items, 1),
        "users": float(len(targets)),
    }


def onnx_recommendations(session, vocab: Vocab, holdout: Holdout, max_history: int,
                         batch_size: int = 1024) -> dict[int, np.ndarray]:
    """Top-K item ids per holdout user from an exported model (its own vocabulary)."""
    users = list(holdout.targets)
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        histories = left_pad([_known(vocab, holdout.histories[u]) for u in batch], max_history)
        item_index, scores = session.run(None, {"history": histories})
        for user, row, row_scores in zip(batch, item_index, scores):
            out[user] = vocab.item_ids[row[np.isfinite(row_scores)]]
    return out


def _known(vocab: Vocab, item_ids: np.ndarray) -> np.ndarray:
    """History as vocabulary indices, dropping items the model has never heard of, repeats collapsed."""
    index = vocab.index_of(item_ids)
    index = index[index != 0]
    if len(index) > 1:
        index = index[np.concatenate([[True], index[1:] != index[:-1]])]
    return index


def popularity_recommendations(dataset: pd.DataFrame, holdout: Holdout, active_ids: np.ndarray,
                               k: int = K) -> dict[int, np.ndarray]:
    """The classic baseline: most-interacted items before the cutoff, minus what the user has seen."""
    before = dataset[dataset["occurred_at"] < holdout.cutoff]
    ranked = before.loc[before["item_id"].isin(active_ids), "item_id"].value_counts()
    ranked = ranked.sort_index().sort_values(ascending=False, kind="stable").index.to_numpy(np.int64)
    out = {}
    for user, history in holdout.histories.items():
        seen = set(history.tolist())
        picks = [item for item in ranked[: k + len(seen)] if item not in seen][:k]
        out[user] = np.array(picks, dtype=np.int64)
    return out


def decide(candidate: dict[str, float], champion: dict[str, float] | None, popularity: dict[str, float],
           config: PipelineConfig) -> GateDecision:
    """Accept only above the floor, within tolerance of the champion, and above popularity."""
    metric = config.gate_metric
    value = candidate[metric]
    reasons = []
    if value < config.gate_min_metric:
        reasons.append(f"{metric} {value:.4f} is below the floor {config.gate_min_metric:.4f}")
    if value <= popularity[metric]:
        reasons.append(f"{metric} {value:.4f} does not beat popularity ({popularity[metric]:.4f})")
    if champion is not None:
        allowed = champion[metric] * (1 - config.gate_champion_tolerance)
        if value < allowed:
            reasons.append(f"{metric} {value:.4f} is worse than the champion's {champion[metric]:.4f} "
                           f"beyond the {config.gate_champion_tolerance:.0%} tolerance")
    accepted = not reasons
    if accepted:
        versus = f", champion {champion[metric]:.4f}" if champion is not None else ", no champion yet"
        reasons.append(f"{metric} {value:.4f} vs popularity {popularity[metric]:.4f}{versus}")
    metrics = {"candidate": candidate, "popularity": popularity}
    if champion is not None:
        metrics["champion"] = champion
    return GateDecision(accepted=accepted, reasons=reasons, metrics=metrics)
