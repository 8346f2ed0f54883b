"""Training: next-item prediction with full-catalog softmax, warm-started from the champion.

Inputs are the events to learn from (the snapshot minus the gate's holdout, or the whole
snapshot for the refit) and the catalog. Output is a model folder (weights, config, vocabulary)
that `export` turns into ONNX.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from recmodel.config import PipelineConfig
from recmodel.data import PAD, Vocab, pad_batch, training_windows, user_sequences, vocab_text_matrix
from recmodel.model import ModelConfig, SequentialRecommender, fill_cold_ids, warm_start

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
VOCAB_FILE = "vocab.npy"
SUMMARY_FILE = "training.json"


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
class TrainResult:
    model_dir: str
    device: str
    epochs: int  # epochs run (early stopping may end before config.epochs)
    best_epoch: int
    validation_ndcg: float  # NDCG@10 of the kept weights on each user's last training item
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


@dataclass(frozen=True)
class Validation:
    """Each user's last item, held out of training to choose the epoch (and hyperparameters)."""

    histories: list[np.ndarray]  # vocabulary indices before the target, time order
    targets: np.ndarray  # (n_users,) vocabulary index of the held-out item


@dataclass(frozen=True)
class FitResult:
    epochs: int
    best_epoch: int
    validation_ndcg: float
    final_loss: float
    windows: int
    warm_started_items: int
    loop: LoopStats


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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
                  device: torch.device | None = None) -> tuple[SequentialRecommender, FitResult]:
    """Build the model (warm-started from `parent_dir` when compatible) and train it.

    With a validation set, training stops once NDCG@10 on it has not improved for
    `config.patience` epochs, and the best epoch's weights are kept.
    """
    torch.manual_seed(config.seed)
    windows_in, windows_out = training_windows(sequences, config.max_history)
    if len(windows_in) == 0:
        raise TrainingError("no user has two or more interactions to learn from")
    model_config = ModelConfig(n_items=len(vocab), max_history=config.max_history, d_model=config.d_model,
                               n_layers=config.n_layers, n_heads=config.n_heads, dropout=config.dropout)
    model = SequentialRecommender(model_config, text_matrix)
    warm_items, epochs = 0, config.epochs
    if parent_dir is not None:
        parent_config, parent_state, parent_vocab = load_weights(parent_dir)
        if _same_architecture(parent_config, model_config):
            warm_items = warm_start(model, parent_state, torch.from_numpy(parent_vocab.item_ids),
                                    torch.from_numpy(vocab.item_ids))
            epochs = config.warm_start_epochs
            log.info("warm start from %s: %d of %d items carried over", parent_dir.name, warm_items, len(vocab) - 1)
        else:
            log.warning("champion %s has a different architecture; training from scratch", parent_dir.name)
    result = _fit(model, windows_in, windows_out, config, epochs, device or pick_device(), validation)
    model.cpu()
    positives = torch.bincount(torch.from_numpy(windows_out[windows_out != PAD]), minlength=len(vocab))
    filled = fill_cold_ids(model, positives)
    log.info("%d rarely-seen items took their text neighbours' id embeddings", filled)
    return model.eval(), FitResult(epochs=result[0], best_epoch=result[1], validation_ndcg=result[2],
                                   final_loss=result[3], windows=len(windows_in), warm_started_items=warm_items,
                                   loop=result[4])


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
        train_sequences, validation = sequences, None
        config = dataclasses.replace(config, warm_start_epochs=config.refit_epochs)
    else:
        train_sequences, validation = hold_out_last(sequences, seed=config.seed)
    text_started = time.perf_counter()
    text_matrix = torch.from_numpy(vocab_text_matrix(vocab, catalog, cache_dir))
    text_seconds = time.perf_counter() - text_started
    device = pick_device()
    model, fit = fit_sequences(train_sequences, vocab, text_matrix, config, validation, parent_dir=parent_dir,
                               device=device)
    save_model(model, vocab, out_dir)
    result = TrainResult(model_dir=str(out_dir), device=str(device), epochs=fit.epochs, best_epoch=fit.best_epoch,
                         validation_ndcg=fit.validation_ndcg, train_events=len(train_events), train_windows=fit.windows,
                         n_items=len(vocab) - 1, final_loss=fit.final_loss, warm_started_items=fit.warm_started_items,
                         seconds=round(time.perf_counter() - started, 2), text_seconds=round(text_seconds, 2),
                         loop_seconds=round(fit.loop.seconds, 2),
                         sequences_per_s=round(fit.loop.sequences_per_s, 1), tokens_per_s=round(fit.loop.tokens_per_s, 1),
                         input_wait_share=round(fit.loop.input_wait_share, 4))
    (out_dir / SUMMARY_FILE).write_text(json.dumps(asdict(result), indent=2))
    return result


