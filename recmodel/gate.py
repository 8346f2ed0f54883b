"""The accuracy gate: candidate vs champion vs popularity on a holdout sized by evidence.

The holdout (`plan_holdout`) is the latest interactions of the snapshot: a time window that grows
from `holdout_days` until `gate_min_users` users can be judged, or each user's last new item
when the log is too bursty for any window. For each judged user, the targets are the held-out
items they had not touched before (seen items are never recommended, so they cannot count).
Metrics rank the full catalog: the ONNX graph returns its top-K over every item, not a sampled
subset. With fewer than `gate_min_users` users the gate does not decide (`undecided`).
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
from recmodel.longtail import HEAD_SHARE, TailBoost

log = logging.getLogger(__name__)

K = 10


class GateError(RuntimeError):
    """The gate cannot be evaluated (e.g. an empty holdout)."""


@dataclass(frozen=True)
class Holdout:
    histories: dict[int, np.ndarray]  # user_id -> item_ids outside the holdout, time order
    targets: dict[int, set[int]]  # user_id -> new item_ids in the holdout


ACCEPTED, REJECTED, UNDECIDED = "accepted", "rejected", "undecided"


@dataclass
class GateDecision:
    outcome: str  # accepted | rejected | undecided (too few users in the holdout to tell)
    reasons: list[str]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # model name -> metric -> value

    @property
    def accepted(self) -> bool:
        return self.outcome == ACCEPTED


def undecided(plan: HoldoutPlan) -> GateDecision:
    """The decision when the holdout is too small to tell a good model from a bad one."""
    return GateDecision(outcome=UNDECIDED, reasons=[
        (f"evidence too thin to decide: {plan.users} users have new items in the holdout ({plan.describe()}), "
        f"fewer than gate_min_users={plan.min_users}; lower gate_min_users or wait for more data")])


TIME_WINDOW, LAST_PER_USER = "time_window", "last_per_user"
MIN_WINDOW_DAYS = 1 / 24  # the narrowest time window tried: an hour


@dataclass(frozen=True)
class HoldoutPlan:
    """Which interactions of the snapshot the gate holds out, chosen before training (JSON-able).

    time_window: every interaction at or after `cutoff`. last_per_user: each user's last new item
    (by occurred_at, then event_id) and what followed it, when no time window within
    `gate_max_holdout_share` of the data gives `gate_min_users` users to judge on.
    """

    kind: str
    cutoff: str | None  # ISO time, time_window only
    window_days: float | None
    users: int  # users with history before their held-out items and at least one new item among them
    targets: int  # (user, new item) pairs
    held_out_rows: int
    share: float  # held_out_rows / dataset rows
    min_users: int  # gate_min_users when the plan was made

    @property
    def enough(self) -> bool:
        return self.users >= self.min_users

    def describe(self) -> str:
        where = (f"interactions since {self.cutoff[:16].replace('T', ' ')} ({self.window_days:g} days)"
                 if self.kind == TIME_WINDOW else "each user's last new item")
        return (f"{where}: {self.held_out_rows:,} rows ({self.share:.1%}), {self.users:,} users with "
                f"{self.targets:,} new items")


def held_out_mask(dataset: pd.DataFrame, plan: HoldoutPlan) -> np.ndarray:
    """(len(dataset),) bool: the rows `plan` holds out of training."""
    if plan.kind == TIME_WINDOW:
        return (dataset["occurred_at"] >= pd.Timestamp(plan.cutoff)).to_numpy()
    return _last_per_user_mask(dataset)


def _last_per_user_mask(dataset: pd.DataFrame) -> np.ndarray:
    """Each user's last new item (the last time they touched an item for the first time, after at least
    one earlier interaction) and whatever they did after it: repeats of seen items, which are no targets
    but must not be trained on either."""
    occurred = dataset["occurred_at"].dt.tz_convert(None).to_numpy()  # UTC datetime64: sortable in numpy
    rows = np.lexsort((dataset["event_id"].to_numpy(), occurred, dataset["user_id"].to_numpy()))  # user, time, event
    order = dataset.iloc[rows].reset_index(drop=True)
    position = order.groupby("user_id", sort=False).cumcount().to_numpy()
    is_new = (~order.duplicated(["user_id", "item_id"])).to_numpy() & (position > 0)
    last_new = pd.Series(np.where(is_new, position, -1)).groupby(order["user_id"]).transform("max").to_numpy()
    mask = np.zeros(len(dataset), dtype=bool)
    mask[rows] = (last_new >= 1) & (position >= last_new)
    return mask


def _new_item_pairs(dataset: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """Held-out (user_id, item_id) pairs of users with training history, minus items they had seen."""
    before = dataset.loc[~mask, ["user_id", "item_id"]].drop_duplicates()
    after = dataset.loc[mask, ["user_id", "item_id"]].drop_duplicates()
    after = after[after["user_id"].isin(before["user_id"].unique())]
    merged = after.merge(before, how="left", on=["user_id", "item_id"], indicator=True)
    return merged.loc[merged["_merge"] == "left_only", ["user_id", "item_id"]]


def plan_holdout(dataset: pd.DataFrame, config: PipelineConfig) -> HoldoutPlan:
    """The holdout the gate decides on, sized by evidence rather than by the calendar.

    Start with the last `holdout_days` (halved first while it holds more than
    `gate_max_holdout_share` of the rows); double the window until `gate_min_users` users have new
    items after the cutoff, as long as it holds at most that share. Real logs are bursty and old:
    when no such window exists, hold out each user's last new item instead (leave-last-out, the
    usual protocol for sequential recommenders). The plan says how many users it holds; below
    `gate_min_users` the gate cannot decide.
    """
    if dataset.empty:
        raise GateError("the dataset is empty; there is nothing to hold out")
    occurred = dataset["occurred_at"]
    newest = occurred.max()

    def since(days: float) -> tuple[pd.Timestamp, np.ndarray]:
        cutoff = newest - timedelta(days=days)
        return cutoff, (occurred >= cutoff).to_numpy()

    window = config.holdout_days
    cutoff, mask = since(window)
    while mask.mean() > config.gate_max_holdout_share and window > MIN_WINDOW_DAYS:
        window /= 2  # a burst at the end of the log (a day of backfilled events): narrow the window first
        cutoff, mask = since(window)
    while mask.mean() <= config.gate_max_holdout_share:
        plan = _plan(dataset, mask, config, TIME_WINDOW, cutoff.isoformat(), window)
        if plan.enough:
            return plan
        window *= 2
        cutoff, mask = since(window)
    return _plan(dataset, _last_per_user_mask(dataset), config, LAST_PER_USER, None, None)


def _plan(dataset: pd.DataFrame, mask: np.ndarray, config: PipelineConfig, kind: str, cutoff: str | None,
          window_days: float | None) -> HoldoutPlan:
    pairs = _new_item_pairs(dataset, mask)
    return HoldoutPlan(kind=kind, cutoff=cutoff, window_days=window_days, users=int(pairs["user_id"].nunique()),
                       targets=len(pairs), held_out_rows=int(mask.sum()), share=round(float(mask.mean()), 4),
                       min_users=config.gate_min_users)


def build_holdout(dataset: pd.DataFrame, held_out: np.ndarray) -> Holdout:
    """Histories (the training rows of each judged user) and targets (their new held-out items), for the
    rows `held_out_mask` holds out."""
    before = dataset[~held_out].sort_values(["user_id", "occurred_at", "event_id"], kind="stable")
    pairs = _new_item_pairs(dataset, held_out)
    if pairs.empty:
        raise GateError("no user has new items in the holdout; wait for more data")
    targets = {int(u): set(g.tolist()) for u, g in pairs.groupby("user_id", sort=True)["item_id"]}
    before = before[before["user_id"].isin(targets)]
    histories = {int(u): g.to_numpy(np.int64) for u, g in before.groupby("user_id", sort=False)["item_id"]}
    return Holdout(histories=histories, targets=targets)


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
    new_items: frozenset[int]  # recommendable items with no training interaction: what a cold item is
    rare_items: frozenset[int]  # items with 1 to RARE_MAX training interactions
    warm_items: frozenset[int]  # items with more


RARE_MAX = 4  # an item with 1..4 training interactions is rare; with more, warm
COLD_USER_MAX = 2  # a user with 1..2 training interactions is a cold user
# Slices reported beside the overall metrics: items by how much training saw of them, and users with
# almost no history. Each is scored on its own users (those with a target in it), with intervals.
SLICES = ("cold_item", "rare_item", "warm_item", "cold_user")


def catalog_stats(train_item_ids: np.ndarray, recommendable_ids: np.ndarray) -> CatalogStats:
    trained = pd.Series(np.asarray(train_item_ids)).value_counts()
    counts = trained.reindex(np.asarray(recommendable_ids), fill_value=0)
    ranked = counts.sort_index().sort_values(ascending=False, kind="stable")
    head = ranked.index[: max(1, round(HEAD_SHARE * len(ranked)))]
    seen = counts.to_numpy()
    return CatalogStats(n_items=len(recommendable_ids), head_items=frozenset(int(i) for i in head),
                        new_items=frozenset(int(i) for i in counts.index[seen == 0]),
                        rare_items=frozenset(int(i) for i in counts.index[(seen >= 1) & (seen <= RARE_MAX)]),
                        warm_items=frozenset(int(i) for i in trained.index[trained.to_numpy() > RARE_MAX]))


def cold_users(histories: dict[int, np.ndarray]) -> frozenset[int]:
    """Users whose training history holds 1..COLD_USER_MAX interactions."""
    return frozenset(user for user, history in histories.items() if 1 <= len(history) <= COLD_USER_MAX)


def slice_targets(targets: dict[int, set[int]], stats: CatalogStats,
                  cold: frozenset[int] = frozenset()) -> dict[str, dict[int, set[int]]]:
    """Each slice's users and targets: an item slice keeps only its items' targets (and the users who
    have one); the cold-user slice keeps the users in `cold` with all their targets."""
    def keep(wanted) -> dict[int, set[int]]:
        return {user: kept for user, relevant in targets.items() if (kept := {i for i in relevant if wanted(i)})}

    return {"cold_item": keep(stats.new_items.__contains__), "rare_item": keep(stats.rare_items.__contains__),
            "warm_item": keep(stats.warm_items.__contains__),
            "cold_user": {user: relevant for user, relevant in targets.items() if user in cold}}


def evaluate_lists(recommended: dict[int, np.ndarray], targets: dict[int, set[int]], stats: CatalogStats,
                   k: int = K, cold: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Means of the per-user metrics plus list-level and slice metrics.

    coverage@k: distinct recommended items / recommendable items. tail_share@k: share of
    recommended slots outside the 20% most popular items. new_item_share@k: share of slots holding an
    item training never saw. Per slice (SLICES, see `slice_targets`): {slice}_ndcg@k, {slice}_hr@k and
    {slice}_users, the users it is scored on (0: the slice is empty and its metrics are 0).
    """
    per_user = per_user_metrics(recommended, targets, k)
    slots = [item for user in targets for item in recommended.get(user, np.array([], np.int64))[:k].tolist()]
    summary: dict[str, Any] = {name: float(values.mean()) for name, values in per_user.items()}
    summary.update({
        f"coverage@{k}": len(set(slots)) / max(stats.n_items, 1),
        f"tail_share@{k}": float(np.mean([item not in stats.head_items for item in slots])) if slots else 0.0,
        f"new_item_share@{k}": float(np.mean([item in stats.new_items for item in slots])) if slots else 0.0,
        "users": float(len(targets)),
    })
    per_slice = {}
    for name, wanted in slice_targets(targets, stats, cold).items():
        metrics = per_user_metrics(recommended, wanted, k)
        per_slice[name] = metrics
        for metric in (f"ndcg@{k}", f"hr@{k}"):
            summary[f"{name}_{metric}"] = float(metrics[metric].mean()) if wanted else 0.0
        summary[f"{name}_users"] = float(len(wanted))
    summary["per_user"] = per_user
    summary["per_slice"] = per_slice
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
    """JSON-ready: the means, plus 95% bootstrap intervals of NDCG@k and HR@k, overall and per slice
    (per-user arrays dropped)."""
    summary = {name: value for name, value in evaluation.items() if name not in ("per_user", "per_slice")}
    for name in (f"ndcg@{k}", f"hr@{k}"):
        summary[f"{name}_ci"] = list(bootstrap_interval(evaluation["per_user"][name]))
        for slice_name, per_user in evaluation.get("per_slice", {}).items():
            if len(per_user[name]):
                summary[f"{slice_name}_{name}_ci"] = list(bootstrap_interval(per_user[name]))
    return summary


