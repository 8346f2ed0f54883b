"""`python -m recmodel bench accuracy --movielens DIR`: the model against classical baselines.

Protocol (leave-last-out): every rating is an interaction; each user's interactions are ordered
by time, ties broken by item id; the last one is the test target, the second-to-last the
validation target, the rest is training data. Every model ranks the full catalog with the
user's earlier items masked; metrics are NDCG@10, HR@10, MRR@10, coverage@10, the share of
recommendations outside the 20% most popular items and a cold-item slice, with 95% bootstrap
intervals over users and paired intervals for the ratios.

The data goes through the real pipeline: imported into a scratch database, extracted and
validated by the same code as a DAG run; the model is trained by `recmodel.train`, exported by
`recmodel.export` and scored through ONNX Runtime by `recmodel.gate`. Hyperparameters are chosen
on the validation targets within a time budget: the model's from a small generic grid with
early stopping, EASE's λ and item-kNN's neighbourhood size from short lists. Baselines are then
refit on training + validation data; the model keeps its early-stopped weights and reads the
validation item as history.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import torch
from psycopg import sql
from rich.console import Console
from rich.table import Table

from recmodel import baselines, db, gate
from recmodel.config import PipelineConfig, settings
from recmodel.data import Vocab, vocab_text_matrix
from recmodel.extract import extract, read_catalog, read_interactions
from recmodel.train import Validation, fit_sequences, pick_device, save_model

log = logging.getLogger(__name__)
console = Console(width=None if sys.stdout.isatty() else 160)  # the table stays readable when piped

ACCURACY_DB = "recsys_bench_accuracy"
# Generic search space, tried in order until the budget runs out; nothing here is tuned to a dataset.
MODEL_GRID: tuple[dict[str, Any], ...] = (
    {"d_model": 64, "dropout": 0.2},
    {"d_model": 64, "dropout": 0.2, "batch_size": 32, "learning_rate": 1e-3},
    {"d_model": 64, "dropout": 0.5},
)
EASE_L2 = (5.0, 20.0, 50.0, 200.0, 1000.0)
KNN_NEIGHBOURS = (20, 50, 200)
K = 10


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


def load_through_pipeline(folder: Path, home: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Import `folder` into a scratch database, then extract and validate it like a DAG run."""
    from recmodel.importers import import_movielens
    from recmodel.validate import DataValidationError, validate_increment

    server_url = db.resolve_url(settings())
    db.ensure_database(server_url, ACCURACY_DB)
    url = db.with_database(server_url, ACCURACY_DB)
    try:
        db.migrate(url)
        import_movielens(url, folder)
        as_of = datetime.now(timezone.utc).replace(microsecond=0)
        extracted = extract(url, "bench-accuracy", as_of, home / "run", lookback=timedelta(0))
        increment, catalog = read_interactions(extracted.increment_path), read_catalog(extracted.catalog_path)
        report = validate_increment(increment, catalog["item_id"].to_numpy(), as_of=as_of,
                                    config=PipelineConfig(event_types=("rating",), value_min=0.0, value_max=5.0),
                                    gx_dir=home / "gx", run_key="bench-accuracy")
        if not report.passed:
            raise DataValidationError("; ".join(report.dataset_failures))
        log.info("pipeline: %d interactions extracted, %d clean, %d quarantined", len(increment), len(report.clean),
                 report.quarantined["event_id"].nunique())
        return report.clean, catalog
    finally:
        with psycopg.connect(db.libpq_url(server_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(ACCURACY_DB)))


def tune_model(split: LeaveLastOut, text_matrix: torch.Tensor, base: PipelineConfig,
               budget_seconds: float) -> tuple[Any, PipelineConfig, list[dict[str, Any]]]:
    """Fit each grid point with early stopping on the validation targets; keep the best."""
    validation = Validation(histories=[split.train[u] for u in split.users],
                            targets=np.array([split.validation[u] for u in split.users], dtype=np.int64))
    started = time.perf_counter()
    trials: list[dict[str, Any]] = []
    best: tuple[float, Any, PipelineConfig] | None = None
    for point in MODEL_GRID:
        if trials and time.perf_counter() - started > budget_seconds:
            log.info("tuning budget of %.0f s spent after %d of %d configurations", budget_seconds, len(trials),
                     len(MODEL_GRID))
            break
        config = replace(base, **point)
        trial_started = time.perf_counter()
        model, fit = fit_sequences(split.train, split.vocab, text_matrix, config, validation)
        trials.append({**point, "validation_ndcg@10": round(fit.validation_ndcg, 4), "best_epoch": fit.best_epoch,
                       "epochs": fit.epochs, "seconds": round(time.perf_counter() - trial_started, 1)})
        log.info("model %s: validation NDCG@10 %.4f (epoch %d)", point, fit.validation_ndcg, fit.best_epoch)
        if best is None or fit.validation_ndcg > best[0]:
            best = (fit.validation_ndcg, model, config)
    assert best is not None
    return best[1], best[2], trials


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


