"""Class statistics and the classifier solved from them, without keeping a single image.

Per class: the count and the feature sum (so the mean). Shared: the second moment ``R = Σ f fᵀ`` of
the features themselves (so the pooled within-class covariance, which drift compensation samples
from: ``fmlora/training/drift.py``), the Gram matrix ``G = Σ h hᵀ`` and
``Q = Σ h yᵀ`` of the random features ``h = ReLU(P f)`` of every training image seen so far (RanPAC's
ridge head). They grow with the number of classes (Q gains a column per class, the means a row),
never with the number of images, and they add up across tasks: a domain-incremental task adds to its
classes' columns. ``P`` is regenerated from a seed, never stored.

The ridge weights are ``W = (G + λI)⁻¹ Q``. λ is chosen on the task's *training* images, scored
one of two ways (``add_task``'s ``scoring``): ``"held_out"`` solves without a held-out fifth of the
task and counts hits on that fifth (RanPAC's recipe); ``"leave_one_out"`` (the pipeline's default,
``TrainConfig.lambda_scoring``) counts, for each of the task's images, the hit of the whole head
solved without that image, in closed form (``_leave_one_out_hits``). ``selection="task"`` decides on
this task alone (the best count; ``tolerance`` takes the largest λ within that many standard errors
of it instead); ``"cumulative"`` (the pipeline's default, ``TrainConfig.lambda_selection``) adds
each task's hits per candidate, on a half-decade grid, to a running tally kept with the statistics
and takes the best of the tally (ties: the larger λ). A fifth is a few dozen images, all of the
newest classes, so a per-task held-out choice swings over decades from task to task (1e-6 to 100 on
the glyph stream); leave-one-out scores five times as many and the head that is published, but its
images are still all of the newest classes, so alone it can choose a λ that fits them at the
earlier classes' cost; the tally weighs every task's evidence.
Sums are kept in float64, so accumulation over many tasks does not lose precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from fmlora.errors import DataError
from fmlora.model.head import RandomFeatures

from .config import LambdaScoring, LambdaSelection, UnscoredWeighting

__all__ = [
    "CUMULATIVE_LAMBDAS",
    "RELATIVE_LAMBDAS",
    "ClassStatistics",
    "RidgeSolution",
    "held_out_split",
    "ncm_logits",
]

# Candidate ridge strengths, relative to the mean diagonal of G (so they mean the same for any
# feature scale or image count).
RELATIVE_LAMBDAS: tuple[float, ...] = tuple(10.0**k for k in range(-6, 3))
# From this relative λ up, G + λI is well enough conditioned that scoring a candidate in float32
# gives the same held-out hits as float64 (checked on every glyph task's trial head at 4,000
# features: identical counts from 1e-3 up, different ones below), at half the cost.
SINGLE_PRECISION_LAMBDA = 1e-3
# Leave-one-out scoring looks at up to this many of a task's images (a per-class share of them): each
# is one more right-hand side of every candidate's solve.
LEAVE_ONE_OUT_IMAGES = 800
# The same range in half decades: a tally over many tasks can tell finer steps apart.
CUMULATIVE_LAMBDAS: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-12, 5))


def held_out_split(labels: torch.Tensor, fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, a seeded ``fraction`` of the indices (at least one when a class has two or more)."""
    generator = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_held = max(1, round(fraction * len(idx))) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


@dataclass(frozen=True)
class RidgeSolution:
    weight: torch.Tensor  # (dim, classes), float32
    relative_lambda: float
    held_out_accuracy: float | None