def paired_ratio(candidate: dict[str, Any], reference: dict[str, Any], metric: str,
                 slice_name: str | None = None) -> tuple[float, float, float]:
    """mean(candidate) / mean(reference) of `metric` over the same users (those of `slice_name` when
    given), with its 95% interval."""
    def values_of(evaluation: dict[str, Any]) -> np.ndarray:
        return evaluation["per_user"][metric] if slice_name is None else evaluation["per_slice"][slice_name][metric]

    values, base = values_of(candidate), values_of(reference)
    low, high = bootstrap_interval(values, reference=base)
    return float(values.mean() / max(base.mean(), 1e-12)), low, high


def onnx_recommendations(session, vocab: Vocab, holdout: Holdout, batch_size: int = 256, *,
                         tail: TailBoost | None = None, k: int = K) -> dict[int, np.ndarray]:
    """Top-k item ids per holdout user from an exported model (its own vocabulary), re-ranked by `tail`
    (`tail_boost`) as scoring re-ranks what it serves."""
    users = list(holdout.targets)
    fixed_length = session.get_inputs()[0].shape[1]  # an int for graphs exported with a fixed history window
    known = [_known(vocab, holdout.histories[u]) for u in users]
    out: dict[int, np.ndarray] = {}
    for positions, histories in length_sorted_batches(
            known, batch_size, length=fixed_length if isinstance(fixed_length, int) else None):
        item_index, scores = session.run(None, {"history": histories})
        if tail is not None:
            item_index, scores = tail.apply(item_index, scores, k)
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


