"""`python -m recmodel bench accuracy --movielens DIR`: what a default `retrain` publishes, scored.

Protocol (leave-last-out, the product end to end): every rating is an interaction; each user's
interactions are ordered by time, ties broken by item id, and the last one is removed. The rest is
imported into a scratch database and one default `recsys_retrain` runs through Airflow, exactly as
`import` + `retrain` would (no tuned grid, no patched copy). The published
`recsys.user_recommendations` view is then scored against the removed items: full-catalog ranking
with seen items excluded, NDCG@10, HR@10, MRR@10, coverage@10, the share of recommendations
outside the 20% most popular items and a cold-item slice, with 95% bootstrap intervals over users
and paired intervals for the ratios.

Beside it, on the same users and targets: EASE, item-kNN and popularity, fitted on the imported
interactions (EASE's λ and item-kNN's neighbourhood size chosen on each user's second-to-last
item, then refit with it), and the run's two models from the registry's lineage: the gated
model (trained without the gate's holdout) and the refit that serves (trained on for
`refit_epochs` on the whole snapshot). Each removed item comes after everything its user did in
the snapshot: the time split "train through T, evaluate on what users did after T", with T each
user's own last imported interaction.

With `--cold-items SHARE`, that share of the items with interactions (chosen with `--cold-seed`) loses
every interaction before the import: they stay in the catalog, but neither the retrain nor the
references ever see one, as for an item published this morning. Users whose removed item is one of
them are the "cold item" slice. Every model is scored on slices as the gate scores them (new, rare and
warm items, cold users; `gate.SLICES`), beside a text-only reference that ranks items by the cosine
between their text embedding and the user's history centroid, and the published view's share of
slots that hold a new item is reported.

The serving model's lists are also re-ranked with each `tail_boost` of TAIL_BOOSTS (the opt-in
long-tail setting, applied exactly as scoring applies it): the accuracy/coverage trade-off curve.

With `--ablations`, the train stage is also run on the same snapshot once per ablation (the default
recipe, then one part taken away or swapped at a time; see ABLATIONS), each model exported to
ONNX and scored like the others, with its per-epoch validation curve (`--curves` draws them).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from psycopg.rows import dict_row
from rich.console import Console
from rich.table import Table

from recmodel import baselines, db, gate
from recmodel.config import PipelineConfig, settings
from recmodel.data import PAD, Vocab
from recmodel.textsignal import nearest_by_text

log = logging.getLogger(__name__)
console = Console(width=None if sys.stdout.isatty() else 160)  # the table stays readable when piped

ACCURACY_DB = "recsys_bench_accuracy"
ACCURACY_AIRFLOW_DB = "recsys_bench_accuracy_airflow"
EASE_L2 = (5.0, 20.0, 50.0, 200.0, 1000.0)
KNN_NEIGHBOURS = (20, 50, 200)
K = 10
SELECT_SERVED = "SELECT user_id, item_id, served_by FROM recsys.user_recommendations ORDER BY user_id, rank"
SELECT_SIMILAR = "SELECT item_id, similar_item_id FROM recsys.similar_items ORDER BY item_id, rank"
SIMILAR_PROBES = 1000  # items whose similar-items list is compared with their co-occurrence and text neighbours
SELECT_SERVING_MODEL = """
SELECT r.version, r.kind, r.lineage, r.dataset_path, r.metrics -> 'holdout' AS holdout, r.artifact_dir, r.onnx_path
FROM recsys.model_registry r JOIN recsys.published_versions p USING (version) WHERE p.serving
"""
TAIL_BOOSTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # the `tail_boost` values of the trade-off curve


@dataclass(frozen=True)
class LeaveLastOut:
    vocab: Vocab
    users: list[int]  # evaluated users (>= 3 interactions), in a fixed order
    train: dict[int, np.ndarray]  # user -> vocabulary indices without the last two
    validation: dict[int, int]  # user -> second-to-last item index
    test: dict[int, int]  # user -> last item index


def split_leave_last_out(dataset: pd.DataFrame, vocab: Vocab) -> LeaveLastOut:
    ordered = dataset.sort_values(["user_id", "occurred_at", "item_id"], kind="stable")
    train, validation, test = {}, {}, {}
    for user, items in ordered.groupby("user_id", sort=True)["item_id"]:
        indices = vocab.index_of(items.to_numpy(np.int64))
        if len(indices) < 3:
            train[int(user)] = indices
            continue
        train[int(user)], validation[int(user)], test[int(user)] = indices[:-2], int(indices[-2]), int(indices[-1])
    return LeaveLastOut(vocab=vocab, users=sorted(test), train=train, validation=validation, test=test)


def _matrix(split: LeaveLastOut, with_validation: bool):
    users, items = [], []
    for row, user in enumerate(split.users):
        history = split.train[user]
        if with_validation:
            history = np.append(history, split.validation[user])
        users.extend([row] * len(history))
        items.extend(history.tolist())
    return baselines.interaction_matrix(np.array(users), np.array(items), len(split.users), len(split.vocab))


def _padding_mask(vocab: Vocab) -> np.ndarray:
    """Baselines rank matrix columns; column 0 is the vocabulary's padding and never a candidate."""
    mask = np.zeros(len(vocab), dtype=bool)
    mask[0] = True
    return mask