def ncm_logits(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each feature to each class mean (nearest class mean)."""
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    m = torch.nn.functional.normalize(means.double(), dim=-1)
    return (f @ m.T).float()


def _moment_of_means(counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    return sums.T @ (sums / counts.clamp_min(1).unsqueeze(1))


def _lu_solve(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
    try:
        return torch.linalg.solve(system, rhs)
    except torch.linalg.LinAlgError:
        return None


def _ridge_solution(system: torch.Tensor, cross: torch.Tensor, *, lu_fallback: bool = True) -> torch.Tensor | None:
    """``system⁻¹ cross`` for ``system = G + λI``, or None where it is numerically singular.

    For λ > 0 the system is symmetric positive definite: Cholesky is about three times cheaper than
    LU, which stays the fallback (λ = 0, or a G indefinite by rounding)."""
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(cross, factor)
    return _lu_solve(system, cross) if lu_fallback else None


Results = tuple[torch.Tensor, ...]


def _per_candidate(
    gram: torch.Tensor,
    operands: tuple[torch.Tensor, ...],
    candidates: Sequence[float],
    compute: Callable[..., Results | None],
) -> Iterator[Results | None]:
    """For each candidate λ (relative to the mean diagonal of G): ``compute(system, factor,
    *operands)`` with ``system = G + λI`` and ``factor`` its Cholesky factor, or None where Cholesky
    refuses the system (then only in float64, for an LU fallback). In float32 from
    ``SINGLE_PRECISION_LAMBDA`` up, else (and whenever float32 fails) in float64; None where neither
    gives finite results.

    One Cholesky factorisation per candidate: at 4,000 features nine of them take a third of the
    time of the one eigendecomposition that would serve them all (2.7 s vs 9 s). G + λI is built in
    one reused buffer: a fresh pair of 128 MB matrices per candidate cost a sixth of the search."""
    scale = float(gram.diagonal().mean()) or 1.0
    double = (gram, *operands)
    single = tuple(t.float() for t in double)
    buffers = {torch.float64: torch.empty_like(gram), torch.float32: torch.empty_like(single[0])}
    for lam in candidates:
        tries = (single, double) if lam >= SINGLE_PRECISION_LAMBDA else (double,)
        found = None
        for g, *ops in tries:
            system = buffers[g.dtype]
            system.copy_(g)
            system.diagonal().add_(lam * scale)
            factor, info = torch.linalg.cholesky_ex(system)
            if int(info) != 0:
                if g.dtype != torch.float64:
                    continue
                factor = None
            results = compute(system, factor, *ops)
            if results is not None and all(bool(torch.isfinite(t).all()) for t in results):
                found = results
                break
        yield found


def _candidate_solutions(
    gram: torch.Tensor, rhs: torch.Tensor, candidates: Sequence[float]
) -> Iterator[torch.Tensor | None]:
    """``(G + λI)⁻¹ rhs`` for each candidate, or None where it is numerically singular
    (``_per_candidate``'s precision policy)."""

    def solve(system: torch.Tensor, factor: torch.Tensor | None, r: torch.Tensor) -> Results | None:
        solution = torch.cholesky_solve(r, factor) if factor is not None else _lu_solve(system, r)
        return None if solution is None else (solution,)

    for results in _per_candidate(gram, (rhs,), candidates, solve):
        yield None if results is None else results[0]


# (predictions of the scored images by the head solved from everything, their leverages, and the
# predictions of any extra rows), or None where the candidate is numerically singular.
LeaveOneOutScore = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None


def _leave_one_out_scores(
    gram: torch.Tensor,
    cross: torch.Tensor,
    h_scored: torch.Tensor,
    extra: torch.Tensor | None,
    candidates: Sequence[float],
) -> Iterator[LeaveOneOutScore]:
    """Per candidate λ (relative to the mean diagonal of G), the scored images' predictions
    ``h_iᵀ (G + λI)⁻¹ Q`` and leverages ``h_iᵀ (G + λI)⁻¹ h_i``, plus ``extra``'s predictions.

    With ``G + λI = LLᵀ`` both come from one triangular solve ``Z = L⁻¹ [Q | Hᵀ]``: predictions
    ``Z_Hᵀ Z_Q`` and leverages the squared column norms of ``Z_H``, half the work of solving with
    both factors (at 4,000 features and 400 images: 0.10 s instead of 0.25 s per float32 candidate).
    ``_per_candidate``'s precision policy; a system Cholesky refuses in float64 falls back to LU."""
    rows = h_scored if extra is None else torch.cat([h_scored, extra])
    m, classes = len(h_scored), cross.shape[1]

    def score(system: torch.Tensor, factor: torch.Tensor | None, q: torch.Tensor, r: torch.Tensor) -> Results | None:
        if factor is not None:
            z = torch.linalg.solve_triangular(factor, torch.cat([q, r.T], dim=1), upper=False)
            z_q, z_rows = z[:, :classes], z[:, classes:]
            return z_rows.T @ z_q, (z_rows[:, :m] ** 2).sum(dim=0)
        solution = _lu_solve(system, torch.cat([q, r[:m].T], dim=1))
        if solution is None:
            return None
        return r @ solution[:, :classes], (r[:m] * solution[:, classes:].T).sum(dim=1)

    for results in _per_candidate(gram, (cross, rows), candidates, score):
        if results is None:
            yield None
        else:
            predictions, leverage = results
            yield predictions[:m], leverage, predictions[m:] if extra is not None else None


def _dual_leave_one_out_scores(
    h: torch.Tensor, onehot: torch.Tensor, scored: torch.Tensor, candidates: Sequence[float]
) -> Iterator[LeaveOneOutScore]:
    """``_leave_one_out_scores`` for ``G = HᵀH`` of the images ``h`` themselves (fewer than features).

    With ``K = HHᵀ = U diag(σ) Uᵀ``, the fit to the images is ``S Y`` with hat matrix
    ``S = H (HᵀH + λI)⁻¹ Hᵀ = U diag(σ / (σ + λ)) Uᵀ``, whose diagonal is the leverages: one
    eigendecomposition of an images x images matrix (400 x 400 on a glyph task, milliseconds) scores
    every candidate, where the primal form factorises a features x features matrix per candidate
    (4,000 x 4,000: seconds each). Exact in arithmetic; float64 throughout."""
    scale = float((h * h).sum()) / h.shape[1] or 1.0
    kernel = h @ h.T
    sigma, u = torch.linalg.eigh((kernel + kernel.T) / 2)
    sigma = sigma.clamp_min(0)
    projected = u.T @ onehot
    u_scored = u[scored]
    for lam in candidates:
        denominator = sigma + lam * scale
        if not bool((denominator > 0).all()):  # λ = 0 on a rank-deficient kernel: singular
            yield None
            continue
        shrink = sigma / denominator
        yield (u_scored * shrink) @ projected, (u_scored**2) @ shrink, None


def _group_out_predictions(fitted: torch.Tensor, hat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Each group's first row predicted by the fit without the whole group: with the group's fitted
    values F (g x classes), targets Y and hat block P (g x g), the left-out residuals are
    ``(I − P)⁻¹ (Y − F)``. None where some ``I − P`` is singular (λ too small for the group)."""
    eye = torch.eye(hat.shape[1], dtype=hat.dtype)
    residual, info = torch.linalg.solve_ex(eye - hat, targets - fitted)
    if bool((info != 0).any()):
        return None
    return (targets - residual)[:, 0]


def _leave_group_out_scores(
    gram: torch.Tensor, cross: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, candidates: Sequence[float]
) -> Iterator[torch.Tensor | None]:
    """Per candidate λ, the prediction of each group's first row (``rows``: m groups x g rows x
    features, e.g. an image and its views; ``targets`` m x g x classes) by the head solved from
    everything but that group. One triangular solve ``Z = L⁻¹ [Q | Rᵀ]`` gives the fitted values
    ``Z_Rᵀ Z_Q`` and the g x g hat blocks ``Z_gᵀ Z_g`` (``_per_candidate``'s precision policy)."""
    m, g, dim = rows.shape
    classes = cross.shape[1]

    def score(
        system: torch.Tensor, factor: torch.Tensor | None, q: torch.Tensor, r: torch.Tensor, y: torch.Tensor
    ) -> Results | None:
        if factor is not None:
            z = torch.linalg.solve_triangular(factor, torch.cat([q, r.T], dim=1), upper=False)
            fitted = (z[:, classes:].T @ z[:, :classes]).view(m, g, classes)
            z_rows = z[:, classes:].reshape(dim, m, g)
            hat = torch.einsum("dma,dmb->mab", z_rows, z_rows)
        else:
            solution = _lu_solve(system, torch.cat([q, r.T], dim=1))
            if solution is None:
                return None
            fitted = (r @ solution[:, :classes]).view(m, g, classes)
            hat = torch.einsum("mad,dmb->mab", r.view(m, g, dim), solution[:, classes:].reshape(dim, m, g))
        left_out = _group_out_predictions(fitted, hat, y)
        return None if left_out is None else (left_out,)

    for results in _per_candidate(gram, (cross, rows.reshape(m * g, dim), targets), candidates, score):
        yield None if results is None else results[0]


def _dual_leave_group_out_scores(
    h: torch.Tensor, onehot: torch.Tensor, groups: torch.Tensor, candidates: Sequence[float]
) -> Iterator[torch.Tensor | None]:
    """``_leave_group_out_scores`` for ``G = HᵀH`` of the rows ``h`` themselves (a first task, fewer
    rows than features): from the rows' kernel ``HHᵀ = U diag(σ) Uᵀ``, the hat matrix is
    ``U diag(σ / (σ + λ)) Uᵀ``. ``groups`` (m x g) indexes the rows of each group, first the scored one."""
    scale = float((h * h).sum()) / h.shape[1] or 1.0
    kernel = h @ h.T
    sigma, u = torch.linalg.eigh((kernel + kernel.T) / 2)
    sigma = sigma.clamp_min(0)
    projected = u.T @ onehot
    u_groups, targets = u[groups], onehot[groups]
    for lam in candidates:
        denominator = sigma + lam * scale
        if not bool((denominator > 0).all()):
            yield None
            continue
        shrink = sigma / denominator
        fitted = (u_groups * shrink) @ projected
        hat = torch.einsum("man,n,mbn->mab", u_groups, shrink, u_groups)
        yield _group_out_predictions(fitted, hat, targets)


def _most_regularised_within(candidates: Sequence[float], hits: Sequence[float], held: int, tolerance: float) -> int:
    """Index of the largest λ whose held-out hits are within ``tolerance`` standard errors of the best.

    A task's held-out fifth is a few dozen images, so neighbouring λ often differ by a hit or two
    of noise; among candidates the evidence cannot tell apart, this takes the most regularised.
    Measured (ARCHITECTURE.md §2): better on glyphs-grating, worse on glyphs-dil, so not the default."""
    best = max(hits)
    p = best / held
    slack = tolerance * math.sqrt(p * (1 - p) / held) * held
    return max((i for i in range(len(candidates)) if hits[i] >= best - slack), key=lambda i: candidates[i])


def _smoothed(hits: Sequence[float], width: int) -> list[float]:
    """Each candidate's hits averaged with ``width`` neighbours either side on the log-λ grid, with
    binomial (1-2-1, 1-4-6-4-1, ...) weights renormalised at the grid's ends."""
    if width <= 0:
        return list(hits)
    weights = [math.comb(2 * width, k) for k in range(2 * width + 1)]
    out = []
    for i in range(len(hits)):
        pairs = [(weights[k], hits[i + k - width]) for k in range(2 * width + 1) if 0 <= i + k - width < len(hits)]
        out.append(sum(w * h for w, h in pairs) / sum(w for w, _ in pairs))
    return out


def _upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.triu_indices(len(matrix), len(matrix))
    return matrix[rows, cols]


def _from_upper_triangle(values: torch.Tensor, size: int) -> torch.Tensor:
    if values.shape != (size * (size + 1) // 2,):
        raise DataError(
            f"a packed {size} x {size} Gram matrix has {size * (size + 1) // 2} values, not {tuple(values.shape)}"
        )
    rows, cols = torch.triu_indices(size, size)
    matrix = torch.zeros(size, size, dtype=values.dtype)
    matrix[rows, cols] = values
    matrix[cols, rows] = values
    return matrix


def _projection_key(random_features: RandomFeatures | None) -> tuple[int, int] | None:
    """What identifies a random projection: it is regenerated from its size and seed."""
    return None if random_features is None else (random_features.dim, random_features.seed)


class ClassStatistics:
    """Running per-class and shared statistics of features and their random projection."""

    def __init__(
        self, in_features: int, random_features: RandomFeatures | None = None, *, keep_gram: bool = True
    ) -> None:
        """``keep_gram=False``: counts and sums only (nearest class means), no ridge solve."""
        self.in_features = in_features
        self.random_features = random_features
        dim = (random_features.dim if random_features is not None else in_features) if keep_gram else 0
        self.labels: list[str] = []
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.sums = torch.zeros(0, in_features, dtype=torch.float64)
        self.moment = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)
        self.cross = torch.zeros(dim, 0, dtype=torch.float64)
        # Held-out hits per candidate of CUMULATIVE_LAMBDAS, summed over tasks (empty until used).
        self.lambda_evidence = torch.zeros(0, dtype=torch.float64)

    @property
    def dim(self) -> int:
        return int(self.gram.shape[0])

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)

    def within_class_covariance(self, shrinkage: float = 0.1) -> torch.Tensor:
        """Pooled within-class covariance of the features, shrunk towards its mean variance."""
        d = self.in_features
        total = float(self.counts.sum())
        if total <= len(self.labels):
            return torch.zeros(d, d, dtype=torch.float64)
        scatter = self.moment - _moment_of_means(self.counts, self.sums)
        covariance = (scatter + scatter.T) / (2 * (total - len(self.labels)))
        target = float(covariance.diagonal().clamp_min(0).mean()) * torch.eye(d, dtype=torch.float64)
        return (1 - shrinkage) * covariance + shrinkage * target

    @torch.no_grad()
    def lift(self, features: torch.Tensor) -> torch.Tensor:
        """The features the ridge head reads (random features where there are), float64."""
        f = features.float().cpu()
        return (self.random_features.cpu()(f) if self.random_features is not None else f).double()

    def _columns(self, classes: Sequence[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(classes) if c not in self.labels]
        if new:
            self.labels.extend(new)
            self.counts = torch.cat([self.counts, torch.zeros(len(new), dtype=torch.float64)])
            self.sums = torch.cat([self.sums, torch.zeros(len(new), self.in_features, dtype=torch.float64)])
            self.cross = torch.cat([self.cross, torch.zeros(self.dim, len(new), dtype=torch.float64)], dim=1)
        position = {c: i for i, c in enumerate(self.labels)}
        return torch.tensor([position[c] for c in classes], dtype=torch.long)

    def contributions(
        self, features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class columns, Gram, per-image lifted features, one-hot targets) of a batch, not added."""
        if features.ndim != 2 or features.shape[1] != self.in_features or len(features) != len(labels):
            raise DataError(f"expected ({len(labels)}, {self.in_features}) features, got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise DataError("features must be finite")
        columns = self._columns(classes)[labels]
        h = self.lift(features) if self.dim else torch.zeros(len(labels), 0, dtype=torch.float64)
        gram = h.T @ h
        # Exactly symmetric (a matrix product need not be), so the stored upper triangle is all of G.
        gram = (gram + gram.T) / 2
        return columns, gram, h, torch.nn.functional.one_hot(columns, len(self.labels)).double()

    def add(self, features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
        """Add a batch: ``labels`` index into ``classes`` (the batch's own class list)."""
        self._accumulate(features, *self.contributions(features, labels, classes))

    def _accumulate(
        self, features: torch.Tensor, columns: torch.Tensor, gram: torch.Tensor, h: torch.Tensor, y: torch.Tensor
    ) -> None:
        self.gram += gram
        self.cross += h.T @ y
        self.counts.index_add_(0, columns, torch.ones(len(columns), dtype=torch.float64))
        self.sums.index_add_(0, columns, features.double())
        self.moment += features.double().T @ features.double()

    def solve(self, relative_lambda: float) -> torch.Tensor:
        """Ridge weights (dim, classes) for λ = ``relative_lambda`` x the mean diagonal of G."""
        scale = float(self.gram.diagonal().mean()) or 1.0
        lam = relative_lambda * scale
        system = self.gram.clone()
        system.diagonal().add_(lam)
        weight = _ridge_solution(system, self.cross)
        if weight is None:
            raise DataError(f"the ridge system is singular at λ = {relative_lambda:g} x mean(diag G)")
        if not torch.isfinite(weight).all():
            raise DataError("the ridge solve did not give finite weights")
        return weight.float()

    def gaussian_samples(self, columns: Sequence[int], per_class: int, seed: int) -> torch.Tensor:
        """``per_class`` features (float64) of each class in ``columns``, class by class, drawn from
        N(class mean, pooled within-class covariance): drift compensation's pseudo-samples, and the
        λ search's stand-ins for earlier classes."""
        generator = torch.Generator().manual_seed(seed)
        values, vectors = torch.linalg.eigh(self.within_class_covariance())
        root = vectors * values.clamp_min(0).sqrt()  # root @ rootᵀ = covariance
        noise = torch.randn(len(columns), per_class, self.in_features, generator=generator, dtype=torch.float64)
        return (self.means[list(columns)].unsqueeze(1) + noise @ root.T).reshape(-1, self.in_features)

    def logits(self, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (self.lift(features).float() @ weight).float()

    def add_task(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        *,
        seed: int = 0,
        candidates: Sequence[float] | None = None,
        selection: LambdaSelection = "task",
        scoring_features: int | None = None,
        tolerance: float | None = None,
        old_class_samples: int = 0,
        smoothing: int = 0,
        scoring: LambdaScoring = "held_out",
        views: torch.Tensor | None = None,
        view_weighting: UnscoredWeighting = "groups",
    ) -> RidgeSolution:
        """Add one task's training features and solve, with λ chosen on them (``scoring``, below).

        ``views`` (images x k x in_features): k views of each image (e.g. random resized crops), in
        the images' order; they join the statistics and the solve. How they count while λ is scored
        (``view_weighting``, leave-one-out scoring): ``"groups"`` puts them in G and leaves each
        image out *with its views* (a view of a left-out image would leak into its own score), so λ
        is scored on the statistics that are solved; ``"copies"`` scores without them, each image
        counted 1 + k times; ``"none"`` scores without them at one copy. Held-out scoring adds them
        after λ is chosen. Measured: README, "Extra views".

        ``scoring_features``: score the candidates on the head made of only the first that many
        random features (the leading block of G is exactly their Gram matrix); None: on the whole
        head. A smaller head's best λ is not the larger head's (measured: README), so the default
        scores on the whole head.

        ``tolerance`` (``selection="task"``): candidates whose held-out hits are within this many
        standard errors of the best count are taken as equally good, and the largest λ of them is
        chosen (the one-standard-error rule, scaled; 0: the best count, ties to the larger λ). None:
        RanPAC's plain arg-max, the best count with ties to the smaller λ (the ``ranpac`` baseline).

        ``old_class_samples``: the held-out fifth holds only this task's classes, so a λ that serves
        them can still cost the earlier ones; this many features per earlier class (not in this
        task), drawn from its Gaussian (class mean, pooled within-class covariance), join the
        held-out set. 0: the task's own images only.

        ``smoothing`` (``selection="task"``): the hits are averaged over this many neighbouring
        candidates either side (binomial weights) before the choice; the reported accuracy stays the
        chosen λ's own.

        ``scoring``: ``"held_out"`` solves without a held-out fifth of the task and scores on it
        (RanPAC); ``"leave_one_out"`` scores every image (up to ``LEAVE_ONE_OUT_IMAGES``) against the
        whole head with that one image left out, in closed form (``_leave_one_out_hits``).
        """
        if candidates is None:
            candidates = CUMULATIVE_LAMBDAS if selection == "cumulative" else RELATIVE_LAMBDAS
        hits: list[float] = []
        total = 0
        if views is not None and (views.ndim != 3 or len(views) != len(features)):
            raise DataError(f"expected views as ({len(features)}, k, features), got {tuple(views.shape)}")
        grouped = views is not None and scoring == "leave_one_out" and view_weighting == "groups"
        if grouped and old_class_samples:
            raise DataError("views scored in groups cannot be combined with draws of earlier classes")
        if len(candidates) < 2:
            self.add(features, labels, classes)
        elif scoring == "leave_one_out":
            copies = 1.0
            if views is not None and view_weighting == "copies":
                copies = 1.0 + views.shape[1]
            hits, total = self._leave_one_out_hits(
                features,
                labels,
                classes,
                candidates,
                seed,
                scoring_features,
                old_class_samples,
                copies,
                views if grouped else None,
            )
        else:
            hits, total = self._held_out_hits(
                features, labels, classes, candidates, seed, scoring_features, old_class_samples
            )
        if not hits:
            lam, accuracy = candidates[len(candidates) // 2], None
        elif selection == "cumulative":
            if len(self.lambda_evidence) != len(candidates):  # first use, or another grid: start afresh
                self.lambda_evidence = torch.zeros(len(candidates), dtype=torch.float64)
            self.lambda_evidence += torch.tensor(hits, dtype=torch.float64)
            tally = self.lambda_evidence.tolist()
            best = max(range(len(candidates)), key=lambda i: (tally[i], i))
            lam, accuracy = candidates[best], hits[best] / total
        else:
            evidence = _smoothed(hits, smoothing)
            if tolerance is None:
                best = max(range(len(candidates)), key=lambda i: (evidence[i], -i))
            else:
                best = _most_regularised_within(candidates, evidence, total, tolerance)
            lam, accuracy = candidates[best], hits[best] / total
        if views is not None and not (grouped and hits):
            self.add(views.reshape(-1, views.shape[2]), labels.repeat_interleave(views.shape[1]), classes)
        return RidgeSolution(self.solve(lam), lam, accuracy)

    def _scoring_block(self, scoring_features: int | None) -> int:
        """How many leading random features the λ candidates are scored on (all when None)."""
        return self.dim if scoring_features is None else max(1, min(scoring_features, self.dim))

    def _earlier_class_draws(
        self, classes: Sequence[str], per_class: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``per_class`` Gaussian draws of every earlier class not in ``classes``, with their columns."""
        task_classes = set(classes)
        earlier = [i for i, c in enumerate(self.labels) if c not in task_classes] if per_class else []
        if not earlier:
            return None
        drawn = self.gaussian_samples(earlier, per_class, seed)
        return drawn, torch.tensor(earlier).repeat_interleave(per_class)

    def _held_out_hits(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        candidates: Sequence[float],
        seed: int,
        scoring_features: int | None,
        old_class_samples: int,
    ) -> tuple[list[float], int]:
        """Add the task; return each candidate's hits on a held-out fifth of it (solved without that
        fifth) and the number of images scored. Nothing is scored when no class has two images."""
        keep, held = held_out_split(labels, seed=seed)
        if len(held) == 0:
            self.add(features, labels, classes)
            return [], 0
        trial = self.copy()
        trial.add(features[keep], labels[keep], classes)
        target = trial._columns(classes)[labels[held]]
        block = self._scoring_block(scoring_features)
        h_held = trial.lift(features[held])[:, :block]
        draws = self._earlier_class_draws(classes, old_class_samples, seed)
        if draws is not None:
            h_held = torch.cat([h_held, trial.lift(draws[0])[:, :block]])
            target = torch.cat([target, draws[1]])
        hits = []
        for solution in _candidate_solutions(trial.gram[:block, :block], trial.cross[:block], candidates):
            # None: numerically singular at this λ, so it cannot be chosen
            if solution is None:
                hits.append(0.0)
            else:
                hits.append(float(((h_held.to(solution.dtype) @ solution).argmax(dim=1) == target).sum()))
        # The whole task is the trial plus its held-out fifth: only the fifth is lifted again.
        trial.add(features[held], labels[held], classes)
        self.replace_with(trial)
        return hits, len(target)

    def _leave_one_out_hits(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        candidates: Sequence[float],
        seed: int,
        scoring_features: int | None,
        old_class_samples: int,
        copies: float = 1.0,
        views: torch.Tensor | None = None,
    ) -> tuple[list[float], int]:
        """Add the task; return each candidate's leave-one-out hits on (up to ``LEAVE_ONE_OUT_IMAGES``
        of) the task's images, from the whole statistics, and the number of images scored.

        Leaving image i out of a ridge fit changes its prediction in closed form: with leverage
        ``H_ii = h_iᵀ (G + λI)⁻¹ h_i``, the left-out prediction is ``(ŷ_i − H_ii y_i) / (1 − H_ii)``,
        whose arg-max is that of ``ŷ_i − H_ii y_i``. So one factorisation per candidate scores every
        image against a head solved from all the others: five times the evidence of a held-out
        fifth, and no smaller trial head whose best λ differs from the whole one's. On a first task
        with fewer images than features, G is exactly ``HᵀH`` of those images and the same scores
        come from the images' own kernel ``HHᵀ`` (``_dual_leave_one_out_scores``).

        ``copies`` (c): the task's images are scored as if each were c identical images, G and Q
        taking ``c HᵀH`` and ``c HᵀY``; leaving out all c copies of image i gives the prediction
        ``(ŷ_i − c H_ii y_i) / (1 − c H_ii)``. On a first task G is the task's alone, and scaling it
        scales λ's reference (the mean diagonal of G) with it: the scores do not change.

        ``views`` (images x k x in_features): added to the statistics too, and each image is left
        out together with its views (``_leave_group_out_scores``, ``_dual_leave_group_out_scores``)."""
        draws = self._earlier_class_draws(classes, old_class_samples, seed)
        first_task = float(self.counts.sum()) == 0
        columns, task_gram, h, onehot = self.contributions(features, labels, classes)
        self._accumulate(features, columns, task_gram, h, onehot)
        fraction = min(1.0, LEAVE_ONE_OUT_IMAGES / len(labels))
        scored = torch.arange(len(labels)) if fraction >= 1.0 else held_out_split(labels, fraction, seed)[1]
        block = self._scoring_block(scoring_features)
        target = columns[scored]
        drawn = None if draws is None else (self.lift(draws[0])[:, :block], draws[1])
        first_kernel = first_task and drawn is None and len(labels) <= block
        if first_kernel:
            scores = _dual_leave_one_out_scores(h[:, :block], onehot, scored, candidates)
        else:
            extra = None if drawn is None else drawn[0]
            gram, cross = self.gram[:block, :block], self.cross[:block]
            if copies != 1.0:
                gram = gram + (copies - 1.0) * task_gram[:block, :block]
                cross = cross + (copies - 1.0) * (h[:, :block].T @ onehot)
            scores = _leave_one_out_scores(gram, cross, h[scored, :block], extra, candidates)
        if views is not None:
            return self._leave_group_out_hits(labels, classes, candidates, views, h, onehot, scored, block)
        rows = torch.arange(len(scored))
        hits = []
        for score in scores:
            if score is None:  # numerically singular at this λ, so it cannot be chosen
                hits.append(0.0)
                continue
            left_out, leverage, extra_predictions = score
            # Outside the first-task kernel path, the leverage is of one copy in the weighted fit.
            left_out[rows, target] -= leverage if first_kernel else copies * leverage
            count = (left_out.argmax(dim=1) == target).sum()
            if drawn is not None and extra_predictions is not None:
                count = count + (extra_predictions.argmax(dim=1) == drawn[1]).sum()
            hits.append(float(count))
        return hits, len(scored) + (0 if drawn is None else len(drawn[1]))

    def _leave_group_out_hits(
        self,
        labels: torch.Tensor,
        classes: Sequence[str],
        candidates: Sequence[float],
        views: torch.Tensor,
        h: torch.Tensor,
        onehot: torch.Tensor,
        scored: torch.Tensor,
        block: int,
    ) -> tuple[list[float], int]:
        """``_leave_one_out_hits`` with the task's ``views`` in the statistics: each scored image is
        left out with its views (its images are already added, as ``h``; this adds the views)."""
        first_task = float(self.counts.sum()) == len(labels)
        n, k = views.shape[:2]
        flat = views.reshape(n * k, -1)
        view_columns, view_gram, view_h, view_onehot = self.contributions(flat, labels.repeat_interleave(k), classes)
        self._accumulate(flat, view_columns, view_gram, view_h, view_onehot)
        target = self._columns(classes)[labels[scored]]
        if first_task and n * (1 + k) <= block:
            rows = torch.cat([h, view_h])[:, :block]
            groups = torch.cat([scored.unsqueeze(1), n + scored.unsqueeze(1) * k + torch.arange(k)], dim=1)
            scores = _dual_leave_group_out_scores(rows, torch.cat([onehot, view_onehot]), groups, candidates)
        else:
            rows = torch.cat([h[scored].unsqueeze(1), view_h.view(n, k, -1)[scored]], dim=1)[:, :, :block]
            targets = onehot[scored].unsqueeze(1).expand(-1, 1 + k, -1)
            scores = _leave_group_out_scores(self.gram[:block, :block], self.cross[:block], rows, targets, candidates)
        hits = [0.0 if left_out is None else float((left_out.argmax(dim=1) == target).sum()) for left_out in scores]
        return hits, len(scored)

    def to_tensors(self, gram_dtype: torch.dtype = torch.float64) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        """Tensors and a JSON-able meta dict that restore these statistics (worker state): exactly,
        unless ``gram_dtype`` rounds G (float32 halves its bytes again, for statistics that are
        only ever solved at a chosen λ, never searched over small ones)."""
        tensors = {
            "counts": self.counts,
            "sums": self.sums,
            "moment": self.moment,
            # G is symmetric: its upper triangle is half the bytes (64 MB of 128 at 4,000 features).
            "gram_upper": _upper_triangle(self.gram).to(gram_dtype),
            "cross": self.cross,
        }
        if len(self.lambda_evidence):
            tensors["lambda_evidence"] = self.lambda_evidence
        meta: dict[str, object] = {"labels": list(self.labels), "in_features": self.in_features, "dim": self.dim}
        if self.random_features is not None:
            rf = self.random_features
            meta["random_features"] = {"dim": rf.dim, "seed": rf.seed}
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], meta: dict[str, object], random_features: RandomFeatures | None
    ) -> ClassStatistics:
        """Restore statistics saved by ``to_tensors`` for a model whose head has ``random_features``;
        anything inconsistent (sizes, projection, non-finite values) is refused."""
        labels = meta.get("labels")
        expected_rf = None if random_features is None else {"dim": random_features.dim, "seed": random_features.seed}
        if not isinstance(labels, list) or meta.get("random_features") != expected_rf:
            raise DataError("the stored class statistics were made for another head")
        in_features = meta.get("in_features")
        if not isinstance(in_features, int) or in_features < 1:
            raise DataError("the stored class statistics do not say their feature size")
        stats = cls(in_features, random_features, keep_gram=meta.get("dim", 1) != 0)
        try:
            counts, sums, cross = tensors["counts"].double(), tensors["sums"].double(), tensors["cross"].double()
            # Statistics published before the triangle was stored keep the whole matrix.
            gram = (
                _from_upper_triangle(tensors["gram_upper"].double(), stats.dim)
                if "gram_upper" in tensors
                else tensors["gram"].double()
            )
        except KeyError as exc:
            raise DataError(f"the stored class statistics lack {exc}") from None
        # State published before the second moment was kept: the class means' own moment (no
        # within-class spread is known for those classes).
        moment = tensors["moment"].double() if "moment" in tensors else _moment_of_means(counts, sums)
        c, d, m = len(labels), stats.in_features, stats.dim
        shapes = tuple(tuple(x.shape) for x in (counts, sums, moment, gram, cross))
        if shapes != ((c,), (c, d), (d, d), (m, m), (m, c)):
            raise DataError(f"the stored class statistics have shapes {shapes}")
        if not all(bool(torch.isfinite(x).all()) for x in (counts, sums, moment, gram, cross)):
            raise DataError("the stored class statistics are not finite")
        evidence = tensors.get("lambda_evidence", torch.zeros(0)).double()
        if evidence.ndim != 1 or not bool(torch.isfinite(evidence).all()) or bool((evidence < 0).any()):
            raise DataError("the stored λ evidence is not a finite, non-negative vector")
        stats.labels = [str(label) for label in labels]
        stats.counts, stats.sums, stats.moment, stats.gram, stats.cross = counts, sums, moment, gram, cross
        stats.lambda_evidence = evidence
        return stats

    def merged(self, other: ClassStatistics) -> ClassStatistics:
        """A copy of these statistics with ``other``'s added (same features and random projection):
        the statistics of both sets of images, as if they had been added here. Classes only in
        ``other`` are appended; the λ evidence stays this one's."""
        same_head = _projection_key(self.random_features) == _projection_key(other.random_features)
        if other.in_features != self.in_features or other.dim != self.dim or not same_head:
            raise DataError("statistics of other features or another head cannot be merged")
        out = self.copy()
        if not other.labels:
            return out
        columns = out._columns(other.labels)
        out.counts.index_add_(0, columns, other.counts)
        out.sums.index_add_(0, columns, other.sums)
        out.moment += other.moment
        out.gram += other.gram
        out.cross.index_add_(1, columns, other.cross)
        return out

    def replace_with(self, other: ClassStatistics) -> None:
        """Take ``other``'s contents (a trial copy that succeeded)."""
        self.labels = list(other.labels)
        self.counts, self.sums, self.moment = other.counts, other.sums, other.moment
        self.gram, self.cross = other.gram, other.cross
        self.lambda_evidence = other.lambda_evidence

    def copy(self) -> ClassStatistics:
        other = ClassStatistics(self.in_features, self.random_features, keep_gram=self.dim > 0)
        other.labels = list(self.labels)
        other.counts, other.sums, other.moment = self.counts.clone(), self.sums.clone(), self.moment.clone()
        other.gram, other.cross = self.gram.clone(), self.cross.clone()
        other.lambda_evidence = self.lambda_evidence.clone()
        return other
