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
from typing import Any

import numpy as np
import pandas as pd

from recmodel.config import PipelineConfig
from recmodel.data import Vocab, length_sorted_batches

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


def per_user_metrics(recommended: dict[int, np.ndarray], targets: dict[int, set[int]],
                     k: int = K) -> dict[str, np.ndarray]:
    """Per-user NDCG@k, Recall@k, HR@k and MRR@k, in the order of `targets`.

    Binary relevance; the ideal DCG places min(|targets|, k) hits at the top. Recall divides by
    min(|targets|, k) so a perfect list scores 1 even when a user has more than k targets. MRR is
    the reciprocal rank of the first hit within the top k (0 without one).
    """
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    out = {name: np.zeros(len(targets)) for name in (f"ndcg@{k}", f"recall@{k}", f"hr@{k}", f"mrr@{k}")}
    for row, (user, relevant) in enumerate(targets.items()):
        top = recommended.get(user, np.array([], dtype=np.int64))[:k]
        gains = np.fromiter((item in relevant for item in top.tolist()), dtype=float, count=len(top))
        out[f"ndcg@{k}"][row] = (gains * discounts[:len(gains)]).sum() / discounts[:min(len(relevant), k)].sum()
        out[f"recall@{k}"][row] = gains.sum() / min(len(relevant), k)
        out[f"hr@{k}"][row] = float(gains.any())
        first = np.flatnonzero(gains)
        out[f"mrr@{k}"][row] = 1.0 / (first[0] + 1) if len(first) else 0.0
    return out


@dataclass(frozen=True)
class CatalogStats:
    """What the slice metrics need to know about the training data."""

    n_items: int  # recommendable items, the denominator of coverage
    head_items: frozenset[int]  # the 20% most-interacted items
    cold_items: frozenset[int]  # items with fewer than COLD_THRESHOLD training interactions


COLD_THRESHOLD = 5
HEAD_SHARE = 0.2


def catalog_stats(train_item_ids: np.ndarray, recommendable_ids: np.ndarray) -> CatalogStats:
    counts = pd.Series(np.asarray(train_item_ids)).value_counts()
    counts = counts.reindex(np.asarray(recommendable_ids), fill_value=0)
    ranked = counts.sort_index().sort_values(ascending=False, kind="stable")
    head = ranked.index[: max(1, int(round(HEAD_SHARE * len(ranked))))]
    return CatalogStats(n_items=len(recommendable_ids), head_items=frozenset(int(i) for i in head),
                        cold_items=frozenset(int(i) for i in counts.index[counts.to_numpy() < COLD_THRESHOLD]))


def evaluate_lists(recommended: dict[int, np.ndarray], targets: dict[int, set[int]], stats: CatalogStats,
                   k: int = K) -> dict[str, Any]:
    """Means of the per-user metrics plus list-level and slice metrics.

    coverage@k: distinct recommended items / recommendable items. tail_share@k: share of
    recommended slots outside the 20% most popular items. cold_*: NDCG and Recall computed on the
    cold targets only, over users who have one (cold_users of them).
    """
    per_user = per_user_metrics(recommended, targets, k)
    slots = [item for user in targets for item in recommended.get(user, np.array([], np.int64))[:k].tolist()]
    cold_targets = {u: t & stats.cold_items for u, t in targets.items() if t & stats.cold_items}
    cold = per_user_metrics(recommended, cold_targets, k) if cold_targets else None
    summary: dict[str, Any] = {name: float(values.mean()) for name, values in per_user.items()}
    summary.update({
        f"coverage@{k}": len(set(slots)) / max(stats.n_items, 1),
        f"tail_share@{k}": float(np.mean([item not in stats.head_items for item in slots])) if slots else 0.0,
        f"cold_ndcg@{k}": float(cold[f"ndcg@{k}"].mean()) if cold else 0.0,
        f"cold_recall@{k}": float(cold[f"recall@{k}"].mean()) if cold else 0.0,
        "cold_users": float(len(cold_targets)),
        "users": float(len(targets)),
    })
    summary["per_user"] = per_user
    return summary


