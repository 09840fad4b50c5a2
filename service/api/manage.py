"""REST: rooms and their members (``service.chat.rooms`` holds the rules). History and posting
are ``service.api.rooms``'."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from service.api.deps import ServicesDep
from service.api.rooms import body_schema, invalid, json_response, read_body
from service.api.schemas import (
    ERROR_RESPONSES,
    ErrorOut,
    MemberList,
    MemberOut,
    MemberRole,
    NewDirectRoom,
    NewRoom,
    PresenceList,
    ReadCursor,
    RoomChange,
    RoomList,
    RoomOut,
)
from service.auth import MAX_SUBJECT_CHARS, CurrentUser, Principal, RoomName
from service.chat import presence, reads, rooms
from service.chat.envelope import dumps_with_items, iso
from service.config import ROOM_NAME_MAX, ROOM_NAME_PATTERN

router = APIRouter(tags=["rooms"], responses=ERROR_RESPONSES)

Responses = dict[int | str, dict[str, Any]]
FORBIDDEN: Responses = {
    403: {"model": ErrorOut, "description": "You see the room but may not do this"}
}
CONFLICT: Responses = {409: {"model": ErrorOut, "description": "The name is taken"}}
INVALID: Responses = {
    422: {
        "description": "Validation Error",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
        },
    }
}
"""FastAPI documents its 422 on routes with declared parameters; these read their body
themselves (``read_body``), so they say it."""


def caller(principal: Principal) -> rooms.Caller:
    return rooms.Caller(principal.user_id, principal.admin)


def charged(services: ServicesDep, principal: Principal) -> rooms.Caller:
    """The caller of a change, charged against their send budget (``CHAT_USER_SEND_RATE``,
    shared with messages): a script creating rooms or churning members gets 429s, as a flood
    of messages does."""
    services.limits.take_send(principal.user_id)
    return caller(principal)


def room_json(row: rooms.RoomRow) -> dict[str, object]:
    """The room object; a listed room's is made in SQL (``service.db.rooms._ROOM_JSON``), the
    same fields and formats."""
    return {
        "name": row.name,
        "kind": row.kind,
        "title": row.title,
        "role": row.role,
        "last_seq": row.last_seq,
        "created_at": iso(row.created_at),
        "last_read_seq": row.last_read_seq,
        "unread": row.unread,
        "mentions": row.mentions,
    }


def member_json(row: rooms.MemberRow) -> dict[str, object]:
    return {
        "user": row.user,
        "role": row.role,
        "joined_at": iso(row.joined_at),
        "last_read_seq": row.last_read_seq,
    }


def check_user_id(user: str) -> str:
    """A user id as tokens carry them (``service.auth``: printable, 1 to 128 characters)."""
    if not 0 < len(user) <= MAX_SUBJECT_CHARS or not user.isprintable():
        detail = f"a user id is 1 to {MAX_SUBJECT_CHARS} printable characters"
        raise invalid(("path", "user"), detail, "user_id")
    return user


@router.get("/rooms", response_model=RoomList)
async def list_rooms(
    user: CurrentUser,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(pattern=ROOM_NAME_PATTERN, max_length=ROOM_NAME_MAX)] = None,
    mine: Annotated[bool, Query(description="Only the rooms the caller is a member of")] = False,
) -> Response:
    """Public rooms and the rooms the caller is a member of (a service admin: every room), by
    name, with the caller's ``role`` (null: not a member) and, in their own rooms, their read
    state: ``last_read_seq``, ``unread`` (text messages of others after it that are not
    deleted, exact) and ``mentions`` (how many of those mention the caller)."""
    found = await rooms.list_rooms(
        services.pool, caller=caller(user), mine=mine, after=after, limit=limit + 1
    )
    more = len(found) > limit
    found = found[:limit]
    next_after = found[-1][0] if more else None
    return json_response(
        dumps_with_items({"next_after": next_after}, "rooms", [room for _, room in found])
    )


@router.post(
    "/rooms",
    response_model=RoomOut,
    status_code=201,
    openapi_extra=body_schema(NewRoom),
    responses={**CONFLICT, **INVALID},
)
async def create_room(user: CurrentUser, services: ServicesDep, request: Request) -> Response:
    """A public or private room; the caller is its ``owner``, ``members`` its members. 409 when
    the name is taken (by any room, also one made by a first message). Names starting with
    ``dm.`` are direct rooms' (``POST /rooms/direct``)."""
    new = await read_body(request, NewRoom)
    if new.name.startswith(rooms.DIRECT_PREFIX):
        raise invalid(
            ("body", "name"),
            f"names starting with {rooms.DIRECT_PREFIX!r} are reserved",
            "reserved",
        )
    for member in new.members:
        check_user_id(member)
    row = await rooms.create_room(
        services.pool,
        services.publish,
        caller=charged(services, user),
        name=new.name,
        kind=new.kind,
        title=new.title,
        members=new.members,
    )
    return json_response(room_json(row), 201)


