"""Rooms with members: who may see, read, post in and manage a room, and the use cases that
change rooms and memberships (REST answers through them; the websocket asks ``check_read``).

Kinds: ``public`` (anyone reads and posts; made by a first message or by ``create_room``),
``private`` (members only), ``direct`` (two users, a server-assigned name under the reserved
``dm.`` prefix, membership fixed). Roles: ``owner`` (one at most), ``admin``, ``member``. A
service admin (``Principal.admin``) may do everything except change a direct room's members.

Every membership change is stored with a ``member`` item in the room's stream, in the same
transaction, under the room row's lock (``service.db.rooms``): the stream orders it with the
room's messages, and the hub closes the sockets of a user it removes (4403). A room that is
deleted, or a never-used name made a private room, closes all of its sockets (``ROOM_CLOSED``).

Reading and posting need no extra round trip on the websocket's hot path: a send is checked
inside the statement that stores it (migration 0005), and the socket's read right at connect.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg

from service.chat.envelope import ROOM_CLOSED, channel_for, encode_notification
from service.chat.messages import Publish
from service.db import rooms as db
from service.db.engine import reading
from service.db.queries import Conn
from service.db.rooms import MemberRow as MemberRow  # what its callers are handed
from service.db.rooms import RoomRow as RoomRow
from service.errors import Forbidden, NotFound, OwnerMustHandOver, RoomExists

DIRECT_PREFIX = "dm."
"""Direct rooms' names start with it; no other room may (``POST /rooms`` is 422, a message or
a websocket to such a name that was never made is refused)."""
MAX_INITIAL_MEMBERS = 100
ROLES = ("owner", "admin", "member")
MANAGERS = ("owner", "admin")
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]+")
_ROOM_NAME_MAX = 64


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: the user, and whether they are a service admin (an admin token)."""

    user: str
    admin: bool = False


@dataclass(slots=True)
class Changes:
    """What a use case wrote to the rooms' streams, published after its commit when the bus is
    not this database (with LISTEN/NOTIFY the transaction NOTIFYed them itself)."""

    publish: Publish | None
    payloads: list[tuple[str, str]] = field(default_factory=list)

    @property
    def notify(self) -> bool:
        return self.publish is None

    def item(self, room: str, seq: int, frame: str) -> None:
        self.payloads.append((channel_for(room), encode_notification(seq, frame)))

    def closed(self, room: str) -> None:
        self.payloads.append((channel_for(room), ROOM_CLOSED))

    async def flush(self) -> None:
        if self.publish is not None:
            for channel, payload in self.payloads:
                await self.publish(channel, payload)


def direct_room_name(a: str, b: str) -> str:
    """One name per pair, in either order: ``dm.<a>.<b>`` (sorted) when both ids are plain and
    it fits, else ``dm.`` and a hash of the pair (user ids may hold any printable character)."""
    first, second = sorted((a, b))
    name = f"{DIRECT_PREFIX}{first}.{second}"
    if _PLAIN_ID.fullmatch(first) and _PLAIN_ID.fullmatch(second) and len(name) <= _ROOM_NAME_MAX:
        return name
    digest = hashlib.sha256(f"{first}\x00{second}".encode()).hexdigest()[:56]
    return DIRECT_PREFIX + digest


def _visible(row: RoomRow | None, caller: Caller) -> RoomRow:
    """The room, or ``NotFound`` for a name never used and for a room the caller may not see
    (the same answer: REST does not tell whether a private room exists)."""
    if row is None or not (row.kind == "public" or row.role is not None or caller.admin):
        raise NotFound("no such room")
    return row


@asynccontextmanager
async def _transaction(pool: asyncpg.Pool) -> AsyncIterator[Conn]:
    async with reading(pool) as conn, conn.transaction():
        yield conn


async def get_room(pool: asyncpg.Pool, *, room: str, caller: Caller) -> RoomRow:
    async with reading(pool) as conn:
        return _visible(await db.room(conn, room=room, user=caller.user), caller)


async def check_present(pool: asyncpg.Pool, *, room: str, caller: Caller) -> None:
    """``NotFound`` unless the caller may see who is in the room, as they may join it: a
    public room, a name never used (open, as to the websocket), or a room they are a member of
    (or a service admin)."""
    async with reading(pool) as conn:
        row = await db.room(conn, room=room, user=caller.user)
    if row is not None or room.startswith(DIRECT_PREFIX):
        _visible(row, caller)


