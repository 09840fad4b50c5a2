"""The reads the service runs (writes: ``service.db.writer``), one statement each.

A read that pairs a room's ``last_seq`` with messages is a single statement, so both come from
one snapshot: a client told ``last_seq`` L has been given every message up to L it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import asyncpg

UNBOUNDED = 2**62
"""Stands in for "no upper bound": a plain range keeps the (room_id, seq) index scan exact,
where ``($x IS NULL OR seq < $x)`` makes PostgreSQL walk the room from one end."""


def _message_json(room: str) -> str:
    """SQL for a message's JSON object, as ``envelope.message_fields`` and ``dumps`` write it
    (migration 0003 builds frames the same way; a test holds them together): the rows go out
    as they come, without decoding, building and encoding seven fields in Python."""
    return f"""'{{"room":' || to_json({room})::text || ',"seq":' || seq || ',"id":' || id
    || ',"author":' || to_json(author)::text || ',"body":' || to_json(body)::text
    || ',"client_msg_id":' || COALESCE(to_json(client_msg_id)::text, 'null')
    || ',"created_at":"'
    || to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"}}'"""


_NEWEST = f"""
SELECT r.last_seq, m.seq, m.json
FROM room r LEFT JOIN LATERAL (
    SELECT seq, {_message_json("r.name")} AS json FROM message
    WHERE room_id = r.id AND seq > $2 AND seq < $3 ORDER BY seq DESC LIMIT $4
) m ON true
WHERE r.name = $1
"""  # noqa: S608 - constant fragments; every value is a bind parameter
_OLDEST = _NEWEST.replace("ORDER BY seq DESC", "ORDER BY seq ASC")
_BETWEEN = f"""
SELECT seq, {_message_json("$1::text")} FROM message
WHERE room_id = (SELECT id FROM room WHERE name = $1) AND seq > $2 AND seq <= $3
ORDER BY seq LIMIT $4
"""  # noqa: S608 - the same
_ROOMS = (
    "SELECT name, last_seq, created_at FROM room "
    "WHERE $1::text IS NULL OR name > $1 ORDER BY name LIMIT $2"
)


@dataclass(frozen=True, slots=True)
class MessageRecord:
    id: int
    room: str
    seq: int
    author: str
    body: str
    client_msg_id: str | None
    created_at: datetime


class StoredMessage(NamedTuple):
    """A message as history sends it: its seq, and its JSON object (``message_fields``)."""

    seq: int
    json: str


@dataclass(frozen=True, slots=True)
class RoomRecord:
    name: str
    last_seq: int
    created_at: datetime


async def room_window(
    conn: asyncpg.Connection, *, room: str, after: int, before: int | None, limit: int, newest: bool
) -> tuple[int, list[StoredMessage]]:
    """The room's ``last_seq`` and up to ``limit`` messages with ``after < seq < before``: the
    newest of them, or the oldest; ascending either way. A room never written to is ``0, []``."""
    rows = await conn.fetch(
        _NEWEST if newest else _OLDEST,
        room,
        after,
        UNBOUNDED if before is None else before,
        limit,
    )
    if not rows:
        return 0, []
    messages = [StoredMessage(r[1], r[2]) for r in rows if r[1] is not None]
    return rows[0][0], messages[::-1] if newest else messages


async def messages_between(
    conn: asyncpg.Connection, *, room: str, after: int, until: int | None, limit: int
) -> list[StoredMessage]:
    """Up to ``limit`` messages with ``after < seq <= until`` (no upper bound when None)."""
    rows = await conn.fetch(_BETWEEN, room, after, UNBOUNDED if until is None else until, limit)
    return [StoredMessage(*r) for r in rows]


async def list_rooms(
    conn: asyncpg.Connection, *, after: str | None, limit: int
) -> list[RoomRecord]:
    rows = await conn.fetch(_ROOMS, after, limit)
    return [RoomRecord(*row) for row in rows]
