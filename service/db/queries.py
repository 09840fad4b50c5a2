"""Every SQL statement the service runs. Callers own the transaction (one per unit of work)."""

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
_BY_CLIENT_MSG_ID = text(_SELECT_MESSAGES + "AND m.author = :author AND m.client_msg_id = :cmid")
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


_INSERT_MESSAGE = text(
    """
    WITH r AS (
        INSERT INTO room (name, last_seq) VALUES (:room, 1)
        ON CONFLICT (name) DO UPDATE SET last_seq = room.last_seq + 1
        RETURNING id, last_seq
    )
    INSERT INTO message (room_id, seq, author, body, client_msg_id)
    SELECT r.id, r.last_seq, :author, :body, :client_msg_id FROM r
    ON CONFLICT (room_id, author, client_msg_id) DO NOTHING
    RETURNING id, seq, created_at
    """
)


async def insert_message(
    session: AsyncSession, *, room: str, author: str, body: str, client_msg_id: str | None
) -> MessageRecord | None:
    """Allocate the next seq under the room's row lock and insert; None if it is a resend.

    The row lock is held until commit, so seqs are handed out in commit order. On a resend the
    caller must roll back, which returns the bumped counter: seqs stay gap-free.
    """
    row = (
        await session.execute(
            _INSERT_MESSAGE,
            {"room": room, "author": author, "body": body, "client_msg_id": client_msg_id},
        )
    ).one_or_none()
    if row is None:
        return None
    return MessageRecord(row.id, room, row.seq, author, body, client_msg_id, row.created_at)


async def find_by_client_msg_id(
    session: AsyncSession, *, room: str, author: str, client_msg_id: str
) -> MessageRecord | None:
    rows = await session.execute(
        _BY_CLIENT_MSG_ID,
        {"room": room, "author": author, "cmid": client_msg_id},
    )
    found = _records(rows.all())
    return found[0] if found else None


async def notify(session: AsyncSession, *, channel: str, payload: str) -> None:
    """Queue a NOTIFY that PostgreSQL delivers at commit, in commit order, or never."""
    await session.execute(
        text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload}
    )


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
