"""REST: rooms and their history. Posting shares the websocket's use case."""

from __future__ import annotations

import asyncio
import email.message
import json
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from service.api.deps import ServicesDep
from service.api.schemas import (
    ERROR_RESPONSES,
    DeleteEventOut,
    EditEventOut,
    ErrorOut,
    MessageEdit,
    MessageOut,
    MessagePage,
    NewMessage,
    ReactionEventOut,
    SendFailedOut,
)
from service.auth import CurrentUser, Principal, RoomName
from service.chat import history
from service.chat.envelope import dumps, dumps_with_items, message_object
from service.chat.events import post_event
from service.chat.messages import submit_message
from service.errors import ChatError, Forbidden, InvalidMessage, NotFound
from service.services import Services

router = APIRouter(tags=["rooms"], responses=ERROR_RESPONSES)


def invalid(loc: tuple[str | int, ...], msg: str, kind: str) -> RequestValidationError:
    """A 422 in the same shape as FastAPI's own, so the OpenAPI schema holds for all of them."""
    return RequestValidationError([{"loc": loc, "msg": msg, "type": kind}])


Cursor = Annotated[int | None, Query(ge=0, le=history.MAX_SEQ)]
Body = TypeVar("Body", bound=BaseModel)


def json_response(
    content: dict[str, Any] | str, status_code: int = 200, **headers: str
) -> Response:
    """Encoded once, by hand (or already JSON text): the shapes are the ``response_model``s
    (checked against the OpenAPI document by the fuzz tests), without validating trusted rows
    all over again."""
    text = content if isinstance(content, str) else dumps(content)
    return Response(text, status_code, headers, media_type="application/json")


