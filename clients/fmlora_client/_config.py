"""Client settings: base URL, keys and timeouts from arguments first, then the environment, then defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

from .errors import FmloraClientError

ENV_URL = "FMLORA_URL"
ENV_API_KEY = "FMLORA_API_KEY"
ENV_ADMIN_KEY = "FMLORA_ADMIN_KEY"

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Explicit defaults, never httpx's implicit 5 s: connecting must be quick, but a prediction on a cold
# replica or an upload of a large task archive may legitimately take a while.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2


def _env(name: str, environ: Mapping[str, str]) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


@dataclass(frozen=True)
class ClientSettings:
    """Resolved connection settings. Keys never appear in ``repr``."""

    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(
        cls,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientSettings:
        """Arguments win over ``FMLORA_URL`` / ``FMLORA_API_KEY`` / ``FMLORA_ADMIN_KEY``, which win over defaults."""
        env = os.environ if environ is None else environ
        url = (base_url or _env(ENV_URL, env) or DEFAULT_BASE_URL).strip()
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise FmloraClientError(f"base URL must be an absolute http(s) URL, got {url!r}")
        return cls(
            base_url=url.rstrip("/"),
            api_key=api_key or _env(ENV_API_KEY, env),
            admin_key=admin_key or _env(ENV_ADMIN_KEY, env),
        )

    def key_for(self, auth: str) -> str | None:
        """The bearer key for a call: admin calls send the admin key, other calls the API key; either falls
        back to the other when it is missing (the server then answers 403 rather than a puzzling 401)."""
        if auth == "admin":
            return self.admin_key or self.api_key
        if auth == "api":
            return self.api_key or self.admin_key
        return None

    def url(self, path: str) -> str:
        return self.base_url + "/" + path.lstrip("/")
