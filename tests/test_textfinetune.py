"""The opt-in fine-tune of the text encoder: pairs, the tuning itself, its cache and refresh, and a training
that reads it (the refit reading the same one)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recmodel.config import PipelineConfig
from recmodel.data import Vocab, text_embeddings, vocab_text_matrix
from recmodel.textfinetune import ENCODERS_FOLDER, consecutive_pairs, ensure_tuned, settings_key
from recmodel.train import train

NOW = datetime(2026, 12, 1, tzinfo=UTC)
GENRES = ["space opera", "courtroom drama", "cooking show", "football documentary"]


def catalog(items: int = 24) -> pd.DataFrame:
    return pd.DataFrame({"item_id": np.arange(1, items + 1),
                         "title": [f"{GENRES[i % 4]} part {i}" for i in range(items)],
                         "description": [""] * items, "tags": [[GENRES[i % 4]] for i in range(items)],
                         "active": True})


def events(users: int = 30, items: int = 24, seed: int = 0) -> pd.DataFrame:
    """Each user follows one genre: consecutive items share their genre's words."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(users):
        genre = user % 4
        for minute, item in enumerate(rng.choice(np.arange(genre, items, 4) + 1, size=5, replace=False)):
            rows.append((user, int(item), pd.Timestamp(NOW) - pd.Timedelta(minutes=100 - minute)))
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "occurred_at"])
    return frame.assign(event_id=np.arange(len(frame)), event_type="view", value=1.0)


def sequences(frame: pd.DataFrame) -> dict[int, np.ndarray]:
    return {int(u): g.to_numpy(np.int64) for u, g in frame.groupby("user_id")["item_id"]}  # ids = indices here


def tune(cache: Path, now: datetime = NOW, steps: int = 2, budget: float = 600.0):
    texts = [f"{GENRES[i % 4]} part {i}. Tags: {GENRES[i % 4]}" for i in range(24)]
    return ensure_tuned(sequences(events()), texts, cache, steps=steps, budget_seconds=budget, refresh_days=7,
                        seed=0, device=torch.device("cpu"), precision=None, now=now)


def test_consecutive_pairs_skip_repeats_and_short_sequences() -> None:
    pairs = consecutive_pairs({1: np.array([3, 4, 4, 5]), 2: np.array([7]), 3: np.array([2, 9])})
    assert pairs.tolist() == [[3, 4], [4, 5], [2, 9]]
    assert consecutive_pairs({1: np.array([3])}).shape == (0, 2)


def test_a_tuned_encoder_is_reused_until_it_is_old_then_replaced(tmp_path: Path) -> None:
    first = tune(tmp_path)
    assert (first.steps, first.reused) == (2, False) and first.pairs > 0
    folder = tmp_path / ENCODERS_FOLDER / settings_key(2, 0)
    assert Path(first.path) == folder and (folder / "tuned.json").is_file()
    items = catalog()
    tuned = text_embeddings(items, tmp_path, encoder_id=first.encoder_id, encoder_path=folder)
    frozen = text_embeddings(items, tmp_path)
    assert np.allclose(np.linalg.norm(tuned, axis=1), 1, atol=1e-5)
    assert not np.allclose(tuned, frozen, atol=1e-4), "the fine-tune changed the embeddings"
    assert (tmp_path / f"text_embeddings-{first.encoder_id}.npz").is_file()

    again = tune(tmp_path, now=NOW + timedelta(days=6))
    assert (again.encoder_id, again.reused, again.seconds) == (first.encoder_id, True, first.seconds)

    later = tune(tmp_path, now=NOW + timedelta(days=8))
    assert later.encoder_id != first.encoder_id and not later.reused
    assert not (tmp_path / f"text_embeddings-{first.encoder_id}.npz").exists(), "the old copy's embeddings went"
    assert not folder.with_name(folder.name + ".staging").exists()
    assert (tmp_path / "text_embeddings.npz").is_file(), "the frozen encoder's cache is untouched"


def test_the_time_budget_ends_the_fine_tune_early(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cut = tune(tmp_path, steps=50, budget=1e-6)
    assert cut.steps == 0
    assert "budget ended the fine-tune after 0 of 50 steps" in caplog.text


def test_too_few_pairs_to_tune_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least two consecutive item pairs"):
        ensure_tuned({1: np.array([1, 2])}, ["a", "b"], tmp_path, steps=1, budget_seconds=60, refresh_days=7,
                     seed=0, device=torch.device("cpu"), precision=None, now=NOW)


def test_training_reads_the_tuned_encoder_and_the_refit_reads_the_same(tmp_path: Path) -> None:
    config = PipelineConfig.from_overrides({"epochs": 1, "d_model": 16, "max_history": 8, "text_finetune_steps": 2,
                                            "text_finetune_refresh_days": 0, "refit_epochs": 1})
    items, frame = catalog(), events()
    trained = train(frame, items, config=config, out_dir=tmp_path / "model", cache_dir=tmp_path / "cache")
    assert trained.text_encoder is not None and trained.text_encoder["steps"] == 2
    recorded = json.loads((tmp_path / "model" / "training.json").read_text())["text_encoder"]
    assert recorded["encoder_id"] == trained.text_encoder["encoder_id"]
    # refresh_days 0 would re-tune a fresh training; the refit keeps what the gate judged
    refit = train(frame, items, config=config, out_dir=tmp_path / "refit", cache_dir=tmp_path / "cache",
                  parent_dir=tmp_path / "model", refit=True)
    assert refit.text_encoder["encoder_id"] == recorded["encoder_id"] and refit.text_encoder["reused"]
    model_text = torch.load(tmp_path / "refit" / "model.pt")["text_matrix"].numpy()
    vocab = Vocab.from_catalog(items["item_id"].to_numpy())
    expected = vocab_text_matrix(vocab, items, tmp_path / "cache", encoder_id=recorded["encoder_id"],
                                 encoder_path=Path(recorded["path"]))
    assert np.allclose(model_text, expected)


def test_the_fine_tune_is_off_by_default_and_its_settings_are_checked() -> None:
    assert PipelineConfig().text_finetune_steps == 0
    with pytest.raises(Exception, match="text_finetune_steps must be within"):
        PipelineConfig.from_overrides({"text_finetune_steps": -1})
