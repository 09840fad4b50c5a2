"""``chat_post_messages`` stores a batch of fewer than ten messages one statement each and a
bigger one with one set-based statement (migration 0007). Both must give the same answers, row
for row, and store the same rows: this runs one mixed batch both ways, in two pairs of rooms
set up alike, and compares everything but ids and times."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

POST = "SELECT * FROM chat_post_messages($1, $2, $3, $4, $5, $6, $7, true)"


async def _setup(conn: asyncpg.Connection, tag: str) -> dict[str, Any]:
    """A public room with three messages (one deleted, one to be resent) and a private room
    with one member; returns their names and ids."""
    public, private = f"pub-{tag}", f"priv-{tag}"
    await conn.fetch(
        POST,
        [public] * 3,
        ["c"] * 3,
        ["ann", "ann", "bob"],
        ["first", "second", "third"],
        ["old-1", "old-2", "old-3"],
        [None] * 3,
        [None] * 3,
    )
    public_id = await conn.fetchval("SELECT id FROM room WHERE name = $1", public)
    await conn.execute(
        "UPDATE message SET body = NULL, deleted = true WHERE room_id = $1 AND seq = 2", public_id
    )
    private_id = await conn.fetchval(
        "INSERT INTO room (name, kind) VALUES ($1, 'private') RETURNING id", private
    )
    await conn.execute(
        "INSERT INTO room_member (room_id, user_id, role) VALUES ($1, 'ann', 'owner'),"
        " ($1, 'cat', 'member')",
        private_id,
    )
    return {"public": public, "private": private, "public_id": public_id}


def _batch(rooms: dict[str, Any]) -> list[tuple[Any, ...]]:
    """(room, author, body, client_msg_id, room_id, reply_to): every kind of answer."""
    pub, priv = rooms["public"], rooms["private"]
    return [
        (pub, "ann", "hello @cat and @dan", "n-1", None, None),
        (pub, "bob", "a reply", "n-2", None, 1),
        (pub, "bob", "reply to a deleted one", "n-3", None, 2),
        (pub, "bob", "reply to nothing", "n-4", None, 999),
        (pub, "ann", "resent", "old-1", None, None),  # stored before: the original
        (priv, "ann", "member says", "n-5", None, None),
        (priv, "eve", "not a member", "n-6", None, None),
        (pub, "cat", "twice in one batch", "n-7", None, None),
        (pub, "cat", "twice in one batch", "n-7", None, None),  # the first's duplicate
        ("dm.x.y", "ann", "a direct room is never made", "n-8", None, None),
        (pub, "ann", "wrong room id", "n-9", rooms["public_id"] + 10**6, None),
        (priv, "cat", "@ann", "n-10", None, None),
        (pub, "dan", "no id", None, None, None),
    ]


async def _run(conn: asyncpg.Connection, batch: list[tuple[Any, ...]], one_call: bool):
    rows = []
    calls = [batch] if one_call else [[m] for m in batch]
    for part in calls:
        got = await conn.fetch(
            POST,
            [m[0] for m in part],
            ["chan"] * len(part),
            [m[1] for m in part],
            [m[2] for m in part],
            [m[3] for m in part],
            [m[4] for m in part],
            [m[5] for m in part],
        )
        rows += sorted(got, key=lambda r: r["o_ord"])
    return rows


def _answer(row: asyncpg.Record) -> tuple[Any, ...]:
    frame = json.loads(row["o_frame"]) if row["o_frame"] else None
    if frame is not None:
        for key in ("room", "id", "created_at"):
            frame.pop(key)
    return (row["o_seq"], row["o_body"], row["o_duplicate"], row["o_error"], frame)


async def _state(conn: asyncpg.Connection, rooms: dict[str, Any]) -> list[Any]:
    found = []
    for name in (rooms["public"], rooms["private"]):
        found.append(
            await conn.fetchrow("SELECT last_seq, text_count FROM room WHERE name = $1", name)
        )
        found.append(
            [
                tuple(r)
                for r in await conn.fetch(
                    "SELECT m.seq, m.author, m.body, m.reply_to, m.reply_quote, m.text_no"
                    " FROM message m JOIN room r ON r.id = m.room_id WHERE r.name = $1"
                    " ORDER BY m.seq",
                    name,
                )
            ]
        )
        found.append(
            [
                tuple(r)
                for r in await conn.fetch(
                    "SELECT mm.user_id, mm.seq FROM message_mention mm JOIN room r"
                    " ON r.id = mm.room_id WHERE r.name = $1 ORDER BY 1, 2",
                    name,
                )
            ]
        )
        found.append(
            [
                tuple(r)
                for r in await conn.fetch(
                    "SELECT rm.user_id, rm.last_read_seq, rm.read_text_no, rm.last_mention_seq"
                    " FROM room_member rm"
                    " JOIN room r ON r.id = rm.room_id WHERE r.name = $1 ORDER BY 1",
                    name,
                )
            ]
        )
    return found


async def test_a_batch_at_once_and_one_message_at_a_time_agree(database_url):
    conn = await asyncpg.connect(database_url)
    heard: list[str] = []
    try:
        await conn.add_listener("chan", lambda *args: heard.append(args[3]))
        tag = uuid.uuid4().hex[:8]
        at_once, each = await _setup(conn, f"a{tag}"), await _setup(conn, f"b{tag}")
        batch_a, batch_b = _batch(at_once), _batch(each)
        assert len(batch_a) >= 10  # the set-based statement
        rows_a = await _run(conn, batch_a, one_call=True)
        notified_a, heard[:] = list(heard), []
        rows_b = await _run(conn, batch_b, one_call=False)
        assert [_answer(r) for r in rows_a] == [_answer(r) for r in rows_b]
        assert [r["o_error"] for r in rows_a] == [
            None, None, "already_deleted", "not_found", None, None, "forbidden", None, None,
            "forbidden", "forbidden", None, None,
        ]  # fmt: skip
        assert [r["o_duplicate"] for r in rows_a][4] and rows_a[8]["o_duplicate"]
        assert rows_a[8]["o_seq"] == rows_a[7]["o_seq"]
        assert await _state(conn, at_once) == await _state(conn, each)
        # The batch's notifications, in seq order per room, one per stored message.
        await conn.execute("SELECT 1")  # let the listener run
        seqs = [int(p.split(":", 1)[0]) for p in notified_a]
        stored = [r["o_seq"] for r in rows_a if r["o_frame"] is not None]
        assert len(seqs) == len(stored)
        public_seqs = [int(p.split(":", 1)[0]) for p in notified_a if f"pub-a{tag}" in p]
        assert public_seqs == sorted(public_seqs) == list(range(4, 4 + len(public_seqs)))
    finally:
        await conn.close()
