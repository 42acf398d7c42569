"""GET /console: the operator console, a static page whose script calls the public API.

The page is the same bytes for everyone: no key, setting or registry content is ever written into
it. Whatever it shows it reads through the API with the key the operator types in (kept in the
tab's sessionStorage), so it has exactly the rights, limits and errors of any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

__all__ = ["STATIC_DIRECTORY", "STATIC_URL", "router"]

STATIC_DIRECTORY = Path(__file__).resolve().parent / "static"
STATIC_URL = "/console/static"

router = APIRouter(include_in_schema=False)


@router.get("/console")
async def console() -> FileResponse:
    # no-cache: a browser revalidates (ETag) so an upgraded server never runs an old page's script.
    return FileResponse(STATIC_DIRECTORY / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})
