"""Drift compensation of stored class statistics (fmlora.training.drift)."""

import pytest
import torch

from fmlora.errors import DataError
from fmlora.model import RandomFeatures
from fmlora.training import ClassStatistics
from fmlora.training.drift import AffineDrift, compensate_drift, fit_affine_drift


def _blobs(classes: int, per_class: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def _map(dim: int = 8, seed: int = 1) -> AffineDrift:
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return AffineDrift(1.3 * rotation, torch.randn(dim, generator=g, dtype=torch.float64) * 2)


def test_the_fitted_map_recovers_a_known_affine_drift():
    x, _ = _blobs(6, 50)
    true = _map()
    fitted = fit_affine_drift(x, true(x).float(), relative_ridge=1e-6)
    assert torch.allclose(fitted.matrix, true.matrix, atol=1e-3)
    assert torch.allclose(fitted.bias, true.bias, atol=1e-3)
    assert fitted.relative_size(x) > 0.5


def test_the_ridge_pulls_a_map_fitted_on_few_images_towards_no_drift():
    x, _ = _blobs(2, 3)  # six images, eight dimensions: the plain fit is not determined
    true = _map()
    loose = fit_affine_drift(x, true(x).float(), relative_ridge=1e-6)
    tight = fit_affine_drift(x, true(x).float(), relative_ridge=100.0)
    eye = torch.eye(8, dtype=torch.float64)
    assert (tight.matrix - eye).norm() < 0.2 * (loose.matrix - eye).norm()
    with pytest.raises(DataError):
        fit_affine_drift(x, x[:3])


def test_no_drift_leaves_every_statistic_as_it_was():
    x, y = _blobs(4, 20)
    stats = ClassStatistics(8, RandomFeatures(8, 64, seed=0))
    stats.add(x, y, ["a", "b", "c", "d"])
    kept = stats.copy()
    compensate_drift(stats, fit_affine_drift(x, x), seed=3)
    for name in ("counts", "sums", "moment", "gram", "cross"):
        assert torch.allclose(getattr(stats, name), getattr(kept, name), atol=1e-6), name


def test_sums_and_second_moment_move_exactly_and_the_gram_towards_the_drifted_features():
    x, y = _blobs(4, 40)
    drift = _map()
    rf = RandomFeatures(8, 128, seed=0)
    stale, truth = ClassStatistics(8, rf), ClassStatistics(8, rf)
    stale.add(x, y, list("abcd"))
    truth.add(drift(x).float(), y, list("abcd"))  # what statistics taken under the new model would be
    moved = stale.copy()
    compensate_drift(moved, drift, samples_per_class=256, seed=0)
    assert torch.allclose(moved.sums, truth.sums, rtol=1e-4, atol=1e-3)
    assert torch.allclose(moved.moment, truth.moment, rtol=1e-4, atol=1e-2)
    assert torch.linalg.eigvalsh(moved.gram).min() >= -1e-6  # still a Gram matrix
    # The estimated Gram and cross matrices are far closer to the truth than the stale ones.
    for name in ("gram", "cross"):
        error = (getattr(moved, name) - getattr(truth, name)).norm()
        stale_error = (getattr(stale, name) - getattr(truth, name)).norm()
        assert error < 0.5 * stale_error, name


def test_a_head_solved_from_compensated_statistics_classifies_drifted_features():
    x, y = _blobs(6, 40, seed=4)
    drift = _map(seed=5)
    rf = RandomFeatures(8, 256, seed=1)
    stale = ClassStatistics(8, rf)
    stale.add(x, y, list("abcdef"))
    moved = stale.copy()
    compensate_drift(moved, drift, samples_per_class=128, seed=0)
    test_x, test_y = _blobs(6, 30, seed=4)  # same centres, fresh images, seen under the new model
    test_x = drift(test_x).float()

    def accuracy(stats: ClassStatistics) -> float:
        scores = stats.logits(test_x, stats.solve(1e-3))
        return float((scores.argmax(1) == test_y).float().mean())

    assert accuracy(moved) > 0.9
    assert accuracy(moved) > accuracy(stale) + 0.2


def test_compensation_of_empty_statistics_is_a_no_op():
    stats = ClassStatistics(8, RandomFeatures(8, 16, seed=0))
    compensate_drift(stats, _map())
    assert stats.labels == [] and stats.gram.abs().sum() == 0


@pytest.mark.parametrize("samples_per_class", [4, 64])  # 16 samples < 128 features; 256 > 128
def test_the_samples_space_route_moves_the_gram_exactly_as_the_features_space_route(samples_per_class):
    from fmlora.training.drift import _compensate_gram

    x, y = _blobs(4, 30, seed=2)
    stats = ClassStatistics(8, RandomFeatures(8, 128, seed=3))
    stats.add(x, y, list("abcd"))
    drift = _map(seed=5)
    primal, dual = stats.copy(), stats.copy()
    _compensate_gram(primal, drift, samples_per_class, seed=1, route="primal")
    _compensate_gram(dual, drift, samples_per_class, seed=1, route="dual")
    assert not torch.allclose(primal.gram, stats.gram)  # the drift moved something
    scale = float(primal.gram.abs().max())
    assert torch.allclose(dual.gram, primal.gram, rtol=1e-6, atol=1e-8 * scale)
    assert torch.allclose(dual.cross, primal.cross, rtol=1e-6, atol=1e-8 * float(primal.cross.abs().max()))
    assert torch.equal(dual.gram, dual.gram.T)
