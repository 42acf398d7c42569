"""Security headers on every response: a Content-Security-Policy that lets a page run only scripts
served by this origin (no inline script, no CDN), plus nosniff, no referrer and no framing.

The API's own pages (the console, /docs, /redoc) keep their code in files, so the strict policy holds
for them; Swagger UI and ReDoc set styles inline (React style props, styled-components), so the docs
pages alone also allow inline *styles* and ReDoc's search worker from a blob URL. Scripts stay
same-origin everywhere.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_SECURITY_POLICY", "DOCS_CONTENT_SECURITY_POLICY", "SecurityHeadersMiddleware"]

_COMMON = (
    "default-src 'self'",
    "script-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
)

CONTENT_SECURITY_POLICY = "; ".join((*_COMMON, "style-src 'self'", "img-src 'self' data: blob:"))
DOCS_CONTENT_SECURITY_POLICY = "; ".join(
    (*_COMMON, "style-src 'self' 'unsafe-inline'", "img-src 'self' data:", "font-src 'self' data:", "worker-src blob:")
)

DOCS_PATHS = ("/docs", "/redoc")


def policy_for(path: str) -> str:
    return DOCS_CONTENT_SECURITY_POLICY if path in DOCS_PATHS else CONTENT_SECURITY_POLICY


class SecurityHeadersMiddleware:
    """Adds the headers to every HTTP response (errors included); pure ASGI, so streaming is untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [
            (b"content-security-policy", policy_for(scope.get("path", "")).encode("latin-1")),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]
        names = {name for name, _ in extra}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in names]
                message = {**message, "headers": headers + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)
