"""Class statistics and the ridge head solved from them (fmlora.training.statistics)."""

import pytest
import torch

from fmlora.errors import DataError
from fmlora.model import RandomFeatures
from fmlora.training import ClassStatistics, held_out_split, ncm_logits


def _blobs(classes: int, per_class: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_statistics_add_up_across_batches_like_one_pass():
    x, y = _blobs(4, 10)
    rf = RandomFeatures(8, 32, seed=1)
    once, twice = ClassStatistics(8, rf), ClassStatistics(8, rf)
    once.add(x, y, ["a", "b", "c", "d"])
    twice.add(x[:17], y[:17], ["a", "b", "c", "d"])
    twice.add(x[17:], y[17:], ["a", "b", "c", "d"])
    assert once.labels == twice.labels == ["a", "b", "c", "d"]
    assert torch.allclose(once.gram, twice.gram) and torch.allclose(once.cross, twice.cross)
    assert torch.allclose(once.means, twice.means) and once.counts.tolist() == [10.0] * 4


def test_merged_statistics_are_those_of_both_sets_of_images():
    x, y = _blobs(4, 10)
    rf = RandomFeatures(8, 32, seed=1)
    train, held, together = ClassStatistics(8, rf), ClassStatistics(8, rf), ClassStatistics(8, rf)
    # The held-out images are listed in another class order and add a class the training lacks.
    train.add(x[y < 3], y[y < 3], ["a", "b", "c"])
    held.add(x[y >= 1], 3 - y[y >= 1], ["d", "c", "b", "a"])
    together.add(x[y < 3], y[y < 3], ["a", "b", "c"])
    together.add(x[y >= 1], y[y >= 1], ["a", "b", "c", "d"])
    merged = train.merged(held)
    assert merged.labels == together.labels == ["a", "b", "c", "d"]
    for name in ("counts", "sums", "moment", "gram", "cross"):
        assert torch.allclose(getattr(merged, name), getattr(together, name)), name
    assert torch.allclose(merged.solve(0.1), together.solve(0.1), atol=1e-6)
    assert train.labels == ["a", "b", "c"] and train.counts.tolist() == [10.0] * 3  # a copy: unchanged
    with pytest.raises(DataError, match="cannot be merged"):
        train.merged(ClassStatistics(8, RandomFeatures(8, 32, seed=2)))


def test_ridge_weights_are_the_closed_form_solution():
    x, y = _blobs(3, 12)
    stats = ClassStatistics(8)
    stats.add(x, y, ["a", "b", "c"])
    weight = stats.solve(0.1)
    h = x.double()
    lam = 0.1 * float((h.T @ h).diagonal().mean())
    expected = torch.linalg.solve(h.T @ h + lam * torch.eye(8, dtype=torch.float64), h.T @ torch.eye(3)[y].double())
    assert torch.allclose(weight, expected.float(), atol=1e-5)


def test_classes_grow_per_class_never_per_image_and_a_task_can_reuse_classes():
    x, y = _blobs(4, 20)
    stats = ClassStatistics(8, RandomFeatures(8, 16, seed=0))
    stats.add_task(x[:40], y[:40], ["a", "b"])
    size_after_first = (stats.gram.numel(), stats.cross.numel(), stats.sums.numel())
    stats.add_task(x[40:], y[40:] - 2, ["c", "d"])
    assert stats.labels == ["a", "b", "c", "d"]
    assert stats.gram.numel() == size_after_first[0] and stats.cross.numel() == 2 * size_after_first[1]
    # A domain-style task adds more images to known classes: nothing grows.
    before = (stats.gram.numel(), stats.cross.numel(), stats.sums.numel())
    stats.add_task(x[:40] + 0.1, y[:40], ["a", "b"])
    assert (stats.gram.numel(), stats.cross.numel(), stats.sums.numel()) == before
    assert stats.counts.tolist() == [40.0, 40.0, 20.0, 20.0]


def test_the_solved_head_separates_classes_and_lambda_is_chosen_on_training_data_only():
    x, y = _blobs(5, 30)
    stats = ClassStatistics(8, RandomFeatures(8, 64, seed=2))
    solution = stats.add_task(x, y, ["a", "b", "c", "d", "e"], seed=0)
    assert solution.held_out_accuracy is not None and solution.held_out_accuracy > 0.9
    assert (stats.logits(x, solution.weight).argmax(1) == y).double().mean() > 0.95


def test_held_out_split_is_per_class_disjoint_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    keep, held = held_out_split(labels, seed=3)
    assert set(keep.tolist()).isdisjoint(held.tolist()) and len(keep) + len(held) == 16
    assert [int((labels[held] == c).sum()) for c in range(3)] == [2, 1, 0]  # a lone image is never held out
    assert torch.equal(held, held_out_split(labels, seed=3)[1])


def test_ncm_is_cosine_to_class_means():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = ncm_logits(torch.tensor([[2.0, 0.1], [0.1, 5.0]]), means)
    assert scores.argmax(1).tolist() == [0, 1] and float(scores.max()) <= 1.0 + 1e-6


def test_bad_features_are_refused():
    stats = ClassStatistics(4)
    with pytest.raises(DataError, match="finite"):
        stats.add(torch.tensor([[float("nan"), 0, 0, 0]]), torch.tensor([0]), ["a"])
    with pytest.raises(DataError, match="expected"):
        stats.add(torch.zeros(2, 3), torch.tensor([0, 0]), ["a"])


def test_statistics_round_trip_through_tensors_and_refuse_another_head():
    x, y = _blobs(3, 10)
    rf = RandomFeatures(8, 16, seed=7)
    stats = ClassStatistics(8, rf)
    stats.add(x, y, ["a", "b", "c"])
    tensors, meta = stats.to_tensors()
    back = ClassStatistics.from_tensors(tensors, meta, rf)
    assert back.labels == stats.labels and torch.equal(back.gram, stats.gram) and torch.equal(back.sums, stats.sums)
    with pytest.raises(DataError, match="another head"):
        ClassStatistics.from_tensors(tensors, meta, RandomFeatures(8, 16, seed=8))
    # The Gram matrix travels as its upper triangle (16 x 17 / 2 values), and comes back whole.
    assert "gram" not in tensors and tensors["gram_upper"].shape == (136,)
    assert torch.equal(back.gram, back.gram.T)
    broken = dict(tensors, gram_upper=tensors["gram_upper"][:3])
    with pytest.raises(DataError, match="packed"):
        ClassStatistics.from_tensors(broken, meta, rf)
    # Statistics published with the whole matrix (before packing) still load.
    legacy = {k: v for k, v in tensors.items() if k != "gram_upper"} | {"gram": stats.gram}
    assert torch.equal(ClassStatistics.from_tensors(legacy, meta, rf).gram, stats.gram)
    with pytest.raises(DataError, match="shapes"):
        ClassStatistics.from_tensors(dict(legacy, gram=stats.gram[:3]), meta, rf)
    nan = dict(tensors, sums=tensors["sums"].clone().fill_(float("nan")))
    with pytest.raises(DataError, match="finite"):
        ClassStatistics.from_tensors(nan, meta, rf)


def test_degenerate_tasks_keep_the_solution_finite():
    stats = ClassStatistics(4, RandomFeatures(4, 12, seed=0))
    same = torch.ones(5, 4)  # a class whose features are all identical
    solution = stats.add_task(same, torch.zeros(5, dtype=torch.long), ["flat"])  # and a task of one class
    assert bool(torch.isfinite(solution.weight).all())
    lone = stats.add_task(torch.randn(1, 4), torch.zeros(1, dtype=torch.long), ["single"])  # one image
    assert bool(torch.isfinite(lone.weight).all()) and lone.weight.shape == (12, 2)
    zeros = stats.add_task(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), ["dark"])  # G gains nothing
    assert bool(torch.isfinite(zeros.weight).all()) and stats.labels == ["flat", "single", "dark"]


