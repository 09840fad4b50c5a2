"""Webhook delivery state in SQL: each receiver's cursor in each room's stream (migration
0011), the outbox of items queued one by one (dead letters queued again), the dead letters and
the per-room registrations.

What there is to send is a room's ``message`` rows past its cursor: the stream is already a
durable log ordered by seq, so storing an item costs delivery nothing but a trigger that marks
an idle cursor ``pending`` (and reads two index entries when it is pending already).

Claiming is how replicas share delivery without a coordinator: a deliverer takes a lease on a
pending cursor that nobody else holds (``claim``: one statement, so one short transaction;
``FOR UPDATE SKIP LOCKED`` keeps two claims from taking the same row) together with the room's
next item, POSTs it with no transaction open, and settles it (``delivered`` / ``failed``) only if
the lease is still its own. While the lease runs no other deliverer can send an item of that
room to that receiver, so an item is never sent twice at once and a room's items go out one
after another in seq order. The lease is longer than a POST may take (``CHAT_WEBHOOK_TIMEOUT``
plus a margin), so this holds even for a deliverer cut off from the database mid-POST. A
deliverer that dies leaves its lease to expire; the item is then due for whoever claims next:
nothing is skipped, and the cost of a crash is a repeat (at least once) after one lease.

A cursor goes idle (``pending`` false) only in ``_catch_up``, under a share lock on the room
row: a writer holds that row's lock from taking its seqs to its commit, so an item being
stored is either seen there, or stored after, when the trigger finds the cursor idle and marks
it again.
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
trigger makes ``global`` cursors only for such connections."""

NOTIFY_CHANNEL = "chat_webhook"
"""The trigger NOTIFYs it (empty payload) in a transaction that marked an idle cursor pending
(migration 0011); retrying dead letters does too."""

_CLAIM_QUEUED = """
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
         WHERE m.room_id = o.room_id AND m.seq = o.seq),
       true
"""
"""An item of the outbox: the oldest of its room and receiver (found by a skip scan of the
key, one index descent per room with queued items, whatever the backlog). The outbox is
nearly always empty: this costs a few index pages."""

_CLAIM_NEXT = """
WITH next AS (
    SELECT c.hook, c.room_id
      FROM webhook_cursor c
     WHERE c.pending AND c.hook = ANY($1::text[]) AND c.next_attempt_at <= now()
       AND (c.leased_until IS NULL OR c.leased_until <= now())
       AND NOT EXISTS (SELECT FROM webhook_outbox o
                        WHERE o.hook = c.hook AND o.room_id = c.room_id)
     ORDER BY c.next_attempt_at
     LIMIT 1
       FOR UPDATE OF c SKIP LOCKED
), leased AS (
    UPDATE webhook_cursor c
       SET leased_until = now() + make_interval(secs => $2::float8), lease_owner = $3
      FROM next
     WHERE (c.hook, c.room_id) = (next.hook, next.room_id)
    RETURNING c.hook, c.room_id, c.delivered_seq, c.attempts
)
SELECT l.hook, l.room_id, i.seq, l.attempts, i.created_at,
       (SELECT w.url FROM webhook w WHERE l.hook = 'room' AND w.room_id = l.room_id),
       i.frame, false, l.delivered_seq
  FROM leased l LEFT JOIN LATERAL (
       SELECT m.seq, m.created_at, chat_message_json(r.name, m, true) AS frame
         FROM message m JOIN room r ON r.id = m.room_id
        WHERE m.room_id = l.room_id AND m.seq > l.delivered_seq
        ORDER BY m.seq LIMIT 1) i ON true
"""
"""A pending cursor with its room's next item (none when it caught up), the longest waiting
first: rooms take turns, as a worker settles one item and claims again. A room with items in
the outbox waits for them (they are older)."""