async def list_rooms(
    pool: asyncpg.Pool, *, caller: Caller, mine: bool, after: str | None, limit: int
) -> list[tuple[str, str]]:
    """``(name, the room object's JSON)`` of each room the caller may see, by name."""
    async with reading(pool) as conn:
        return await db.list_rooms(
            conn, user=caller.user, everything=caller.admin, mine=mine, after=after, limit=limit
        )


async def create_room(
    pool: asyncpg.Pool,
    publish: Publish | None,
    *,
    caller: Caller,
    name: str,
    kind: str,
    title: str | None,
    members: list[str],
) -> RoomRow:
    """A public or private room owned by the caller, with ``members`` as members; a
    ``member`` item for each. ``RoomExists`` when the name is taken."""
    changes = Changes(publish)
    async with _transaction(pool) as conn:
        row = await db.create_room(conn, name=name, kind=kind, title=title)
        if row is None:
            raise RoomExists(f"a room named {name!r} exists")
        await _add(conn, changes, row, caller.user, caller.user, "owner")
        for user in dict.fromkeys(members):
            if user != caller.user:
                await _add(conn, changes, row, caller.user, user, "member")
        if kind != "public":
            # Sockets may be open on the name (accepted as a public room to be): they lose it.
            await _close(conn, changes, name)
        created = await db.room(conn, room=name, user=caller.user)
    await changes.flush()
    assert created is not None  # noqa: S101 - made in this transaction
    return created


async def open_direct(
    pool: asyncpg.Pool, publish: Publish | None, *, caller: Caller, other: str
) -> tuple[RoomRow, bool]:
    """The direct room of the caller and ``other``, made if needed: ``(room, created)``. Two
    callers at once (on two replicas) make one room: the name is the pair's, and the second
    insert waits for the first and finds it."""
    name = direct_room_name(caller.user, other)
    changes = Changes(publish)
    async with _transaction(pool) as conn:
        row = await db.create_room(conn, name=name, kind="direct", title=None)
        created = row is not None
        if row is not None:
            for user in sorted({caller.user, other}):
                await _add(conn, changes, row, caller.user, user, "member")
            await _close(conn, changes, name)
        found = await db.room(conn, room=name, user=caller.user)
    await changes.flush()
    if found is None or found.kind != "direct":  # deleted meanwhile; or made otherwise by hand
        raise NotFound("no such room")
    return found, created


async def update_room(
    pool: asyncpg.Pool, *, caller: Caller, room: str, title: str | None
) -> RoomRow:
    async with _transaction(pool) as conn:
        row = _visible(await db.room(conn, room=room, user=caller.user, lock=True), caller)
        allowed = caller.admin or (row.kind != "direct" and row.role in MANAGERS)
        if not allowed:
            raise Forbidden("only the room's owner and admins change it")
        await db.set_title(conn, room_id=row.id, title=title)
        updated = await db.room(conn, room=room, user=caller.user)
    assert updated is not None  # noqa: S101 - locked in this transaction
    return updated


async def delete_room(
    pool: asyncpg.Pool, publish: Publish | None, *, caller: Caller, room: str
) -> None:
    """The room, its messages and its members; every socket of it closes (4403)."""
    changes = Changes(publish)
    async with _transaction(pool) as conn:
        row = _visible(await db.room(conn, room=room, user=caller.user, lock=True), caller)
        if not (caller.admin or (row.kind != "direct" and row.role == "owner")):
            raise Forbidden("only the room's owner deletes it")
        await db.delete_room(conn, room_id=row.id)
        await _close(conn, changes, room)
    await changes.flush()


async def list_members(
    pool: asyncpg.Pool, *, caller: Caller, room: str, after: str | None, limit: int
) -> list[MemberRow]:
    async with reading(pool) as conn:
        row = _visible(await db.room(conn, room=room, user=caller.user), caller)
        if row.role is None and not caller.admin:
            raise Forbidden("only members list a room's members")
        return await db.members(conn, room_id=row.id, after=after, limit=limit)