def test_cumulative_lambda_tallies_held_out_hits_over_tasks_and_survives_a_round_trip():
    from fmlora.training.statistics import CUMULATIVE_LAMBDAS

    rf = RandomFeatures(8, 64, seed=2)
    stats = ClassStatistics(8, rf)
    x, y = _blobs(6, 20, seed=3)
    first = stats.add_task(x[y < 3], y[y < 3], ["a", "b", "c"], seed=0, selection="cumulative")
    tally = stats.lambda_evidence.clone()
    # One entry per candidate; each is a count of held-out hits (4 of 20 per class held out).
    assert len(tally) == len(CUMULATIVE_LAMBDAS) and float(tally.max()) <= 12 and float(tally.max()) > 0
    assert first.relative_lambda in CUMULATIVE_LAMBDAS
    second = stats.add_task(x[y >= 3], y[y >= 3] - 3, ["d", "e", "f"], seed=1, selection="cumulative")
    assert bool((stats.lambda_evidence >= tally).all()) and float(stats.lambda_evidence.sum()) > float(tally.sum())
    # The chosen λ is the best of the running tally, the larger one on a tie.
    evidence = stats.lambda_evidence.tolist()
    best = max(range(len(evidence)), key=lambda i: (evidence[i], i))
    assert second.relative_lambda == CUMULATIVE_LAMBDAS[best]
    tensors, meta = stats.to_tensors()
    restored = ClassStatistics.from_tensors(tensors, meta, rf)
    assert torch.equal(restored.lambda_evidence, stats.lambda_evidence)
    assert torch.equal(stats.copy().lambda_evidence, stats.lambda_evidence)
    tensors["lambda_evidence"] = torch.tensor([1.0, float("nan")])
    with pytest.raises(DataError, match="evidence"):
        ClassStatistics.from_tensors(tensors, meta, rf)
    del tensors["lambda_evidence"]  # state saved before the tally existed starts a new one
    assert len(ClassStatistics.from_tensors(tensors, meta, rf).lambda_evidence) == 0


