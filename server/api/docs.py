"""Swagger UI at /docs and ReDoc at /redoc from files installed with the server (the
``fastapi-offline`` package ships Swagger UI's and ReDoc's bundles), so the API pages work on an
offline or air-gapped cluster. FastAPI's own pages load them from a CDN and start them with an inline
script, which the Content-Security-Policy forbids; here the start-up code is a file as well.

Paths in the pages are relative, so the docs also work behind a proxy that adds a path prefix.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

__all__ = ["install_docs", "router"]

VENDOR_URL = "/docs/vendor"

router = APIRouter(include_in_schema=False)

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fmlora API · {title}</title>
<link rel="icon" href="console/static/favicon.svg" type="image/svg+xml">
{head}
</head>
<body>
<div id="{root}" data-openapi-url="openapi.json"></div>
{scripts}
</body>
</html>
"""

SWAGGER_HTML = _PAGE.format(
    title="Swagger UI",
    head='<link rel="stylesheet" href="docs/vendor/swagger-ui.css">',
    root="swagger-ui",
    scripts='<script src="docs/vendor/swagger-ui-bundle.js"></script>\n'
    '<script src="console/static/swagger-init.js"></script>',
)

REDOC_HTML = _PAGE.format(
    title="ReDoc",
    head='<link rel="stylesheet" href="console/static/redoc.css">',
    root="redoc",
    scripts='<script src="docs/vendor/redoc.standalone.js"></script>\n'
    '<script src="console/static/redoc-init.js"></script>',
)


def vendor_directory() -> Path:
    """Where fastapi-offline keeps swagger-ui-bundle.js, swagger-ui.css and redoc.standalone.js."""
    return Path(str(files("fastapi_offline") / "static"))


# ReDoc's side menu shows Redocly's logo from their CDN: an outside request the policy blocks (and the
# browser logs). An empty data URL fails to load at once, and ReDoc then hides the image itself.
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


@cache
def redoc_bundle() -> bytes:
    return (vendor_directory() / "redoc.standalone.js").read_bytes().replace(REDOC_CDN_LOGO, b"data:,")


@router.get(f"{VENDOR_URL}/redoc.standalone.js")
async def redoc_script() -> Response:
    return Response(redoc_bundle(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=3600"})


@router.get("/docs", response_class=HTMLResponse)
async def swagger_ui() -> HTMLResponse:
    return HTMLResponse(SWAGGER_HTML)


@router.get("/redoc", response_class=HTMLResponse)
async def redoc() -> HTMLResponse:
    return HTMLResponse(REDOC_HTML)


def install_docs(app: FastAPI) -> None:
    """Serve the docs pages and their assets; create the app with ``docs_url=None, redoc_url=None``."""
    app.include_router(router)
    app.mount(VENDOR_URL, StaticFiles(directory=vendor_directory()), name="docs-vendor")
