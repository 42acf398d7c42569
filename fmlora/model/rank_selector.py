"""Dynamic rank selection (DRS): how much of the shared subspace a task may use.

Before a task trains, its complexity (normalised spectral entropy of the frozen backbone's [CLS]
features) and its novelty (1 - max cosine between its mean feature and earlier tasks') set a prior
over candidate ranks. Learnable logits start at that prior; Gumbel-Softmax samples soft weights y over
the candidates, and the gate g_j = sum_k y_k * 1[j < r_k] scales the task factors' rank components.
The temperature anneals over the task; at its end the argmax candidate becomes the hard rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fmlora.errors import DataError

from .config import RankSelectorConfig

__all__ = ["RankSelector", "task_complexity", "task_novelty"]


def task_complexity(features: torch.Tensor) -> float:
    """Normalised spectral entropy of the feature covariance, in [0, 1].

    Near 0: the task's features lie on a few directions (easy); near 1: spread over many (complex).
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise DataError("task complexity needs at least two feature vectors")
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    n, d = x.shape
    # The Gram matrix shares the covariance's non-zero eigenvalues and is cheaper when n < d.
    gram = x @ x.T if n < d else x.T @ x
    eig = torch.linalg.eigvalsh(gram).clamp_min(0)
    total = eig.sum()
    if total <= 0:
        return 0.0
    p = eig / total
    p = p[p > 0]
    entropy = -(p * p.log()).sum().item()
    return float(entropy / math.log(max(2, min(n - 1, d))))


def task_novelty(mean_feature: torch.Tensor, previous_means: torch.Tensor | None) -> float:
    """1 - the largest cosine similarity to an earlier task's mean feature (1 for the first task)."""
    if previous_means is None or previous_means.numel() == 0:
        return 1.0
    cos = F.cosine_similarity(previous_means.double(), mean_feature.double().unsqueeze(0), dim=-1)
    return float((1 - cos.max()).clamp(0, 1).item())


class RankSelector(nn.Module):
    def __init__(self, rank: int, config: RankSelectorConfig):
        super().__init__()
        self.config = config
        self.rank = rank
        ranks = sorted({max(1, round(c * rank)) for c in config.candidates})
        self.register_buffer("candidate_ranks", torch.tensor(ranks, dtype=torch.long), persistent=False)
        # 1[j < r_k] for each candidate k (rows) and rank component j (columns).
        steps = (torch.arange(rank).unsqueeze(0) < self.candidate_ranks.unsqueeze(1)).float()
        self.register_buffer("rank_masks", steps, persistent=False)
        self.logits = nn.Parameter(torch.zeros(len(ranks)), requires_grad=False)
        self.temperature = config.tau_start
        self.chosen_rank: int | None = None
        # Gumbel noise comes from the learner's generator, never from the process-global RNG.
        self.generator: torch.Generator | None = None

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def target_capacity(self, complexity: float, novelty: float) -> float:
        c = self.config
        total = c.complexity_weight + c.novelty_weight
        if total == 0:
            return 1.0
        return min(1.0, max(0.0, (c.complexity_weight * complexity + c.novelty_weight * novelty) / total))

    def prior_logits(self, complexity: float, novelty: float) -> torch.Tensor:
        target = self.target_capacity(complexity, novelty)
        fractions = self.candidate_ranks.float() / self.rank
        return -self.config.prior_sharpness * (fractions - target).abs()

    def expected_rank(self, logits: torch.Tensor | None = None) -> float:
        weights = torch.softmax((self.logits if logits is None else logits).detach(), dim=0)
        return float((weights * self.candidate_ranks.float()).sum().detach())

    def begin_task(self, complexity: float, novelty: float, generator: torch.Generator | None = None) -> None:
        self.generator = generator
        with torch.no_grad():
            self.logits.copy_(self.prior_logits(complexity, novelty))
        self.logits.requires_grad_(self.enabled)
        self.temperature = self.config.tau_start
        self.chosen_rank = None

    def anneal(self, progress: float) -> None:
        """Geometric schedule from tau_start to tau_end as progress goes 0 -> 1."""
        c = self.config
        p = min(1.0, max(0.0, progress))
        self.temperature = c.tau_start * (c.tau_end / c.tau_start) ** p

    def sample_gate(self) -> torch.Tensor:
        """A soft gate over rank components from one Gumbel-Softmax draw (training)."""
        uniform = torch.rand(self.logits.shape, generator=self.generator).clamp_(1e-10, 1 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform)).to(self.logits.device, self.logits.dtype)
        weights = torch.softmax((self.logits + gumbel) / self.temperature, dim=0)
        return weights @ self.rank_masks.to(weights.dtype)

    def hard_gate(self, rank: int | None = None) -> torch.Tensor:
        rank = self.current_hard_rank() if rank is None else rank
        return (torch.arange(self.rank, device=self.logits.device) < rank).float()

    def current_hard_rank(self) -> int:
        if not self.enabled:
            return self.rank
        return int(self.candidate_ranks[int(self.logits.argmax())])

    def rank_penalty(self) -> torch.Tensor:
        """Expected rank as a fraction of the full rank, under the current softmax."""
        weights = torch.softmax(self.logits / self.temperature, dim=0)
        return self.config.rank_penalty * (weights * self.candidate_ranks.float()).sum() / self.rank

    def end_task(self) -> int:
        self.chosen_rank = self.current_hard_rank()
        self.logits.requires_grad_(False)
        self.generator = None
        return self.chosen_rank

    def abort_task(self) -> None:
        self.logits.requires_grad_(False)
        self.generator = None
        self.chosen_rank = None