def test_per_task_lambda_keeps_no_tally_and_takes_the_largest_of_equals():
    rf = RandomFeatures(8, 64, seed=2)
    x, y = _blobs(3, 20, seed=4)
    candidates = (1e-3, 1e-2, 1e-1)
    stats = ClassStatistics(8, rf)
    solution = stats.add_task(x, y, ["a", "b", "c"], seed=0, candidates=candidates, tolerance=0.0)
    # Well-separated blobs: every candidate gets every held-out image right, so the most regularised wins.
    assert solution.held_out_accuracy == 1.0 and solution.relative_lambda == 1e-1
    assert len(stats.lambda_evidence) == 0
    # RanPAC's arg-max keeps the first of equals.
    argmax = ClassStatistics(8, rf).add_task(x, y, ["a", "b", "c"], seed=0, candidates=candidates)
    assert argmax.relative_lambda == 1e-3


def test_lambda_scored_on_a_leading_block_is_the_choice_of_a_head_of_that_many_features():
    x, y = _blobs(6, 20, seed=3)
    big, small = RandomFeatures(8, 96, seed=4), RandomFeatures(8, 24, seed=4)
    # The same seed draws the same leading rows, so the block of G is the small head's Gram matrix.
    assert torch.equal(big.projection[:24], small.projection)
    classes = ["a", "b", "c", "d", "e", "f"]
    scored = ClassStatistics(8, big).add_task(x, y, classes, seed=1, scoring_features=24)
    reference = ClassStatistics(8, small).add_task(x, y, classes, seed=1)
    whole = ClassStatistics(8, big).add_task(x, y, classes, seed=1)
    assert scored.relative_lambda == reference.relative_lambda
    assert scored.held_out_accuracy == reference.held_out_accuracy
    # The rows are still solved over every feature, at the λ the block chose.
    assert scored.weight.shape == whole.weight.shape == (96, 6)
    stats = ClassStatistics(8, big)
    stats.add(x, y, classes)
    assert torch.allclose(scored.weight, stats.solve(scored.relative_lambda))
    # A block as large as the head (or larger) is the whole head.
    larger = ClassStatistics(8, big).add_task(x, y, classes, seed=1, scoring_features=500)
    assert larger.relative_lambda == whole.relative_lambda and torch.equal(larger.weight, whole.weight)


