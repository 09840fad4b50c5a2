"""Group commit (``service.db.writer``, migrations 0002 to 0004) against the real database:
batches keep seqs gap-free and ordered, resends idempotent, and one bad message alone. The
frames' bytes on every path: test_message_frame.py."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from service.chat.envelope import channel_for, decode_notification, stored_frame
from service.db.queries import messages_between
from service.db.writer import MessageWriter, Stored
from service.errors import OutcomeUnknown, Unavailable
from tests.support import Client, locked_out


def _room() -> str:
    return f"g-{uuid.uuid4().hex[:12]}"


def _submit(writer: MessageWriter, room: str, body: str, cmid: str | None = None, author="ann"):
    return writer.submit(
        room=room, channel=channel_for(room), author=author, body=body, client_msg_id=cmid
    )


@pytest.fixture
def batch_sizes() -> list[int]:
    return []


@pytest.fixture
async def writers(database_url, batch_sizes):
    """Two writers on separate connections: two server processes, in effect."""
    made = [MessageWriter(database_url, notify=True, on_batch=batch_sizes.append) for _ in range(2)]
    for writer in made:
        await writer.start()
    yield made
    for writer in made:
        await writer.close()


async def _stored_seqs(database_url: str, room: str) -> tuple[list[int], int]:
    conn = await asyncpg.connect(database_url)
    try:
        seqs = await conn.fetch(
            "SELECT m.seq FROM message m JOIN room r ON r.id = m.room_id "
            "WHERE r.name = $1 ORDER BY m.seq",
            room,
        )
        last = await conn.fetchval("SELECT last_seq FROM room WHERE name = $1", room)
    finally:
        await conn.close()
    return [r["seq"] for r in seqs], last


async def test_concurrent_batches_over_rooms_keep_seqs_gap_free_and_in_submit_order(
    writers, batch_sizes, database_url
):
    rooms = [_room() for _ in range(3)]
    # Interleaved rooms, submitted at once from two writers: batches lock rooms in different
    # arrival orders, which deadlocks unless the function orders its locks.
    futures = {w: [] for w in range(2)}
    for i in range(300):
        w = i % 2
        room = rooms[(i * 7 + w) % 3]
        futures[w].append((room, _submit(writers[w], room, f"m{i}", f"c{i}")))
    results: dict[int, list[tuple[str, Stored]]] = {}
    for w, pending in futures.items():
        done = await asyncio.wait_for(asyncio.gather(*(f for _, f in pending)), 30)
        results[w] = [(room, stored) for (room, _), stored in zip(pending, done, strict=True)]

    assert max(batch_sizes) > 1  # the sends really were grouped
    for room in rooms:
        seqs, last = await _stored_seqs(database_url, room)
        assert seqs == list(range(1, len(seqs) + 1)) and last == len(seqs)
        for w in range(2):  # one writer's sends to a room get increasing seqs, in submit order
            mine = [s.message.seq for r, s in results[w] if r == room]
            assert mine == sorted(mine)
    acked = sorted(s.message.seq for w in range(2) for r, s in results[w] if r == rooms[0])
    assert acked == list(range(1, len(acked) + 1))


async def test_resends_in_one_batch_and_across_batches_are_stored_once(writers, database_url):
    room = _room()
    first, again, other = await asyncio.gather(
        _submit(writers[0], room, "hello", "same"),
        _submit(writers[0], room, "hello, edited", "same"),  # same batch, same id
        _submit(writers[0], room, "hello", "same", author="bob"),  # another author's id
    )
    later = await _submit(writers[1], room, "third try", "same")
    assert not first.duplicate and not other.duplicate
    assert again.duplicate and later.duplicate
    for dup in (again, later):
        assert dup.message.seq == first.message.seq and dup.message.id == first.message.id
        assert dup.message.body == "hello"  # the original, not the resend's body
        assert dup.message.created_at == first.message.created_at
    after = await _submit(writers[1], room, "next", "next")
    assert after.message.seq == 3  # the resends gave their seqs back
    assert await _stored_seqs(database_url, room) == ([1, 2, 3], 3)


async def test_notify_carries_the_frame_or_a_reference_when_too_big(writers, database_url):
    room = _room()
    listener = await asyncpg.connect(database_url)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(channel_for(room), lambda *args: heard.put_nowait(args[3]))
    try:
        await _submit(writers[0], room, "small")
        big = await _submit(writers[0], room, "é" * 4000)  # 8000+ bytes of UTF-8
        seq, _, frame = decode_notification(await asyncio.wait_for(heard.get(), 5))
        stored = await messages_between(listener, room=room, after=0, until=1, limit=1)
        assert (seq, frame) == (1, stored_frame(stored[0]))
        seq, _, frame = decode_notification(await asyncio.wait_for(heard.get(), 5))
        assert (seq, frame) == (big.message.seq, None)
    finally:
        await listener.close()


async def test_a_bad_message_fails_alone(writers, database_url):
    room = _room()
    good_before, bad, good_after = (
        _submit(writers[0], room, "fine"),
        _submit(writers[0], room, "nul \x00 inside"),  # PostgreSQL refuses it (not validated here)
        _submit(writers[0], room, "fine too"),
    )
    results = await asyncio.gather(good_before, bad, good_after, return_exceptions=True)
    assert isinstance(results[1], asyncpg.PostgresError)
    assert [r.message.seq for r in (results[0], results[2])] == [1, 2]
    assert await _stored_seqs(database_url, room) == ([1, 2], 2)


async def test_reconnects_after_its_connection_is_killed_and_reports_failures_meanwhile(
    own_database, pg_server_url
):
    database_url = own_database
    writer = MessageWriter(database_url, notify=True)
    await writer.start()
    room = _room()
    await _submit(writer, room, "before")
    try:
        async with locked_out(pg_server_url, database_url, "chat-service-writer"):
            # Whether the writer saw its connection die before it sent the batch (nothing
            # stored) or after (it cannot tell whether the backend got it first) is a race.
            with pytest.raises((Unavailable, OutcomeUnknown)) as failed:
                await asyncio.wait_for(_submit(writer, room, "while down", "w-1"), 15)
            assert failed.value.client_msg_id == "w-1"
            with pytest.raises(Unavailable) as refused:  # now it has no connection: refused
                await asyncio.wait_for(_submit(writer, room, "while down", "w-1"), 15)
            assert refused.value.code == "unavailable" and refused.value.client_msg_id == "w-1"
        retried = await asyncio.wait_for(_submit(writer, room, "while down", "w-1"), 15)
        assert retried.message.seq == 2 and not retried.duplicate
    finally:
        await writer.close()


async def test_close_stores_what_is_queued(database_url):
    writer = MessageWriter(database_url, notify=True)
    await writer.start()
    room = _room()
    pending = [_submit(writer, room, f"m{i}") for i in range(50)]
    await writer.close()
    assert all(f.done() and not f.exception() for f in pending)
    assert await _stored_seqs(database_url, room) == (list(range(1, 51)), 50)
    with pytest.raises(Unavailable):
        await _submit(writer, room, "after close")


async def test_pipelined_sends_are_answered_in_order(server, room, alice):
    """A client may send without waiting for acks; answers keep the order of its frames."""
    async with await Client.connect(server, room, alice) as client:
        for i in range(8):
            await client.send(f"m{i}", f"p-{i}")
        await client.send_json({"type": "ping"})
        await client.send_json({"type": "send", "body": "", "client_msg_id": "p-empty"})
        for i in range(8, 12):
            await client.send(f"m{i}", f"p-{i}")
        frames = [await client.recv() for _ in range(14 + 12)]
    answers = [f for f in frames if f["type"] != "message"]
    assert [f["seq"] for f in frames if f["type"] == "message"] == list(range(1, 13))
    kinds = [(a["type"], a.get("client_msg_id")) for a in answers]
    expected = [("ack", f"p-{i}") for i in range(8)] + [("pong", None), ("error", "p-empty")]
    assert kinds == expected + [("ack", f"p-{i}") for i in range(8, 12)]
    assert [a["seq"] for a in answers if a["type"] == "ack"] == list(range(1, 13))


async def _post_batch(
    conn: asyncpg.Connection, room: str, cmids: list[str], *, before_0005: bool = False
) -> list[int]:
    """``before_0005``: the function as it was before it took the senders' room ids."""
    n = len(cmids)
    args: list[object] = [[room] * n, [channel_for(room)] * n, ["ann"] * n, ["x"] * n, cmids]
    if before_0005:
        query = "$1::text[], $2::text[], $3::text[], $4::text[], $5::text[], false"
    else:
        query = "$1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], false"
        args.append([None] * n)
    rows = await conn.fetch(f"SELECT * FROM chat_post_messages({query})", *args)  # noqa: S608 - constant
    return [row["o_seq"] for row in sorted(rows, key=lambda row: row["o_ord"])]