def save_model(model: SequentialRecommender, vocab: Vocab, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
    np.save(out_dir / VOCAB_FILE, vocab.item_ids)


def _same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    fields = ("max_history", "d_model", "n_layers", "n_heads", "text_dim")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def validation_ndcg(model: SequentialRecommender, validation: Validation, device: torch.device,
                    k: int = 10, batch_size: int = 256) -> float:
    """Mean NDCG@k of the held-out items, ranking the full catalog with each user's history masked."""
    if len(validation.targets) == 0:
        return 0.0
    model.eval()
    gains = []
    with torch.inference_mode():
        for start in range(0, len(validation.targets), batch_size):
            histories = torch.from_numpy(pad_batch(validation.histories[start:start + batch_size])).to(device)
            targets = torch.from_numpy(validation.targets[start:start + batch_size]).to(device)
            scores = model.next_item_logits(histories).float()  # (B, n_items)
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


def _fit(model: SequentialRecommender, inputs: np.ndarray, targets: np.ndarray, config: PipelineConfig,
         epochs: int, device: torch.device, validation: Validation | None
         ) -> tuple[int, int, float, float, LoopStats]:
    """The training loop; returns (epochs run, best epoch, best validation NDCG@10, last epoch's loss, stats)."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed)
    x_all, y_all = torch.from_numpy(inputs), torch.from_numpy(targets)
    lengths = (x_all != PAD).sum(dim=1)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    best_ndcg, best_epoch, best_state = -1.0, 0, None
    loss_value = float("nan")
    epoch = 0
    loop_seconds = input_seconds = 0.0
    sequences = tokens = 0
    steps_per_epoch = (len(x_all) + config.batch_size - 1) // config.batch_size
    with tqdm(total=epochs * steps_per_epoch, desc=f"train ({device.type})", unit="step", leave=False,
              disable=None) as bar:
        for epoch in range(1, epochs + 1):
            running = 0.0
            epoch_started = time.perf_counter()
            for batch in _length_bucketed_batches(lengths, config.batch_size, generator):
                batch_started = time.perf_counter()
                x, y = x_all[batch], y_all[batch]
                keep = (x != PAD).any(dim=0) | (y != PAD).any(dim=0)  # drop columns that are padding in every row
                x, y = x[:, keep].to(device), y[:, keep].to(device)
                input_seconds += time.perf_counter() - batch_started
                with autocast:
                    hidden = model(x)  # (B, T, d)
                    positions = y != PAD  # (B, T): only real next items are targets
                    loss = next_item_loss(hidden[positions], model.item_vectors(), y[positions])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                running += loss.item()  # also waits for the device, so the timings above are honest
                sequences += len(batch)
                tokens += int(positions.sum())
                bar.update(1)
            loop_seconds += time.perf_counter() - epoch_started
            loss_value = round(running / steps_per_epoch, 4)
            if validation is None:
                log.info("epoch %d/%d: loss %.4f", epoch, epochs, loss_value)
                continue
            ndcg = validation_ndcg(model, validation, device)
            log.info("epoch %d/%d: loss %.4f, validation NDCG@10 %.4f", epoch, epochs, loss_value, ndcg)
            if ndcg > best_ndcg:
                best_ndcg, best_epoch = ndcg, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= config.patience:
                log.info("early stop: no improvement for %d epochs; keeping epoch %d", config.patience, best_epoch)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    stats = LoopStats(seconds=loop_seconds, input_seconds=input_seconds, sequences=sequences, tokens=tokens)
    return epoch, best_epoch or epoch, max(best_ndcg, 0.0), loss_value, stats


def load_weights(model_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Vocab]:
    config = ModelConfig(**json.loads((model_dir / CONFIG_FILE).read_text()))
    state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return config, state, Vocab(np.load(model_dir / VOCAB_FILE))


def load_vocab(model_dir: Path) -> Vocab:
    return Vocab(np.load(model_dir / VOCAB_FILE))


def load_model(model_dir: Path) -> tuple[SequentialRecommender, Vocab]:
    config, state, vocab = load_weights(model_dir)
    model = SequentialRecommender(config, state["text_matrix"])
    model.load_state_dict(state)
    return model.eval(), vocab