def test_the_cholesky_solve_matches_a_general_solve_and_falls_back_when_g_is_not_definite():
    x, y = _blobs(3, 10)
    stats = ClassStatistics(8, RandomFeatures(8, 40, seed=0))
    stats.add(x, y, ["a", "b", "c"])
    lam = 1e-3 * float(stats.gram.diagonal().mean())
    general = torch.linalg.solve(stats.gram + lam * torch.eye(40, dtype=torch.float64), stats.cross)
    assert torch.allclose(stats.solve(1e-3), general.float(), rtol=1e-4, atol=1e-6)
    # 30 images, 40 features: G is singular, so λ = 0 cannot be factorised by Cholesky; LU still
    # answers with finite rows or refuses with the library's own error, never a LinAlgError.
    try:
        weight = stats.solve(0.0)
    except DataError as exc:
        assert "singular" in str(exc) or "finite" in str(exc)
    else:
        assert weight.shape == (40, 3) and bool(torch.isfinite(weight).all())


def test_lambda_is_the_held_out_best_of_explicit_ridge_solves_over_the_whole_head():
    from fmlora.training.statistics import RELATIVE_LAMBDAS

    x, y = _blobs(5, 16, seed=6)
    x = x + 2.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))  # overlapping classes
    rf = RandomFeatures(8, 48, seed=5)
    classes = ["a", "b", "c", "d", "e"]
    chosen = ClassStatistics(8, rf).add_task(x, y, classes, seed=2, tolerance=0.5)
    keep, held = held_out_split(y, seed=2)
    trial = ClassStatistics(8, rf)
    trial.add(x[keep], y[keep], classes)
    hits = [int((trial.logits(x[held], trial.solve(lam)).argmax(1) == y[held]).sum()) for lam in RELATIVE_LAMBDAS]
    # The tolerance rule: the largest λ within half a standard error of the best held-out count.
    top = max(hits)
    slack = 0.5 * (top / len(held) * (1 - top / len(held)) / len(held)) ** 0.5 * len(held)
    rule = max(i for i in range(len(hits)) if hits[i] >= top - slack)
    assert chosen.relative_lambda == RELATIVE_LAMBDAS[rule]
    assert chosen.held_out_accuracy == hits[rule] / len(held)
    # RanPAC's plain arg-max (the default): the first best count, i.e. ties to the smaller λ.
    argmax = ClassStatistics(8, rf).add_task(x, y, classes, seed=2)
    assert argmax.relative_lambda == RELATIVE_LAMBDAS[hits.index(top)]
    assert len(set(hits)) > 1  # the candidates really differ here, so the choice was tested


def test_the_lambda_rule_takes_the_most_regularised_candidate_the_evidence_cannot_tell_from_the_best():
    from fmlora.training.statistics import _most_regularised_within

    lambdas = (1e-3, 1e-2, 1e-1, 1.0)
    # 80 held-out images, best 60 hits: one standard error is sqrt(.75 x .25 / 80) x 80 = 3.9 hits.
    hits = (60, 59, 57, 50)
    assert _most_regularised_within(lambdas, hits, 80, 0.5) == 1  # 59 within 1.9 of 60, 57 not
    assert _most_regularised_within(lambdas, hits, 80, 1.0) == 2  # 57 within 3.9
    assert _most_regularised_within(lambdas, hits, 80, 0.0) == 0
    assert _most_regularised_within(lambdas, (60, 60, 59, 40), 80, 0.0) == 1  # a tie goes to the larger λ
    # The candidates' order does not matter: the largest λ wins, wherever it stands.
    assert _most_regularised_within((1.0, 1e-3), (59, 60), 80, 0.5) == 0


def test_gaussian_draws_of_earlier_classes_join_the_held_out_fifth_when_asked():
    from fmlora.training.statistics import RELATIVE_LAMBDAS

    x, y = _overlapping_blobs(16, seed=8, spread=2.0)
    first, second = y < 3, y >= 3
    base = ClassStatistics(8, RandomFeatures(8, 48, seed=5))
    base.add_task(x[first], y[first], ["a", "b", "c"], seed=1)
    plain = base.copy().add_task(x[second], y[second] - 3, ["d", "e", "f"], seed=2, tolerance=None)
    mixed = base.copy().add_task(x[second], y[second] - 3, ["d", "e", "f"], seed=2, tolerance=None, old_class_samples=5)
    # The same choice, made by hand: the task's held-out fifth plus five draws of each earlier class.
    keep, held = held_out_split(y[second] - 3, seed=2)
    trial = base.copy()
    trial.add(x[second][keep], y[second][keep] - 3, ["d", "e", "f"])
    drawn = base.gaussian_samples([0, 1, 2], 5, seed=2)
    features = torch.cat([x[second][held], drawn])
    target = torch.cat([y[second][held], torch.arange(3).repeat_interleave(5)])
    hits = [int((trial.logits(features, trial.solve(lam)).argmax(1) == target).sum()) for lam in RELATIVE_LAMBDAS]
    assert mixed.relative_lambda == RELATIVE_LAMBDAS[hits.index(max(hits))]
    assert mixed.held_out_accuracy == max(hits) / (len(held) + 15)
    assert plain.held_out_accuracy is not None and plain.held_out_accuracy * len(held) == round(
        plain.held_out_accuracy * len(held)
    )
    # Draws come from each class's own Gaussian: their mean is near the class mean.
    assert torch.allclose(base.gaussian_samples([1], 4000, seed=0).mean(0), base.means[1], atol=0.15)