def bootstrap_interval(values: np.ndarray, *, reference: np.ndarray | None = None, samples: int = 1000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval over users of mean(values), or of mean(values) / mean(reference).

    Resampling the same users for both arrays keeps the ratio paired, so a model that wins on
    the same users gets a tight interval even when both means are noisy.
    """
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(samples, len(values)))
    stat = values[picks].mean(axis=1)
    if reference is not None:
        stat = stat / np.maximum(reference[picks].mean(axis=1), 1e-12)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stat, [tail, 100 - tail])
    return float(low), float(high)


def summarize(evaluation: dict[str, Any], k: int = K) -> dict[str, Any]:
    """JSON-ready: the means, plus 95% bootstrap intervals of NDCG@k and HR@k (per-user arrays dropped)."""
    summary = {name: value for name, value in evaluation.items() if name != "per_user"}
    for name in (f"ndcg@{k}", f"hr@{k}"):
        summary[f"{name}_ci"] = list(bootstrap_interval(evaluation["per_user"][name]))
    return summary


def paired_ratio(candidate: dict[str, Any], reference: dict[str, Any], metric: str) -> tuple[float, float, float]:
    """mean(candidate) / mean(reference) of `metric` over the same users, with its 95% interval."""
    values, base = candidate["per_user"][metric], reference["per_user"][metric]
    low, high = bootstrap_interval(values, reference=base)
    return float(values.mean() / max(base.mean(), 1e-12)), low, high


def onnx_recommendations(session, vocab: Vocab, holdout: Holdout, batch_size: int = 256) -> dict[int, np.ndarray]:
    """Top-K item ids per holdout user from an exported model (its own vocabulary)."""
    users = list(holdout.targets)
    fixed_length = session.get_inputs()[0].shape[1]  # an int for graphs exported with a fixed history window
    known = [_known(vocab, holdout.histories[u]) for u in users]
    out: dict[int, np.ndarray] = {}
    for positions, histories in length_sorted_batches(
            known, batch_size, length=fixed_length if isinstance(fixed_length, int) else None):
        item_index, scores = session.run(None, {"history": histories})
        for position, row, row_scores in zip(positions, item_index, scores):
            out[users[position]] = vocab.item_ids[row[np.isfinite(row_scores)]]
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


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, popularity: dict[str, Any],
           config: PipelineConfig) -> GateDecision:
    """Accept above the floor, clearly above popularity, and not clearly worse than the champion.

    The arguments are `evaluate_lists` results on the same holdout users. "Clearly" uses the
    paired bootstrap interval of the ratio, so the gate does not flip on noise: popularity must
    be beaten with the whole interval above 1, and the champion only wins if the whole interval
    lies below 1 - tolerance.
    """
    metric = config.gate_metric
    value = candidate[metric]
    reasons = []
    if value < config.gate_min_metric:
        reasons.append(f"{metric} {value:.4f} is below the floor {config.gate_min_metric:.4f}")
    vs_popularity = paired_ratio(candidate, popularity, metric)
    if vs_popularity[1] <= 1.0:
        reasons.append(f"{metric} {value:.4f} does not clearly beat popularity ({popularity[metric]:.4f}): "
                       f"ratio {vs_popularity[0]:.2f} [{vs_popularity[1]:.2f}, {vs_popularity[2]:.2f}]")
    metrics = {"candidate": summarize(candidate), "popularity": summarize(popularity)}
    metrics["candidate"][f"{metric}_vs_popularity"] = list(vs_popularity)
    versus = ", no champion yet"
    if champion is not None:
        vs_champion = paired_ratio(candidate, champion, metric)
        metrics["champion"] = summarize(champion)
        metrics["candidate"][f"{metric}_vs_champion"] = list(vs_champion)
        versus = f", champion {champion[metric]:.4f} (ratio {vs_champion[0]:.2f} [{vs_champion[1]:.2f}, {vs_champion[2]:.2f}])"
        if vs_champion[2] < 1 - config.gate_champion_tolerance:
            reasons.append(f"{metric} {value:.4f} is worse than the champion's {champion[metric]:.4f} beyond the "
                           f"{config.gate_champion_tolerance:.0%} tolerance: ratio {vs_champion[0]:.2f} "
                           f"[{vs_champion[1]:.2f}, {vs_champion[2]:.2f}]")
    accepted = not reasons
    if accepted:
        reasons.append(f"{metric} {value:.4f} vs popularity {popularity[metric]:.4f}{versus}")
    return GateDecision(accepted=accepted, reasons=reasons, metrics=metrics)
