"""The operator console (GET /console), the offline API docs (/docs, /redoc) and the security
headers every response carries. ``install_console(app)`` adds all three to an app created with
``docs_url=None, redoc_url=None``; call it last, so the headers wrap every other middleware."""

from __future__ import annotations

from fastapi import FastAPI

from server.api.console.router import STATIC_DIRECTORY, STATIC_FILES, STATIC_URL, router
from server.api.console.security import (
    CONTENT_SECURITY_POLICY,
    DOCS_CONTENT_SECURITY_POLICY,
    SecurityHeadersMiddleware,
)
from server.api.docs import install_docs

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "DOCS_CONTENT_SECURITY_POLICY",
    "STATIC_DIRECTORY",
    "SecurityHeadersMiddleware",
    "install_console",
]


def install_console(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(STATIC_URL, STATIC_FILES, name="console-static")
    install_docs(app)
    app.add_middleware(SecurityHeadersMiddleware)