def test_smoothing_averages_each_candidates_hits_with_its_neighbours_on_the_grid():
    from fmlora.training.statistics import _smoothed

    # A lone spike between poor neighbours loses to a broad plateau once smoothed (1-2-1 weights).
    hits = (40, 61, 40, 58, 59, 58)
    smoothed = _smoothed(hits, 1)
    assert smoothed[1] == pytest.approx((40 + 2 * 61 + 40) / 4)
    assert smoothed[4] == pytest.approx((58 + 2 * 59 + 58) / 4)
    assert smoothed[0] == pytest.approx((2 * 40 + 61) / 3)  # renormalised at the grid's end
    assert max(range(6), key=lambda i: smoothed[i]) == 4 and max(range(6), key=lambda i: hits[i]) == 1
    assert _smoothed(hits, 0) == list(hits)
    assert _smoothed(hits, 2)[2] == pytest.approx((40 + 4 * 61 + 6 * 40 + 4 * 58 + 59) / 16)


def test_smoothed_lambda_is_the_arg_max_of_the_smoothed_held_out_hits():
    from fmlora.training.statistics import RELATIVE_LAMBDAS, _smoothed

    x, y = _blobs(5, 16, seed=6)
    x = x + 2.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    rf = RandomFeatures(8, 48, seed=5)
    classes = ["a", "b", "c", "d", "e"]
    chosen = ClassStatistics(8, rf).add_task(x, y, classes, seed=2, smoothing=1)
    keep, held = held_out_split(y, seed=2)
    trial = ClassStatistics(8, rf)
    trial.add(x[keep], y[keep], classes)
    hits = [int((trial.logits(x[held], trial.solve(lam)).argmax(1) == y[held]).sum()) for lam in RELATIVE_LAMBDAS]
    smoothed = _smoothed(hits, 1)
    best = max(range(len(hits)), key=lambda i: (smoothed[i], -i))
    assert chosen.relative_lambda == RELATIVE_LAMBDAS[best]
    assert chosen.held_out_accuracy == hits[best] / len(held)  # the chosen λ's own accuracy, not smoothed


def test_leave_one_out_hits_are_those_of_explicit_refits_without_each_image():
    from fmlora.training.statistics import RELATIVE_LAMBDAS

    base, task_x, task_y, _ = _views_test_data()
    chosen = base.copy().add_task(task_x, task_y, ["d", "e", "f"], seed=2, scoring="leave_one_out")
    # By hand: for every image of the task, the head solved from everything else, scored on it.
    hits = []
    for lam in RELATIVE_LAMBDAS:
        whole = base.copy()
        whole.add(task_x, task_y, ["d", "e", "f"])
        scale = float(whole.gram.diagonal().mean())  # λ is relative to the whole statistics' G
        count = 0
        for i in range(len(task_y)):
            rest = torch.arange(len(task_y)) != i
            refit = base.copy()
            refit.add(task_x[rest], task_y[rest], ["d", "e", "f"])
            system = refit.gram + lam * scale * torch.eye(refit.dim, dtype=torch.float64)
            weight = torch.linalg.solve(system, refit.cross)
            count += int((refit.lift(task_x[i : i + 1]) @ weight).argmax() == task_y[i] + 3)
        hits.append(count)
    assert len(set(hits)) > 1  # the candidates differ, so the choice is tested
    assert chosen.relative_lambda == RELATIVE_LAMBDAS[hits.index(max(hits))]
    assert chosen.held_out_accuracy == max(hits) / len(task_y)