_CATCH_UP_TRIES = 3
"""Cursors found caught up in a row before ``claim`` gives up for now (each is marked idle)."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """An item leased to its claimer. ``frame`` None: the item is gone (its room was deleted);
    ``url`` None for a ``room`` item: the registration was removed. ``queued``: an item of the
    outbox, not its room's cursor's next."""

    hook: str
    room_id: int
    seq: int
    attempts: int
    enqueued_at: datetime
    """When the item was stored (or, for an outbox item, queued)."""
    url: str | None
    frame: str | None
    queued: bool


async def claim(
    conn: Conn, *, hooks: list[str], lease: float, owner: str, outbox: bool = True
) -> Claimed | None:
    """Lease the next due item of a room and receiver nobody else is sending to ``owner`` for
    ``lease`` seconds (outside a transaction: the claim commits at once). ``outbox`` False:
    the caller knows the outbox had nothing due a moment ago (it is nearly always empty), so
    only cursors are looked at; their rooms with outbox items still wait for those."""
    if outbox:
        row = await conn.fetchrow(_CLAIM_QUEUED, hooks, lease, owner)
        if row is not None:
            return Claimed(*row)
    for _ in range(_CATCH_UP_TRIES):
        row = await conn.fetchrow(_CLAIM_NEXT, hooks, lease, owner)
        if row is None:
            return None
        if row[2] is not None:
            return Claimed(*row[:8])
        await _catch_up(conn, hook=row[0], room_id=row[1], delivered_seq=row[8], owner=owner)
    return None


async def _catch_up(conn: Conn, *, hook: str, room_id: int, delivered_seq: int, owner: str) -> None:
    """Release the lease of a cursor that found no item past ``delivered_seq``, and mark it
    idle unless the room has items past it after all: read under a share lock on the room row,
    which waits for a writer of the room to commit (see the module's docstring)."""
    async with conn.transaction():
        last_seq = await conn.fetchval("SELECT last_seq FROM room WHERE id = $1 FOR SHARE", room_id)
        await conn.execute(
            "UPDATE webhook_cursor SET pending = $4, leased_until = NULL, lease_owner = NULL"
            " WHERE hook = $1 AND room_id = $2 AND lease_owner = $3",
            hook,
            room_id,
            owner,
            last_seq is not None and last_seq > delivered_seq,
        )


_ADVANCE = """
UPDATE webhook_cursor c
   SET delivered_seq = $3, attempts = 0, last_error = NULL, next_attempt_at = now(),
       leased_until = CASE WHEN r.last_seq > $3 THEN NULL ELSE c.leased_until END,
       lease_owner = CASE WHEN r.last_seq > $3 THEN NULL ELSE c.lease_owner END
  FROM room r
 WHERE r.id = c.room_id AND c.hook = $1 AND c.room_id = $2 AND c.lease_owner = $4
RETURNING r.last_seq > $3
"""
"""Past the item (delivered, or a dead letter now). The lease goes with it unless the room has
nothing more as far as this snapshot sees: then ``_catch_up`` looks again under the lock."""


async def _advance(conn: Conn, item: Claimed, *, owner: str, dead_error: str | None) -> bool:
    """Move the cursor past ``item``. The commit does not wait for the WAL's flush (one
    flush fewer per item for the chat's writer to queue behind): a PostgreSQL crash may forget
    it, which repeats the item once the claim's lease runs out, never skips one. The claim
    commits durably: a lease a crash forgot could hand the room to a second deliverer while
    the first is still sending."""
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = off")
        more = await conn.fetchrow(_ADVANCE, item.hook, item.room_id, item.seq, owner)
        if more is None:
            return False
        if dead_error is not None:
            await conn.execute(
                "INSERT INTO webhook_dead_letter"
                " (hook, room_id, seq, attempts, last_error, enqueued_at)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                item.hook,
                item.room_id,
                item.seq,
                item.attempts + 1,
                dead_error[:500],
                item.enqueued_at,
            )
    if not more[0]:
        await _catch_up(
            conn, hook=item.hook, room_id=item.room_id, delivered_seq=item.seq, owner=owner
        )
    return True


async def delivered(conn: Conn, item: Claimed, *, owner: str) -> bool:
    """Done with it; False when the lease had passed to another deliverer meanwhile."""
    if not item.queued:
        return await _advance(conn, item, owner=owner, dead_error=None)
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
        if not item.queued:
            return await _advance(conn, item, owner=owner, dead_error=error)
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
        f"UPDATE {_table(item)} SET attempts = attempts + 1, last_error = $4,"  # noqa: S608
        " next_attempt_at = now() + make_interval(secs => $5::float8),"
        " leased_until = NULL, lease_owner = NULL"
        " WHERE hook = $1 AND room_id = $2 AND lease_owner = $3",
        item.hook,
        item.room_id,
        owner,
        error[:500],
        retry_in,
    )
    return status != "UPDATE 0"


