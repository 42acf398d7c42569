"""Bearer-key authentication: an admin key for management, an optional API key for everything else.

- Missing or malformed ``Authorization`` header, or a key this server does not know → 401 (with
  ``WWW-Authenticate: Bearer``), as RFC 6750 has it for an invalid token.
- A valid key that may not do this (the API key on a management route) → 403.
- No admin key configured → every management call is 403 (management is off, as in TorchServe's
  default), unless ``auth_disabled`` is set explicitly for local use.

Keys are compared in constant time (``hmac.compare_digest`` over SHA-256 digests) and never logged
or echoed.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request, Security
from fastapi.security import HTTPBearer
from pydantic import SecretStr

from server.api.errors import ApiError
from server.api.settings import Settings

__all__ = ["bearer_scheme", "require_admin", "require_api_key"]

# Only for the OpenAPI document (the "Authorize" button in /docs); parsing is ours below.
bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>")

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="fmlora"'}


def _settings(request: Request) -> Settings:
    return request.app.state.fmlora.settings


def _presented_key(request: Request) -> bytes:
    header = request.headers.get("authorization")
    if header is None:
        raise ApiError(
            401, "unauthorized", "missing Authorization header; send 'Authorization: Bearer <key>'", headers=_CHALLENGE
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise ApiError(
            401, "unauthorized", "malformed Authorization header; expected 'Bearer <key>'", headers=_CHALLENGE
        )
    try:
        return token.encode("ascii")
    except UnicodeEncodeError:
        raise ApiError(
            401, "unauthorized", "malformed Authorization header; keys are ASCII", headers=_CHALLENGE
        ) from None


def _matches(presented: bytes, key: SecretStr | None) -> bool:
    if key is None:
        return False
    # Compare fixed-length digests: compare_digest on raw keys of different lengths returns early,
    # which would reveal the configured key's length.
    expected = hashlib.sha256(key.get_secret_value().encode("utf-8")).digest()
    return hmac.compare_digest(hashlib.sha256(presented).digest(), expected)


def _unknown_key() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "this key is not valid for this server",
        headers={"WWW-Authenticate": 'Bearer realm="fmlora", error="invalid_token"'},
    )


async def require_admin(request: Request, _credentials: object = Security(bearer_scheme)) -> None:
    """Dependency for POST /tasks and POST /models/{version}/activate.

    ``async`` on purpose: a plain function would cost every request a hop through the thread pool,
    and the check is a few microseconds of hashing.
    """
    settings = _settings(request)
    if settings.auth_disabled:
        return
    if settings.admin_key is None:
        raise ApiError(
            403,
            "admin_disabled",
            "management is disabled on this server: no admin key is configured (set FMLORA_ADMIN_KEY)",
        )
    presented = _presented_key(request)
    # Both comparisons always run, so timing does not reveal which key came close.
    admin_ok = _matches(presented, settings.admin_key)
    api_ok = _matches(presented, settings.api_key)
    if admin_ok:
        return
    if api_ok:
        raise ApiError(403, "forbidden", "this key is not allowed to manage the server (admin key required)")
    raise _unknown_key()


async def require_api_key(request: Request, _credentials: object = Security(bearer_scheme)) -> None:
    """Dependency for predictions and reads: open unless FMLORA_API_KEY is set."""
    settings = _settings(request)
    if settings.auth_disabled or settings.api_key is None:
        return
    presented = _presented_key(request)
    api_ok = _matches(presented, settings.api_key)
    admin_ok = _matches(presented, settings.admin_key)
    if not (api_ok or admin_ok):
        raise _unknown_key()
