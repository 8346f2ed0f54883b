"""The model, its ONNX export and the baselines, on tiny hand-made inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from recmodel import baselines
from recmodel.accuracy import split_leave_last_out
from recmodel.data import Vocab
from recmodel.model import ModelConfig, SequentialRecommender, TopKRecommender, fill_cold_ids, warm_start
from recmodel.score import open_session


def tiny_model(n_items: int = 30, max_history: int = 4, seed: int = 0) -> SequentialRecommender:
    torch.manual_seed(seed)
    text = torch.randn(n_items, 384)
    model = SequentialRecommender(ModelConfig(n_items=n_items, max_history=max_history, d_model=16, n_heads=2),
                                  text)
    torch.nn.init.normal_(model.id_embedding.weight, std=0.5)
    return model.eval()


def test_whole_history_is_masked_even_beyond_the_window(tmp_path: Path) -> None:
    model = tiny_model()
    excluded = torch.zeros(30, dtype=torch.bool)
    excluded[29] = True  # inactive
    wrapper = TopKRecommender(model, excluded, k=10).eval()
    history = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21]])  # 10 items, window of 4
    items, scores = wrapper(history)
    assert not set(items[0].tolist()) & {0, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 29}
    torch.onnx.export(wrapper, (history,), str(tmp_path / "m.onnx"), input_names=["history"],
                      output_names=["item_index", "score"], dynamo=True,
                      dynamic_shapes={"history": {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}})
    session, provider = open_session(tmp_path / "m.onnx")
    assert provider == "CPUExecutionProvider" or provider == "CUDAExecutionProvider"
    longer = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18]], dtype=np.int64)
    got_items, got_scores = session.run(None, {"history": longer})
    with torch.no_grad():
        ref_items, ref_scores = (t.numpy() for t in wrapper(torch.from_numpy(longer)))
    assert not set(got_items[0].tolist()) & set(longer[0].tolist())
    np.testing.assert_allclose(got_scores, ref_scores, atol=1e-4)


def test_export_wrapper_scores_exactly_as_the_trained_model() -> None:
    """The wrapper freezes item vectors and switches GPT-2 to eager attention; scores must not move."""
    model = tiny_model()
    history = torch.tensor([[0, 0, 0, 3, 5], [1, 2, 3, 4, 6], [0, 0, 0, 0, 9]])
    with torch.no_grad():
        reference = model.next_item_logits(history)  # SDPA attention, vectors computed on the fly
        excluded = torch.zeros(30, dtype=torch.bool)
        excluded[[7, 8]] = True
        items, scores = TopKRecommender(model, excluded, k=5).eval()(history)
    assert model.encoder.config._attn_implementation == "eager"
    expected = reference.masked_fill(excluded, float("-inf")).scatter(1, history, float("-inf")).topk(5)
    torch.testing.assert_close(scores, expected.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(items, expected.indices)


def test_only_the_last_window_of_history_is_encoded() -> None:
    model = tiny_model()
    recent = torch.tensor([[4, 5, 6, 7]])
    older = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    torch.testing.assert_close(model.next_item_logits(recent), model.next_item_logits(older))


def test_cold_items_borrow_their_text_neighbours_ids() -> None:
    model = tiny_model(n_items=6)
    with torch.no_grad():
        model.text_matrix[5] = model.text_matrix[2] * 3  # item 5 reads like item 2
        model.id_embedding.weight[5] = -10.0  # pushed down by being a negative only
    padding_before = model.id_embedding.weight[0].clone()
    positives = torch.tensor([0, 9, 9, 9, 9, 0])
    assert fill_cold_ids(model, positives, min_count=5, neighbours=1) == 1
    torch.testing.assert_close(model.id_embedding.weight[5], model.id_embedding.weight[2])
    torch.testing.assert_close(model.id_embedding.weight[0], padding_before)  # padding is never filled


def test_warm_start_maps_embeddings_by_item_id() -> None:
    parent = tiny_model(n_items=4)
    child = tiny_model(n_items=5, seed=1)
    with torch.no_grad():
        child.id_embedding.weight.zero_()
    carried = warm_start(child, parent.state_dict(), torch.tensor([-1, 10, 20, 30]), torch.tensor([-1, 10, 15, 20, 30]))
    assert carried == 3
    torch.testing.assert_close(child.id_embedding.weight[3], parent.id_embedding.weight[2])  # item 20
    assert torch.count_nonzero(child.id_embedding.weight[2]) == 0  # item 15 is new: starts from its text
    torch.testing.assert_close(child.text_projection.weight, parent.text_projection.weight)


def test_ease_closed_form_and_masking() -> None:
    train = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=np.float32))
    ease = baselines.fit_ease(train, l2=0.5)
    gram = train.T.toarray() @ train.toarray() + 0.5 * np.eye(4)
    precision = np.linalg.inv(gram)
    expected = np.eye(4) - precision / np.diag(precision)
    np.testing.assert_allclose(ease.score(sp.csr_matrix(np.eye(4, dtype=np.float32))), expected, atol=1e-5)
    top = baselines.top_k(ease, train, k=1)  # row 1 has a single unseen item
    for row, items in enumerate(top):
        assert not set(items.tolist()) & set(train[row].nonzero()[1].tolist())


def test_item_knn_and_popularity_rank_as_expected() -> None:
    train = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0]], dtype=np.float32))
    knn = baselines.fit_item_knn(train, neighbours=1, shrink=0.0)
    assert baselines.top_k(knn, sp.csr_matrix(np.array([[1, 0, 0, 0]], dtype=np.float32)), k=1)[0, 0] == 1
    popularity = baselines.fit_popularity(train)
    assert baselines.top_k(popularity, sp.csr_matrix(np.array([[1, 0, 0, 0]], dtype=np.float32)), k=3).tolist() == [[1, 2, 3]]


def test_leave_last_out_breaks_ties_by_item_id() -> None:
    at = pd.Timestamp("2020-01-01", tz="UTC")
    dataset = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 2], "item_id": [30, 10, 20, 40, 10, 20],
                            "occurred_at": [at, at, at, at + pd.Timedelta(days=1), at, at]})
    split = split_leave_last_out(dataset, Vocab.from_catalog(np.array([10, 20, 30, 40])))
    ids = split.vocab.item_ids
    assert split.users == [1]  # user 2 has fewer than 3 interactions: training only
    assert ids[split.train[1]].tolist() == [10, 20] and ids[split.validation[1]] == 30 and ids[split.test[1]] == 40
    assert ids[split.train[2]].tolist() == [10, 20]


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_respects_excluded_items(k: int) -> None:
    popularity = baselines.fit_popularity(sp.csr_matrix(np.array([[1, 1, 1, 1]], dtype=np.float32)))
    excluded = np.array([True, False, True, False])
    top = baselines.top_k(popularity, sp.csr_matrix((1, 4), dtype=np.float32), k=min(k, 2), excluded=excluded)
    assert set(top[0].tolist()) <= {1, 3}


def test_chunked_softmax_loss_matches_the_plain_loss_and_its_gradients() -> None:
    from recmodel.train import next_item_loss

    torch.manual_seed(0)
    hidden = torch.randn(37, 8, requires_grad=True)
    vectors = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    plain = next_item_loss(hidden, vectors, targets)  # under the budget: one logits matrix
    plain_grads = torch.autograd.grad(plain, (hidden, vectors))
    chunked = next_item_loss(hidden, vectors, targets, budget_bytes=12 * 50 * 5)  # chunks of 5 rows
    assert type(chunked.grad_fn).__name__ == "ChunkedSoftmaxLossBackward"
    chunked_grads = torch.autograd.grad(chunked, (hidden, vectors))
    torch.testing.assert_close(chunked, plain)
    for got, expected in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, expected)