async def release(conn: Conn, item: Claimed, *, owner: str) -> None:
    """Give up a lease without an attempt (the POST was cut off by a shutdown)."""
    await conn.execute(
        f"UPDATE {_table(item)} SET leased_until = NULL, lease_owner = NULL"  # noqa: S608
        " WHERE hook = $1 AND room_id = $2 AND lease_owner = $3",
        item.hook,
        item.room_id,
        owner,
    )


def _table(item: Claimed) -> str:
    """Where ``item``'s lease and attempts are kept: its outbox row, or its room's cursor (a
    lease owner names one claim, so it alone picks the row within the room)."""
    return "webhook_outbox" if item.queued else "webhook_cursor"


@dataclass(frozen=True, slots=True)
class Backlog:
    pending: int
    oldest_age: float
    """Seconds since the oldest pending item was queued (0 with none)."""
    dead: int


async def backlog(conn: Conn, *, hooks: list[str]) -> Backlog:
    """What is still to send to ``hooks``: the outbox's items and those past pending cursors."""
    row = await conn.fetchrow(
        "WITH behind AS (SELECT c.room_id, c.delivered_seq, r.last_seq"
        "  FROM webhook_cursor c JOIN room r ON r.id = c.room_id"
        "  WHERE c.pending AND c.hook = ANY($1::text[]))"
        " SELECT (SELECT count(*) FROM webhook_outbox)"
        "   + (SELECT COALESCE(sum(last_seq - delivered_seq), 0) FROM behind),"
        " COALESCE(EXTRACT(EPOCH FROM now() - LEAST("
        "   (SELECT min(enqueued_at) FROM webhook_outbox),"
        "   (SELECT min(m.created_at) FROM behind b JOIN message m"
        "     ON m.room_id = b.room_id AND m.seq = b.delivered_seq + 1))), 0)::float8,"
        " (SELECT count(*) FROM webhook_dead_letter)",
        hooks,
    )
    assert row is not None  # noqa: S101 - an aggregate returns one row
    return Backlog(max(0, int(row[0])), max(0.0, float(row[1])), int(row[2]))


async def adopt_registrations(conn: Conn) -> int:
    """Give registrations made by a replica of the release before 0011 their cursor (from the
    room's next item on); this release makes it with the registration."""
    status = await conn.execute(
        "INSERT INTO webhook_cursor (hook, room_id, delivered_seq, pending)"
        " SELECT 'room', r.id, r.last_seq, false FROM webhook w JOIN room r ON r.id = w.room_id"
        " WHERE NOT EXISTS (SELECT FROM webhook_cursor c"
        "                    WHERE c.hook = 'room' AND c.room_id = w.room_id)"
        " ON CONFLICT DO NOTHING"
    )
    return int(status.rsplit(" ", 1)[-1])


@dataclass(frozen=True, slots=True)
class Registration:
    room: str
    url: str
    created_at: datetime


async def put_registration(conn: Conn, *, room: str, url: str) -> Registration | None:
    """Register (or replace) ``room``'s receiver; None when there is no such room. Its cursor
    starts past the room's last item: the share lock on the room row waits for an item being
    stored to commit, so "from the next stored item on" is exact."""
    async with conn.transaction():
        found = await conn.fetchrow("SELECT id, last_seq FROM room WHERE name = $1 FOR SHARE", room)
        if found is None:
            return None
        row = await conn.fetchrow(
            "INSERT INTO webhook (room_id, url) VALUES ($1, $2)"
            " ON CONFLICT (room_id) DO UPDATE SET url = EXCLUDED.url"
            " RETURNING url, created_at",
            found[0],
            url,
        )
        await conn.execute(
            "INSERT INTO webhook_cursor (hook, room_id, delivered_seq, pending)"
            " VALUES ('room', $1, $2, false) ON CONFLICT DO NOTHING",
            found[0],
            found[1],
        )
    assert row is not None  # noqa: S101 - an upsert returns its row
    return Registration(room, row[0], row[1])


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
        " cursor AS (DELETE FROM webhook_cursor c USING gone"
        "  WHERE c.hook = 'room' AND c.room_id = gone.room_id),"
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