async def test_a_big_batch_leaves_one_version_of_its_room_row(own_database):
    """Under overload batches hold hundreds of messages: bumping ``last_seq`` once per message
    left as many row versions, unprunable until commit, and the room table bloated (0003)."""
    conn = await asyncpg.connect(own_database)
    try:
        room = _room()
        assert await _post_batch(conn, room, ["first"]) == [1]
        size = await conn.fetchval("SELECT pg_relation_size('room')")
        cmids = [f"m{k}" for k in range(400)] + ["m7"]  # and a resend inside the batch
        assert await _post_batch(conn, room, cmids) == [*range(2, 402), 9]
        assert await conn.fetchval("SELECT last_seq FROM room WHERE name = $1", room) == 401
        assert await conn.fetchval("SELECT pg_relation_size('room')") == size == 8192
    finally:
        await conn.close()


def test_downgrading_to_0002_keeps_a_working_function(fresh_database):
    from service.db.migrate import downgrade, upgrade

    async def post(
        url: str, room: str, cmids: list[str], *, before_0005: bool = False
    ) -> tuple[list[int], int]:
        conn = await asyncpg.connect(url)
        try:
            seqs = await _post_batch(conn, room, cmids, before_0005=before_0005)
            return seqs, await conn.fetchval("SELECT last_seq FROM room WHERE name = $1", room)
        finally:
            await conn.close()

    url = fresh_database()
    upgrade(url)
    downgrade(url, "0002")
    room = _room()
    assert asyncio.run(post(url, room, ["a", "b", "a"], before_0005=True)) == ([1, 2, 1], 2)
    upgrade(url)
    assert asyncio.run(post(url, room, ["c", "b", "d"])) == ([3, 2, 4], 4)
