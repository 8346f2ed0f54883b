"""Classical baselines on the same data and split as the model: popularity, item-kNN, EASE and a
text-only ranker (the user's history centroid in the text encoder's space).

Each `fit_*` takes the training interactions as a users x items binary matrix (CSR) and returns a
scorer; `top_k` ranks the full catalog for a batch of users with their training items masked.
EASE (Steck, 2019) is the closed form B = I - P / diag(P) with P = (XᵀX + λI)⁻¹ and a zero diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

Scorer = Callable[[sp.csr_matrix], np.ndarray]  # (B, n_items) history rows -> (B, n_items) scores


@dataclass(frozen=True)
class FittedBaseline:
    name: str
    params: dict[str, float]
    score: Scorer


def interaction_matrix(user_index: np.ndarray, item_index: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary users x items matrix; repeated (user, item) pairs count once."""
    data = np.ones(len(user_index), dtype=np.float32)
    matrix = sp.csr_matrix((data, (user_index, item_index)), shape=(n_users, n_items))
    matrix.data[:] = 1.0
    return matrix


def fit_popularity(train: sp.csr_matrix) -> FittedBaseline:
    counts = np.asarray(train.sum(axis=0)).ravel().astype(np.float32)
    return FittedBaseline("popularity", {}, lambda rows: np.broadcast_to(counts, (rows.shape[0], len(counts))).copy())


def fit_ease(train: sp.csr_matrix, l2: float) -> FittedBaseline:
    gram = (train.T @ train).toarray().astype(np.float64)  # (n_items, n_items)
    gram[np.diag_indices_from(gram)] += l2
    precision = symmetric_inverse(gram)
    weights = -precision / np.diag(precision)  # B[i, j] = -P[i, j] / P[j, j]
    weights[np.diag_indices_from(weights)] = 0.0
    weights = weights.astype(np.float32)
    return FittedBaseline("ease", {"l2": l2}, lambda rows: np.asarray(rows @ weights))


def fit_text_centroid(text_matrix: np.ndarray) -> FittedBaseline:
    """Content only: an item's score is the cosine between its text embedding and the mean text embedding of
    the user's history. The one reference that can rank an item nobody has interacted with."""
    unit = text_matrix / np.maximum(np.linalg.norm(text_matrix, axis=1, keepdims=True), 1e-12)
    unit = unit.astype(np.float32)
    return FittedBaseline("text_centroid", {}, lambda rows: np.asarray(rows @ unit) @ unit.T)


def symmetric_inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive-definite matrix through its Cholesky factor (LAPACK potrf, potri):
    half the work of `np.linalg.inv`'s LU, which matters for EASE's item-by-item Gram matrix (n³ flops)."""
    from scipy.linalg import lapack

    factor, info = lapack.dpotrf(matrix, lower=False, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"matrix is not positive definite (potrf info {info})")
    upper, info = lapack.dpotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"matrix is singular (potri info {info})")
    return np.triu(upper) + np.triu(upper, 1).T  # potri fills the upper triangle only


def fit_item_knn(train: sp.csr_matrix, neighbours: int, shrink: float = 10.0) -> FittedBaseline:
    """Cosine item-item similarity with shrinkage, pruned to each item's top `neighbours`."""
    counts = np.asarray(train.sum(axis=0)).ravel()
    co = (train.T @ train).toarray().astype(np.float32)  # (n_items, n_items) co-occurrence
    norms = np.sqrt(np.outer(counts, counts)).astype(np.float32) + shrink
    similarity = co / norms
    np.fill_diagonal(similarity, 0.0)
    if neighbours < similarity.shape[0]:
        cut = np.argpartition(-similarity, neighbours, axis=0)[neighbours:]  # weakest rows per column
        np.put_along_axis(similarity, cut, 0.0, axis=0)
    return FittedBaseline("item_knn", {"neighbours": neighbours, "shrink": shrink},
                          lambda rows: np.asarray(rows @ similarity))


def top_k(baseline: FittedBaseline, history: sp.csr_matrix, k: int, excluded: np.ndarray | None = None,
          batch_size: int = 512) -> np.ndarray:
    """(n_users, k) item indices by descending score, each user's history items masked."""
    out = np.empty((history.shape[0], k), dtype=np.int64)
    for start in range(0, history.shape[0], batch_size):
        rows = history[start:start + batch_size]
        scores = baseline.score(rows).astype(np.float32)
        scores[rows.nonzero()] = -np.inf
        if excluded is not None:
            scores[:, excluded] = -np.inf
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        out[start:start + batch_size] = np.take_along_axis(part, order, axis=1)
    return out
