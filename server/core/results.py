"""A batch's model outputs → one answer per image: top-k labels and the meta-prompt each image used."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
import torch
from torch.nn import functional as F

from fmlora.model.prompts import PromptChoice
from server.core.versions import VersionEntry

__all__ = ["ImageResult", "LabelScore", "Prediction", "PromptUsed", "answer_batch"]


class LabelScore(TypedDict):
    label: str
    score: float
    task: str


class PromptUsed(TypedDict):
    mode: str  # auto, none or task
    task: str | None  # the named task, or for auto the nearest learned task
    weights: dict[str, float]  # softmax over learned tasks of the query's affinity, the highest few


@dataclass(frozen=True)
class ImageResult:
    """One image's answer: top-k ``{label, score, task}`` and the meta-prompt used."""

    predictions: list[LabelScore]
    prompt: PromptUsed

    def to_dict(self) -> dict[str, object]:
        return {"predictions": [dict(p) for p in self.predictions], "prompt": dict(self.prompt)}


@dataclass(frozen=True)
class Prediction:
    model_version: int | None
    snapshot_sha256: str | None
    results: list[ImageResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "model_version": self.model_version,
            "snapshot_sha256": self.snapshot_sha256,
            "results": [r.to_dict() for r in self.results],
        }


def answer_batch(
    version: VersionEntry,
    logits: torch.Tensor,
    query: torch.Tensor | None,
    choices: Sequence[PromptChoice],
    top_ks: Sequence[int],
    *,
    temperature: float,
    weights_top: int,
) -> list[ImageResult]:
    """Softmax, top-k and the prompt report for every row of a batch, with one device-to-host copy."""
    with torch.inference_mode():
        probs = logits.float().softmax(dim=-1)
        k = min(max(top_ks), probs.shape[1])
        scores, indices = probs.topk(k, dim=-1)
        affinity = _task_affinity(version, query, choices, temperature)
        columns = [scores, indices.float()]
        top = 0
        if affinity is not None:
            top = max(1, min(weights_top, affinity.shape[1]))
            aff_w, aff_i = affinity.topk(top, dim=-1)  # column 0 of aff_i is the nearest task
            columns += [aff_w, aff_i.float()]
        host = torch.cat(columns, dim=1).cpu().numpy()
    scores_l = host[:, :k].tolist()
    indices_l = host[:, k : 2 * k].astype(np.int64).tolist()
    aff_w_l = host[:, 2 * k : 2 * k + top].tolist()
    aff_i_l = host[:, 2 * k + top :].astype(np.int64).tolist()
    labels, label_tasks, names = version.labels, version.label_tasks, version.task_names
    results = []
    for row, (choice, top_k) in enumerate(zip(choices, top_ks, strict=True)):
        predictions = [
            LabelScore(label=labels[j], score=float(s), task=label_tasks[j])
            for j, s in zip(indices_l[row][:top_k], scores_l[row][:top_k], strict=True)
        ]
        task = choice.task if choice.mode == "task" else None
        weights: dict[str, float] = {}
        if affinity is not None and choice.mode != "none":
            if choice.mode == "auto":
                task = names[aff_i_l[row][0]]
            if weights_top > 0:
                weights = {names[j]: float(w) for j, w in zip(aff_i_l[row], aff_w_l[row], strict=True)}
        results.append(ImageResult(predictions, PromptUsed(mode=choice.mode, task=task, weights=weights)))
    return results


def _task_affinity(
    version: VersionEntry, query: torch.Tensor | None, choices: Sequence[PromptChoice], temperature: float
) -> torch.Tensor | None:
    """(N, tasks): softmax over learned tasks of cos(prompt query, task key) / T. The query is the
    image's [CLS] entering the prompted blocks (auto) or the named task's key (task)."""
    keys = version.tensors.get("prompts.task_keys")
    if query is None or keys is None or keys.shape[0] == 0:
        return None
    keys = keys.to(device=query.device, dtype=torch.float32)
    q = query.float()
    named = [(row, version.task_names.index(c.task or "")) for row, c in enumerate(choices) if c.mode == "task"]
    if named:
        q = q.clone()
        for row, index in named:
            q[row] = keys[index]
    cos = F.cosine_similarity(q.unsqueeze(1), keys.unsqueeze(0), dim=-1)
    return torch.softmax(cos / temperature, dim=-1)
