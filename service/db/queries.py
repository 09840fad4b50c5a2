"""The reads the service runs (writes: ``service.db.writer``), one statement each.

A read that pairs a room's ``last_seq`` with messages is a single statement, so both come from
one snapshot: a client told ``last_seq`` L has been given every message up to L it asked for.

A message leaves the database as JSON text, made by ``chat_message_json`` (migration 0004), the
function ``chat_post_messages`` makes its frames with: the rows go out as they come, without
decoding, building and encoding seven fields in Python, and there is one definition of a
message's JSON. To add a field, replace that function in a new migration (its docstring says
how); these statements do not change. The planner inlines it (a STABLE ``LANGUAGE sql``
function), so it costs what the expression written out here would.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import asyncpg

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
"""A connection of one's own, or one borrowed from a pool (``engine.reading``)."""

UNBOUNDED = 2**62
"""Stands in for "no upper bound": a plain range keeps the (room_id, seq) index scan exact,
where ``($x IS NULL OR seq < $x)`` makes PostgreSQL walk the room from one end."""

_NEWEST = """
SELECT r.last_seq, m.seq, m.json, r.id, r.kind, rm.role
FROM room r
LEFT JOIN room_member rm ON rm.room_id = r.id AND rm.user_id = $5
LEFT JOIN LATERAL (
    SELECT seq, CASE WHEN $7 THEN chat_message_json(r.name, msg, false)
        ELSE left(chat_message_json(r.name, msg, false), -1) || ',"reactions":'
        || CASE WHEN msg.reaction_count = 0 THEN '[]' ELSE COALESCE((
            SELECT '[' || string_agg(
                '{"emoji":' || to_json(x.emoji)::text || ',"count":' || x.n
                || ',"me":' || CASE WHEN x.me THEN 'true' ELSE 'false' END || '}',
                ',' ORDER BY x.first) || ']'
            FROM (
                SELECT emoji, count(*) AS n, COALESCE(bool_or(user_id = $5), false) AS me,
                    min(seq) AS first
                FROM message_reaction WHERE room_id = r.id AND target_seq = msg.seq
                GROUP BY emoji
            ) x
        ), '[]') END || '}'
        END AS json
    FROM message msg
    WHERE room_id = r.id AND seq > $2 AND seq < $3 AND ($7 OR kind = 'text')
        AND ($6 OR r.kind = 'public' OR rm.role IS NOT NULL)
    ORDER BY seq DESC LIMIT $4
) m ON true
WHERE r.name = $1
"""
"""A room's end and a window of its stream, and what the reader (``$5``; ``$6``: may read
every room) is in the room, from one snapshot: the window is empty for a reader who may not
read the room. ``$7`` false: text messages only, in their current state with their
``reactions`` (``[{"emoji", "count", "me"}]``, ``me``: the reader's; in the order they were
first given), for history pages and ``?history=N``; true: every item as the stream has it."""
_OLDEST = _NEWEST.replace("ORDER BY seq DESC", "ORDER BY seq ASC")
_BETWEEN = """
SELECT seq, chat_message_json($1::text, msg, false) FROM message msg
WHERE room_id = (SELECT id FROM room WHERE name = $1) AND seq > $2 AND seq <= $3
ORDER BY seq LIMIT $4
"""


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """A stored item as its writer knows it (``body`` None: an item without text)."""

    id: int
    room: str
    seq: int
    author: str
    body: str | None
    client_msg_id: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Reader:
    """Who reads: ``user``'s role in the room comes back with the window; ``everything``
    reads every room (a service admin, or the service itself: catch-up, gap filling)."""

    user: str | None = None
    everything: bool = True


SERVICE = Reader()
"""The service's own reads (catch-up, gap filling): every room, every kind."""


@dataclass(frozen=True, slots=True)
class Window:
    """``room_window``'s answer. ``room_id`` None: no room has the name (``last_seq`` 0, no
    messages); ``kind`` and ``role`` (the reader's) let the caller decide what it may see."""

    last_seq: int
    messages: list[StoredMessage]
    room_id: int | None = None
    kind: str | None = None
    role: str | None = None


class StoredMessage(NamedTuple):
    """A message as history sends it: its seq, and its JSON object (``chat_message_json``)."""

    seq: int
    json: str


async def room_window(
    conn: Conn,
    *,
    room: str,
    after: int,
    before: int | None,
    limit: int,
    newest: bool,
    reader: Reader = SERVICE,
    every_kind: bool = True,
) -> Window:
    """The room's ``last_seq`` and up to ``limit`` items with ``after < seq < before``: the
    newest of them, or the oldest; ascending either way (text messages only unless
    ``every_kind``). None of them when ``reader`` may not read the room."""
    rows = await conn.fetch(
        _NEWEST if newest else _OLDEST,
        room,
        after,
        UNBOUNDED if before is None else before,
        limit,
        reader.user,
        reader.everything,
        every_kind,
    )
    if not rows:
        return Window(0, [])
    messages = [StoredMessage(r[1], r[2]) for r in rows if r[1] is not None]
    first = rows[0]
    return Window(first[0], messages[::-1] if newest else messages, first[3], first[4], first[5])


async def messages_between(
    conn: Conn, *, room: str, after: int, until: int | None, limit: int
) -> list[StoredMessage]:
    """Up to ``limit`` messages with ``after < seq <= until`` (no upper bound when None)."""
    rows = await conn.fetch(_BETWEEN, room, after, UNBOUNDED if until is None else until, limit)
    return [StoredMessage(*r) for r in rows]
