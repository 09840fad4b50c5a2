"""The webhook outbox and registrations in SQL (migration 0009 has the tables and the trigger
that fills the outbox in the transaction of each stream item).

Claiming is how replicas share delivery without a coordinator: a deliverer takes a lease on one
due item that is the oldest pending one of its room and receiver (``claim``: one statement, so
one short transaction; ``FOR UPDATE SKIP LOCKED`` keeps two claims from taking the same row),
POSTs it with no transaction open, and settles it (``delivered`` / ``failed``) only if the
lease is still its own. While the lease runs no other deliverer can take the item, nor the
room's next one (it is not the oldest pending: the leased one still is), so an item is never
sent twice at once and a room's items go out one after another in seq order. The lease is
longer than a POST may take (``CHAT_WEBHOOK_TIMEOUT`` plus a margin), so this holds even for a
deliverer cut off from the database mid-POST. A deliverer that dies leaves its lease to expire;
the item is then due for whoever claims next: nothing is skipped, and the cost of a crash is a
repeat (at least once) after one lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.db.queries import Conn

GLOBAL = "global"
"""``hook`` of an item for the replica's ``CHAT_WEBHOOK_URL``."""
ROOM = "room"
"""``hook`` of an item for its room's own registration (the ``webhook`` table)."""

SESSION_SETTING = "chat.webhook"
"""Set to ``on`` on every database connection of a replica with ``CHAT_WEBHOOK_URL``: the
trigger queues ``global`` items only for such connections."""

NOTIFY_CHANNEL = "chat_webhook"
"""The trigger NOTIFYs it (empty payload) in a transaction that queued an item of a room
whose queue was idle (migration 0010); retrying dead letters does too."""

_CLAIM = """
WITH RECURSIVE head AS (
    (SELECT hook, room_id, seq FROM webhook_outbox ORDER BY hook, room_id, seq LIMIT 1)
    UNION ALL
    SELECT n.hook, n.room_id, n.seq FROM head h CROSS JOIN LATERAL (
        SELECT hook, room_id, seq FROM webhook_outbox
         WHERE (hook, room_id) > (h.hook, h.room_id)
         ORDER BY hook, room_id, seq LIMIT 1) n
), next AS (
    SELECT o.hook, o.room_id, o.seq
      FROM head JOIN webhook_outbox o USING (hook, room_id, seq)
     WHERE o.next_attempt_at <= now() AND o.hook = ANY($1::text[])
       AND (o.leased_until IS NULL OR o.leased_until <= now())
     ORDER BY o.next_attempt_at
     LIMIT 1
       FOR UPDATE OF o SKIP LOCKED
)
UPDATE webhook_outbox o
   SET leased_until = now() + make_interval(secs => $2::float8), lease_owner = $3
  FROM next
 WHERE (o.hook, o.room_id, o.seq) = (next.hook, next.room_id, next.seq)
RETURNING o.hook, o.room_id, o.seq, o.attempts, o.enqueued_at,
       (SELECT w.url FROM webhook w WHERE o.hook = 'room' AND w.room_id = o.room_id),
       (SELECT chat_message_json(r.name, m, true)
          FROM message m JOIN room r ON r.id = m.room_id
         WHERE m.room_id = o.room_id AND m.seq = o.seq)
"""
"""The heads (each room's oldest pending item per receiver) are found by a skip scan of the
outbox's primary key, one index descent per room with pending items, so a claim costs the same
whatever the backlog of a room whose receiver is down (a scan of the due rows checking each for
an older one cost 26 ms at 22,000 queued items, and grew with them). The outbox holds only
what is still to send (dead letters have their own table): no index but the key."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """An item leased to its claimer. ``frame`` None: the item is gone (its room was deleted);
    ``url`` None for a ``room`` item: the registration was removed."""

    hook: str
    room_id: int
    seq: int
    attempts: int
    enqueued_at: datetime
    url: str | None
    frame: str | None


async def claim(conn: Conn, *, hooks: list[str], lease: float, owner: str) -> Claimed | None:
    """Lease the next due item of a room whose head nobody else holds to ``owner`` for
    ``lease`` seconds (outside a transaction: the claim commits at once)."""
    row = await conn.fetchrow(_CLAIM, hooks, lease, owner)
    return None if row is None else Claimed(*row)


async def delivered(conn: Conn, item: Claimed, *, owner: str) -> bool:
    """Done with it; False when the lease had passed to another deliverer meanwhile."""
    status = await conn.execute(
        "DELETE FROM webhook_outbox"
        " WHERE hook = $1 AND room_id = $2 AND seq = $3 AND lease_owner = $4",
        item.hook,
        item.room_id,
        item.seq,
        owner,
    )
    return status != "DELETE 0"


async def failed(
    conn: Conn, item: Claimed, *, owner: str, error: str, retry_in: float | None
) -> bool:
    """One more attempt failed: due again in ``retry_in`` seconds, or (None) moved to the dead
    letters. False when the lease had passed to another deliverer meanwhile (nothing
    recorded)."""
    if retry_in is None:
        status = await conn.execute(
            "WITH dead AS (DELETE FROM webhook_outbox"
            "  WHERE hook = $1 AND room_id = $2 AND seq = $3 AND lease_owner = $4"
            "  RETURNING hook, room_id, seq, attempts + 1, $5::text, enqueued_at)"
            " INSERT INTO webhook_dead_letter"
            " (hook, room_id, seq, attempts, last_error, enqueued_at)"
            " SELECT * FROM dead ON CONFLICT DO NOTHING",
            item.hook,
            item.room_id,
            item.seq,
            owner,
            error[:500],
        )
        return status != "INSERT 0 0"
    status = await conn.execute(
        "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = $5,"
        " next_attempt_at = now() + make_interval(secs => $6::float8),"
        " leased_until = NULL, lease_owner = NULL"
        " WHERE hook = $1 AND room_id = $2 AND seq = $3 AND lease_owner = $4",
        item.hook,
        item.room_id,
        item.seq,
        owner,
        error[:500],
        retry_in,
    )
    return status != "UPDATE 0"


async def release(conn: Conn, item: Claimed, *, owner: str) -> None:
    """Give up a lease without an attempt (the POST was cut off by a shutdown)."""
    await conn.execute(
        "UPDATE webhook_outbox SET leased_until = NULL, lease_owner = NULL"
        " WHERE hook = $1 AND room_id = $2 AND seq = $3 AND lease_owner = $4",
        item.hook,
        item.room_id,
        item.seq,
        owner,
    )


@dataclass(frozen=True, slots=True)
class Backlog:
    pending: int
    oldest_age: float
    """Seconds since the oldest pending item was queued (0 with none)."""
    dead: int


async def backlog(conn: Conn) -> Backlog:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM webhook_outbox),"
        " COALESCE((SELECT EXTRACT(EPOCH FROM now() - min(enqueued_at))"
        " FROM webhook_outbox), 0)::float8,"
        " (SELECT count(*) FROM webhook_dead_letter)"
    )
    assert row is not None  # noqa: S101 - an aggregate returns one row
    return Backlog(int(row[0]), float(row[1]), int(row[2]))


@dataclass(frozen=True, slots=True)
class Registration:
    room: str
    url: str
    created_at: datetime


async def put_registration(conn: Conn, *, room: str, url: str) -> Registration | None:
    """Register (or replace) ``room``'s receiver; None when there is no such room."""
    row = await conn.fetchrow(
        "INSERT INTO webhook (room_id, url) SELECT id, $2 FROM room WHERE name = $1"
        " ON CONFLICT (room_id) DO UPDATE SET url = EXCLUDED.url"
        " RETURNING $1::text, url, created_at",
        room,
        url,
    )
    return None if row is None else Registration(*row)


