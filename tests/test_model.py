"""The model, its ONNX export and the baselines, on tiny hand-made inputs."""

from __future__ import annotations

import itertools
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
from recmodel.artifacts import open_session


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
    items, _scores = wrapper(history)
    assert not set(items[0].tolist()) & {0, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 29}
    torch.onnx.export(wrapper, (history,), str(tmp_path / "m.onnx"), input_names=["history"],
                      output_names=["item_index", "score"], dynamo=True,
                      dynamic_shapes={"history": {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}})
    session, provider = open_session(tmp_path / "m.onnx")
    assert provider == "CPUExecutionProvider" or provider == "CUDAExecutionProvider"
    longer = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18]], dtype=np.int64)
    got_items, got_scores = session.run(None, {"history": longer})
    with torch.no_grad():
        _ref_items, ref_scores = (t.numpy() for t in wrapper(torch.from_numpy(longer)))
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


def test_symmetric_inverse_matches_lu_and_refuses_an_indefinite_matrix() -> None:
    rng = np.random.default_rng(0)
    rows = rng.random((40, 30))
    spd = rows.T @ rows + 0.1 * np.eye(30)
    inverse = baselines.symmetric_inverse(spd)
    np.testing.assert_allclose(inverse, np.linalg.inv(spd), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(inverse, inverse.T)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        baselines.symmetric_inverse(np.diag([1.0, -1.0, 2.0]))


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


def _batch(n_items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    history = torch.randint(1, n_items, (6, 5), generator=generator)
    history[:2, :2] = 0  # left padding
    targets = torch.randint(1, n_items, (6, 5), generator=generator)
    targets[:2, :1] = 0
    return history, targets


def test_sampled_softmax_over_every_item_is_the_exact_softmax() -> None:
    """With each item drawn once, the target among them removed as an accidental hit and put back as the
    class, the sampled softmax is the exact one: the logQ correction of a uniform q cancels."""
    from recmodel.train import ExactSoftmax, SampledSoftmax

    model = tiny_model(n_items=30, max_history=8)  # eval: no dropout, both losses see the same hidden states
    history, targets = _batch(30)
    uniform = SampledSoftmax(torch.ones(30), negatives=29, generator=torch.Generator(), popularity_share=0.0)
    sampled = uniform.loss(model, history, targets, torch.arange(1, 30))
    torch.testing.assert_close(sampled, ExactSoftmax(torch.ones(30))(model, history, targets), rtol=1e-4, atol=1e-4)


def test_sampled_softmax_corrects_for_popularity_sampling() -> None:
    """Negatives drawn by popularity, with logQ, estimate the exact loss; without it they overshoot."""
    from recmodel.train import ExactSoftmax, SampledSoftmax

    model = tiny_model(n_items=200, max_history=8)
    with torch.no_grad():  # logits of a trained model's scale (a few units), not tiny_model's dozens
        torch.nn.init.normal_(model.id_embedding.weight, std=0.05)
        model.text_matrix.mul_(0.05)
    history, targets = _batch(200)
    counts = torch.arange(200, dtype=torch.float) ** 2
    loss = SampledSoftmax(counts, negatives=400, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = float(ExactSoftmax(counts)(model, history, targets))
        estimates = [float(loss(model, history, targets)) for _ in range(40)]
        loss.log_expected = torch.zeros_like(loss.log_expected)  # no correction: popular items counted K q times
        uncorrected = [float(loss(model, history, targets)) for _ in range(40)]
    assert abs(np.mean(estimates) - exact) < 0.01 * exact, (np.mean(estimates), exact)
    assert np.mean(uncorrected) > 1.1 * exact, (np.mean(uncorrected), exact)
    assert 0.0 < float(loss.q[1:].min()) and float(loss.q[0]) == 0.0  # every item can be drawn, padding never
    drawn = torch.cat([loss.draw(torch.device("cpu")) for _ in range(50)])
    assert int(drawn.min()) >= 1 and torch.bincount(drawn, minlength=200)[150:].sum() > drawn.numel() // 4


def test_sampled_softmax_trains_only_the_rows_it_touches() -> None:
    from recmodel.train import SampledSoftmax

    model = tiny_model(n_items=50, max_history=8).train()
    history, targets = _batch(50)
    negatives = torch.tensor([7, 9])
    SampledSoftmax(torch.ones(50), negatives=2, generator=torch.Generator()).loss(model, history, targets,
                                                                                   negatives).backward()
    touched = set(torch.cat([history.flatten(), targets.flatten(), negatives]).tolist()) - {0}
    rows_with_gradient = set(torch.nonzero(model.id_embedding.weight.grad.abs().sum(1)).flatten().tolist())
    assert rows_with_gradient == touched


def test_auto_loss_is_exact_for_small_catalogs_and_sampled_for_large() -> None:
    from recmodel.config import PipelineConfig
    from recmodel.train import ExactSoftmax, SampledSoftmax, choose_loss

    config = PipelineConfig(sampled_loss_min_items=100, negatives=10)
    assert isinstance(choose_loss(config, torch.ones(100), torch.Generator()), ExactSoftmax)  # 99 items
    assert isinstance(choose_loss(config, torch.ones(101), torch.Generator()), SampledSoftmax)
    forced = PipelineConfig(loss="sampled", negatives=10)
    assert isinstance(choose_loss(forced, torch.ones(11), torch.Generator()), ExactSoftmax)  # 10 items: no sampling
    assert isinstance(choose_loss(PipelineConfig(loss="softmax"), torch.ones(10**5), torch.Generator()), ExactSoftmax)


def test_byte_dropout_drops_at_its_rate_and_keeps_the_expected_value() -> None:
    from recmodel.model import ByteDropout

    torch.manual_seed(0)
    dropout = ByteDropout(0.2).train()
    x = torch.ones(200_000)
    out = dropout(x)
    assert abs(float((out == 0).float().mean()) - 51 / 256) < 0.005
    assert abs(float(out.mean()) - 1.0) < 0.01
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(ByteDropout(0.0).train()(x), x)


def test_cpu_training_attention_computes_what_sdpa_computes() -> None:
    from recmodel.model import CPU_TRAINING_ATTENTION

    model = tiny_model()
    history = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4]])
    with torch.inference_mode():
        reference = model(history)
        model.encoder.set_attn_implementation(CPU_TRAINING_ATTENTION)
        real = history != 0  # a padding position's output is never read (no target, never the last)
        torch.testing.assert_close(model(history)[real], reference[real])
    # In training mode too (its own dropout path), with dropout off so the two can be compared.
    undropped = SequentialRecommender(ModelConfig(n_items=30, max_history=4, d_model=16, n_heads=2, dropout=0.0),
                                      torch.randn(30, 384)).train()
    torch.nn.init.normal_(undropped.id_embedding.weight, std=0.5)
    with torch.no_grad():
        reference = undropped(history)
        undropped.encoder.set_attn_implementation(CPU_TRAINING_ATTENTION)
        torch.testing.assert_close(undropped(history)[real], reference[real])