def run_accuracy(folder: Path, *, output: Path | None, budget_seconds: float = 900.0) -> dict[str, Any]:
    from recmodel.export import export
    from recmodel.score import open_session

    started = time.perf_counter()
    home = settings().home
    with tempfile.TemporaryDirectory(prefix="recsys-accuracy-") as scratch:
        work = Path(scratch)
        dataset, catalog = load_through_pipeline(folder, work)
        vocab = Vocab.from_catalog(catalog["item_id"].to_numpy())
        split = split_leave_last_out(dataset, vocab)
        text_matrix = torch.from_numpy(vocab_text_matrix(vocab, catalog, home / "cache"))
        model, config, trials = tune_model(split, text_matrix, PipelineConfig(), budget_seconds)
        save_model(model, vocab, work / "model")
        exported = export(work / "model", catalog, dataset, top_k=K, seed=config.seed)
        session, provider = open_session(Path(exported.onnx_path))
        histories = {u: vocab.item_ids[np.append(split.train[u], split.validation[u])] for u in split.users}
        targets = {u: {int(vocab.item_ids[split.test[u]])} for u in split.users}
        holdout = gate.Holdout(cutoff=pd.Timestamp.now(tz="UTC"), histories=histories, targets=targets)
        recommended = {"model": gate.onnx_recommendations(session, vocab, holdout)}
        fitted = tune_baselines(split)
        history_matrix = _matrix(split, True)
        padding = _padding_mask(vocab)
        for name, baseline in fitted.items():
            top = baselines.top_k(baseline, history_matrix, K, padding)
            recommended[name] = {u: vocab.item_ids[top[row]] for row, u in enumerate(split.users)}
    seen = np.concatenate(list(histories.values())) if histories else np.array([], dtype=np.int64)
    stats = gate.catalog_stats(seen, catalog["item_id"].to_numpy())
    evaluations = {name: gate.evaluate_lists(recs, targets, stats, K) for name, recs in recommended.items()}
    result = _summarise(evaluations, fitted, trials, config, split, provider, time.perf_counter() - started)
    _print(result)
    if output:
        output.write_text(json.dumps({"device": str(pick_device()), "accuracy": result}, indent=2))
        console.print(f"wrote {output}")
    return result


def _summarise(evaluations: dict[str, dict[str, Any]], fitted: dict[str, baselines.FittedBaseline],
               trials: list[dict[str, Any]], config: PipelineConfig, split: LeaveLastOut, provider: str,
               seconds: float) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for name, evaluation in evaluations.items():
        row = gate.summarize(evaluation, K)
        for metric in (f"ndcg@{K}", f"hr@{K}"):
            if name != "model":
                ratio, low, high = gate.paired_ratio(evaluations["model"], evaluation, metric)
                row[f"model_ratio_{metric}"], row[f"model_ratio_{metric}_ci"] = ratio, [low, high]
        if name in fitted:
            row["params"] = fitted[name].params
        models[name] = row
    models["model"]["params"] = {k: getattr(config, k) for k in ("d_model", "dropout", "n_layers", "max_history",
                                                                 "batch_size", "learning_rate")}
    return {"protocol": "leave-last-out (ties by item id), full ranking, K=10", "users": len(split.users),
            "items": len(split.vocab) - 1, "onnx_provider": provider, "models": models, "tuning": trials,
            "seconds": round(seconds, 1)}


def _print(result: dict[str, Any]) -> None:
    table = Table(title=f"accuracy, {result['protocol']}: {result['users']} users, {result['items']} items")
    for column in ("model", "NDCG@10 [95% CI]", "HR@10 [95% CI]", "MRR@10", "cov@10", "tail", "cold NDCG",
                   "model/this NDCG [CI]", "model/this HR [CI]"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for name, row in result["models"].items():
        def ci(metric: str) -> str:
            low, high = row[f"{metric}_ci"]
            return f"{row[metric]:.4f} [{low:.4f}, {high:.4f}]"

        def ratio(metric: str) -> str:
            if name == "model":
                return "-"
            low, high = row[f"model_ratio_{metric}_ci"]
            return f"{row[f'model_ratio_{metric}']:.2f}x [{low:.2f}, {high:.2f}]"

        table.add_row(name, ci("ndcg@10"), ci("hr@10"), f"{row['mrr@10']:.4f}", f"{row['coverage@10']:.3f}",
                      f"{row['tail_share@10']:.2f}", f"{row['cold_ndcg@10']:.4f}", ratio("ndcg@10"), ratio("hr@10"))
    console.print(table)
    console.print(f"model: {result['models']['model']['params']}; tuning: {result['tuning']}; "
                  f"{result['seconds']:.0f} s in all, ONNX Runtime {result['onnx_provider']}")