def _ndcg_of(top: np.ndarray, targets: np.ndarray) -> float:
    per_user = gate.per_user_metrics(dict(enumerate(top)), {row: {int(t)} for row, t in enumerate(targets)}, K)
    return float(per_user[f"ndcg@{K}"].mean())


def tune_baselines(split: LeaveLastOut) -> dict[str, baselines.FittedBaseline]:
    """Choose each baseline's parameter on validation, then refit on training + validation."""
    train_only, with_validation = _matrix(split, False), _matrix(split, True)
    validation_targets = np.array([split.validation[u] for u in split.users])
    padding = _padding_mask(split.vocab)
    chosen = {"popularity": baselines.fit_popularity(with_validation)}
    for name, fit, grid in (("ease", baselines.fit_ease, EASE_L2), ("item_knn", baselines.fit_item_knn, KNN_NEIGHBOURS)):
        scores = {value: _ndcg_of(baselines.top_k(fit(train_only, value), train_only, K, padding), validation_targets)
                  for value in grid}
        best = max(scores, key=scores.get)
        log.info("%s: validation NDCG@10 by parameter %s -> %s", name, {k: round(v, 4) for k, v in scores.items()}, best)
        chosen[name] = fit(with_validation, best)
    return chosen


def placeholder_titles(items: pd.DataFrame) -> pd.DataFrame:
    """The catalog as a shop whose text says nothing: every title "Product <id>", no description, no tags."""
    return items.assign(title="Product " + items["item_id"].astype(str), description=None, tags=None)


def neighbours_agreement(similar: pd.DataFrame, interactions: pd.DataFrame, text_matrix: np.ndarray, vocab: Vocab,
                         k: int = K, probes: int = SIMILAR_PROBES, seed: int = 0) -> dict[str, float]:
    """How much the published similar-items lists agree with co-occurrence neighbours and with text neighbours.

    For up to `probes` items with at least 5 users: the share of its top-k similar items that are among its
    k nearest items by co-occurrence (cosine between the sets of users who touched them) and among its k
    nearest by text embedding. With text that says nothing (e.g. "Product 19263"), text neighbours are title
    digits, and lists that follow them do not follow what users do.
    """
    users = interactions["user_id"].astype("category").cat.codes.to_numpy()
    index = vocab.index_of(interactions["item_id"].to_numpy(np.int64))
    matrix = baselines.interaction_matrix(index, users, len(vocab), int(users.max()) + 1)  # items x users
    counts = np.asarray(matrix.sum(axis=1)).ravel()
    lists = {int(i): g.to_numpy(np.int64)[:k] for i, g in similar.groupby("item_id")["similar_item_id"]}
    candidates = np.array([row for row in np.flatnonzero(counts >= 5) if int(vocab.item_ids[row]) in lists])
    if len(candidates) == 0:
        return {"items": 0, "cooccurrence_overlap": 0.0, "text_overlap": 0.0}
    probe = np.random.default_rng(seed).choice(candidates, size=min(probes, len(candidates)), replace=False)
    norms = np.sqrt(np.maximum(counts, 1))
    cooccurrence = np.asarray((matrix[probe] @ matrix.T).todense()) / norms[probe, None] / norms[None, :]
    cooccurrence[np.arange(len(probe)), probe] = -np.inf
    cooccurrence[:, 0] = -np.inf  # padding
    by_cooccurrence = np.argpartition(-cooccurrence, k, axis=1)[:, :k]
    by_text = nearest_by_text(text_matrix, probe, np.arange(len(vocab)) != PAD, k)
    overlap = {"cooccurrence_overlap": [], "text_overlap": []}
    for row, item in enumerate(probe):
        published = set(lists[int(vocab.item_ids[item])].tolist())
        for name, nearest in (("cooccurrence_overlap", by_cooccurrence), ("text_overlap", by_text)):
            overlap[name].append(len(published & set(vocab.item_ids[nearest[row]].tolist())) / k)
    return {"items": len(probe), **{name: float(np.mean(values)) for name, values in overlap.items()}}


@dataclass(frozen=True)
class AccuracySplit:
    imported: pd.DataFrame  # what the retrain and every reference learn from
    removed: pd.DataFrame  # each user's last interaction: the targets
    cold_items: np.ndarray  # items none of whose interactions were imported (sorted ids)

    @property
    def interactions(self) -> pd.DataFrame:
        """Everything the references' leave-last-out split may see: the imported rows and the targets."""
        return pd.concat([self.imported, self.removed])


