"""Dev logins: a token for any user name, so a newcomer can try the demo page.

Enabled by default in embedded mode only (``CHAT_DEV_AUTH``); otherwise the route answers 404.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, HTTPException

from service.api.deps import ServicesDep
from service.api.schemas import ERROR_RESPONSES, DevToken, DevTokenRequest, ErrorOut
from service.auth import DEV_TOKEN_TTL

router = APIRouter(
    tags=["auth"],
    responses={
        400: ERROR_RESPONSES[400],
        404: {"model": ErrorOut, "description": "Dev auth is disabled"},
    },
)


@router.post("/auth/dev-token", response_model=DevToken)
async def dev_token(request: DevTokenRequest, services: ServicesDep) -> DevToken:
    """Issue a token for ``user`` without a password (development only)."""
    if not services.settings.dev_auth_enabled or not services.tokens.can_issue:
        raise HTTPException(404, "dev auth is disabled")
    token = services.tokens.issue(request.user, ttl=DEV_TOKEN_TTL)
    expires = datetime.now(UTC) + timedelta(seconds=DEV_TOKEN_TTL)
    return DevToken(token=token, user=request.user, expires_at=expires)
