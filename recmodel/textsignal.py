"""Does the catalog's text say anything about what users do? Measured on the training data before training.

Titles like "Product 19263", SKU codes or empty descriptions give every item an embedding, but one that
follows digits and templates, not taste. Trained as if it were informative, such text decides where new
items land and which items look alike. The measure: for up to `PROBES` items with at least
`MIN_USERS` users, the mean co-occurrence cosine (between the sets of users who touched two items)
of each item's `NEIGHBOURS` nearest items by text, over that of as many random such items. Text that
follows taste puts co-occurring items together (lift well above 1); text that says nothing scores
about 1. docs/MODEL.md has the measured values and what the model does with each verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

PROBES = 1000
NEIGHBOURS = 10
MIN_USERS = 5
# Lift of text neighbours over random items below which the text is treated as saying nothing. Measured on
# ml-latest-small: titles with genres 1.80, random vectors 1.02, titles "Product <movieId>" 1.36 (the
# digits follow the order movies joined the catalog, so they carry a little of the era, no taste).
MIN_LIFT = 1.5


@dataclass(frozen=True)
class TextSignal:
    probes: int  # items measured (0: too few items with MIN_USERS users to tell; text is then trusted)
    neighbour_cosine: float  # mean co-occurrence cosine of an item and its nearest items by text
    random_cosine: float  # ... and random items
    lift: float  # neighbour_cosine / random_cosine
    informative: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)

    def describe(self) -> str:
        if not self.probes:
            return "too few items with interactions to test the item text; it is used as it is"
        verdict = "informative" if self.informative else f"says little (below {MIN_LIFT:g})"
        return (f"item text: its nearest neighbours co-occur {self.lift:.2f}x as much as random items "
                f"({self.probes:,} items probed): {verdict}")


PROBE_BLOCK = 32  # probes whose similarities to every item are held at once: 32 x n_items floats


def nearest_by_text(text_matrix: np.ndarray, probes: np.ndarray, candidates: np.ndarray, k: int = NEIGHBOURS
                    ) -> np.ndarray:
    """(len(probes), k) rows of `text_matrix` closest by cosine to each probe (unordered), among the rows where
    `candidates` (a bool mask) is set, never the probe itself; `PROBE_BLOCK` probes at a time."""
    norms = np.maximum(np.linalg.norm(text_matrix, axis=1), 1e-12)
    unit = text_matrix / norms[:, None]
    blocks = []
    for block in np.array_split(probes, max(len(probes) // PROBE_BLOCK, 1)):
        similarity = unit[block] @ unit.T  # (block, n_items)
        similarity[:, ~candidates] = -np.inf
        similarity[np.arange(len(block)), block] = -np.inf
        blocks.append(np.argpartition(-similarity, k, axis=1)[:, :k])
    return np.concatenate(blocks) if blocks else np.zeros((0, k), dtype=np.int64)


def measure_text_signal(text_matrix: np.ndarray, sequences: dict[int, np.ndarray], seed: int = 0) -> TextSignal:
    """`text_matrix`: (n_items, dim) in vocabulary order (row 0 padding); `sequences`: each user's vocabulary
    indices."""
    n_items = len(text_matrix)
    rows = np.concatenate([np.full(len(s), u, dtype=np.int64) for u, s in enumerate(sequences.values())] or [[]])
    cols = np.concatenate(list(sequences.values()) or [[]]).astype(np.int64)
    matrix = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (cols, rows)), shape=(n_items, len(sequences)))
    matrix.data[:] = 1.0  # items x users, binary
    users = np.asarray(matrix.sum(axis=1)).ravel()
    users[0] = 0
    warm = np.flatnonzero(users >= MIN_USERS)
    norms = np.linalg.norm(text_matrix, axis=1)
    warm = warm[norms[warm] > 0]
    if len(warm) <= NEIGHBOURS + 1:
        return TextSignal(probes=0, neighbour_cosine=0.0, random_cosine=0.0, lift=0.0, informative=True)
    rng = np.random.default_rng(seed)
    probe = rng.choice(warm, size=min(PROBES, len(warm)), replace=False)
    candidates = np.zeros(n_items, dtype=bool)
    candidates[warm] = True
    nearest = nearest_by_text(text_matrix, probe, candidates).ravel()
    random = rng.choice(warm, size=len(nearest))
    anchors = np.repeat(probe, NEIGHBOURS)
    while (same := random == anchors).any():  # a random partner is never the item itself
        random[same] = rng.choice(warm, size=int(same.sum()))
    root = np.sqrt(users)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float((np.asarray(matrix[a].multiply(matrix[b]).sum(axis=1)).ravel() / (root[a] * root[b])).mean())

    neighbour, baseline = cosine(anchors, nearest), cosine(anchors, random)
    lift = neighbour / baseline if baseline > 0 else 1.0
    return TextSignal(probes=len(probe), neighbour_cosine=round(neighbour, 5), random_cosine=round(baseline, 5),
                      lift=round(lift, 3), informative=lift >= MIN_LIFT)
