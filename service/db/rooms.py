"""Rooms and their members in SQL: one statement each, run by ``service.chat.rooms`` inside
the transaction of one use case. A membership change and its ``member`` item in the room's
stream (``chat_append_member``, migration 0005) are written in one transaction that holds the
room row's lock, as ``chat_post_messages`` does for a message: both take seqs from the same
counter, in one order."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.db.queries import Conn


@dataclass(frozen=True, slots=True)
class RoomRow:
    id: int
    name: str
    kind: str
    title: str | None
    role: str | None
    """The asking user's role; None when not a member."""
    last_seq: int
    created_at: datetime
    last_read_seq: int | None = None
    """The asking member's read cursor, ``unread`` text messages of others after it (not
    deleted) and how many of those ``mentions`` them; all None when not a member."""
    unread: int | None = None
    mentions: int | None = None


@dataclass(frozen=True, slots=True)
class MemberRow:
    user: str
    role: str
    joined_at: datetime
    last_read_seq: int


_READ_STATE = """
m.last_read_seq,
r.text_count - m.read_text_no - CASE WHEN r.last_deleted_seq > m.last_read_seq THEN (
    SELECT count(*) FROM message d
    WHERE d.room_id = r.id AND d.kind = 'text' AND d.deleted AND d.seq > m.last_read_seq
) ELSE 0 END AS unread,
CASE WHEN m.last_mention_seq > m.last_read_seq THEN (
    SELECT count(*) FROM message_mention mm
    WHERE mm.room_id = r.id AND mm.user_id = m.user_id AND mm.seq > m.last_read_seq
) WHEN m.user_id IS NOT NULL THEN 0 END AS mentions"""
"""A member's unread and mention counts (migration 0007) from the counters kept at write time:
the text messages after the cursor (none of them the member's: posting moves it), minus the
deleted ones there (a partial index holds only those); mentions are a range of the member's
own rows. Each count only where something can be after the cursor (``room.last_deleted_seq``,
``room_member.last_mention_seq``). NULL for a row without a member."""
_ROOM = f"""
SELECT r.id, r.name, r.kind, r.title, m.role, r.last_seq, r.created_at, {_READ_STATE}
FROM room r
LEFT JOIN room_member m ON m.room_id = r.id AND m.user_id = $2
WHERE r.name = $1
"""  # noqa: S608 - constant text, no input
_ROOM_FOR_UPDATE = _ROOM + " FOR UPDATE OF r"
_ROOM_JSON = """
'{"name":' || to_json(x.name)::text || ',"kind":"' || x.kind
|| '","title":' || COALESCE(to_json(x.title)::text, 'null')
|| ',"role":' || COALESCE('"' || x.role || '"', 'null')
|| ',"last_seq":' || x.last_seq
|| ',"created_at":"' || to_char(x.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
|| '","last_read_seq":' || COALESCE(x.last_read_seq::text, 'null')
|| ',"unread":' || COALESCE(x.unread::text, 'null')
|| ',"mentions":' || COALESCE(x.mentions::text, 'null') || '}'"""
"""A listed room as the API's room object (``service.api.manage.room_json``, the same fields
and formats): a list of 200 rooms leaves PostgreSQL as 200 strings, not 1,800 values to decode
into objects and encode again."""
_LIST = f"""
SELECT x.name, {_ROOM_JSON} FROM (
    SELECT r.name, r.kind, r.title, m.role, r.last_seq, r.created_at,
        {_READ_STATE}
    FROM room r
    LEFT JOIN room_member m ON m.room_id = r.id AND m.user_id = $1
    WHERE ($2 OR r.kind = 'public' OR m.role IS NOT NULL) AND ($3::text IS NULL OR r.name > $3)
    ORDER BY r.name LIMIT $4
) x
"""  # noqa: S608 - constant text, no input
_LIST_MINE = f"""
SELECT x.name, {_ROOM_JSON} FROM (
    SELECT r.name, r.kind, r.title, m.role, r.last_seq, r.created_at,
        {_READ_STATE}
    FROM room_member m
    JOIN room r ON r.id = m.room_id
    WHERE m.user_id = $1 AND ($2::text IS NULL OR r.name > $2)
    ORDER BY r.name LIMIT $3
) x
"""  # noqa: S608 - constant text, no input
_CREATE = """
INSERT INTO room (name, kind, title) VALUES ($1, $2, $3)
ON CONFLICT (name) DO NOTHING
RETURNING id, name, kind, title, NULL::text, last_seq, created_at
"""
_ROLE = "SELECT role FROM room_member WHERE room_id = $1 AND user_id = $2"
_PUT_MEMBER = """
INSERT INTO room_member (room_id, user_id, role, last_read_seq, read_text_no)
SELECT $1, $2, $3, last_seq, text_count FROM room WHERE id = $1
ON CONFLICT (room_id, user_id) DO UPDATE SET role = excluded.role
RETURNING user_id, role, joined_at, last_read_seq
"""
"""A new member has read what the room holds (the caller holds the room's lock); a role
change keeps the cursor."""
_DELETE_MEMBER = "DELETE FROM room_member WHERE room_id = $1 AND user_id = $2"
_MEMBERS = """
SELECT user_id, role, joined_at, last_read_seq FROM room_member
WHERE room_id = $1 AND ($2::text IS NULL OR user_id COLLATE "C" > $2)
ORDER BY user_id COLLATE "C" LIMIT $3
"""
_MEMBER = """
SELECT user_id, role, joined_at, last_read_seq FROM room_member
WHERE room_id = $1 AND user_id = $2
"""
_MARK_READ = (
    "SELECT o_room, o_room_id, o_user, o_seq, o_receipts "
    "FROM chat_mark_read($1::text[], $2::text[], $3::bigint[], $4)"
)
_TITLE = "UPDATE room SET title = $2 WHERE id = $1"
_DELETE_ROOM = "DELETE FROM room WHERE id = $1"
_APPEND_MEMBER = "SELECT o_seq, o_frame FROM chat_append_member($1, $2, $3, $4, $5, $6, $7)"
_OWNER = "SELECT user_id FROM room_member WHERE room_id = $1 AND role = 'owner'"
_NOTIFY = "SELECT pg_notify($1, $2)"
_NOTIFY_ALL = "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS s(c, p)"


