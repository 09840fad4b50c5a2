"""Presence's SQL (tables: migration 0008; the rules: ``service.chat.presence``).

Every statement that adds or removes a replica from a ``presence`` row says whether the row
appeared or went: the row lock orders the replicas' writes, so each user's "online" and
"offline" is reported by exactly one of them, whatever they race."""

from __future__ import annotations

from dataclasses import dataclass

from service.db.queries import Conn

_REGISTER = """
INSERT INTO presence_replica (id, expires_at) VALUES ($1, now() + make_interval(secs => $2))
ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at
RETURNING xmax = 0
"""
_HOLD = "SELECT 1 FROM presence_replica WHERE id = $1 FOR KEY SHARE"
_ADD = """
INSERT INTO presence AS p (room, user_id, name, replicas)
SELECT a.room, a.user_id, a.name, ARRAY[$1]
FROM unnest($2::text[], $3::text[], $4::text[]) AS a(room, user_id, name)
ORDER BY a.room, a.user_id
ON CONFLICT (room, user_id) DO UPDATE
SET name = EXCLUDED.name, replicas = array_append(array_remove(p.replicas, $1), $1)
RETURNING p.room, p.user_id, p.name, xmax = 0
"""
_DROP_LAST = """
DELETE FROM presence p USING unnest($2::text[], $3::text[]) AS d(room, user_id)
WHERE p.room = d.room AND p.user_id = d.user_id AND p.replicas = ARRAY[$1]
RETURNING p.room, p.user_id
"""
_DROP = """
UPDATE presence p SET replicas = array_remove(p.replicas, $1)
FROM unnest($2::text[], $3::text[]) AS d(room, user_id)
WHERE p.room = d.room AND p.user_id = d.user_id AND $1 = ANY(p.replicas)
"""
_EXPIRED = """
WITH gone AS (DELETE FROM presence_replica WHERE expires_at < now() RETURNING id)
SELECT coalesce(array_agg(id), '{}') FROM gone
"""
_DROP_LAST_OF = "DELETE FROM presence WHERE replicas <@ $1::text[] RETURNING room, user_id"
_DROP_ALL_OF = """
UPDATE presence SET replicas = ARRAY(SELECT r FROM unnest(replicas) AS r WHERE r <> ALL($1))
WHERE replicas && $1::text[]
"""
_ROOM = "SELECT user_id, name FROM presence WHERE room = $1"
_PAGE = """
SELECT user_id, name FROM presence WHERE room = $1 AND user_id COLLATE "C" > $2
ORDER BY user_id COLLATE "C" LIMIT $3
"""


@dataclass(frozen=True, slots=True)
class Change:
    """A user who appeared in a room (``online``, with their name) or left it."""

    room: str
    user: str
    online: bool
    name: str | None = None


async def register(conn: Conn, *, replica: str, ttl: float) -> bool:
    """Register the replica, or move its expiry ``ttl`` seconds from now: True when it was
    not registered (first start, or another replica reaped it as dead meanwhile)."""
    fresh: bool = await conn.fetchval(_REGISTER, replica, ttl)
    return fresh


async def write(
    conn: Conn,
    *,
    replica: str,
    add: list[tuple[str, str, str | None]],
    drop: list[tuple[str, str]],
) -> list[Change] | None:
    """Add the replica to the users ``(room, user, name)`` and drop it from ``(room, user)``,
    in the caller's transaction: the users who appeared or left. None when the replica is not
    registered (reaped as dead): nothing was written."""
    if await conn.fetchval(_HOLD, replica) is None:
        return None
    changes: list[Change] = []
    if add:
        rows = await conn.fetch(
            _ADD, replica, [a[0] for a in add], [a[1] for a in add], [a[2] for a in add]
        )
        changes.extend(Change(room, user, True, name) for room, user, name, new in rows if new)
    if drop:
        rooms, users = [d[0] for d in drop], [d[1] for d in drop]
        rows = await conn.fetch(_DROP_LAST, replica, rooms, users)
        changes.extend(Change(room, user, False) for room, user in rows)
        await conn.execute(_DROP, replica, rooms, users)
    return changes


async def reap(conn: Conn) -> list[Change]:
    """Delete the replicas whose presence expired and drop them from every row, in the
    caller's transaction: the users who left with them."""
    dead: list[str] = await conn.fetchval(_EXPIRED)
    if not dead:
        return []
    rows = await conn.fetch(_DROP_LAST_OF, dead)
    await conn.execute(_DROP_ALL_OF, dead)
    return [Change(room, user, False) for room, user in rows]


async def room(conn: Conn, *, room: str) -> dict[str, str | None]:
    """Everyone present in the room: user -> name."""
    return {user: name for user, name in await conn.fetch(_ROOM, room)}


async def page(conn: Conn, *, room: str, after: str, limit: int) -> list[tuple[str, str | None]]:
    """``(user, name)`` of the room's present users after ``after``, by user id in code
    point order (as ``ready`` lists them)."""
    return [(user, name) for user, name in await conn.fetch(_PAGE, room, after, limit)]
