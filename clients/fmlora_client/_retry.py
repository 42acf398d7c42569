"""When and how long to wait before retrying: exponential backoff with full jitter, honouring Retry-After.

Only idempotent calls are retried, and only after a connection failure or a 408/429/502/503/504 answer.
A ``Retry-After`` (seconds or an HTTP date) replaces the computed backoff; one longer than
``max_retry_after`` ends the retries instead (the caller gets the error and its ``retry_after``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

RETRYABLE_STATUSES = frozenset({408, 429, 502, 503, 504})


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value (delta-seconds or HTTP-date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds and seconds != float("inf") else None  # NaN, inf
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = now or datetime.now(timezone.utc)
    return max(0.0, (when - current).total_seconds())


def retry_after_from(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"))


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries idempotent calls.

    ``max_retries`` retries after the first attempt (0 disables retrying). The n-th retry waits a random
    time in [0, min(max_backoff, initial_backoff * 2**n)] ("full jitter"), unless the server said
    ``Retry-After``, which is honoured exactly when it is at most ``max_retry_after`` seconds.
    """

    max_retries: int = 2
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0
    statuses: frozenset[int] = RETRYABLE_STATUSES
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("backoff and retry-after limits must be >= 0")

    def backoff(self, retry_number: int) -> float:
        """Full-jitter exponential backoff before retry ``retry_number`` (0-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * (2.0**retry_number))
        return self.rng.uniform(0.0, ceiling)

    def delay_after_status(self, retry_number: int, response: httpx.Response) -> float | None:
        """Seconds to wait before retrying after this response, or None when it must not be retried."""
        if retry_number >= self.max_retries or response.status_code not in self.statuses:
            return None
        retry_after = retry_after_from(response)
        if retry_after is None:
            return self.backoff(retry_number)
        if retry_after > self.max_retry_after:
            return None
        return retry_after

    def delay_after_error(self, retry_number: int) -> float | None:
        """Seconds to wait before retrying after a connection failure, or None when out of retries."""
        if retry_number >= self.max_retries:
            return None
        return self.backoff(retry_number)