def test_item_vectors_of_some_rows_are_those_rows_of_all() -> None:
    model = tiny_model()
    rows = torch.tensor([0, 5, 2, 29])
    with torch.no_grad():
        torch.testing.assert_close(model.item_vectors(rows), model.item_vectors()[rows])
        assert float(model.item_vectors(rows)[0].abs().sum()) == 0.0
    text_free = SequentialRecommender(ModelConfig(n_items=30, d_model=16, item_text=False), torch.randn(30, 384))
    with torch.no_grad():
        torch.testing.assert_close(text_free.item_vectors()[1:], text_free.id_embedding.weight[1:])


def test_warmup_cosine_rises_peaks_and_decays_to_a_tenth() -> None:
    from recmodel.train import FINAL_LR_SHARE, WarmupCosine

    schedule = WarmupCosine(1000)
    assert schedule(0) < 0.05 and schedule(schedule.warmup_steps) == pytest.approx(1.0)
    assert schedule(999) == pytest.approx(FINAL_LR_SHARE, abs=1e-3) and schedule(5000) == pytest.approx(FINAL_LR_SHARE)
    values = [schedule(step) for step in range(schedule.warmup_steps, 1000)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # never rises after the peak
    schedule.fit_to(500)  # the time budget will end the run at step 500: the decay ends there
    assert schedule(499) == pytest.approx(FINAL_LR_SHARE, abs=1e-2) and schedule.warmup_steps == 25
    schedule.fit_to(5000)  # a faster pace never plans past the planned steps
    assert schedule.total_steps == 1000


def _fit_tiny(continuing: bool = False, with_model: bool = False, **overrides):
    from recmodel.config import PipelineConfig
    from recmodel.train import fit_sequences, hold_out_last

    rng = np.random.default_rng(0)
    sequences = {user: rng.integers(1, 21, size=8) for user in range(60)}
    train_sequences, validation = hold_out_last(sequences)
    config = PipelineConfig.from_overrides({"d_model": 16, "n_heads": 2, "max_history": 8, "batch_size": 16,
                                            **overrides})
    model, fit = fit_sequences(train_sequences, Vocab(np.arange(-1, 21)), torch.randn(22, 384), config,
                               None if continuing else validation, device=torch.device("cpu"), continuing=continuing)
    return (model, fit, validation) if with_model else fit


def test_the_checkpoint_window_follows_the_mean_of_its_epochs_and_averages_their_weights() -> None:
    from recmodel.train import CheckpointWindow

    from recmodel.train import load_parameters

    window, layer = CheckpointWindow(2), torch.nn.Linear(2, 1)
    layer.register_buffer("scale", torch.tensor(7.0))
    for epoch, (weight, ndcg) in enumerate([(1.0, 0.1), (2.0, 0.2), (4.0, 0.5)], start=1):
        torch.nn.init.constant_(layer.weight, weight)
        window.add(epoch, ndcg, layer)
    assert window.epochs == [2, 3] and window.mean_ndcg == pytest.approx(0.35)  # the first epoch left the window
    averaged = window.averaged_parameters()
    assert set(averaged) == {"weight", "bias"}  # buffers are not copied every epoch
    assert torch.equal(averaged["weight"], torch.full((1, 2), 3.0))
    assert float(layer.weight[0, 0]) == 4.0  # the model itself is untouched until the average is loaded
    load_parameters(layer, averaged)
    assert float(layer.weight[0, 0]) == 3.0 and float(layer.scale) == 7.0
    with pytest.raises(ValueError, match="bias"):
        load_parameters(layer, {"weight": averaged["weight"]})


def test_the_kept_model_is_the_average_of_the_best_window_and_its_validation_is_measured_on_it() -> None:
    from recmodel.train import validation_ndcg

    # Patience beyond the epochs: no plateau decay either, so the schedule keeps its planned length.
    model, fit, validation = _fit_tiny(with_model=True, epochs=8, patience=20, checkpoint_window=3, learning_rate=1e-2)
    assert fit.kept_epochs == list(range(max(fit.best_epoch - 2, 1), fit.best_epoch + 1))
    assert fit.validation_ndcg == pytest.approx(validation_ndcg(model, validation, torch.device("cpu")))
    assert (fit.planned_epochs, fit.scheduled_epochs) == (8, 8.0)  # no budget cut: the schedule kept its length
    single = _fit_tiny(epochs=8, patience=20, checkpoint_window=1, learning_rate=1e-2)
    assert single.kept_epochs == [single.best_epoch]
    best = max(point.validation_ndcg for point in single.curve)
    assert single.curve[single.best_epoch - 1].validation_ndcg == best


def test_a_budget_too_short_for_the_planned_epochs_shortens_the_schedule_and_the_record_says_so(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import recmodel.train

    ticks = itertools.count()  # a clock of the training loop's own: 10 ms per reading, whatever the machine's load
    monkeypatch.setattr(recmodel.train, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 0.01))
    with caplog.at_level("WARNING", logger="recmodel.train"):
        fit = _fit_tiny(epochs=1000, patience=1000, train_time_budget_seconds=3.0)  # 4,000 steps: far more than 3 s
    assert fit.stopped_by == "time_budget" and fit.planned_epochs == 1000
    assert fit.scheduled_epochs < 1000  # the decay was re-planned to end with the budget
    assert "learning-rate decay now ends there" in caplog.text


def test_the_refit_trains_on_at_the_end_of_the_decay_not_from_a_new_warm_up() -> None:
    fit = _fit_tiny(continuing=True, epochs=3, learning_rate=1e-3, refit_learning_rate=3e-4)
    assert [point.learning_rate for point in fit.curve] == pytest.approx([3e-4] * 3)
    assert fit.kept_epochs == [3] and fit.validation_ndcg == 0.0  # no validation: the last weights are kept


def test_the_time_budget_ends_training_mid_epoch_and_says_so() -> None:
    fit = _fit_tiny(epochs=50, train_time_budget_seconds=0.001)  # spent by the first step
    assert (fit.epochs, fit.stopped_by, len(fit.curve)) == (1, "time_budget", 1)
    assert fit.loop.sequences < 60  # one batch, not the whole epoch of 60 windows
    assert fit.still_improving is (fit.validation_ndcg > 0)  # stopped by the budget on its best (only) epoch


def test_a_plateau_waits_for_min_epochs_and_patience_then_decays_the_learning_rate_and_stops(
        caplog: pytest.LogCaptureFixture) -> None:
    from recmodel.train import FINAL_LR_SHARE

    # A learning rate this small leaves the ranking unchanged: the best epoch stays the first.
    with caplog.at_level("INFO", logger="recmodel.train"):
        fit = _fit_tiny(epochs=20, learning_rate=1e-12, patience=2, min_epochs=4)
    assert fit.annealed_at_epoch == 4  # plateaued since epoch 1, but not before min_epochs
    assert "the learning rate now decays to its floor over 1 epochs" in caplog.text
    assert (fit.epochs, fit.best_epoch, fit.stopped_by, fit.still_improving) == (5, 1, "early_stopping", False)
    assert [point.epoch for point in fit.curve] == [1, 2, 3, 4, 5]  # one epoch (patience / 2) of decay, then stop
    assert fit.curve[-1].learning_rate == pytest.approx(1e-12 * FINAL_LR_SHARE)
    assert fit.curve[3].learning_rate > 0.5e-12  # still high when the plateau was seen
    assert all(point.validation_ndcg == fit.curve[0].validation_ndcg for point in fit.curve)
    constant = _fit_tiny(epochs=20, learning_rate=1e-12, patience=2, min_epochs=4, lr_schedule="constant")
    assert (constant.epochs, constant.annealed_at_epoch) == (4, None)  # nothing to decay: it stops


def test_annealing_decays_from_where_the_schedule_is_to_its_floor() -> None:
    from recmodel.train import FINAL_LR_SHARE, WarmupCosine

    schedule = WarmupCosine(1000)
    before = schedule(300)
    schedule.anneal(300, 50)
    assert schedule(300) == pytest.approx(before) and schedule(350) == pytest.approx(FINAL_LR_SHARE)
    values = [schedule(step) for step in range(300, 351)]
    assert all(a >= b for a, b in itertools.pairwise(values)) and schedule(900) == pytest.approx(FINAL_LR_SHARE)
    schedule.fit_to(2000)  # the budget never pushes an anneal's end back ...
    assert schedule.total_steps == 350
    schedule.fit_to(320)  # ... but may bring it closer
    assert schedule.total_steps == 320 and schedule(320) == pytest.approx(FINAL_LR_SHARE)


def test_training_threads_follow_the_cgroup_cpu_quota(tmp_path: Path) -> None:
    import os

    from recmodel.train import cpu_threads

    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # a container allowed 1.5 CPUs
    assert cpu_threads(cpu_max) == min(cores, 2)
    cpu_max.write_text("max 100000\n")
    assert cpu_threads(cpu_max) == cores
    assert cpu_threads(tmp_path / "absent") == cores  # cgroup v1 or no cgroup: the affinity decides


def test_the_ablations_swap_one_part_each_and_are_valid_settings() -> None:
    from recmodel.accuracy import ablations
    from recmodel.config import PipelineConfig

    small, large = ablations(9_742, PipelineConfig()), ablations(50_000, PipelineConfig())
    assert [a.name for a in small][:4] == ["default recipe", "no item text", "sampled loss", "sampled loss, 3x epochs"]
    assert "softmax loss" in [a.name for a in large] and not any("3x" in a.name for a in large)
    for ablation in small + large:
        PipelineConfig.from_overrides(ablation.overrides)  # every override is a checked setting
    plain = next(a for a in small if a.name == "plain SASRec").overrides
    assert (plain["item_text"], plain["loss"], plain["lr_schedule"], plain["patience"]) == (False, "softmax", "constant", 10)
    assert [a.warm_start for a in small].count(True) == 1
