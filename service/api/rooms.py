"""REST: rooms and their history. Posting shares the websocket's use case."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.exceptions import RequestValidationError

from service.api.deps import MAX_SEQ, CurrentUser, RoomName, ServicesDep, SessionDep
from service.api.schemas import (
    ERROR_RESPONSES,
    MessageOut,
    MessagePage,
    NewMessage,
    RoomList,
    RoomOut,
)
from service.chat.history import read_page
from service.chat.limits import RateLimited
from service.chat.messages import post_message
from service.config import ROOM_NAME_PATTERN
from service.db import queries
from service.db.engine import translate_db_errors
from service.errors import InvalidMessage

router = APIRouter(tags=["rooms"], responses=ERROR_RESPONSES)


def invalid(loc: tuple[str, ...], msg: str, kind: str) -> RequestValidationError:
    """A 422 in the same shape as FastAPI's own, so the OpenAPI schema holds for all of them."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": kind}])


Cursor = Annotated[int | None, Query(ge=0, le=MAX_SEQ)]


@router.get("/rooms", response_model=RoomList)
async def list_rooms(
    _: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(pattern=ROOM_NAME_PATTERN)] = None,
) -> RoomList:
    """Rooms that have messages, by name."""
    with translate_db_errors():
        rooms = await queries.list_rooms(session, after=after, limit=limit + 1)
    more = len(rooms) > limit
    rooms = rooms[:limit]
    return RoomList(
        rooms=[RoomOut.model_validate(r) for r in rooms],
        next_after=rooms[-1].name if more else None,
    )


@router.get("/rooms/{room}/messages", response_model=MessagePage)
async def room_messages(
    room: RoomName,
    _: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Cursor = None,
    after: Cursor = None,
) -> MessagePage:
    """A page of history in ascending seq order: the newest page by default; ``before`` pages
    back, ``after`` pages forward. A room nobody has written to is an empty page."""
    if before is not None and after is not None and before <= after:
        raise invalid(("query", "before"), "'before' must be greater than 'after'", "cursor_order")
    page = await read_page(session=session, room=room, limit=limit, before=before, after=after)
    return MessagePage(
        room=room,
        last_seq=page.last_seq,
        messages=[MessageOut.model_validate(m) for m in page.messages],
        next_before=page.next_before,
        next_after=page.next_after,
    )


@router.post("/rooms/{room}/messages", response_model=MessageOut, status_code=201)
async def create_message(
    room: RoomName,
    new: NewMessage,
    user: CurrentUser,
    services: ServicesDep,
    response: Response,
) -> MessageOut:
    """Store a message and fan it out to the room's websockets. A resend with the same
    ``client_msg_id`` returns the original with ``Idempotent-Replayed: true``."""
    try:
        services.limits.take_send(user.user_id)
        posted = await post_message(
            writer=services.writer,
            room=room,
            author=user.user_id,
            body=new.body,
            client_msg_id=new.client_msg_id,
            max_chars=services.settings.max_message_chars,
            publish=services.publish,
        )
    except (InvalidMessage, RateLimited) as exc:
        services.metrics.errors.labels(exc.code).inc()
        if isinstance(exc, RateLimited):
            raise
        raise invalid(("body", "body"), f"{exc.code}: {exc.detail}", exc.code) from None
    if posted.duplicate:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        services.metrics.stored.labels("rest").inc()
    return MessageOut.model_validate(posted.message)