async def room(conn: Conn, *, room: str, user: str, lock: bool = False) -> RoomRow | None:
    """The room by name with the user's role; ``lock`` holds its row until the transaction
    ends, so changes of the room and of its members (and its messages) happen in one order."""
    row = await conn.fetchrow(_ROOM_FOR_UPDATE if lock else _ROOM, room, user)
    return None if row is None else RoomRow(*row)


async def list_rooms(
    conn: Conn, *, user: str, everything: bool, mine: bool, after: str | None, limit: int
) -> list[tuple[str, str]]:
    """Public rooms and the user's rooms (``everything``: all rooms; ``mine``: the user's
    only, from the member index), by name: ``(name, the room object's JSON)`` each."""
    if mine:
        rows = await conn.fetch(_LIST_MINE, user, after, limit)
    else:
        rows = await conn.fetch(_LIST, user, everything, after, limit)
    return [(row[0], row[1]) for row in rows]


async def create_room(conn: Conn, *, name: str, kind: str, title: str | None) -> RoomRow | None:
    """The new room; None when the name is taken (by any room, of any kind)."""
    row = await conn.fetchrow(_CREATE, name, kind, title)
    return None if row is None else RoomRow(*row)


async def role_of(conn: Conn, *, room_id: int, user: str) -> str | None:
    role: str | None = await conn.fetchval(_ROLE, room_id, user)
    return role


async def member(conn: Conn, *, room_id: int, user: str) -> MemberRow | None:
    row = await conn.fetchrow(_MEMBER, room_id, user)
    return None if row is None else MemberRow(*row)


async def put_member(conn: Conn, *, room_id: int, user: str, role: str) -> MemberRow:
    row = await conn.fetchrow(_PUT_MEMBER, room_id, user, role)
    assert row is not None  # noqa: S101 - an upsert always returns its row
    return MemberRow(*row)


async def delete_member(conn: Conn, *, room_id: int, user: str) -> None:
    await conn.execute(_DELETE_MEMBER, room_id, user)


async def members(conn: Conn, *, room_id: int, after: str | None, limit: int) -> list[MemberRow]:
    rows = await conn.fetch(_MEMBERS, room_id, after, limit)
    return [MemberRow(*row) for row in rows]


async def set_title(conn: Conn, *, room_id: int, title: str | None) -> None:
    await conn.execute(_TITLE, room_id, title)


async def delete_room(conn: Conn, *, room_id: int) -> None:
    """The room, its messages and its members (foreign keys cascade)."""
    await conn.execute(_DELETE_ROOM, room_id)


async def append_member(
    conn: Conn,
    *,
    room_id: int,
    author: str,
    user: str,
    action: str,
    role: str | None,
    channel: str,
    notify: bool,
) -> tuple[int, str]:
    """Store a ``member`` item with the room's next seq: ``(seq, frame)``, the frame its
    ``message`` frame (NOTIFYed at commit when ``notify``)."""
    row = await conn.fetchrow(_APPEND_MEMBER, room_id, author, user, action, role, channel, notify)
    assert row is not None  # noqa: S101 - the function returns one row
    return row[0], row[1]


async def owner_of(conn: Conn, *, room_id: int) -> str | None:
    owner: str | None = await conn.fetchval(_OWNER, room_id)
    return owner


async def notify(conn: Conn, *, channel: str, payload: str) -> None:
    """A NOTIFY sent at commit (nothing if the transaction rolls back)."""
    await conn.execute(_NOTIFY, channel, payload)


async def notify_all(conn: Conn, signals: list[tuple[str, str]]) -> None:
    """NOTIFYs ``(channel, payload)`` sent at commit, in order, in one round trip."""
    if signals:
        await conn.execute(_NOTIFY_ALL, [c for c, _ in signals], [p for _, p in signals])


@dataclass(frozen=True, slots=True)
class CursorMoved:
    """A read cursor ``chat_mark_read`` moved; ``receipts``: the room is small enough for
    read receipts."""

    room: str
    room_id: int
    user: str
    seq: int
    receipts: bool


async def mark_read(
    conn: Conn, *, marks: list[tuple[str, str, int]], receipts_max: int
) -> list[CursorMoved]:
    """Move the cursors ``(room, user, seq)`` forward (members only, at most to the room's
    end): the ones that moved."""
    rows = await conn.fetch(
        _MARK_READ,
        [m[0] for m in marks],
        [m[1] for m in marks],
        [m[2] for m in marks],
        receipts_max,
    )
    return [CursorMoved(*row) for row in rows]