@router.get("/rooms/{room}/messages", response_model=MessagePage)
async def room_messages(
    room: RoomName,
    user: CurrentUser,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Cursor = None,
    after: Cursor = None,
    events: Annotated[
        Literal["all"] | None,
        Query(description="`all`: every kind of stream item, not only text messages"),
    ] = None,
) -> Response:
    """A page of history in ascending seq order: the newest page by default; ``before`` pages
    back, ``after`` pages forward. Text messages only, unless ``events=all``. 404 for a name
    never used and for a private room the caller is not a member of."""
    if before is not None and after is not None and before <= after:
        raise invalid(("query", "before"), "'before' must be greater than 'after'", "cursor_order")
    page = await history.read_page(
        pool=services.pool,
        room=room,
        limit=limit,
        before=before,
        after=after,
        reader=history.Reader(user.user_id, user.admin),
        every_kind=events == "all",
    )
    head = {
        "room": room,
        "last_seq": page.last_seq,
        "next_before": page.next_before,
        "next_after": page.next_after,
    }
    return json_response(dumps_with_items(head, "messages", [m.json for m in page.messages]))


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a body a route reads itself (``read_body``), documented as if it
    were a declared parameter."""
    return {
        "requestBody": {
            "content": {"application/json": {"schema": model.model_json_schema()}},
            "required": True,
        }
    }


def _is_json(content_type: str | None) -> bool:
    """FastAPI's rule for a declared body: JSON when no type is given or it is ``*/json``,
    ``*/*+json``."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def read_body(request: Request, model: type[Body]) -> Body:
    """The body, read only now (after authentication) through the app's body cap
    (``GuardMiddleware``: 413 past ``CHAT_MAX_BODY_BYTES``), with FastAPI's answers for the
    rest: 422 for invalid JSON or fields, 400 for a body Python cannot read. (A declared body
    parameter would be read and parsed before the token is checked.)"""
    raw = await request.body()
    if not raw:
        raise invalid(("body",), "Field required", "missing")
    if not _is_json(request.headers.get("content-type")):
        raise invalid(("body",), "Input should be a valid dictionary or object", "model_type")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise invalid(("body", exc.pos), "JSON decode error", "json_invalid") from None
    except (ValueError, RecursionError):  # bad UTF-8, too many digits, too deep
        raise HTTPException(400, "There was an error parsing the body") from None
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None


@router.post(
    "/rooms/{room}/messages",
    response_model=MessageOut,
    status_code=201,
    openapi_extra=body_schema(NewMessage),
    responses={
        503: {
            "model": SendFailedOut,
            "description": "Not stored (`unavailable`, `overloaded` with Retry-After), or maybe "
            "stored (`outcome_unknown`): resend with the `client_msg_id` given",
        }
    },
)
async def create_message(
    room: RoomName,
    user: CurrentUser,
    services: ServicesDep,
    request: Request,
) -> Response:
    """Store a message and fan it out to the room's websockets. A resend with the same
    ``client_msg_id`` returns the original with ``Idempotent-Replayed: true``. 404 in a
    private or direct room the caller is not a member of (checked where it is stored)."""
    new = await read_body(request, NewMessage)
    try:
        services.limits.take_send(user.user_id)
        stored = submit_message(
            writer=services.writer,
            room=room,
            author=user.user_id,
            body=new.body,
            client_msg_id=new.client_msg_id,
            max_chars=services.settings.max_message_chars,
            publish=services.publish,
            reply_to=new.reply_to,
        )
        posted = await asyncio.shield(stored)  # a client that hangs up does not stop the publish
        services.typing.stop(room, user.user_id)  # a message ends typing
    except Forbidden:
        services.metrics.errors.labels(NotFound.code).inc()
        raise NotFound("no such room") from None
    except NotFound as exc:  # the message replied to
        services.metrics.errors.labels(exc.code).inc()
        raise invalid(("body", "reply_to"), exc.detail, exc.code) from None
    except ChatError as exc:
        services.metrics.errors.labels(exc.code).inc()
        if isinstance(exc, InvalidMessage):  # in FastAPI's shape, as the OpenAPI schema says
            raise invalid(("body", "body"), f"{exc.code}: {exc.detail}", exc.code) from None
        raise  # the app's ChatError handler answers as the error tree says (503s: resend id)
    if posted.frame is not None:
        services.metrics.counts.stored_rest += 1
        return json_response(message_object(posted.frame), 201)
    # A resend: the original as history reads it (the writer brings back only new frames).
    seq = posted.message.seq
    original = await history.read_range(pool=services.pool, room=room, after=seq - 1, until=seq)
    return json_response(original[0].json, 201, **{"Idempotent-Replayed": "true"})


EVENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorOut, "description": "Not yours to change (`forbidden`)"},
    409: {
        "model": ErrorOut,
        "description": "The message is deleted (`already_deleted`), or has the most different "
        "reactions allowed (`too_many_reactions`)",
    },
}
SeqPath = Annotated[int, Path(ge=1, le=history.MAX_SEQ, description="The message's seq")]


@router.patch(
    "/rooms/{room}/messages/{seq}",
    response_model=EditEventOut,
    openapi_extra=body_schema(MessageEdit),
    responses=EVENT_RESPONSES,
)
async def edit_message(
    room: RoomName, seq: SeqPath, user: CurrentUser, services: ServicesDep, request: Request
) -> Response:
    """Edit a message (its author only): an ``edit`` item in the room's stream, which this
    answers with; the message's text in history is the new one, with ``edited_at``. A resend
    with the same ``client_msg_id`` returns the original."""
    change = await read_body(request, MessageEdit)
    return await _change(
        services, user, room, seq, "edit", body=change.body, client_msg_id=change.client_msg_id
    )


@router.delete(
    "/rooms/{room}/messages/{seq}", response_model=DeleteEventOut, responses=EVENT_RESPONSES
)
async def delete_message(
    room: RoomName,
    seq: SeqPath,
    user: CurrentUser,
    services: ServicesDep,
    client_msg_id: Annotated[str | None, Query(max_length=128)] = None,
) -> Response:
    """Delete a message (its author, the room's owner and admins, a service admin): a
    ``delete`` item in the room's stream, which this answers with. The text and every edit of
    it are erased from storage; history shows a tombstone."""
    return await _change(services, user, room, seq, "delete", client_msg_id=client_msg_id)


EmojiPath = Annotated[str, Path(min_length=1, max_length=64, description="One emoji")]


@router.put(
    "/rooms/{room}/messages/{seq}/reactions/{emoji}",
    response_model=ReactionEventOut,
    responses=EVENT_RESPONSES,
)
async def add_reaction(
    room: RoomName,
    seq: SeqPath,
    emoji: EmojiPath,
    user: CurrentUser,
    services: ServicesDep,
) -> Response:
    """React to a message with one emoji (anyone who may post in the room): a ``reaction``
    item, which this answers with. Reacting again with the same emoji stores nothing and
    answers with the item that set it (``Idempotent-Replayed: true``)."""
    return await _change(services, user, room, seq, "reaction", emoji=emoji, on=True)


@router.delete(
    "/rooms/{room}/messages/{seq}/reactions/{emoji}",
    response_model=ReactionEventOut,
    responses=EVENT_RESPONSES,
)
async def remove_reaction(
    room: RoomName,
    seq: SeqPath,
    emoji: EmojiPath,
    user: CurrentUser,
    services: ServicesDep,
) -> Response:
    """Take one's reaction back: a ``reaction`` item with ``on: false``; 404 when there was
    none (a repeat answers with the item that removed it)."""
    return await _change(services, user, room, seq, "reaction", emoji=emoji, on=False)


async def _change(
    services: Services,
    user: Principal,
    room: str,
    seq: int,
    kind: str,
    *,
    body: str | None = None,
    emoji: str | None = None,
    on: bool | None = None,
    client_msg_id: str | None = None,
) -> Response:
    try:
        services.limits.take_send(user.user_id)
        stored = await asyncio.shield(
            asyncio.ensure_future(
                post_event(
                    services.pool,
                    services.publish,
                    room=room,
                    room_id=None,
                    author=user.user_id,
                    admin=user.admin,
                    kind=kind,
                    target_seq=seq,
                    body=body,
                    emoji=emoji,
                    on=on,
                    client_msg_id=client_msg_id,
                    max_chars=services.settings.max_message_chars,
                )
            )
        )
    except InvalidMessage as exc:
        services.metrics.errors.labels(exc.code).inc()
        where = {"edit": ("body", "body"), "reaction": ("path", "emoji")}
        loc = where.get(kind, ("query", "client_msg_id"))
        raise invalid(loc, f"{exc.code}: {exc.detail}", exc.code) from None
    if stored.frame is not None:
        return json_response(message_object(stored.frame))
    done = stored.message.seq  # a resend: the original, as history reads it
    original = await history.read_range(pool=services.pool, room=room, after=done - 1, until=done)
    return json_response(original[0].json, 200, **{"Idempotent-Replayed": "true"})