def test_first_task_leave_one_out_hits_from_the_image_kernel_are_those_of_explicit_refits():
    # 36 images, 96 random features, empty statistics: G is the images' own HᵀH, so the hits come
    # from the 36 x 36 kernel (the dual form), which must agree with refitting without each image.
    from fmlora.training.statistics import CUMULATIVE_LAMBDAS

    rf = RandomFeatures(8, 96, seed=5)
    x, y = _blobs(3, 12, seed=12)
    x = x + 2.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(13))
    classes = ["a", "b", "c"]
    stats = ClassStatistics(8, rf)
    chosen = stats.add_task(x, y, classes, seed=2, scoring="leave_one_out", selection="cumulative")
    whole = ClassStatistics(8, rf)
    whole.add(x, y, classes)
    scale = float(whole.gram.diagonal().mean())
    hits = []
    for lam in CUMULATIVE_LAMBDAS:
        count = 0
        for i in range(len(y)):
            rest = torch.arange(len(y)) != i
            refit = ClassStatistics(8, rf)
            refit.add(x[rest], y[rest], classes)
            system = refit.gram + lam * scale * torch.eye(refit.dim, dtype=torch.float64)
            weight = torch.linalg.solve(system, refit.cross)
            count += int((refit.lift(x[i : i + 1]) @ weight).argmax() == y[i])
        hits.append(count)
    assert len(set(hits)) > 1
    assert stats.lambda_evidence.tolist() == hits
    best = max(range(len(hits)), key=lambda i: (hits[i], i))
    assert chosen.relative_lambda == CUMULATIVE_LAMBDAS[best]


def test_kernel_and_factorised_leave_one_out_scores_agree():
    from fmlora.training.statistics import (
        CUMULATIVE_LAMBDAS,
        _dual_leave_one_out_scores,
        _leave_one_out_scores,
    )

    rf = RandomFeatures(8, 64, seed=1)
    x, y = _blobs(4, 10, seed=3)
    stats = ClassStatistics(8, rf)
    _, _, h, onehot = stats.contributions(x, y, ["a", "b", "c", "d"])
    gram, cross = h.T @ h, h.T @ onehot
    scored = torch.arange(0, 40, 3)
    primal = list(_leave_one_out_scores(gram, cross, h[scored], None, CUMULATIVE_LAMBDAS))
    dual = list(_dual_leave_one_out_scores(h, onehot, scored, CUMULATIVE_LAMBDAS))
    for lam, p, d in zip(CUMULATIVE_LAMBDAS, primal, dual, strict=True):
        assert p is not None and d is not None
        tol = 1e-4 if lam >= 1e-3 else 1e-8  # the factorised form scores large λ in float32
        assert torch.allclose(p[0].double(), d[0], atol=tol, rtol=tol), lam
        assert torch.allclose(p[1].double(), d[1], atol=tol, rtol=tol), lam


