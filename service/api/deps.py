"""Dependencies and their aliases. Each takes ``HTTPConnection`` so REST and websocket share it."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Path, WebSocketException
from starlette.requests import HTTPConnection

from service.auth import Principal, extract_token
from service.config import ROOM_NAME_MAX, ROOM_NAME_PATTERN
from service.db.queries import UNBOUNDED
from service.errors import WS_POLICY_VIOLATION, NotAuthenticated
from service.services import Services


async def get_services(conn: HTTPConnection) -> Services:
    """Async on purpose, like every dependency here: a sync one would run in a thread."""
    return conn.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_principal(conn: HTTPConnection, services: ServicesDep) -> Principal:
    """The caller, from a header, cookie or ``token`` query parameter; refused before accept."""
    try:
        source = extract_token(
            authorization=conn.headers.get("authorization"),
            cookie=conn.cookies.get("session"),
            query=conn.query_params.get("token"),
        )
        if source is None:
            raise NotAuthenticated("missing token")
        if source.origin == "cookie":
            check_origin(conn, services.settings.origins)
        return await services.tokens.authenticate(source.token)
    except NotAuthenticated as exc:
        if conn.scope["type"] == "websocket":
            raise WebSocketException(WS_POLICY_VIOLATION, exc.detail) from None
        raise HTTPException(401, exc.detail, headers={"WWW-Authenticate": "Bearer"}) from None


def check_origin(conn: HTTPConnection, allowed: frozenset[str]) -> None:
    """A cookie is sent by the browser whatever page asks: only trusted pages may use it.

    Browsers always send ``Origin`` on websockets and cross-site requests; a request without
    one does not come from another site's page.
    """
    origin = conn.headers.get("origin")
    if origin is None:
        return
    origin = origin.rstrip("/")
    same_site = urlsplit(origin).netloc == conn.headers.get("host")
    if not same_site and origin not in allowed:
        raise NotAuthenticated(f"origin {origin!r} may not use the session cookie")


CurrentUser = Annotated[Principal, Depends(get_principal)]

RoomName = Annotated[
    str,
    Path(
        pattern=ROOM_NAME_PATTERN,
        max_length=ROOM_NAME_MAX,
        description="1 to 64 of A-Z a-z 0-9 _ . -, not only dots",
    ),
]

MAX_SEQ = UNBOUNDED
"""Cursors above this are refused (422) rather than overflowing PostgreSQL's bigint."""
