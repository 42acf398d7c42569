"""GET /console: the operator console, a static page whose script calls the public API.

The page is the same bytes for everyone: no key, setting or registry content is ever written into
it. Whatever it shows it reads through the API with the key the operator types in (kept in the
tab's sessionStorage), so it has exactly the rights, limits and errors of any other client.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

__all__ = ["STATIC_DIRECTORY", "STATIC_FILES", "STATIC_URL", "RevalidatedStaticFiles", "router"]

STATIC_DIRECTORY = Path(__file__).resolve().parent / "static"
STATIC_URL = "/console/static"

router = APIRouter(include_in_schema=False)


class RevalidatedStaticFiles(StaticFiles):
    """The console's files with ``Cache-Control: no-cache``: a browser asks again (a cheap 304 by
    ETag) instead of guessing a lifetime, so an upgraded server never runs last release's script."""

    def file_response(self, *args: object, **kwargs: object) -> Response:
        response = super().file_response(*args, **kwargs)  # type: ignore[arg-type]
        response.headers.setdefault("Cache-Control", "no-cache")
        return response


STATIC_FILES = RevalidatedStaticFiles(directory=STATIC_DIRECTORY)


@router.get("/console")
async def console(request: Request) -> Response:
    page = STATIC_DIRECTORY / "index.html"
    return STATIC_FILES.file_response(page, os.stat(page), request.scope)  # 304 when the ETag matches