def split_for_accuracy(interactions: pd.DataFrame, cold_share: float, cold_seed: int) -> AccuracySplit:
    """Each user's last interaction removed; with `cold_share` > 0, that share of the items with interactions
    (drawn with `cold_seed`) also loses every other interaction: new items for the retrain."""
    imported, removed = remove_last_interactions(interactions)
    items = np.unique(interactions["item_id"].to_numpy(np.int64))
    count = round(cold_share * len(items))
    cold = np.sort(np.random.default_rng(cold_seed).choice(items, size=count, replace=False)) if count else items[:0]
    return AccuracySplit(imported=imported[~imported["item_id"].isin(cold)], removed=removed, cold_items=cold)


def remove_last_interactions(interactions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every interaction but each user's last, those last ones): by time, ties broken by item id."""
    ordered = interactions.sort_values(["user_id", "occurred_at", "item_id"], kind="stable")
    last = ordered.groupby("user_id", sort=False).tail(1)
    return ordered.drop(last.index).sort_values("occurred_at", kind="stable"), last


@dataclass(frozen=True)
class Ablation:
    name: str
    change: str  # what differs from the default recipe
    overrides: dict[str, Any]
    warm_start: bool = False  # from a champion trained on the snapshot without its newest events


# A plain SASRec (Kang & McAuley, 2018) in this code: id embeddings only, full-softmax cross-entropy
# (as in SASRec+, Klenitskiy & Vasilev 2023), a constant learning rate, the same windows every epoch, trained
# until 10 epochs pass without a better validation NDCG@10.
PLAIN_SASREC = {"item_text": False, "loss": "softmax", "lr_schedule": "constant", "shift_windows": False,
                "patience": 10, "epochs": 400, "train_time_budget_seconds": 604_800.0}
# What a training.json (TrainResult) says about how training went, as the accuracy report shows it.
TRAINING_FIELDS = ("loss", "epochs", "best_epoch", "kept_epochs", "planned_epochs", "scheduled_epochs",
                   "annealed_at_epoch", "stopped_by", "still_improving", "validation_ndcg", "seconds", "loop_seconds",
                   "tokens_per_s", "warm_started_items")
WARM_START_NEW_SHARE = 0.1  # the champion of the warm-start ablation has not seen the newest 10% of events


def ablations(n_items: int, config: PipelineConfig) -> list[Ablation]:
    chosen = "sampled" if n_items >= config.sampled_loss_min_items else "softmax"
    other = "softmax" if chosen == "sampled" else "sampled"
    swapped_loss = [Ablation(f"{other} loss", f"loss={other} instead of {chosen}", {"loss": other})]
    if other == "sampled":  # the same training time: a sampled epoch costs about a third of an exact one
        swapped_loss.append(Ablation("sampled loss, 3x epochs", "loss=sampled, up to 3x the epochs",
                                     {"loss": "sampled", "epochs": 3 * config.epochs}))
    return [
        Ablation("default recipe", f"the default settings ({chosen} loss at {n_items:,} items)", {}),
        Ablation("no item text", "item vectors are id embeddings only", {"item_text": False}),
        *swapped_loss,
        Ablation("constant LR", "no warm-up or cosine decay", {"lr_schedule": "constant"}),
        Ablation("fixed windows", "long histories cut at the same places every epoch", {"shift_windows": False}),
        Ablation("plain SASRec", "no text, exact softmax, constant LR, patience 10", PLAIN_SASREC),
        Ablation("warm start", f"warm-started from a champion trained without the newest "
                 f"{WARM_START_NEW_SHARE:.0%} of events", {}, warm_start=True),
    ]


def run_ablations(snapshot: pd.DataFrame, catalog: pd.DataFrame, holdout: gate.Holdout, home: Path,
                  conf: dict[str, Any] | None = None) -> tuple[dict[str, dict[int, np.ndarray]], list[dict[str, Any]]]:
    """Train, export and score each ablation on `snapshot` (each one's change on top of `conf`): (top-10 lists
    by name, training records)."""
    from recmodel.export import export
    from recmodel.artifacts import load_vocab, open_session
    from recmodel.train import train

    cache = home / "cache"
    champion_dir = None
    recommended, records = {}, []
    base = PipelineConfig.from_overrides(conf)
    for ablation in ablations(int(catalog["item_id"].nunique()), base):
        config = PipelineConfig.from_overrides({**(conf or {}), **ablation.overrides})
        if ablation.warm_start:
            champion_dir = home / "ablation-champion"
            cutoff = snapshot["occurred_at"].quantile(1 - WARM_START_NEW_SHARE)
            train(snapshot[snapshot["occurred_at"] < cutoff], catalog, config=config, out_dir=champion_dir,
                  cache_dir=cache)
        console.print(f"ablation [bold]{ablation.name}[/bold]: {ablation.change}")
        model_dir = home / f"ablation-{len(records)}"
        trained = train(snapshot, catalog, config=config, out_dir=model_dir, cache_dir=cache,
                        parent_dir=champion_dir if ablation.warm_start else None)
        exported = export(model_dir, catalog, snapshot, top_k=K)
        session, _ = open_session(Path(exported.onnx_path))
        recommended[ablation.name] = gate.onnx_recommendations(session, load_vocab(model_dir), holdout)
        records.append({"name": ablation.name, "change": ablation.change, "overrides": ablation.overrides,
                        **{key: getattr(trained, key) for key in TRAINING_FIELDS},
                        "curve": [asdict(epoch) for epoch in trained.curve]})
    return recommended, records


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Validation NDCG@10 per epoch and per second of training, one line per ablation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for record in records:
        epochs = [point["epoch"] for point in record["curve"]]
        ndcg = [point["validation_ndcg"] for point in record["curve"]]
        seconds = [point["seconds"] for point in record["curve"]]
        line, = by_epoch.plot(epochs, ndcg, label=record["name"], linewidth=1.5)
        by_time.plot(seconds, ndcg, color=line.get_color(), linewidth=1.5)
        by_epoch.plot([record["best_epoch"]], [record["validation_ndcg"]], "o", color=line.get_color())
    by_epoch.set(xlabel="epoch", ylabel="validation NDCG@10 (each user's last training item)")
    by_time.set(xlabel="seconds of training (validation included)")
    by_epoch.legend(fontsize=8)
    for axis in (by_epoch, by_time):
        axis.grid(alpha=0.3)
    figure.suptitle("ablations on the same snapshot; a dot marks the epoch whose weights are kept")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_training_curves(seeds: list[int], trainings: list[dict[str, Any]], path: Path) -> None:
    """Each seed's gated training: validation NDCG@10 per epoch, the mean early stopping follows, the epochs
    whose weights were averaged into the kept model, and the learning rate."""
    import matplotlib

    from recmodel.train import epoch_span

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(seeds), figsize=(5 * len(seeds), 4.2), sharey=True, squeeze=False)
    for axis, seed, training in zip(axes[0], seeds, trainings):
        curve = training["curve"]
        epochs = [point["epoch"] for point in curve]
        ndcg = np.array([point["validation_ndcg"] for point in curve])
        window = max(len(training.get("kept_epochs") or [1]), 1)
        mean = [ndcg[max(i - window + 1, 0):i + 1].mean() for i in range(len(ndcg))]
        axis.plot(epochs, ndcg, color="tab:blue", alpha=0.45, linewidth=1, label="validation NDCG@10, per epoch")
        axis.plot(epochs, mean, color="tab:blue", linewidth=2, label=f"mean of the last {window} (early stopping)")
        kept = training.get("kept_epochs") or [training["best_epoch"]]
        axis.axvspan(kept[0] - 0.5, kept[-1] + 0.5, color="tab:green", alpha=0.2,
                     label=f"kept: average of epochs {epoch_span(kept)}")
        if training.get("annealed_at_epoch"):
            axis.axvline(training["annealed_at_epoch"], color="tab:red", linestyle="--", linewidth=1,
                         label="plateau: the final decay starts")
        rate = axis.twinx()
        rate.plot(epochs, [point["learning_rate"] for point in curve], color="tab:gray", linestyle=":", linewidth=1)
        rate.set_ylabel("learning rate (dotted)", color="tab:gray")
        axis.set(xlabel="epoch", title=f"seed {seed}: {training['epochs']} epochs, {training['stopped_by']}")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation NDCG@10 (each user's last training item)")
    axes[0][0].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_accuracy(folder: Path, *, output: Path | None, with_ablations: bool = False,
                 curves: Path | None = None, cold_share: float = 0.0, cold_seed: int = 0,
                 placeholders: bool = False, conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """Import `folder` minus each user's last rating (and every interaction of `cold_share` of the items;
    with `placeholders`, titles "Product <id>" and no other text), run one retrain (default settings, or
    those `conf` changes, as `retrain --conf` takes them), score what it published."""
    from recmodel.bench import retrain_through_airflow, scratch_database
    from recmodel.data import vocab_text_matrix
    from recmodel.importers import import_frames, read_movielens

    started = time.perf_counter()
    items, interactions = read_movielens(folder)
    if placeholders:
        items = placeholder_titles(items)
    parts = split_for_accuracy(interactions, cold_share, cold_seed)
    imported, removed, cold_items, interactions = parts.imported, parts.removed, parts.cold_items, parts.interactions
    if len(cold_items):
        console.print(f"{len(cold_items):,} items ({cold_share:.0%}, seed {cold_seed}) made cold: every interaction "
                      f"of theirs removed, {removed['item_id'].isin(cold_items).sum():,} users' removed item is one")
    server_url = db.resolve_url(settings())
    with tempfile.TemporaryDirectory(prefix="recsys-accuracy-") as scratch, \
            scratch_database(server_url, ACCURACY_DB) as url, \
            scratch_database(server_url, ACCURACY_AIRFLOW_DB, migrate=False) as airflow_url:
        import_frames(url, items, imported, "movielens minus each user's last rating")
        settings_note = f"settings {conf}" if conf else "default settings"
        console.print(f"imported {len(imported):,} of {len(interactions):,} ratings; one retrain ({settings_note}) "
                      "through Airflow …")
        outcome, retrain_seconds = retrain_through_airflow(url, airflow_url, Path(scratch) / "home", conf or {})
        with db.connect(url) as conn:
            served = pd.DataFrame(conn.execute(SELECT_SERVED).fetchall(), columns=["user_id", "item_id", "served_by"])
            serving = conn.cursor(row_factory=dict_row).execute(SELECT_SERVING_MODEL).fetchone()
            similar = pd.DataFrame(conn.execute(SELECT_SIMILAR).fetchall(), columns=["item_id", "similar_item_id"])
        snapshot = pd.read_parquet(serving["dataset_path"])
        vocab = Vocab.from_catalog(items["item_id"].to_numpy())
        split = split_leave_last_out(interactions, vocab)
        # Every model is scored on the same users: those with a test item and a history in the snapshot.
        in_snapshot = set(snapshot["user_id"].unique().tolist())
        split = replace(split, users=[u for u in split.users if u in in_snapshot])
        targets = {u: {int(vocab.item_ids[split.test[u]])} for u in split.users}
        view = {int(u): g.to_numpy(np.int64) for u, g in served.groupby("user_id")["item_id"]}  # in rank order
        recommended = {"published view": view}
        recommended.update(_lineage_models(serving, snapshot, targets))
        published_training = _gated_training(serving)
        tuned_text = _tuned_text_matrix(serving, published_training, vocab)  # read before the scratch home goes
        stats = gate.catalog_stats(imported["item_id"].to_numpy(), items["item_id"].to_numpy())
        cold_users = gate.cold_users(_holdout(snapshot, targets).histories)
        tradeoff = tail_boost_curve(serving, snapshot, targets, stats, items["item_id"].to_numpy(), cold_users)
        catalog = items.assign(active=items["active"].fillna(True))
        text_matrix = vocab_text_matrix(vocab, catalog, Path(scratch) / "home" / "cache")
        agreement = neighbours_agreement(similar, imported, text_matrix, vocab)
        ablation_records: list[dict[str, Any]] = []
        if with_ablations:
            by_ablation, ablation_records = run_ablations(snapshot, catalog, _holdout(snapshot, targets),
                                                          Path(scratch) / "home", conf)
            recommended.update({f"ablation: {name}": recs for name, recs in by_ablation.items()})
    history_matrix = _matrix(split, True)
    padding = _padding_mask(vocab)
    fitted = tune_baselines(split)
    fitted["text only"] = baselines.fit_text_centroid(text_matrix)
    if tuned_text is not None:  # the same reference through the encoder the retrain fine-tuned
        fitted["text only (tuned encoder)"] = baselines.fit_text_centroid(tuned_text)
    for name, baseline in fitted.items():
        top = baselines.top_k(baseline, history_matrix, K, padding)
        recommended[name] = {u: vocab.item_ids[top[row]] for row, u in enumerate(split.users)}
    evaluations = {name: gate.evaluate_lists(recs, targets, stats, K, cold=cold_users)
                   for name, recs in recommended.items()}
    result = _summarise(evaluations, fitted, split, removed, served, serving, outcome.task_seconds,
                        retrain_seconds, time.perf_counter() - started)
    result["catalog_text"] = "placeholder titles (Product <id>), no description or tags" if placeholders else "as given"
    result["similar_items"] = agreement
    result["cold_items"] = {"share": cold_share, "seed": cold_seed, "items": len(cold_items),
                            "users": int(removed["item_id"].isin(cold_items).sum()),
                            "served_slot_share": float(served["item_id"].isin(cold_items).mean()),
                            "served_items": int(served.loc[served["item_id"].isin(cold_items), "item_id"].nunique()),
                            "new_item_slot_share": float(served["item_id"].isin(stats.new_items).mean())}
    result["tail_boost_curve"] = tradeoff
    if ablation_records:
        result["ablations"] = ablation_records
    result["published_training"] = published_training
    result["conf"] = conf or {}
    _print(result)
    if curves and ablation_records:
        plot_curves(ablation_records, curves)
        console.print(f"wrote {curves}")
    if output:
        from recmodel.bench import device_name

        output.write_text(json.dumps({"device": device_name(), "accuracy": result}, indent=2, default=str))
        console.print(f"wrote {output}")
    return result


SEED_METRICS = ("ndcg@10", "hr@10", "cold_item_ndcg@10", "warm_item_ndcg@10")


def run_accuracy_over_seeds(folder: Path, seeds: list[int], *, output: Path | None, conf: dict[str, Any] | None = None,
                            curves: Path | None = None, **options: Any) -> dict[str, Any]:
    """`run_accuracy` once per training seed, then the published view's mean and t interval over the seeds.

    The split, the references and EASE do not depend on the seed; the retrain (its initialisation, its
    validation users, its batches) does, and moves NDCG@10 on ml-latest-small by about ±0.007: as much as
    most single-run differences, which is why defaults are judged on several seeds.
    """
    runs = []
    for seed in seeds:
        console.rule(f"seed {seed}")
        runs.append(run_accuracy(folder, output=None, conf={**(conf or {}), "seed": seed}, **options))
    summary = seed_summary(seeds, runs)
    _print_seeds(summary)
    trainings = [run.get("published_training") for run in runs]
    if curves and all(trainings):
        plot_training_curves(seeds, trainings, curves)
        console.print(f"wrote {curves}")
    if output:
        from recmodel.bench import device_name

        output.write_text(json.dumps({"device": device_name(), "over_seeds": summary, "runs": runs}, indent=2,
                                     default=str))
        console.print(f"wrote {output}")
    return summary


def seed_summary(seeds: list[int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per seed, the published view's figures and how its training ended; over seeds, each metric's mean with
    a 95% t interval (none from one seed), and the mean ratio to EASE (which has no seed)."""
    from scipy import stats

    rows = []
    for seed, run in zip(seeds, runs):
        published, training = run["models"]["published view"], run.get("published_training") or {}
        rows.append({"seed": seed, **{metric: published[metric] for metric in SEED_METRICS},
                     "ease_ndcg@10": run["models"]["ease"]["ndcg@10"],
                     "gated_ndcg@10": run["models"].get("gated model", {}).get("ndcg@10"),
                     "epochs": training.get("epochs"), "best_epoch": training.get("best_epoch"),
                     "kept_epochs": training.get("kept_epochs"), "stopped_by": training.get("stopped_by"),
                     "retrain_seconds": run["retrain_seconds"]})
    means: dict[str, Any] = {}
    for metric in (*SEED_METRICS, "ease_ndcg@10", "gated_ndcg@10"):
        if any(row[metric] is None for row in rows):
            continue
        values = np.array([row[metric] for row in rows], dtype=np.float64)
        mean = float(values.mean())
        half = (float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
                if len(values) > 1 else None)
        means[metric] = {"mean": mean, "ci": None if half is None else [mean - half, mean + half]}
    ratio = means["ndcg@10"]["mean"] / means["ease_ndcg@10"]["mean"] if means["ease_ndcg@10"]["mean"] else None
    return {"seeds": seeds, "runs": rows, "published_view": means, "ndcg@10_ratio_to_ease": ratio}


def _print_seeds(summary: dict[str, Any]) -> None:
    from recmodel.train import epoch_span

    table = Table(title=f"published view over seeds {', '.join(map(str, summary['seeds']))}")
    for column in ("seed", "NDCG@10", "HR@10", "new items NDCG@10", "warm items NDCG@10", "EASE NDCG@10", "epochs",
                   "retrain"):
        table.add_column(column, justify="right")
    for row in summary["runs"]:
        table.add_row(str(row["seed"]), *(f"{row[m]:.4f}" for m in (*SEED_METRICS, "ease_ndcg@10")),
                      f"{row['epochs']} (kept {epoch_span(row.get('kept_epochs') or [row['best_epoch']])}, "
                      f"{row['stopped_by']})" if row["epochs"] else "-",
                      f"{row['retrain_seconds']:.0f} s")
    cells = []
    for metric in (*SEED_METRICS, "ease_ndcg@10"):
        figure = summary["published_view"][metric]
        ci = figure["ci"]
        cells.append(f"{figure['mean']:.4f}" + ("" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]"))
    table.add_row("mean [95% t]", *cells, "", "")
    console.print(table)
    if summary["ndcg@10_ratio_to_ease"] is not None:
        console.print(f"mean NDCG@10 over seeds / EASE: {summary['ndcg@10_ratio_to_ease']:.2f}x")


def _lineage_models(serving: dict[str, Any], snapshot: pd.DataFrame,
                    targets: dict[int, set[int]]) -> dict[str, dict[int, np.ndarray]]:
    """Top-10 of the run's gated model and of its refit (the registry's lineage), from each ONNX file."""
    from recmodel.artifacts import load_vocab, open_session

    lineage = serving["lineage"] or {}
    holdout = _holdout(snapshot, targets)
    out = {}
    for name in ("gated", "refit"):
        if name in lineage:
            session, _ = open_session(Path(lineage[name]["onnx_path"]))
            out[f"{name} model"] = gate.onnx_recommendations(session, load_vocab(Path(lineage[name]["artifact_dir"])),
                                                             holdout)
    return out


def tail_boost_curve(serving: dict[str, Any], snapshot: pd.DataFrame, targets: dict[int, set[int]],
                     stats: gate.CatalogStats, item_ids: np.ndarray, cold_users: frozenset[int]) -> list[dict[str, Any]]:
    """The serving model's top-10 for the evaluated users re-ranked with each of TAIL_BOOSTS, as scoring
    re-ranks with `tail_boost`: accuracy against coverage, tail share and novelty (empty for a baseline)."""
    from recmodel import longtail
    from recmodel.artifacts import load_vocab, open_session

    if serving["kind"] != "model":
        return []
    session, _ = open_session(Path(serving["onnx_path"]))
    vocab = load_vocab(Path(serving["artifact_dir"]))
    holdout = _holdout(snapshot, targets)
    curve = []
    for boost in TAIL_BOOSTS:
        lists = gate.onnx_recommendations(session, vocab, holdout, tail=longtail.TailBoost.of(boost, snapshot, vocab))
        evaluation = gate.summarize(gate.evaluate_lists(lists, targets, stats, K, cold=cold_users), K)
        slots = pd.DataFrame({"item_id": np.concatenate([lists[u][:K] for u in targets])})
        novelty = longtail.measure(slots.assign(user_id=0), snapshot, item_ids).novelty
        curve.append({"tail_boost": boost, **{name: evaluation[name] for name in (
            f"ndcg@{K}", f"ndcg@{K}_ci", f"hr@{K}", f"coverage@{K}", f"tail_share@{K}", f"new_item_share@{K}",
            f"cold_item_ndcg@{K}", f"cold_item_hr@{K}", f"warm_item_ndcg@{K}")}, "novelty": novelty})
    return curve


def _gated_training(serving: dict[str, Any]) -> dict[str, Any] | None:
    """How the published run's gated model trained (epochs, stop reason, curve), from its training.json."""
    from recmodel.artifacts import training_summary

    gated = (serving["lineage"] or {}).get("gated")
    if gated is None:
        return None
    summary = training_summary(Path(gated["artifact_dir"]))
    return {key: summary.get(key) for key in (*TRAINING_FIELDS, "curve", "text_encoder")}


def _tuned_text_matrix(serving: dict[str, Any], gated_training: dict[str, Any] | None,
                       vocab: Vocab) -> np.ndarray | None:
    """The text embeddings the published model read, when its retrain fine-tuned the encoder
    (`gated_training`: what `_gated_training` read of it)."""
    from recmodel.artifacts import load_weights

    if not (gated_training or {}).get("text_encoder"):
        return None
    gated = serving["lineage"]["gated"]  # there is a gated model: it has a training record
    _, state, model_vocab = load_weights(Path(gated["artifact_dir"]))
    if not np.array_equal(model_vocab.item_ids, vocab.item_ids):
        raise RuntimeError("the published model's vocabulary is not the benchmark's catalog")
    return state["text_matrix"].numpy()


def _holdout(snapshot: pd.DataFrame, targets: dict[int, set[int]]) -> gate.Holdout:
    """Each evaluated user's whole snapshot history (time order) and removed item."""
    ordered = snapshot.sort_values(["user_id", "occurred_at", "event_id"], kind="stable")
    histories = {int(u): g.to_numpy(np.int64) for u, g in ordered.groupby("user_id", sort=False)["item_id"]}
    return gate.Holdout(histories=histories, targets=targets)


def _summarise(evaluations: dict[str, dict[str, Any]], fitted: dict[str, baselines.FittedBaseline],
               split: LeaveLastOut, removed: pd.DataFrame, served: pd.DataFrame, serving: dict[str, Any],
               task_seconds: dict[str, float], retrain_seconds: float, seconds: float) -> dict[str, Any]:
    reference = evaluations["published view"]
    models: dict[str, Any] = {}
    for name, evaluation in evaluations.items():
        row = gate.summarize(evaluation, K)
        if name != "published view":
            for metric in (f"ndcg@{K}", f"hr@{K}"):
                ratio, low, high = gate.paired_ratio(reference, evaluation, metric)
                row[f"model_ratio_{metric}"], row[f"model_ratio_{metric}_ci"] = ratio, [low, high]
        if name in fitted:
            row["params"] = fitted[name].params
        models[name] = row
    refit_gain = None
    if "gated model" in evaluations and "refit model" in evaluations:
        ratio, low, high = gate.paired_ratio(evaluations["refit model"], evaluations["gated model"], f"ndcg@{K}")
        refit_gain = {"ndcg@10_ratio": ratio, "ci": [low, high]}
    users = int(removed["user_id"].nunique())
    return {"protocol": "each user's last rating removed, the rest imported, one retrain through Airflow (default "
                        "settings but those in `conf`); "
                        "the published view scored on the removed items (full ranking, seen excluded, K=10)",
            "users": users, "evaluated_users": len(split.users), "items": len(split.vocab) - 1,
            "served_users": int(served["user_id"].nunique()),
            "served_share": round(served["user_id"].nunique() / max(users, 1), 4),
            "served_by": sorted(served["served_by"].unique().tolist()), "version": serving["version"],
            "holdout": serving["holdout"], "defaults": _default_settings(), "models": models,
            "refit_gain": refit_gain, "retrain_seconds": round(retrain_seconds, 1),
            "task_seconds": {k: round(v, 1) for k, v in task_seconds.items()}, "seconds": round(seconds, 1)}


def _default_settings() -> dict[str, Any]:
    config = PipelineConfig()
    return {k: getattr(config, k) for k in ("d_model", "n_layers", "dropout", "max_history", "epochs", "patience",
                                            "batch_size", "learning_rate", "refit_epochs", "gate_min_users")}


def _ci_text(row: dict[str, Any], metric: str) -> str:
    low, high = row[f"{metric}_ci"]
    return f"{row[metric]:.4f} [{low:.4f}, {high:.4f}]"


def _ratio_text(row: dict[str, Any], metric: str) -> str:
    low, high = row[f"model_ratio_{metric}_ci"]
    return f"{row[f'model_ratio_{metric}']:.2f}x [{low:.2f}, {high:.2f}]"


def _slice_text(row: dict[str, Any], name: str) -> str:
    users = int(row[f"{name}_users"])
    if not users:
        return "-"
    low, high = row[f"{name}_ndcg@{K}_ci"]
    return f"{row[f'{name}_ndcg@{K}']:.4f} [{low:.4f}, {high:.4f}] / {row[f'{name}_hr@{K}']:.3f}"


def _print_slices(result: dict[str, Any]) -> None:
    first = next(iter(result["models"].values()))
    table = Table(title="by slice: NDCG@10 [95% CI] / HR@10; users: " + ", ".join(
        f"{name} {int(first[f'{name}_users']):,}" for name in gate.SLICES))
    table.add_column("model")
    for name in gate.SLICES:
        table.add_column(name.replace("_", " "), justify="right")
    for model, row in result["models"].items():
        table.add_row(model, *(_slice_text(row, name) for name in gate.SLICES))
    console.print(table)
    agreement = result["similar_items"]
    console.print(f"similar items ({agreement['items']:,} items probed, catalog text {result['catalog_text']}): "
                  f"{agreement['cooccurrence_overlap']:.1%} of each list are co-occurrence neighbours, "
                  f"{agreement['text_overlap']:.1%} text neighbours")
    cold = result.get("cold_items") or {}
    if cold.get("items"):
        console.print(f"{cold['items']:,} items made cold ({cold['users']:,} users' removed item): "
                      f"{cold['served_slot_share']:.2%} of the published slots, {cold['served_items']:,} distinct items")


def _print(result: dict[str, Any]) -> None:
    table = Table(title=f"accuracy: {result['evaluated_users']} users, {result['items']} items; {result['protocol']}")
    for column in ("model", "NDCG@10 [95% CI]", "HR@10 [95% CI]", "MRR@10", "cov@10", "tail", "new slots",
                   "published/this NDCG [CI]", "published/this HR [CI]"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, row in result["models"].items():
        ratios = ("-", "-") if name == "published view" else (_ratio_text(row, "ndcg@10"), _ratio_text(row, "hr@10"))
        table.add_row(name, _ci_text(row, "ndcg@10"), _ci_text(row, "hr@10"), f"{row['mrr@10']:.4f}",
                      f"{row['coverage@10']:.3f}", f"{row['tail_share@10']:.2f}", f"{row['new_item_share@10']:.3f}", *ratios)
    console.print(table)
    _print_slices(result)
    console.print(f"published {result['version']} (served_by {', '.join(result['served_by'])}): "
                  f"{result['served_users']:,} of {result['users']:,} users served ({result['served_share']:.1%}); "
                  f"default settings {result['defaults']}")
    if result["refit_gain"]:
        low, high = result["refit_gain"]["ci"]
        gain = result["refit_gain"]["ndcg@10_ratio"]
        console.print(f"refit vs gated model (NDCG@10 on the removed items): {gain:.2f}x "
                      f"[{low:.2f}, {high:.2f}]")
    if result["tail_boost_curve"]:
        curve = Table(title="tail_boost: the serving model's top-10 re-ranked (accuracy vs long tail)")
        for column in ("tail_boost", "NDCG@10 [95% CI]", "HR@10", "coverage@10", "tail share@10", "new-item slots",
                       "new-item NDCG@10", "novelty (bits)"):
            curve.add_column(column, justify="right")
        for point in result["tail_boost_curve"]:
            curve.add_row(f"{point['tail_boost']:g}", _ci_text(point, "ndcg@10"), f"{point['hr@10']:.4f}",
                          f"{point['coverage@10']:.3f}", f"{point['tail_share@10']:.3f}",
                          f"{point['new_item_share@10']:.3f}", f"{point['cold_item_ndcg@10']:.4f}",
                          f"{point['novelty']:.2f}")
        console.print(curve)
    encoder = (result["published_training"] or {}).get("text_encoder")
    if encoder:
        console.print(f"text encoder fine-tuned for {encoder['steps']} steps on {encoder['pairs']:,} consecutive pairs "
                      f"in {encoder['seconds']:.0f} s")
    if result["conf"]:
        console.print(f"settings changed for this retrain: {result['conf']}")
    console.print(f"retrain {result['retrain_seconds']:.0f} s ({result['task_seconds']}); "
                  f"{result['seconds']:.0f} s in all")