@router.post(
    "/rooms/direct",
    response_model=RoomOut,
    status_code=201,
    openapi_extra=body_schema(NewDirectRoom),
    responses={200: {"model": RoomOut, "description": "The direct room existed"}, **INVALID},
)
async def open_direct(user: CurrentUser, services: ServicesDep, request: Request) -> Response:
    """The direct room of the caller and ``user``: 201 when this call made it, 200 when it
    existed (the same room whoever asks, in either order)."""
    new = await read_body(request, NewDirectRoom)
    other = check_user_id(new.user)
    if other == user.user_id:
        raise invalid(("body", "user"), "a direct room is with someone else", "self")
    row, created = await rooms.open_direct(
        services.pool, services.publish, caller=charged(services, user), other=other
    )
    return json_response(room_json(row), 201 if created else 200)


@router.get("/rooms/{room}", response_model=RoomOut)
async def get_room(room: RoomName, user: CurrentUser, services: ServicesDep) -> Response:
    """404 for a name never used and for a private room the caller is not a member of."""
    return json_response(
        room_json(await rooms.get_room(services.pool, room=room, caller=caller(user)))
    )


@router.patch(
    "/rooms/{room}",
    response_model=RoomOut,
    openapi_extra=body_schema(RoomChange),
    responses=FORBIDDEN,
)
async def update_room(
    room: RoomName, user: CurrentUser, services: ServicesDep, request: Request
) -> Response:
    """Change the title: the room's owner and admins (a direct room: service admins)."""
    change = await read_body(request, RoomChange)
    row = await rooms.update_room(
        services.pool, caller=charged(services, user), room=room, title=change.title
    )
    return json_response(room_json(row))


@router.delete("/rooms/{room}", status_code=204, responses=FORBIDDEN)
async def delete_room(room: RoomName, user: CurrentUser, services: ServicesDep) -> Response:
    """The room with its messages and members (the owner, or a service admin); every socket
    open to it closes with 4403."""
    await rooms.delete_room(
        services.pool, services.publish, caller=charged(services, user), room=room
    )
    return Response(status_code=204)


@router.put(
    "/rooms/{room}/read",
    status_code=204,
    openapi_extra=body_schema(ReadCursor),
    responses={**FORBIDDEN, **INVALID},
)
async def mark_read(
    room: RoomName, user: CurrentUser, services: ServicesDep, request: Request
) -> Response:
    """Move the caller's read cursor (members only) forward to ``seq`` (at most the room's
    end; never back): their unread count drops, their other devices get a ``read`` frame, and
    in small rooms the others a ``receipt``."""
    cursor = await read_body(request, ReadCursor)
    await reads.move_cursor(
        services.pool, services.reads, caller=caller(user), room=room, seq=cursor.seq
    )
    return Response(status_code=204)


@router.get("/rooms/{room}/members", response_model=MemberList, responses=FORBIDDEN)
async def list_members(
    room: RoomName,
    user: CurrentUser,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
) -> Response:
    """The room's members by user id (members and service admins only)."""
    found = await rooms.list_members(
        services.pool, caller=caller(user), room=room, after=after, limit=limit + 1
    )
    more = len(found) > limit
    found = found[:limit]
    return json_response(
        {"members": [member_json(m) for m in found], "next_after": found[-1].user if more else None}
    )


@router.get("/rooms/{room}/presence", response_model=PresenceList)
async def list_present(
    room: RoomName,
    user: CurrentUser,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(min_length=1, max_length=MAX_SUBJECT_CHARS)] = None,
) -> Response:
    """Who is in the room now (a socket open on any replica, or closed within the grace
    period), by user id. A private or direct room's presence is for its members only (404)."""
    if after is not None and not after.isprintable():  # no user id holds one (service.auth)
        raise invalid(("query", "after"), "'after' must be printable", "string_pattern_mismatch")
    found = await presence.page(
        services.pool, caller=caller(user), room=room, after=after, limit=limit + 1
    )
    more = len(found) > limit
    found = found[:limit]
    return json_response(
        {
            "users": [{"user": u, "name": n} for u, n in found],
            "next_after": found[-1][0] if more else None,
        }
    )


@router.put(
    "/rooms/{room}/members/{user}",
    response_model=MemberOut,
    openapi_extra=body_schema(MemberRole),
    responses={
        **FORBIDDEN,
        201: {"model": MemberOut, "description": "Added"},
        409: {"model": ErrorOut, "description": "The owner must hand ownership over first"},
    },
)
async def put_member(
    room: RoomName,
    user: str,
    principal: CurrentUser,
    services: ServicesDep,
    request: Request,
) -> Response:
    """Add a member or change their role (200; 201 when added). Anyone joins a public room
    (``member``, on themselves); the owner and admins add members and admins; only the owner
    (or a service admin) makes an owner, and the owner before becomes an admin."""
    change = await read_body(request, MemberRole)
    member, added = await rooms.put_member(
        services.pool,
        services.publish,
        caller=charged(services, principal),
        room=room,
        user=check_user_id(user),
        role=change.role,
    )
    return json_response(member_json(member), 201 if added else 200)


@router.delete(
    "/rooms/{room}/members/{user}",
    status_code=204,
    responses={
        **FORBIDDEN,
        409: {"model": ErrorOut, "description": "The owner must hand ownership over first"},
    },
)
async def remove_member(
    room: RoomName, user: str, principal: CurrentUser, services: ServicesDep
) -> Response:
    """Leave (yourself) or remove a member (the owner and admins); their sockets to the room
    close with 4403 on every replica."""
    await rooms.remove_member(
        services.pool,
        services.publish,
        caller=charged(services, principal),
        room=room,
        user=check_user_id(user),
    )
    return Response(status_code=204)
