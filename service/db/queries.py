"""The reads the service runs (writes: ``service.db.writer``). Callers own the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

UNBOUNDED = 2**62
"""Stands in for "no upper bound": a plain range keeps the (room_id, seq) index scan exact,
where ``(:x IS NULL OR seq < :x)`` makes PostgreSQL walk the room from one end."""

_SELECT_MESSAGES = (
    "SELECT m.id, CAST(:room AS text) AS room, m.seq, m.author, m.body, m.client_msg_id, "
    "m.created_at FROM message m "
    "WHERE m.room_id = (SELECT id FROM room WHERE name = :room) "
)
_BETWEEN = text(
    _SELECT_MESSAGES + "AND m.seq > :after AND m.seq <= :until ORDER BY m.seq LIMIT :limit"
)
_BEFORE = text(
    _SELECT_MESSAGES + "AND m.seq > :after AND m.seq < :before ORDER BY m.seq DESC LIMIT :limit"
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


def _records(rows: Sequence[object]) -> list[MessageRecord]:
    return [MessageRecord(*row) for row in rows]  # type: ignore[misc]


async def room_last_seq(session: AsyncSession, *, room: str) -> int:
    value = await session.scalar(
        text("SELECT last_seq FROM room WHERE name = :room"), {"room": room}
    )
    return int(value or 0)


async def messages_between(
    session: AsyncSession, *, room: str, after: int, until: int | None, limit: int
) -> list[MessageRecord]:
    """Messages with ``after < seq <= until`` (no upper bound when None), ascending."""
    rows = await session.execute(
        _BETWEEN,
        {
            "room": room,
            "after": after,
            "until": UNBOUNDED if until is None else until,
            "limit": limit,
        },
    )
    return _records(rows.all())


async def messages_before(
    session: AsyncSession, *, room: str, before: int | None, after: int, limit: int
) -> list[MessageRecord]:
    """The newest ``limit`` messages with ``after < seq < before``, returned ascending."""
    rows = await session.execute(
        _BEFORE,
        {
            "room": room,
            "before": UNBOUNDED if before is None else before,
            "after": after,
            "limit": limit,
        },
    )
    return _records(rows.all())[::-1]


async def list_rooms(session: AsyncSession, *, after: str | None, limit: int) -> list[RoomRecord]:
    rows = await session.execute(
        text(
            "SELECT name, last_seq, created_at FROM room "
            "WHERE CAST(:after AS text) IS NULL OR name > :after ORDER BY name LIMIT :limit"
        ),
        {"after": after, "limit": limit},
    )
    return [RoomRecord(*row) for row in rows.all()]
