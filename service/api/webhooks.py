"""REST: outgoing webhooks, for service admins only (docs/webhooks.md). A room's own receiver
(``/rooms/{room}/webhook``) and the dead letters (``/admin/webhooks/dead-letters``); the global
receiver is ``CHAT_WEBHOOK_URL``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from service.api.deps import ServicesDep
from service.api.rooms import body_schema, invalid, json_response, read_body
from service.api.schemas import (
    ERROR_RESPONSES,
    DeadLetterList,
    ErrorOut,
    RetryIn,
    RetryOut,
    WebhookIn,
    WebhookOut,
)
from service.auth import CurrentUser, Principal, RoomName
from service.chat import webhooks
from service.chat.envelope import iso
from service.config import ROOM_NAME_MAX, ROOM_NAME_PATTERN
from service.errors import Forbidden

router = APIRouter(tags=["webhooks"], responses=ERROR_RESPONSES)

ADMIN_ONLY: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorOut, "description": "Only a service admin manages webhooks"}
}
INVALID: dict[int | str, dict[str, Any]] = {
    422: {
        "description": "Validation Error",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
        },
    }
}


def require_admin(principal: Principal) -> None:
    """Webhooks see every item of a room: only a service admin may point them somewhere."""
    if not principal.admin:
        raise Forbidden("only a service admin manages webhooks")


def webhook_json(found: webhooks.Registration) -> dict[str, object]:
    return {"room": found.room, "url": found.url, "created_at": iso(found.created_at)}


@router.put(
    "/rooms/{room}/webhook",
    response_model=WebhookOut,
    openapi_extra=body_schema(WebhookIn),
    responses={**ADMIN_ONLY, **INVALID},
)
async def put_webhook(
    room: RoomName, user: CurrentUser, services: ServicesDep, request: Request
) -> Response:
    """Set the room's own receiver (replacing one): every stream item stored from now on is
    POSTed to it too, besides ``CHAT_WEBHOOK_URL``. 404 for a room that does not exist; 422
    when the URL is not one, or the service has no ``CHAT_WEBHOOK_SECRET`` to sign with."""
    require_admin(user)
    given = await read_body(request, WebhookIn)
    problem = webhooks.check_url(given.url)
    if problem is not None:
        raise invalid(("body", "url"), problem, "url")
    if not services.settings.webhooks_enabled:
        raise invalid(
            ("body", "url"),
            "webhooks are off: the service needs CHAT_WEBHOOK_SECRET to sign them",
            "webhooks_off",
        )
    found = await webhooks.register(services.pool, room=room, url=given.url)
    return json_response(webhook_json(found))


@router.get("/rooms/{room}/webhook", response_model=WebhookOut, responses=ADMIN_ONLY)
async def get_webhook(room: RoomName, user: CurrentUser, services: ServicesDep) -> Response:
    """The room's own receiver; 404 when it has none."""
    require_admin(user)
    return json_response(webhook_json(await webhooks.registration(services.pool, room=room)))


@router.delete("/rooms/{room}/webhook", status_code=204, responses=ADMIN_ONLY)
async def delete_webhook(room: RoomName, user: CurrentUser, services: ServicesDep) -> Response:
    """Remove the room's own receiver and what was still queued for it; 404 when it has none."""
    require_admin(user)
    await webhooks.unregister(services.pool, room=room)
    return Response(status_code=204)


@router.get("/admin/webhooks/dead-letters", response_model=DeadLetterList, responses=ADMIN_ONLY)
async def list_dead_letters(
    user: CurrentUser,
    services: ServicesDep,
    room: Annotated[str | None, Query(pattern=ROOM_NAME_PATTERN, max_length=ROOM_NAME_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Items given up on after ``CHAT_WEBHOOK_MAX_ATTEMPTS`` attempts, oldest first."""
    require_admin(user)
    found = await webhooks.dead_letters(services.pool, room=room, limit=limit + 1)
    items = [
        {
            "hook": d.hook,
            "room": d.room,
            "seq": d.seq,
            "attempts": d.attempts,
            "last_error": d.last_error,
            "enqueued_at": iso(d.enqueued_at),
            "dead_at": iso(d.dead_at),
        }
        for d in found[:limit]
    ]
    return json_response({"dead_letters": items, "more": len(found) > limit})


@router.post(
    "/admin/webhooks/dead-letters/retry",
    response_model=RetryOut,
    openapi_extra=body_schema(RetryIn),
    responses={**ADMIN_ONLY, **INVALID},
)
async def retry_dead_letters(
    user: CurrentUser, services: ServicesDep, request: Request
) -> Response:
    """Send dead letters again (all, or one room's), with a fresh attempt budget, once the
    receiver is fixed. They go out ahead of what their room queued since."""
    require_admin(user)
    given = await read_body(request, RetryIn)
    count = await webhooks.retry_dead_letters(services.pool, room=given.room)
    return json_response({"retried": count})
