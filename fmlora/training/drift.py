"""Drift compensation: carry earlier classes' statistics over to the features of an adapted model.

Class statistics are taken under the model as it was when their task was learned. Once the adapter
moves, the features of earlier classes move with it, and the solved head would be fitted to where
they *were* (ARCHITECTURE.md §2, "The solved head"). No image of an earlier class is kept, so the
drift is estimated on the current task's images, which are seen under both models:

1. ``fit_affine_drift``: the affine map ``f_new ≈ A f_old + b`` fitted by least squares on the
   task's training features before and after training, shrunk towards the identity (so a map fitted
   on few images stays close to "no drift").
2. ``compensate_drift``: the map applied to the statistics. Counts, feature sums and the second
   moment transform exactly under an affine map. The Gram and cross matrices of the random features
   do not (``ReLU(P f)`` is not linear): pseudo-features drawn from each class's Gaussian (its mean,
   the pooled within-class covariance) are lifted before and after the map, a linear map ``T`` of
   random features is fitted between the two (ridge towards the identity), and ``G ← T G Tᵀ``,
   ``Q ← T Q``. The exact statistics are transformed, never replaced by samples, so a Gram matrix
   stays one and no drift changes nothing. (Adding the samples' Gram *difference* instead was tried
   and dropped: at the small λ a held-out fifth often picks, the mismatch between the Gaussian and
   the real classes dominated, and old classes did worse than with no compensation at all.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fmlora.errors import DataError

from .statistics import ClassStatistics

__all__ = ["AffineDrift", "compensate_drift", "fit_affine_drift"]

# Ridge of the random-feature map's fit, relative to the samples' mean second moment.
LIFT_RIDGE = 1e-3


@dataclass(frozen=True)
class AffineDrift:
    matrix: torch.Tensor  # (d, d) float64: f_new = matrix @ f_old + bias
    bias: torch.Tensor  # (d,) float64

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features.double() @ self.matrix.T + self.bias

    def relative_size(self, reference: torch.Tensor) -> float:
        """Mean displacement of ``reference`` features relative to their mean norm."""
        ref = reference.double()
        moved = (self(ref) - ref).norm(dim=1).mean()
        return float(moved / ref.norm(dim=1).mean().clamp_min(1e-12))


def fit_affine_drift(before: torch.Tensor, after: torch.Tensor, relative_ridge: float = 0.1) -> AffineDrift:
    """Least-squares ``after ≈ A before + b`` with a ridge penalty ``λ‖A − I‖²``, where λ is
    ``relative_ridge`` x the mean variance of ``before`` x the number of images."""
    if before.shape != after.shape or before.ndim != 2 or len(before) == 0:
        raise DataError(f"drift needs paired features, got {tuple(before.shape)} and {tuple(after.shape)}")
    x, y = before.double(), after.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    d = x.shape[1]
    scatter = xc.T @ xc
    lam = relative_ridge * (float(scatter.diagonal().mean()) or 1.0)
    eye = torch.eye(d, dtype=torch.float64)
    # Rows of Aᵀ solve (XᵀX + λI) Aᵀ = XᵀY + λI: the penalty pulls A towards the identity.
    matrix = torch.linalg.solve(scatter + lam * eye, xc.T @ yc + lam * eye).T
    bias = my - matrix @ mx
    if not (torch.isfinite(matrix).all() and torch.isfinite(bias).all()):
        raise DataError("the drift map is not finite")
    return AffineDrift(matrix, bias)


@torch.no_grad()
def compensate_drift(
    statistics: ClassStatistics, drift: AffineDrift, *, samples_per_class: int = 32, seed: int = 0
) -> None:
    """Move every class in ``statistics`` through ``drift`` (in place)."""
    if not statistics.labels:
        return
    counts, sums = statistics.counts, statistics.sums
    a, b = drift.matrix, drift.bias
    total, n = sums.sum(0), float(counts.sum())
    if statistics.dim:
        _compensate_gram(statistics, drift, samples_per_class, seed)
    statistics.sums = sums @ a.T + counts.unsqueeze(1) * b
    moved = a @ statistics.moment @ a.T + torch.outer(a @ total, b)
    statistics.moment = moved + torch.outer(b, a @ total) + n * torch.outer(b, b)


def _compensate_gram(
    statistics: ClassStatistics, drift: AffineDrift, samples: int, seed: int, route: str = "auto"
) -> None:
    """Move the Gram and cross matrices through the linear map of random features that the drift
    induces on each class's Gaussian: ``G ← T G Tᵀ``, ``Q ← T Q``.

    ``T`` is the ridge fit (towards the identity) of lifted samples after the map on those before:
    ``Tᵀ = (S + λI)⁻¹ (Hᵀ diag(w) H' + λI) = I + U D`` with ``S = Hᵀ diag(w) H``, ``D = H' − H`` and
    ``U = (S + λI)⁻¹ Hᵀ diag(w)``. With fewer samples N than random features M, ``U`` is computed in
    the samples' space (``Bᵀ (B Bᵀ + λI)⁻¹ diag(√w)`` with ``B = diag(√w) H``: an N x N solve) and
    ``T G Tᵀ = G + K + Kᵀ + Dᵀ (Uᵀ G U) D`` with ``K = G U D``, never forming T: about 3M²N
    operations instead of about 5M³ (a 4,000-feature head after its first task: ~20x fewer); the
    cheaper route by count is taken.
    """
    old = statistics.gaussian_samples(range(len(statistics.labels)), samples, seed)
    h_old, h_new = statistics.lift(old), statistics.lift(drift(old))
    weights = (statistics.counts / samples).repeat_interleave(samples)
    n, m = h_old.shape
    # Ridge towards the identity: directions the samples do not reach keep their statistics.
    mean_diagonal = float((weights.unsqueeze(1) * h_old.square()).sum()) / m
    lam = LIFT_RIDGE * (mean_diagonal or 1.0)
    # Multiply-adds of each route; the samples' space wins until N approaches M.
    dual_cost, primal_cost = 3 * m * m * n + 5 * m * n * n + n**3 / 3, m * m * n + 4.3 * m**3
    if route == "dual" or (route == "auto" and dual_cost < primal_cost):
        root_w = weights.sqrt()
        scaled = h_old * root_w.unsqueeze(1)  # B
        kernel = scaled @ scaled.T + lam * torch.eye(n, dtype=torch.float64)
        # U = Bᵀ K⁻¹ diag(√w) = (K⁻¹ B)ᵀ diag(√w), K symmetric positive definite (λ > 0).
        update = torch.cholesky_solve(scaled, torch.linalg.cholesky(kernel)).T * root_w  # U, (M, N)
        if not torch.isfinite(update).all():
            raise DataError("the drift map of the random features is not finite")
        delta = h_new - h_old  # D, (N, M)
        gram_u = statistics.gram @ update
        k = gram_u @ delta
        gram = statistics.gram + k + k.T + delta.T @ ((update.T @ gram_u) @ delta)
        statistics.gram = (gram + gram.T) / 2
        statistics.cross = statistics.cross + delta.T @ (update.T @ statistics.cross)
        return
    weighted = h_old * weights.unsqueeze(1)
    scatter = weighted.T @ h_old
    eye = torch.eye(m, dtype=torch.float64)
    transform = torch.linalg.solve(scatter + lam * eye, weighted.T @ h_new + lam * eye).T
    if not torch.isfinite(transform).all():
        raise DataError("the drift map of the random features is not finite")
    gram = transform @ statistics.gram @ transform.T
    statistics.gram = (gram + gram.T) / 2
    statistics.cross = transform @ statistics.cross
