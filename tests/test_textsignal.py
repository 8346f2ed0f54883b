"""The item-text check: text that groups items as users do is informative; placeholder text is not."""

from __future__ import annotations

import numpy as np

from recmodel.textsignal import MIN_LIFT, measure_text_signal


def clustered_log(n_items: int = 400, clusters: int = 20, users: int = 2000, seed: int = 0) -> dict[int, np.ndarray]:
    """Each user touches 8 items of one taste cluster (item i is in cluster i % clusters)."""
    rng = np.random.default_rng(seed)
    items = np.arange(1, n_items + 1)
    out = {}
    for user in range(users):
        members = items[items % clusters == rng.integers(clusters)]
        out[user] = rng.choice(members, size=8, replace=False)
    return out


def test_text_that_groups_items_as_users_do_is_informative() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 32))
    text = np.zeros((401, 32), dtype=np.float32)
    text[1:] = centres[np.arange(1, 401) % 20] + 0.3 * rng.normal(size=(400, 32))  # text follows the cluster
    signal = measure_text_signal(text, clustered_log())
    assert signal.informative and signal.lift > 3 * MIN_LIFT, signal


def test_placeholder_text_is_not() -> None:
    rng = np.random.default_rng(2)
    random_text = np.zeros((401, 32), dtype=np.float32)
    random_text[1:] = rng.normal(size=(400, 32))
    signal = measure_text_signal(random_text, clustered_log())
    assert not signal.informative and 0.7 < signal.lift < 1.3, signal
    same_text = np.zeros((401, 32), dtype=np.float32)
    same_text[1:] = 1.0  # every item "Product": identical embeddings
    assert not measure_text_signal(same_text, clustered_log()).informative
    assert "says little" in signal.describe()


def test_too_little_data_trusts_the_text() -> None:
    signal = measure_text_signal(np.ones((5, 4), dtype=np.float32), {1: np.array([1, 2])})
    assert signal.informative and signal.probes == 0
