"""The reads the service runs (writes: ``service.db.writer``), one statement each.

A read that pairs a room's ``last_seq`` with messages is a single statement, so both come from
one snapshot: a client told ``last_seq`` L has been given every message up to L it asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

UNBOUNDED = 2**62
"""Stands in for "no upper bound": a plain range keeps the (room_id, seq) index scan exact,
where ``($x IS NULL OR seq < $x)`` makes PostgreSQL walk the room from one end."""

_NEWEST = """
SELECT r.last_seq, m.id, m.seq, m.author, m.body, m.client_msg_id, m.created_at
FROM room r LEFT JOIN LATERAL (
    SELECT id, seq, author, body, client_msg_id, created_at FROM message
    WHERE room_id = r.id AND seq > $2 AND seq < $3 ORDER BY seq DESC LIMIT $4
) m ON true
WHERE r.name = $1
"""
_OLDEST = _NEWEST.replace("ORDER BY seq DESC", "ORDER BY seq ASC")
_BETWEEN = """
SELECT id, seq, author, body, client_msg_id, created_at FROM message
WHERE room_id = (SELECT id FROM room WHERE name = $1) AND seq > $2 AND seq <= $3
ORDER BY seq LIMIT $4
"""
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


@dataclass(frozen=True, slots=True)
class RoomRecord:
    name: str
    last_seq: int
    created_at: datetime


def _records(room: str, rows: Sequence[Sequence[object]]) -> list[MessageRecord]:
    return [MessageRecord(r[0], room, *r[1:]) for r in rows]  # type: ignore[arg-type]


async def room_window(
    conn: asyncpg.Connection, *, room: str, after: int, before: int | None, limit: int, newest: bool
) -> tuple[int, list[MessageRecord]]:
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
    messages = _records(room, [r[1:] for r in rows if r[1] is not None])
    return rows[0][0], messages[::-1] if newest else messages


async def messages_between(
    conn: asyncpg.Connection, *, room: str, after: int, until: int | None, limit: int
) -> list[MessageRecord]:
    """Up to ``limit`` messages with ``after < seq <= until`` (no upper bound when None)."""
    rows = await conn.fetch(_BETWEEN, room, after, UNBOUNDED if until is None else until, limit)
    return _records(room, rows)


async def list_rooms(
    conn: asyncpg.Connection, *, after: str | None, limit: int
) -> list[RoomRecord]:
    rows = await conn.fetch(_ROOMS, after, limit)
    return [RoomRecord(*row) for row in rows]
