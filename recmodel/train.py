"""Training: next-item prediction with full-catalog softmax, warm-started from the champion.

Inputs are the run's dataset snapshot and catalog; events at or after `cutoff` are held out for
the gate and never trained on. Output is a model folder (weights, config, vocabulary) that
`export` turns into ONNX.
"""

from __future__ import annotations

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
from recmodel.data import PAD, Vocab, training_windows, user_sequences, vocab_text_matrix
from recmodel.model import ModelConfig, SequentialRecommender, warm_start

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
VOCAB_FILE = "vocab.npy"
SUMMARY_FILE = "training.json"


class TrainingError(RuntimeError):
    """Training cannot produce a model from this data."""


@dataclass(frozen=True)
class TrainResult:
    model_dir: str
    device: str
    epochs: int
    train_events: int
    train_windows: int
    n_items: int
    final_loss: float
    warm_started_items: int
    seconds: float


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def train(dataset: pd.DataFrame, catalog: pd.DataFrame, *, cutoff: pd.Timestamp, config: PipelineConfig,
          out_dir: Path, cache_dir: Path, parent_dir: Path | None = None) -> TrainResult:
    """Train on events before `cutoff`; write the model to `out_dir`."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    train_events = dataset[dataset["occurred_at"] < cutoff]
    vocab = Vocab.from_catalog(catalog["item_id"].to_numpy())
    windows_in, windows_out = training_windows(user_sequences(train_events, vocab), config.max_history)
    if len(windows_in) == 0:
        raise TrainingError(f"no user has two or more interactions before {cutoff:%Y-%m-%d %H:%M}; nothing to learn from")

    text_matrix = torch.from_numpy(vocab_text_matrix(vocab, catalog, cache_dir))
    model_config = ModelConfig(n_items=len(vocab), max_history=config.max_history, d_model=config.d_model,
                               n_layers=config.n_layers, n_heads=config.n_heads, dropout=config.dropout)
    model = SequentialRecommender(model_config, text_matrix)
    warm_items = 0
    epochs = config.epochs
    if parent_dir is not None:
        parent_config, parent_state, parent_vocab = load_weights(parent_dir)
        if _same_architecture(parent_config, model_config):
            warm_items = warm_start(model, parent_state, torch.from_numpy(parent_vocab.item_ids),
                                    torch.from_numpy(vocab.item_ids))
            epochs = config.warm_start_epochs
            log.info("warm start from %s: %d of %d items carried over", parent_dir.name, warm_items, len(vocab) - 1)
        else:
            log.warning("champion %s has a different architecture; training from scratch", parent_dir.name)

    device = pick_device()
    final_loss = _fit(model, windows_in, windows_out, config, epochs, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.cpu()
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(model_config.to_dict(), indent=2))
    np.save(out_dir / VOCAB_FILE, vocab.item_ids)
    result = TrainResult(model_dir=str(out_dir), device=str(device), epochs=epochs, train_events=len(train_events),
                         train_windows=len(windows_in), n_items=len(vocab) - 1, final_loss=final_loss,
                         warm_started_items=warm_items, seconds=round(time.perf_counter() - started, 2))
    (out_dir / SUMMARY_FILE).write_text(json.dumps(asdict(result), indent=2))
    return result


def _same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    fields = ("max_history", "d_model", "n_layers", "n_heads", "text_dim")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def _fit(model: SequentialRecommender, inputs: np.ndarray, targets: np.ndarray, config: PipelineConfig,
         epochs: int, device: torch.device) -> float:
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed)
    x_all, y_all = torch.from_numpy(inputs), torch.from_numpy(targets)
    steps = epochs * ((len(x_all) + config.batch_size - 1) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=steps,
                                                    pct_start=0.1)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss_value = float("nan")
    with tqdm(total=steps, desc=f"train ({device.type})", unit="step", leave=False, disable=None) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(x_all), generator=generator)
            running, batches = 0.0, 0
            for start in range(0, len(order), config.batch_size):
                batch = order[start:start + config.batch_size]
                x, y = x_all[batch].to(device), y_all[batch].to(device)
                with autocast:
                    hidden = model(x)  # (B, L, d)
                    positions = y != PAD  # (B, L): only real next items are targets
                    logits = hidden[positions] @ model.item_vectors().T  # (N, n_items)
                    loss = torch.nn.functional.cross_entropy(logits.float(), y[positions])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                running += loss.item()
                batches += 1
                bar.update(1)
            loss_value = running / max(batches, 1)
            log.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, loss_value)
    model.eval()
    return round(loss_value, 4)


def load_weights(model_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Vocab]:
    config = ModelConfig(**json.loads((model_dir / CONFIG_FILE).read_text()))
    state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return config, state, Vocab(np.load(model_dir / VOCAB_FILE))


def load_model(model_dir: Path) -> tuple[SequentialRecommender, Vocab]:
    config, state, vocab = load_weights(model_dir)
    model = SequentialRecommender(config, state["text_matrix"])
    model.load_state_dict(state)
    return model.eval(), vocab