async def put_member(
    pool: asyncpg.Pool,
    publish: Publish | None,
    *,
    caller: Caller,
    room: str,
    user: str,
    role: str,
) -> tuple[MemberRow, bool]:
    """Add ``user`` with ``role``, or change their role: ``(member, added)``. The rules are
    the module's; ``{"role": "owner"}`` hands ownership over (the owner before becomes an
    admin)."""
    changes = Changes(publish)
    async with _transaction(pool) as conn:
        row = _visible(await db.room(conn, room=room, user=caller.user, lock=True), caller)
        if row.kind == "direct":
            raise Forbidden("a direct room's members do not change")
        target = await db.member(conn, room_id=row.id, user=user)
        _check_put(row, caller, user, target, role)
        if target is not None and target.role == role:
            return target, False
        demoted = None
        if role == "owner":
            owner = await db.owner_of(conn, room_id=row.id)
            if owner is not None and owner != user:
                demoted = owner
                await db.put_member(conn, room_id=row.id, user=owner, role="admin")
        result = await db.put_member(conn, room_id=row.id, user=user, role=role)
        action = "joined" if target is None else "role"
        # The stream tells a hand-over as the spec does: the new owner, then the one before.
        await _item(conn, changes, row, caller.user, user, action, role)
        if demoted is not None:
            await _item(conn, changes, row, caller.user, demoted, "role", "admin")
    await changes.flush()
    return result, target is None


def _check_put(
    row: RoomRow, caller: Caller, user: str, target: MemberRow | None, role: str
) -> None:
    if caller.admin:
        return
    if user == caller.user and target is not None and target.role == role:
        return  # no change (joining a room one is in)
    if user == caller.user and target is None:
        if row.kind == "public" and role == "member":
            return  # joining a public room
        if row.role is None:
            raise Forbidden(
                "join a public room as a member; private rooms are joined by invitation"
            )
    mine = row.role
    if mine == "owner":
        if user == caller.user and role != "owner":
            raise OwnerMustHandOver("hand ownership over to another member first")
        return
    if mine == "admin":
        if role == "owner" or (target is not None and target.role == "owner"):
            raise Forbidden("an admin cannot make owners or change the owner")
        return
    raise Forbidden("only the room's owner and admins manage its members")


async def remove_member(
    pool: asyncpg.Pool, publish: Publish | None, *, caller: Caller, room: str, user: str
) -> None:
    """Leave (``user`` is the caller) or remove someone; their sockets to the room close."""
    changes = Changes(publish)
    async with _transaction(pool) as conn:
        row = _visible(await db.room(conn, room=room, user=caller.user, lock=True), caller)
        if row.kind == "direct":
            raise Forbidden("a direct room's members do not change")
        target = await db.member(conn, room_id=row.id, user=user)
        leaving = user == caller.user
        if target is None:
            if not leaving and row.role is None and not caller.admin:
                raise Forbidden("only the room's owner and admins manage its members")
            raise NotFound(f"{user!r} is not a member")
        if not caller.admin:
            if leaving and target.role == "owner":
                raise OwnerMustHandOver("hand ownership over to another member before leaving")
            if not leaving and (row.role not in MANAGERS or target.role == "owner"):
                raise Forbidden("only the room's owner and admins remove members, never the owner")
        await db.delete_member(conn, room_id=row.id, user=user)
        await _item(conn, changes, row, caller.user, user, "left" if leaving else "removed", None)
    await changes.flush()


async def _add(
    conn: Conn, changes: Changes, row: RoomRow, author: str, user: str, role: str
) -> None:
    await db.put_member(conn, room_id=row.id, user=user, role=role)
    await _item(conn, changes, row, author, user, "joined", role)


async def _item(
    conn: Conn,
    changes: Changes,
    row: RoomRow,
    author: str,
    user: str,
    action: str,
    role: str | None,
) -> None:
    seq, frame = await db.append_member(
        conn,
        room_id=row.id,
        author=author,
        user=user,
        action=action,
        role=role,
        channel=channel_for(row.name),
        notify=changes.notify,
    )
    changes.item(row.name, seq, frame)


async def _close(conn: Conn, changes: Changes, room: str) -> None:
    if changes.notify:
        await db.notify(conn, channel=channel_for(room), payload=ROOM_CLOSED)
    changes.closed(room)
