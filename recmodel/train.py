"""Training: next-item prediction with softmax cross-entropy (exact, or sampled for large catalogs),
warm-started from the champion.

Inputs are the events to learn from (the snapshot minus the gate's holdout, or the whole
snapshot for the refit) and the catalog. Output is a model folder (weights, config, vocabulary)
that `export` turns into ONNX.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from recmodel.artifacts import SUMMARY_FILE, load_weights, save_model, training_summary
from recmodel.config import PipelineConfig
from recmodel.data import PAD, Vocab, item_text, pad_batch, training_windows, user_sequences, vocab_text_matrix, vocab_texts
from recmodel.model import CPU_TRAINING_ATTENTION, ModelConfig, SequentialRecommender, fill_cold_ids, warm_start
from recmodel.progress import Progress
from recmodel.textfinetune import TunedEncoder, ensure_tuned, read_tuned
from recmodel.textsignal import TextSignal, measure_text_signal

log = logging.getLogger(__name__)



LOGITS_BUDGET_BYTES = 1 << 30  # a batch whose (targets x items) logits exceed this is softmaxed in chunks


class ChunkedSoftmaxLoss(torch.autograd.Function):
    """Mean full-softmax cross-entropy of `hidden @ vectors.T` without holding all the logits.

    The plain loss keeps (N, n_items) logits, their log-softmax and their gradient: at 50k items
    and 12,800 target positions per batch that is 7.7 GB. Here forward keeps only each row's
    log-sum-exp and backward recomputes the logits `chunk` rows at a time, so memory is
    chunk x n_items for one extra matmul. Exact, not sampled. Computed in float32.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, hidden: torch.Tensor, vectors: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        lse = torch.empty(len(hidden), device=hidden.device)
        total = torch.zeros((), device=hidden.device)
        for start in range(0, len(hidden), chunk):
            rows = slice(start, start + chunk)
            logits = hidden[rows] @ vectors.T  # (chunk, n_items)
            lse[rows] = torch.logsumexp(logits, dim=1)
            total += (lse[rows] - logits.gather(1, targets[rows].unsqueeze(1)).squeeze(1)).sum()
        ctx.save_for_backward(hidden, vectors, targets, lse)
        ctx.chunk = chunk
        return total / len(hidden)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        hidden, vectors, targets, lse = ctx.saved_tensors
        grad_hidden, grad_vectors = torch.empty_like(hidden), torch.zeros_like(vectors)
        scale = grad / len(hidden)
        for start in range(0, len(hidden), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            probs = torch.exp(hidden[rows] @ vectors.T - lse[rows].unsqueeze(1))  # softmax, (chunk, n_items)
            probs[torch.arange(len(probs), device=probs.device), targets[rows]] -= 1.0
            probs *= scale
            grad_hidden[rows] = probs @ vectors
            grad_vectors += probs.T @ hidden[rows]
        return grad_hidden, grad_vectors, None, None


def next_item_loss(hidden: torch.Tensor, vectors: torch.Tensor, targets: torch.Tensor,
                   budget_bytes: int = LOGITS_BUDGET_BYTES) -> torch.Tensor:
    """Full-catalog softmax cross-entropy of each row of `hidden` (N, d) against its target item."""
    logits_bytes = 4 * len(hidden) * len(vectors)
    if logits_bytes <= budget_bytes:
        return torch.nn.functional.cross_entropy((hidden @ vectors.T).float(), targets)
    chunk = max(budget_bytes // (12 * len(vectors)), 1)  # logits, softmax and a temporary per chunk row
    return ChunkedSoftmaxLoss.apply(hidden, vectors, targets, chunk)


class ExactSoftmax:
    """Next-item cross-entropy over the whole catalog: every item that is a target somewhere in the training
    data is a negative at every position.

    Its cost grows with the catalog (a (positions x items) matmul forward and two backward), so
    it is the loss for small catalogs, where it is also the most accurate. The padding item is
    not a class, and neither is an item no training sequence leads to: the data says nothing against it,
    and pushing it down as a negative would bury every new item below the whole catalog. Training leaves
    such an item's id embedding as it started (zero, or the champion's); its text decides its rank.
    """

    name = "softmax"

    def __init__(self, positives: torch.Tensor) -> None:
        learned = positives > 0
        learned[PAD] = False
        self.classes = torch.nonzero(learned).squeeze(1)  # vocabulary indices
        self.class_of = torch.full((len(positives),), -1, dtype=torch.long)
        self.class_of[self.classes] = torch.arange(len(self.classes))

    def __call__(self, model: SequentialRecommender, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.classes.device != history.device:
            self.classes, self.class_of = self.classes.to(history.device), self.class_of.to(history.device)
        vectors = model.item_vectors()
        hidden = model(history, vectors)  # (B, T, d)
        positions = targets != PAD
        return next_item_loss(hidden[positions], vectors[self.classes], self.class_of[targets[positions]])


class SampledSoftmax:
    """Softmax cross-entropy against the target and `negatives` items shared by the whole batch.

    The softmax's denominator, sum_j exp(s_j) over the items that are targets somewhere in the training data
    (as in `ExactSoftmax`), is estimated by importance
    sampling: the target's own exp(s_t) plus, for each of K negatives drawn from q,
    exp(s_j) / (K q_j), i.e. each negative's logit corrected by -log(K q_j) (the logQ
    correction). The estimate is unbiased, so popular items, drawn often, are not over-penalised.
    q mixes uniform and popularity (half each): popular items are the hard negatives, uniform
    ones keep the tail ranked. A negative that is the row's own target is removed (it is in the
    denominator already). Only the item vectors the batch touches are computed.
    """

    name = "sampled"

    def __init__(self, positives: torch.Tensor, negatives: int, generator: torch.Generator,
                 popularity_share: float = 0.5) -> None:
        real = (positives > 0).double()  # items no sequence leads to are never drawn, nor is PAD
        real[PAD] = 0.0
        uniform = real / real.sum()
        counts = positives.double() * real
        popularity = counts / counts.sum() if counts.sum() > 0 else uniform
        q = (1 - popularity_share) * uniform + popularity_share * popularity
        self.q = q.float()
        self.cdf = torch.cumsum(q, dim=0)  # float64: inverse-CDF draws work at any catalog size
        self.log_expected = torch.log(negatives * self.q).clamp(min=-80.0)  # (n_items,); PAD is never drawn
        self.negatives = negatives
        self.generator = generator

    def draw(self, device: torch.device) -> torch.Tensor:
        """K items from q. PAD (q = 0, cdf[0] = 0) is never drawn: a draw u picks the first cdf > u."""
        u = torch.rand(self.negatives, generator=self.generator, dtype=torch.float64) * self.cdf[-1]
        drawn = torch.searchsorted(self.cdf, u, right=True).clamp(max=len(self.cdf) - 1)
        return drawn.to(device)

    def __call__(self, model: SequentialRecommender, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(model, history, targets, self.draw(history.device))

    def loss(self, model: SequentialRecommender, history: torch.Tensor, targets: torch.Tensor,
             sampled: torch.Tensor) -> torch.Tensor:
        """The loss against the negatives `sampled` (K,), drawn from `self.q`."""
        device = history.device
        if self.log_expected.device != device:
            self.log_expected = self.log_expected.to(device)
        positions = targets != PAD
        wanted = targets[positions]  # (N,)
        # Every item the batch touches, PAD first (unique sorts), so local index 0 stays padding.
        rows = torch.cat([torch.zeros(1, dtype=history.dtype, device=device), history.flatten(), wanted,
                          sampled]).unique()
        vectors = model.item_vectors(rows)  # (U, d)
        hidden = model(torch.searchsorted(rows, history), vectors)[positions]  # (N, d)
        # Logits in float32 even under autocast: target and negatives are compared at one precision.
        with torch.autocast(device_type=device.type, enabled=False):
            hidden, vectors = hidden.float(), vectors.float()
            target_logits = (hidden * vectors[torch.searchsorted(rows, wanted)]).sum(-1)  # (N,)
            negative_logits = hidden @ vectors[torch.searchsorted(rows, sampled)].T  # (N, K)
            negative_logits.sub_(self.log_expected[sampled]).masked_fill_(
                sampled.unsqueeze(0) == wanted.unsqueeze(1), float("-inf"))
            # log(exp(s_t) + estimated sum over the other items) - s_t
            return (torch.logaddexp(target_logits, torch.logsumexp(negative_logits, dim=1)) - target_logits).mean()


Loss = ExactSoftmax | SampledSoftmax


def choose_loss(config: PipelineConfig, positives: torch.Tensor, generator: torch.Generator) -> Loss:
    """`config.loss`, with "auto" meaning exact up to `sampled_loss_min_items` items and sampled above."""
    n_items = len(positives) - 1
    kind = config.loss
    if kind == "auto":
        kind = "sampled" if n_items >= config.sampled_loss_min_items else "softmax"
    if kind == "sampled" and config.negatives < n_items:
        return SampledSoftmax(positives, config.negatives, generator)
    return ExactSoftmax(positives)  # sampling as many negatives as there are items would only add noise


class TrainingError(RuntimeError):
    """Training cannot produce a model from this data."""


@dataclass(frozen=True)
class LoopStats:
    """Where the training loop's time went (validation excluded), for `bench` and the run record."""

    seconds: float
    input_seconds: float  # building batches and moving them to the device
    sequences: int  # training windows processed, all epochs together
    tokens: int  # next-item targets processed, all epochs together

    @property
    def sequences_per_s(self) -> float:
        return self.sequences / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def input_wait_share(self) -> float:
        """Share of the loop spent waiting on input rather than computing; low means no starvation."""
        return self.input_seconds / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of the loop, as the registry and `bench accuracy`'s curves show it."""

    epoch: int
    loss: float
    validation_ndcg: float | None  # None without a validation set (the refit)
    seconds: float  # cumulative, training and validation
    learning_rate: float  # at the epoch's end


@dataclass(frozen=True)
class TrainResult:
    model_dir: str
    device: str
    loss: str  # "softmax" (exact) or "sampled"
    precision: str  # "bfloat16" (autocast) or "float32"
    epochs: int  # epochs run (early stopping or the time budget may end before the planned epochs)
    best_epoch: int  # the last of `kept_epochs`
    stopped_by: str  # "early_stopping", "time_budget" or "epochs" (ran every planned epoch)
    still_improving: bool  # the last epoch was the best: more epochs would likely have helped
    validation_ndcg: float  # NDCG@10 of the kept weights on each user's last training item
    kept_epochs: list[int]  # the epochs whose weights were averaged into the kept model (CheckpointWindow)
    planned_epochs: int  # the epochs asked for
    scheduled_epochs: float  # where the learning-rate schedule ended up ending: < planned when the budget cut it
    annealed_at_epoch: int | None  # validation plateaued here with the learning rate still high: the decay began
    curve: list[EpochRecord]
    train_events: int
    train_windows: int
    n_items: int
    final_loss: float
    warm_started_items: int
    seconds: float
    text_seconds: float  # item text embeddings (zero when all came from the cache)
    loop_seconds: float
    sequences_per_s: float
    tokens_per_s: float
    input_wait_share: float
    # `recmodel.textsignal.TextSignal`: does the item text follow what users do? (None: item_text is off)
    text_signal: dict[str, Any] | None
    # `recmodel.textfinetune.TunedEncoder` when `text_finetune_steps` > 0 (None: the frozen MiniLM)
    text_encoder: dict[str, Any] | None = None


@dataclass(frozen=True)
class Validation:
    """Each user's last item, held out of training to choose the epoch (and hyperparameters)."""

    histories: list[np.ndarray]  # vocabulary indices before the target, time order
    targets: np.ndarray  # (n_users,) vocabulary index of the held-out item


@dataclass(frozen=True)
class FitResult:
    loss: str
    precision: str
    epochs: int
    best_epoch: int
    stopped_by: str
    validation_ndcg: float
    kept_epochs: list[int]
    planned_epochs: int
    scheduled_epochs: float
    annealed_at_epoch: int | None
    curve: list[EpochRecord]
    final_loss: float
    windows: int
    warm_started_items: int
    loop: LoopStats

    @property
    def still_improving(self) -> bool:
        return self.stopped_by != "early_stopping" and self.best_epoch == self.epochs and self.validation_ndcg > 0


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_threads(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may really use: its CPU affinity, capped by a cgroup v2 CPU quota.

    A container limited to 2 CPUs on a 64-core host still sees 64 cores; PyTorch would start 32+
    threads that then queue for the quota. The quota comes from /sys/fs/cgroup/cpu.max ("max" or
    "<quota> <period>").
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(math.ceil(int(quota) / int(period)), 1))
    except (OSError, ValueError):
        pass
    return cores


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast on CUDA; none on CPU.

    On this project's CPU worker (AMX and AVX512-BF16) CPU autocast measured 29.5k tokens/s
    against float32's 28.0k at 1M interactions / 50k items, within run-to-run noise, for more
    memory and coarser logits (docs/PERFORMANCE.md): the model's matmuls are too small to win.
    """
    return torch.bfloat16 if device.type == "cuda" else None


def hold_out_last(sequences: dict[int, np.ndarray], min_length: int = 3,
                  max_users: int = 5000, seed: int = 0) -> tuple[dict[int, np.ndarray], Validation]:
    """Split off the last item of sequences with >= min_length items (at most max_users of them)."""
    eligible = [u for u, s in sequences.items() if len(s) >= min_length]
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(eligible, size=min(max_users, len(eligible)), replace=False).tolist()) if eligible else set()
    train = {u: (s[:-1] if u in chosen else s) for u, s in sequences.items()}
    ordered = sorted((u for u in sequences if u in chosen), key=lambda u: len(sequences[u]))  # less padding
    return train, Validation(histories=[sequences[u][:-1] for u in ordered],
                             targets=np.array([sequences[u][-1] for u in ordered], dtype=np.int64))


def fit_sequences(sequences: dict[int, np.ndarray], vocab: Vocab, text_matrix: torch.Tensor, config: PipelineConfig,
                  validation: Validation | None, *, parent_dir: Path | None = None,
                  device: torch.device | None = None, epochs: int | None = None, text_informs: bool = True,
                  continuing: bool = False) -> tuple[SequentialRecommender, FitResult]:
    """Build the model (warm-started from `parent_dir` when compatible) and train it.

    After training, rarely-seen items borrow their text neighbours' id embeddings (`fill_cold_ids`),
    unless `text_informs` is False: neighbours by text that says nothing (`recmodel.textsignal`) are
    neighbours by title digits.

    Trains for `epochs` (default: `config.epochs` from scratch, `config.warm_start_epochs` from
    a parent) or until `config.train_time_budget_seconds` is spent. With a validation set, training also stops
    once the mean validation NDCG@10 of the last `config.checkpoint_window` epochs has not improved for
    `config.patience` epochs (never before `config.min_epochs`), and the average of the best window's weights
    is kept. `continuing` (the refit) trains on at the end of the decay (`_fit`).
    """
    torch.manual_seed(config.seed)
    transitions = [seq[1:] for seq in sequences.values() if len(seq) >= 2]
    if not transitions:
        raise TrainingError("no user has two or more interactions to learn from")
    model_config = ModelConfig(n_items=len(vocab), max_history=config.max_history, d_model=config.d_model,
                               n_layers=config.n_layers, n_heads=config.n_heads, dropout=config.dropout,
                               item_text=config.item_text, delta_max_norm=config.delta_max_norm)
    model = SequentialRecommender(model_config, text_matrix)
    warm_items, planned = 0, config.epochs
    if parent_dir is not None:
        parent_config, parent_state, parent_vocab = load_weights(parent_dir)
        if _same_architecture(parent_config, model_config):
            warm_items = warm_start(model, parent_state, torch.from_numpy(parent_vocab.item_ids),
                                    torch.from_numpy(vocab.item_ids))
            planned = config.warm_start_epochs
            log.info("warm start from %s: %d of %d items carried over", parent_dir.name, warm_items, len(vocab) - 1)
        else:
            log.warning("champion %s has a different architecture; training from scratch", parent_dir.name)
    positives = torch.bincount(torch.from_numpy(np.concatenate(transitions)), minlength=len(vocab))
    result = _fit(model, sequences, config, positives, device or pick_device(), validation,
                  epochs=planned if epochs is None else epochs, budget_seconds=config.train_time_budget_seconds,
                  continuing=continuing)
    model.cpu()
    if config.item_text and text_informs:
        filled = fill_cold_ids(model, positives)
        log.info("%d rarely-seen items took their text neighbours' id embeddings", filled)
    return model.eval(), dataclasses.replace(result, warm_started_items=warm_items)


def train(train_events: pd.DataFrame, catalog: pd.DataFrame, *, config: PipelineConfig, out_dir: Path,
          cache_dir: Path, parent_dir: Path | None = None, refit: bool = False) -> TrainResult:
    """Train on `train_events` and write the model to `out_dir`.

    A normal run holds each user's last training item out to pick the epoch (early stopping). A
    refit (`refit=True`, `parent_dir` = the gated model) learns from every event instead, for
    `refit_epochs` epochs from the gated weights: the served model has seen the freshest data.
    """
    started = time.perf_counter()
    vocab = Vocab.from_catalog(catalog["item_id"].to_numpy())
    sequences = user_sequences(train_events, vocab)
    if not any(len(s) >= 2 for s in sequences.values()):
        raise TrainingError("no user has two or more interactions outside the gate's holdout; nothing to learn from")
    if refit:
        if parent_dir is None:
            raise ValueError("a refit continues from the gated model: parent_dir is required")
        train_sequences, validation, epochs = sequences, None, config.refit_epochs
    else:
        train_sequences, validation = hold_out_last(sequences, seed=config.seed)
        epochs = None
    device = pick_device()
    text_started = time.perf_counter()
    tuned = _tuned_encoder(train_sequences, vocab, catalog, cache_dir, config, device, parent_dir if refit else None)
    text_matrix = torch.from_numpy(vocab_text_matrix(
        vocab, catalog, cache_dir, encoder_id=tuned.encoder_id if tuned else "",
        encoder_path=Path(tuned.path) if tuned else None))
    text_seconds = time.perf_counter() - text_started
    signal = _text_signal(text_matrix, train_sequences, config, parent_dir if refit else None)
    model, fit = fit_sequences(train_sequences, vocab, text_matrix, config, validation, parent_dir=parent_dir,
                               device=device, epochs=epochs, text_informs=signal is None or signal.informative,
                               continuing=refit)
    save_model(model, vocab, out_dir)
    result = TrainResult(model_dir=str(out_dir), device=str(device), loss=fit.loss, precision=fit.precision,
                         epochs=fit.epochs, best_epoch=fit.best_epoch, stopped_by=fit.stopped_by,
                         still_improving=fit.still_improving, validation_ndcg=fit.validation_ndcg,
                         kept_epochs=fit.kept_epochs, planned_epochs=fit.planned_epochs,
                         scheduled_epochs=fit.scheduled_epochs, annealed_at_epoch=fit.annealed_at_epoch,
                         curve=fit.curve,
                         train_events=len(train_events), train_windows=fit.windows,
                         n_items=len(vocab) - 1, final_loss=fit.final_loss, warm_started_items=fit.warm_started_items,
                         seconds=round(time.perf_counter() - started, 2), text_seconds=round(text_seconds, 2),
                         loop_seconds=round(fit.loop.seconds, 2),
                         sequences_per_s=round(fit.loop.sequences_per_s, 1), tokens_per_s=round(fit.loop.tokens_per_s, 1),
                         input_wait_share=round(fit.loop.input_wait_share, 4),
                         text_signal=None if signal is None else signal.as_dict(),
                         text_encoder=None if tuned is None else tuned.as_dict())
    (out_dir / SUMMARY_FILE).write_text(json.dumps(asdict(result), indent=2))
    return result


def _tuned_encoder(sequences: dict[int, np.ndarray], vocab: Vocab, catalog: pd.DataFrame, cache_dir: Path,
                   config: PipelineConfig, device: torch.device, gated_dir: Path | None) -> TunedEncoder | None:
    """The fine-tuned text encoder this training reads (None: the frozen MiniLM). A refit reads the one its
    gated model (`gated_dir`) was trained with, so what serves was trained the way it was judged."""
    if not config.item_text or config.text_finetune_steps == 0:
        return None
    recorded = training_summary(gated_dir).get("text_encoder") if gated_dir is not None else None
    if recorded:
        kept = read_tuned(Path(recorded["path"]))
        if kept is None or kept.encoder_id != recorded["encoder_id"]:
            raise TrainingError(f"the gated model's text encoder {recorded['encoder_id']} is no longer in "
                                f"{recorded['path']}; retrain instead of refitting")
        return dataclasses.replace(kept, reused=True)
    return ensure_tuned(sequences, item_text(vocab_texts(vocab, catalog)), cache_dir,
                        steps=config.text_finetune_steps, budget_seconds=config.text_finetune_budget_seconds,
                        refresh_days=config.text_finetune_refresh_days, seed=config.seed, device=device,
                        precision=autocast_dtype(device), now=datetime.now(UTC))


def _text_signal(text_matrix: torch.Tensor, sequences: dict[int, np.ndarray], config: PipelineConfig,
                 gated_dir: Path | None) -> TextSignal | None:
    """Whether the item text informs (None with item_text off). A refit takes the verdict of the model the gate
    judged (`gated_dir`), so what serves was trained the way it was judged."""
    if not config.item_text:
        return None
    recorded = training_summary(gated_dir).get("text_signal") if gated_dir is not None else None
    signal = TextSignal(**recorded) if recorded else measure_text_signal(text_matrix.numpy(), sequences, seed=config.seed)
    log.info("%s", signal.describe())
    return signal


def _same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    fields = ("max_history", "d_model", "n_layers", "n_heads", "text_dim", "item_text")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def validation_ndcg(model: SequentialRecommender, validation: Validation, device: torch.device,
                    k: int = 10, batch_size: int = 256) -> float:
    """Mean NDCG@k of the held-out items, ranking the full catalog with each user's history masked."""
    if len(validation.targets) == 0:
        return 0.0
    model.eval()
    gains = []
    with torch.inference_mode():
        vectors = model.item_vectors()
        for start in range(0, len(validation.targets), batch_size):
            histories = torch.from_numpy(pad_batch(validation.histories[start:start + batch_size])).to(device)
            targets = torch.from_numpy(validation.targets[start:start + batch_size]).to(device)
            scores = model.next_item_logits(histories, vectors).float()  # (B, n_items)
            scores = scores.scatter(1, histories, float("-inf"))  # seen items and PAD out
            target_scores = scores.gather(1, targets.unsqueeze(1))  # (B, 1)
            rank = (scores > target_scores).sum(dim=1)  # 0-based rank of the target
            gains.append(torch.where(rank < k, 1.0 / torch.log2(rank.float() + 2), torch.zeros_like(rank.float())))
    model.train()
    return float(torch.cat(gains).mean())


def _length_bucketed_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator,
                             bucket_batches: int = 32) -> list[torch.Tensor]:
    """Shuffled batches of windows of similar length.

    Most users are short and a few are long; a random batch pads every row to its longest one.
    Sorting within shuffled buckets of `bucket_batches` batches keeps batches random across
    epochs while cutting the padding the transformer computes on.
    """
    order = torch.randperm(len(lengths), generator=generator)
    batches = []
    for start in range(0, len(order), batch_size * bucket_batches):
        bucket = order[start:start + batch_size * bucket_batches]
        bucket = bucket[torch.argsort(lengths[bucket], stable=True)]
        batches.extend(bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


WARMUP_SHARE = 0.05  # of the steps, with the learning rate rising linearly from zero
FINAL_LR_SHARE = 0.1  # cosine decay ends at this share of the peak learning rate
SCHEDULE_REFRESH_STEPS = 25  # how often the schedule is re-fitted to the time budget


class WarmupCosine:
    """Learning-rate multiplier: linear warm-up, then cosine decay to FINAL_LR_SHARE at `total_steps`.

    `fit_to` moves the end (never past the planned steps) to where the time budget will end the
    run, so a run cut by the budget still finishes its decay instead of stopping near the peak.
    `anneal` starts the decay's end now: from the current multiplier down to FINAL_LR_SHARE over the
    given steps, for a run whose validation has plateaued while the learning rate is still high.
    """

    def __init__(self, planned_steps: int) -> None:
        self.planned_steps = max(planned_steps, 2)
        self.total_steps = self.warmup_steps = 0
        self.anneal_start: int | None = None
        self.anneal_from = 1.0
        self.fit_to(self.planned_steps)

    def fit_to(self, total_steps: int) -> None:
        if self.anneal_start is not None:  # annealing: the budget may only bring the end closer
            self.total_steps = max(min(total_steps, self.total_steps), self.anneal_start + 1)
            return
        self.total_steps = min(max(total_steps, 2), self.planned_steps)
        self.warmup_steps = max(int(WARMUP_SHARE * self.total_steps), 1)

    def anneal(self, step: int, steps: int) -> None:
        self.anneal_from, self.anneal_start = self(step), step
        self.total_steps = step + max(steps, 1)

    def __call__(self, step: int) -> float:
        if self.anneal_start is not None and step >= self.anneal_start:
            progress = min((step - self.anneal_start) / (self.total_steps - self.anneal_start), 1.0)
            return FINAL_LR_SHARE + (self.anneal_from - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress))
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * progress))


def _fit(model: SequentialRecommender, sequences: dict[int, np.ndarray], config: PipelineConfig,
         positives: torch.Tensor, device: torch.device, validation: Validation | None, *, epochs: int,
         budget_seconds: float, continuing: bool = False) -> FitResult:
    """The training loop, with CPU training's thread count and attention set for its duration only.

    `continuing` (the refit) trains on at the constant `refit_learning_rate`, near where the gated model's decay
    ended: warming up to the peak again would throw away what the decay settled (docs/MODEL.md, "Refit").
    """
    lr_schedule, peak_lr = ("constant", config.refit_learning_rate) if continuing else \
        (config.lr_schedule, config.learning_rate)
    model.to(device).train()
    attention, threads = model.encoder.config._attn_implementation, torch.get_num_threads()
    try:
        if device.type == "cpu":
            model.encoder.set_attn_implementation(CPU_TRAINING_ATTENTION)
            torch.set_num_threads(min(threads, cpu_threads()))
        return _train_loop(model, sequences, config, positives, device, validation, epochs=epochs,
                           budget_seconds=budget_seconds, lr_schedule=lr_schedule, peak_lr=peak_lr)
    finally:
        model.encoder.set_attn_implementation(attention)
        torch.set_num_threads(threads)


def _train_loop(model: SequentialRecommender, sequences: dict[int, np.ndarray], config: PipelineConfig,
                positives: torch.Tensor, device: torch.device, validation: Validation | None, *, epochs: int,
                budget_seconds: float, lr_schedule: str, peak_lr: float) -> FitResult:
    """Stops after `epochs`, early (patience on the window's mean validation NDCG), or when the time budget is
    spent: then mid-epoch, after one last validation so the partial epoch can still be one of those kept.

    The first epoch cuts long sequences into windows from their end; with `shift_windows`, every later epoch cuts them
    at a new random shift (`training_windows`).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01, fused=True)
    generator = torch.Generator().manual_seed(config.seed)
    loss_fn = choose_loss(config, positives, generator)
    x_all, y_all = (torch.from_numpy(a) for a in training_windows(sequences, config.max_history))
    shifts = np.random.default_rng(config.seed) if config.shift_windows else None  # the first epoch cuts from the end
    lengths = (x_all != PAD).sum(dim=1)
    first_epoch_windows = len(x_all)
    # A shifted cut can add a window to a long sequence: the count, and so the steps of an epoch, vary by a few.
    steps_per_epoch = (len(x_all) + config.batch_size - 1) // config.batch_size
    schedule = WarmupCosine(epochs * steps_per_epoch) if lr_schedule == "warmup_cosine" else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule or (lambda step: 1.0))
    precision = autocast_dtype(device)
    autocast = torch.autocast(device_type=device.type, dtype=precision or torch.float32, enabled=precision is not None)
    window = CheckpointWindow(config.checkpoint_window)
    best_mean, best_epoch, best_state, kept_epochs = -1.0, 0, None, []
    annealed_at: int | None = None  # the epoch whose plateau started the final decay
    curve: list[EpochRecord] = []
    loss_value = float("nan")
    stopped_by, epoch, global_step = "epochs", 0, 0
    started = time.perf_counter()
    loop_seconds = input_seconds = 0.0
    windows_seen = tokens = 0
    log.info("training on %s (%d threads): %s loss over the %d items training sequences lead to, %s, up to %d epochs "
             "of %d steps, budget %.0f s",
             device.type, torch.get_num_threads(), loss_fn.name, int((positives[PAD + 1:] > 0).sum()),
             precision or "float32", epochs,
             steps_per_epoch, budget_seconds)
    progress = Progress(log, "train", epochs * steps_per_epoch, "steps", limit_seconds=budget_seconds)
    for epoch in range(1, epochs + 1):
        if shifts is not None and epoch > 1:
            x_all, y_all = (torch.from_numpy(a) for a in training_windows(sequences, config.max_history, shifts))
            lengths = (x_all != PAD).sum(dim=1)
        running, steps, out_of_time = 0.0, 0, False
        epoch_started = time.perf_counter()
        for batch in _length_bucketed_batches(lengths, config.batch_size, generator):
            batch_started = time.perf_counter()
            x, y = x_all[batch], y_all[batch]
            keep = (x != PAD).any(dim=0) | (y != PAD).any(dim=0)  # drop columns that are padding in every row
            x, y = x[:, keep].to(device), y[:, keep].to(device)
            input_seconds += time.perf_counter() - batch_started
            with autocast:
                loss = loss_fn(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += loss.item()  # also waits for the device, so the timings above are honest
            steps, global_step = steps + 1, global_step + 1
            windows_seen += len(batch)
            tokens += int((y != PAD).sum())
            progress.advance(1, f"epoch {epoch}/{epochs}, loss {running / steps:.4f}")
            elapsed = time.perf_counter() - started
            if elapsed > budget_seconds:
                out_of_time = True
                break
            if schedule is not None and global_step % SCHEDULE_REFRESH_STEPS == 0:
                # At this pace (validation included), the budget ends the run after this many steps.
                cut_before = schedule.total_steps < schedule.planned_steps
                schedule.fit_to(global_step + int((budget_seconds - elapsed) / (elapsed / global_step)))
                if not cut_before and schedule.total_steps < schedule.planned_steps:
                    log.warning("time budget: at this pace %.0f s allow about %.1f of the %d planned epochs; the "
                                "learning-rate decay now ends there (raise train_time_budget_seconds to train longer)",
                                budget_seconds, schedule.total_steps / steps_per_epoch, epochs)
        loop_seconds += time.perf_counter() - epoch_started
        loss_value = round(running / max(steps, 1), 4)
        ndcg = validation_ndcg(model, validation, device) if validation is not None else None
        elapsed = time.perf_counter() - started
        curve.append(EpochRecord(epoch=epoch, loss=loss_value, validation_ndcg=None if ndcg is None else round(ndcg, 5),
                                 seconds=round(elapsed, 2), learning_rate=scheduler.get_last_lr()[0]))
        if ndcg is not None:
            window.add(epoch, ndcg, model)
        log.info("epoch %d/%d: loss %.4f%s, %.0f s", epoch, epochs, loss_value,
                 "" if ndcg is None else f", validation NDCG@10 {ndcg:.4f} (epochs {epoch_span(window.epochs)}: "
                 f"{window.mean_ndcg:.4f})", elapsed)
        if ndcg is not None and window.mean_ndcg > best_mean:
            best_mean, best_epoch, kept_epochs = window.mean_ndcg, epoch, window.epochs
            best_state = window.averaged_parameters()
        if out_of_time and (epoch < epochs or steps < steps_per_epoch):
            stopped_by = "time_budget"
            log.info("time budget: %.0f of %.0f s spent in epoch %d", elapsed, budget_seconds, epoch)
            break
        if ndcg is not None and epoch >= config.min_epochs and epoch - max(best_epoch, annealed_at or 0) >= config.patience:
            anneal_steps = math.ceil(config.patience / 2) * steps_per_epoch
            if schedule is not None and annealed_at is None and schedule.total_steps - global_step > anneal_steps:
                # From the current weights: decaying from the kept average instead (tried) never beat the average.
                schedule.anneal(global_step, anneal_steps)
                annealed_at = epoch
                log.info("validation plateaued: the mean NDCG@10 of %d epochs has not improved for %d epochs; the "
                         "learning rate now decays to its floor over %d epochs, then training stops", window.size,
                         config.patience, math.ceil(config.patience / 2))
            else:
                stopped_by = "early_stopping"
                log.info("early stop: the mean validation NDCG@10 of %d epochs has not improved for %d epochs; keeping "
                         "the average of epochs %s", window.size, config.patience, epoch_span(kept_epochs))
                break
        if annealed_at is not None and schedule is not None and global_step >= schedule.total_steps:
            stopped_by = "early_stopping"
            log.info("early stop: the decay after the plateau at epoch %d has ended; keeping the average of epochs %s",
                     annealed_at, epoch_span(kept_epochs))
            break
    kept_ndcg = 0.0
    if best_state is not None:
        load_parameters(model, best_state)
        kept_ndcg = validation_ndcg(model, validation, device)
        log.info("kept the average of epochs %s: validation NDCG@10 %.4f", epoch_span(kept_epochs), kept_ndcg)
    model.eval()
    scheduled_steps = schedule.total_steps if schedule is not None else epochs * steps_per_epoch
    stats = LoopStats(seconds=loop_seconds, input_seconds=input_seconds, sequences=windows_seen, tokens=tokens)
    return FitResult(loss=loss_fn.name, precision=str(precision or torch.float32).removeprefix("torch."), epochs=epoch,
                     best_epoch=best_epoch or epoch, stopped_by=stopped_by, validation_ndcg=kept_ndcg,
                     kept_epochs=kept_epochs or [epoch], planned_epochs=epochs,
                     scheduled_epochs=round(scheduled_steps / steps_per_epoch, 2), annealed_at_epoch=annealed_at,
                     curve=curve, final_loss=loss_value, windows=first_epoch_windows, warm_started_items=0, loop=stats)


class CheckpointWindow:
    """The last `size` epochs' validation NDCG and weights.

    On 610 validation users NDCG@10 swings by ±0.005 from one epoch to the next while the trend still
    rises; early stopping that follows single epochs quits on a dip and keeps a lucky spike. Following the
    window's mean, and keeping the average of its weights (checkpoint averaging, as in stochastic weight
    averaging), makes both the stop and the kept model rest on several epochs.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: deque[tuple[int, float, dict[str, torch.Tensor]]] = deque(maxlen=size)

    def add(self, epoch: int, ndcg: float, model: torch.nn.Module) -> None:
        """Keeps a copy of the parameters only: buffers (the frozen text matrix, 1.5 GB at 1M items) do not
        change between epochs."""
        weights = {name: value.detach().to("cpu", copy=True) for name, value in model.named_parameters()}
        self._entries.append((epoch, ndcg, weights))

    @property
    def epochs(self) -> list[int]:
        return [epoch for epoch, _, _ in self._entries]

    @property
    def mean_ndcg(self) -> float:
        return sum(ndcg for _, ndcg, _ in self._entries) / len(self._entries)

    def averaged_parameters(self) -> dict[str, torch.Tensor]:
        """The element-wise mean of the window's parameters, for `load_parameters`."""
        kept = [weights for _, _, weights in self._entries]
        return {name: torch.stack([w[name].float() for w in kept]).mean(0).to(value.dtype)
                for name, value in kept[-1].items()}


def load_parameters(model: torch.nn.Module, parameters: dict[str, torch.Tensor]) -> None:
    """Copy `parameters` (every one of the model's, by name) into `model`; its buffers stay as they are."""
    missing = {name for name, _ in model.named_parameters()} - set(parameters)
    if missing:
        raise ValueError(f"parameters missing from the kept weights: {sorted(missing)}")
    model.load_state_dict(parameters, strict=False)


def epoch_span(epochs: list[int]) -> str:
    """"27-29" for a run of epochs, "18" for one, "-" for none."""
    return f"{epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else str(epochs[0]) if epochs else "-"
