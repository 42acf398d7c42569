"""GET /whoami: what the presented key may do here, so a client (the console) can show a read-only
view for the API key and offer management only where the server allows it."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Security
from pydantic import BaseModel, Field

from server.api.auth import _matches, _presented_key, _unknown_key, bearer_scheme
from server.api.routes._common import get_state
from server.api.schemas import ErrorEnvelope

router = APIRouter(tags=["health"])


class WhoAmIResponse(BaseModel):
    role: Literal["admin", "reader", "anonymous"] = Field(
        description="'admin': the admin key (or auth disabled); 'reader': the API key; 'anonymous': no key sent."
    )
    management: bool = Field(description="Whether this server accepts management calls at all (an admin key is set).")
    reads_need_key: bool = Field(description="Whether predictions and reads need a key (FMLORA_API_KEY is set).")


@router.get(
    "/whoami",
    response_model=WhoAmIResponse,
    summary="The presented key's role",
    responses={401: {"model": ErrorEnvelope, "description": "Malformed Authorization header, or an unknown key."}},
)
async def whoami(request: Request, _credentials: object = Security(bearer_scheme)) -> WhoAmIResponse:
    """Answers without a key too (role 'anonymous'); a key the server does not know is 401, as anywhere."""
    settings = get_state(request).settings
    management = settings.auth_summary["admin_enabled"]
    reads_need_key = settings.auth_summary["api_key_required"]
    if settings.auth_disabled:
        return WhoAmIResponse(role="admin", management=management, reads_need_key=reads_need_key)
    if request.headers.get("authorization") is None:
        return WhoAmIResponse(role="anonymous", management=management, reads_need_key=reads_need_key)
    presented = _presented_key(request)
    # Both comparisons always run, so timing does not reveal which key came close.
    admin_ok = _matches(presented, settings.admin_key)
    api_ok = _matches(presented, settings.api_key)
    if admin_ok:
        return WhoAmIResponse(role="admin", management=management, reads_need_key=reads_need_key)
    if api_ok:
        return WhoAmIResponse(role="reader", management=management, reads_need_key=reads_need_key)
    raise _unknown_key()