def popularity_ranking(events: pd.DataFrame, active_ids: np.ndarray) -> pd.Series:
    """Active items by interaction count in `events`, most first (ties by item id): item_id -> count."""
    counts = events.loc[events["item_id"].isin(active_ids), "item_id"].value_counts()
    return counts.sort_index().sort_values(ascending=False, kind="stable")


def unseen_top(ranked: np.ndarray, seen: set[int], k: int) -> np.ndarray:
    """The first `k` items of `ranked` the user has not seen."""
    return np.array([item for item in ranked[: k + len(seen)].tolist() if item not in seen][:k], dtype=np.int64)


def popularity_recommendations(train_events: pd.DataFrame, holdout: Holdout, active_ids: np.ndarray,
                               k: int = K) -> dict[int, np.ndarray]:
    """The classic baseline: most-interacted items in training, minus what the user has seen."""
    ranked = popularity_ranking(train_events, active_ids).index.to_numpy(np.int64)
    return {user: unseen_top(ranked, set(history.tolist()), k) for user, history in holdout.histories.items()}


COLD_ITEM_MIN_USERS = 20  # fewer users whose target is a new item: too few to compare models on new items


def _cold_item_regression(candidate: dict[str, Any], champion: dict[str, Any], metrics: dict[str, dict[str, Any]],
                          config: PipelineConfig) -> list[str]:
    """A warning (not a rejection) when the candidate ranks new items clearly worse than the champion:
    the overall metric barely sees them, so a regression for new items would otherwise pass unnoticed.
    Silent when the champion ranked none of them (nothing to fall behind) or too few users have one."""
    metric = config.gate_metric
    if "per_slice" not in candidate or "per_slice" not in champion:
        return []
    users = len(candidate["per_slice"]["cold_item"][metric])  # the champion is scored on the same users
    if users < COLD_ITEM_MIN_USERS:
        return []
    ours, theirs = (float(e["per_slice"]["cold_item"][metric].mean()) for e in (candidate, champion))
    if theirs == 0.0:
        return []
    ratio = paired_ratio(candidate, champion, metric, "cold_item")
    metrics["candidate"][f"cold_item_{metric}_vs_champion"] = list(ratio)
    if ratio[2] >= 1 - config.gate_champion_tolerance:
        return []
    return [(f"new items ranked worse than by the champion: cold-item {metric} {ours:.4f} vs {theirs:.4f} over "
             f"{users} users whose next item had no training interaction, ratio {ratio[0]:.2f} "
             f"[{ratio[1]:.2f}, {ratio[2]:.2f}]")]


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
    if champion is not None:
        reasons.extend(_cold_item_regression(candidate, champion, metrics, config))
    return GateDecision(outcome=ACCEPTED if accepted else REJECTED, reasons=reasons, metrics=metrics)