def _overlapping_blobs(per_class: int, seed: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Six classes whose blobs overlap (extra noise), so λ candidates differ in their hits."""
    x, y = _blobs(6, per_class, seed=seed)
    return x + spread * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)), y


def _views_test_data():
    x, y = _overlapping_blobs(12, seed=10, spread=2.5)
    first, second = y < 3, y >= 3
    base = ClassStatistics(8, RandomFeatures(8, 48, seed=5))
    base.add(x[first], y[first], ["a", "b", "c"])
    task_x, task_y = x[second], y[second] - 3
    views = task_x.unsqueeze(1) + 1.5 * torch.randn(len(task_x), 2, 8, generator=torch.Generator().manual_seed(12))
    return base, task_x, task_y, views


def _refit_hits(base, task_x, task_y, views, classes, candidates, offset):
    """By hand: for each image, the head solved from everything but the image and its views."""
    expected = []
    for lam in candidates:
        whole = base.copy()
        whole.add(torch.cat([task_x, views.reshape(-1, 8)]), torch.cat([task_y, task_y.repeat_interleave(2)]), classes)
        scale = float(whole.gram.diagonal().mean())
        count = 0
        for i in range(len(task_y)):
            rest = torch.arange(len(task_y)) != i
            refit = base.copy()
            kept = torch.cat([task_x[rest], views[rest].reshape(-1, 8)])
            refit.add(kept, torch.cat([task_y[rest], task_y[rest].repeat_interleave(2)]), classes)
            system = refit.gram + lam * scale * torch.eye(refit.dim, dtype=torch.float64)
            weight = torch.linalg.solve(system, refit.cross)
            count += int((refit.lift(task_x[i : i + 1]) @ weight).argmax() == task_y[i] + offset)
        expected.append(float(count))
    return expected


def test_views_are_left_out_with_their_image_and_join_the_solve():
    from fmlora.training.statistics import CUMULATIVE_LAMBDAS

    base, task_x, task_y, views = _views_test_data()
    classes = ["d", "e", "f"]
    expected = _refit_hits(base, task_x, task_y, views, classes, CUMULATIVE_LAMBDAS, 3)
    stats = base.copy()
    solution = stats.add_task(task_x, task_y, classes, selection="cumulative", scoring="leave_one_out", views=views)
    assert stats.lambda_evidence.tolist() == expected and len(set(expected)) > 1
    by_hand = base.copy()
    by_hand.add(torch.cat([task_x, views.reshape(-1, 8)]), torch.cat([task_y, task_y.repeat_interleave(2)]), classes)
    assert stats.counts.tolist() == by_hand.counts.tolist() == [12.0] * 3 + [36.0] * 3
    assert torch.allclose(solution.weight, by_hand.solve(solution.relative_lambda), atol=1e-5)


def test_a_first_tasks_views_are_left_out_with_their_image_through_the_kernel():
    from fmlora.training.statistics import CUMULATIVE_LAMBDAS

    _, task_x, task_y, views = _views_test_data()
    empty = ClassStatistics(8, RandomFeatures(8, 160, seed=6))  # 36 images x 3 rows <= 160 features: the kernel
    classes = ["d", "e", "f"]
    expected = _refit_hits(empty, task_x, task_y, views, classes, CUMULATIVE_LAMBDAS, 0)
    stats = empty.copy()
    stats.add_task(task_x, task_y, classes, selection="cumulative", scoring="leave_one_out", views=views)
    assert stats.lambda_evidence.tolist() == expected and len(set(expected)) > 1


def test_views_scored_as_copies_or_not_at_all_stay_out_of_the_scoring_statistics():
    from fmlora.training.statistics import CUMULATIVE_LAMBDAS

    base, task_x, task_y, views = _views_test_data()
    classes = ["d", "e", "f"]
    kwargs = {"selection": "cumulative", "scoring": "leave_one_out", "views": views}
    plain, copies = base.copy(), base.copy()
    plain.add_task(task_x, task_y, classes, view_weighting="none", **kwargs)
    copies.add_task(task_x, task_y, classes, view_weighting="copies", **kwargs)
    once = base.copy()._leave_one_out_hits(task_x, task_y, classes, CUMULATIVE_LAMBDAS, 0, None, 0)[0]
    thrice = base.copy()._leave_one_out_hits(task_x, task_y, classes, CUMULATIVE_LAMBDAS, 0, None, 0, copies=3.0)[0]
    assert plain.lambda_evidence.tolist() == once and copies.lambda_evidence.tolist() == thrice and once != thrice
    assert plain.counts.tolist() == copies.counts.tolist() == [12.0] * 3 + [36.0] * 3


def test_leave_one_out_with_copies_is_an_explicit_refit_without_every_copy_of_each_image():
    from fmlora.training.statistics import CUMULATIVE_LAMBDAS

    base, task_x, task_y, _ = _views_test_data()
    classes = ["d", "e", "f"]
    hits = base.copy()._leave_one_out_hits(task_x, task_y, classes, CUMULATIVE_LAMBDAS, 2, None, 0, copies=3.0)[0]
    copies = task_x.unsqueeze(1).expand(-1, 2, -1)  # two exact copies besides the image: three in all
    assert hits == _refit_hits(base, task_x, task_y, copies, classes, CUMULATIVE_LAMBDAS, 3)


def test_views_of_the_wrong_shape_are_refused():
    base, task_x, task_y, views = _views_test_data()
    with pytest.raises(DataError, match="views"):
        base.copy().add_task(task_x, task_y, ["d", "e", "f"], scoring="leave_one_out", views=views[:5])
