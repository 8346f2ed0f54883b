"""Export: the trained model to a self-contained ONNX graph, checked against PyTorch.

The graph maps a batch of histories (B, L) of item indices to the top-K item indices and
scores (B, K), with seen, padding and inactive items masked inside the graph. K is
`longtail.CANDIDATE_POOL_FACTOR` × top_k: scoring serves the first top_k, or re-ranks the pool
when `tail_boost` is set. The item
vectors go beside it as .npy for `similar_items`.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recmodel.artifacts import ITEM_VECTORS_FILE, ONNX_FILE, PARITY_FILE, load_model, open_session, sha256_file
from recmodel.data import Vocab, inactive_mask, left_pad, pad_batch, user_sequences
from recmodel.longtail import CANDIDATE_POOL_FACTOR
from recmodel.model import TopKRecommender

log = logging.getLogger(__name__)
for _chatty in ("onnx_ir", "onnxscript"):  # an INFO line per folded initializer otherwise
    logging.getLogger(_chatty).setLevel(logging.WARNING)
# torch.onnx warns that torchvision ops are not registered; this model uses none of them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

SCORE_TOLERANCE = 1e-3
MIN_TOPK_AGREEMENT = 0.99


class ExportParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond tolerance; the model is not exported."""


@dataclass(frozen=True)
class ExportResult:
    onnx_path: str
    onnx_sha256: str
    item_vectors_path: str
    provider: str
    parity_users: int
    max_score_diff: float
    topk_agreement: float


def export(model_dir: Path, catalog: pd.DataFrame, dataset: pd.DataFrame, *, top_k: int,
           parity_users: int = 256, seed: int = 0) -> ExportResult:
    model, vocab = load_model(model_dir)
    excluded = torch.from_numpy(inactive_mask(vocab, catalog))
    wrapper = TopKRecommender(model, excluded, k=min(top_k * CANDIDATE_POOL_FACTOR, len(vocab) - 1)).eval()
    histories = sample_histories(dataset, vocab, parity_users, seed)
    onnx_path = model_dir / ONNX_FILE
    export_onnx(wrapper, histories[:2], onnx_path)
    with torch.inference_mode():
        ref_items, ref_scores = (t.numpy() for t in wrapper(torch.from_numpy(histories)))
        np.save(model_dir / ITEM_VECTORS_FILE, model.item_vectors().numpy())
    session, provider = open_session(onnx_path)
    got_items, got_scores = session.run(None, {"history": histories})
    max_diff = _max_score_diff(ref_scores, got_scores)
    agreement = _topk_agreement(ref_items, ref_scores, got_items)
    result = ExportResult(onnx_path=str(onnx_path), onnx_sha256=sha256_file(onnx_path),
                          item_vectors_path=str(model_dir / ITEM_VECTORS_FILE), provider=provider,
                          parity_users=len(histories), max_score_diff=max_diff, topk_agreement=agreement)
    (model_dir / PARITY_FILE).write_text(json.dumps(asdict(result), indent=2))
    if max_diff > SCORE_TOLERANCE or agreement < MIN_TOPK_AGREEMENT:
        onnx_path.unlink()
        raise ExportParityError(f"ONNX parity failed on {len(histories)} users: max score diff {max_diff:.2e} "
                                f"(tolerance {SCORE_TOLERANCE}), top-K agreement {agreement:.3f} "
                                f"(need {MIN_TOPK_AGREEMENT})")
    log.info("exported %s (parity on %d users: max diff %.1e, top-K agreement %.3f, %s)",
             onnx_path.name, len(histories), max_diff, agreement, provider)
    return result


def export_onnx(wrapper: TopKRecommender, example: np.ndarray, path: Path) -> None:
    """Write the graph: history (batch, length) of item indices in, top-K indices and scores out.

    torch.export specialises a dimension traced at size 0 or 1, so the example is widened to at
    least 2 x 2 (left padding, a repeated row) to keep both dimensions dynamic.
    """
    rows = example if len(example) >= 2 else np.repeat(example, 2, axis=0)
    example = left_pad(list(rows), max(rows.shape[1], 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (torch.from_numpy(example),), str(path),
            input_names=["history"], output_names=["item_index", "score"],
            dynamic_shapes={"history": {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}},
            dynamo=True, verbose=False,
        )
    drop_exporter_annotations(path)


def drop_exporter_annotations(path: Path) -> None:
    """Remove the exporter's per-node debug annotations (`namespace`, `pkg.torch.onnx.*`: source stack traces,
    module names, and reprs such as `<function sym_max at 0x7f58…>` that hold a memory address). Without
    them the graph file depends only on the model, so one model exported in two processes (two workers,
    say) gives the same files, byte for byte. The weights stay where the exporter put them (`.onnx.data`
    beside the graph), untouched."""
    import onnx

    graph_model = onnx.load(str(path), load_external_data=False)
    nodes = [*graph_model.graph.node, *(n for f in graph_model.functions for n in f.node)]
    while nodes:
        node = nodes.pop()
        del node.metadata_props[:]
        nodes.extend(n for a in node.attribute for g in (a.g, *a.graphs) for n in g.node)
    onnx.save(graph_model, str(path))


def sample_histories(dataset: pd.DataFrame, vocab: Vocab, n: int, seed: int) -> np.ndarray:
    sequences = list(user_sequences(dataset, vocab).values())
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(sequences), size=min(n, len(sequences)), replace=False) if sequences else []
    return pad_batch([sequences[i] for i in chosen])


def _max_score_diff(ref: np.ndarray, got: np.ndarray) -> float:
    """Largest gap between finite scores; a slot masked (-inf) on one side only counts as infinite."""
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(ref[finite] - got[finite]))) if finite.any() else 0.0


def _topk_agreement(ref_items: np.ndarray, ref_scores: np.ndarray, got_items: np.ndarray) -> float:
    """Share of users whose top-K lists hold the same items; order may differ where scores tie."""
    if len(ref_items) == 0:
        return 1.0
    same = 0
    for ref_row, score_row, got_row in zip(ref_items, ref_scores, got_items):
        finite = np.isfinite(score_row)
        if np.array_equal(ref_row[finite], got_row[finite]):
            same += 1
            continue
        same += set(ref_row[finite].tolist()) == set(got_row[finite].tolist())
    return same / len(ref_items)
