"""Where a run's files and a model's files live, and how they are saved and loaded.

Every stage finds its inputs through this module, so the layout is decided in one place:

    $RECSYS_HOME/runs/<run_key>/     increment, catalog and dataset snapshots, score files, manifest.json
    $RECSYS_HOME/models/<version>/   the gated model (weights, config, vocab, ONNX, item vectors)
    $RECSYS_HOME/models/<version>/refit/   the same files for the refit that serves

Heavy libraries (torch, onnxruntime) are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from recmodel.data import Vocab

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from recmodel.model import ModelConfig, SequentialRecommender

log = logging.getLogger(__name__)

# A run's folder
INCREMENT_FILE = "increment.parquet"
CATALOG_FILE = "catalog.parquet"
DATASET_FILE = "dataset.parquet"
SIMILAR_FILE = "similar_items.parquet"
POPULAR_FILE = "popular_items.parquet"
MANIFEST_FILE = "manifest.json"
# A model's folder
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
VOCAB_FILE = "vocab.npy"
SUMMARY_FILE = "training.json"
ONNX_FILE = "model.onnx"
ITEM_VECTORS_FILE = "item_vectors.npy"
PARITY_FILE = "parity.json"
REFIT_FOLDER = "refit"

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ORT_FATAL_ONLY = 4  # onnxruntime log severity: silences the "CUDA libraries missing" error on CPU hosts


@dataclass(frozen=True)
class RunFolder:
    """The files of one run, under ``$RECSYS_HOME/runs/<run_key>``."""

    path: Path

    @property
    def dataset(self) -> Path:
        return self.path / DATASET_FILE

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def similar_items(self) -> Path:
        return self.path / SIMILAR_FILE

    @property
    def popular_items(self) -> Path:
        return self.path / POPULAR_FILE

    def user_shard(self, shard: int, shards: int) -> Path:
        return self.path / f"user_recommendations.shard-{shard}-of-{shards}.parquet"


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Parquet written under a temporary name, then renamed into place: whoever reads `path` (the next task,
    or a retry of this task on another worker) finds a whole file, never one that a dying writer cut short,
    and two tries writing at once leave one whole file, not a mix."""
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")  # unique across hosts sharing the folder
    try:
        frame.to_parquet(partial, index=False)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def run_folder(home: Path, run_key: str) -> RunFolder:
    return RunFolder(home / "runs" / run_key)


def model_folder(home: Path, version: str) -> Path:
    return home / "models" / version


def save_model(model: SequentialRecommender, vocab: Vocab, out_dir: Path) -> None:
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
    np.save(out_dir / VOCAB_FILE, vocab.item_ids)


def load_weights(model_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Vocab]:
    import torch

    from recmodel.model import ModelConfig

    config = ModelConfig(**json.loads((model_dir / CONFIG_FILE).read_text()))
    state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return config, state, load_vocab(model_dir)


def load_vocab(model_dir: Path) -> Vocab:
    return Vocab(np.load(model_dir / VOCAB_FILE))


def load_model(model_dir: Path) -> tuple[SequentialRecommender, Vocab]:
    from recmodel.model import SequentialRecommender

    config, state, vocab = load_weights(model_dir)
    model = SequentialRecommender(config, state["text_matrix"])
    model.load_state_dict(state)
    return model.eval(), vocab


def load_item_vectors(model_dir: Path) -> np.ndarray:
    return np.load(model_dir / ITEM_VECTORS_FILE)


def training_summary(model_dir: Path) -> dict:
    """What `train` wrote about its own run (epochs, curve, throughput)."""
    return json.loads((model_dir / SUMMARY_FILE).read_text())


def open_session(onnx_path: Path):
    """An InferenceSession on CUDA when usable, else CPU; returns (session, provider name)."""
    import onnxruntime as ort

    wanted = [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]
    ort.set_default_logger_severity(ORT_FATAL_ONLY)
    options = ort.SessionOptions()
    options.log_severity_level = ORT_FATAL_ONLY
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=wanted)
    ort.set_default_logger_severity(2)
    provider = session.get_providers()[0]
    if CUDA in wanted and provider != CUDA:
        log.info("ONNX Runtime: CUDA provider unavailable here (no GPU or CUDA libraries), using %s", provider)
    else:
        log.info("ONNX Runtime provider: %s", provider)
    return session, provider


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