async def get_registration(conn: Conn, *, room: str) -> Registration | None:
    row = await conn.fetchrow(
        "SELECT r.name, w.url, w.created_at FROM webhook w JOIN room r ON r.id = w.room_id"
        " WHERE r.name = $1",
        room,
    )
    return None if row is None else Registration(*row)


async def delete_registration(conn: Conn, *, room: str) -> bool:
    """Remove ``room``'s receiver, what is queued for it and its dead letters (nowhere to go
    now). False when it had none."""
    row = await conn.fetchrow(
        "WITH gone AS (DELETE FROM webhook w USING room r"
        "  WHERE r.id = w.room_id AND r.name = $1 RETURNING w.room_id),"
        " dropped AS (DELETE FROM webhook_outbox o USING gone"
        "  WHERE o.hook = 'room' AND o.room_id = gone.room_id),"
        " dropped_dead AS (DELETE FROM webhook_dead_letter d USING gone"
        "  WHERE d.hook = 'room' AND d.room_id = gone.room_id)"
        " SELECT count(*) FROM gone",
        room,
    )
    return row is not None and row[0] > 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    hook: str
    room: str | None
    """None when the room was deleted since."""
    seq: int
    attempts: int
    last_error: str | None
    enqueued_at: datetime
    dead_at: datetime


async def dead_letters(
    conn: Conn, *, room: str | None, after: tuple[int, int] | None, limit: int
) -> list[DeadLetter]:
    """Dead letters, oldest first (by room id, seq), ``room``'s only when given."""
    rows = await conn.fetch(
        "SELECT d.hook, r.name, d.seq, d.attempts, d.last_error, d.enqueued_at, d.dead_at"
        " FROM webhook_dead_letter d LEFT JOIN room r ON r.id = d.room_id"
        " WHERE ($1::text IS NULL OR r.name = $1)"
        " AND ($2::bigint IS NULL OR (d.room_id, d.seq) > ($2, $3))"
        " ORDER BY d.room_id, d.seq, d.hook LIMIT $4",
        room,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [DeadLetter(*row) for row in rows]


async def retry_dead(conn: Conn, *, room: str | None) -> int:
    """Queue dead letters (``room``'s, or all) again with a fresh attempt budget."""
    status = await conn.execute(
        "WITH back AS (DELETE FROM webhook_dead_letter d"
        "  WHERE $1::text IS NULL OR d.room_id = (SELECT id FROM room WHERE name = $1)"
        "  RETURNING hook, room_id, seq, enqueued_at)"
        " INSERT INTO webhook_outbox (hook, room_id, seq, enqueued_at)"
        " SELECT * FROM back ON CONFLICT DO NOTHING",
        room,
    )
    count = int(status.rsplit(" ", 1)[-1])
    if count:
        await conn.execute(f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')")
    return count
