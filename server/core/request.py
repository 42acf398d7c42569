"""A prediction request on its way to the batcher: argument checks, the prompt against the version,
the deadline, and one image as the batcher carries it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fmlora.errors import UnknownTaskError, VersionNotFoundError
from fmlora.model.prompts import PromptChoice
from server.core.errors import InvalidRequestError, RequestTimeoutError
from server.core.protocol import PromptInput
from server.core.versions import VersionEntry

__all__ = ["Item", "check_prompt", "check_version_number", "parse_request", "within"]

T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    image: np.ndarray  # uint8 (H, W, 3) at the model's input size
    choice: PromptChoice
    top_k: int


def check_version_number(version: object) -> int:
    """Version numbers are SQLite integers >= 1; anything else cannot exist (404, never a 500)."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or not 1 <= version < 2**63:
        raise VersionNotFoundError(f"version {version!r} does not exist")
    return int(version)


def parse_request(images: Sequence[np.ndarray], top_k: int, prompt: PromptInput) -> tuple[PromptChoice, int]:
    if images is None or len(images) == 0:
        raise InvalidRequestError("a prediction needs at least one image")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidRequestError(f"top_k must be a positive integer, got {top_k!r}")
    return PromptChoice.parse(prompt), int(top_k)


def check_prompt(entry: VersionEntry, choice: PromptChoice) -> None:
    if choice.mode == "task" and choice.task not in entry.task_names:
        known = ", ".join(entry.task_names) or "none yet"
        raise UnknownTaskError(
            f"unknown task {choice.task!r} for prompt selection in version {entry.version} (known: {known})"
        )


async def within(awaitable: Awaitable[T], deadline: float) -> T:
    try:
        return await asyncio.wait_for(awaitable, max(deadline - time.monotonic(), 0.001))
    except asyncio.TimeoutError:
        raise RequestTimeoutError("the request did not complete within its timeout") from None
