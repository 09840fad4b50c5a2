"""Dev logins: a token for any user name, so a newcomer can try the demo page.

Enabled by default in embedded mode only (``CHAT_DEV_AUTH``); otherwise the route answers 404.
``GET /auth/me`` says who a token makes the caller: what an operator checks first when wiring
in an identity provider.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, HTTPException

from service.api.deps import ServicesDep
from service.api.schemas import ERROR_RESPONSES, DevToken, DevTokenRequest, ErrorOut, Me
from service.auth import DEV_TOKEN_TTL, CurrentUser

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


me_router = APIRouter(tags=["auth"], responses={401: ERROR_RESPONSES[401]})


@me_router.get("/auth/me", response_model=Me)
async def me(user: CurrentUser) -> Me:
    """The user id and display name the service takes from the caller's token."""
    return Me(user=user.user_id, name=user.name)
