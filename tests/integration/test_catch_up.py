"""Catch-up without storms: after a LISTEN reconnect or a hole in the live stream, a room's
connections share one bounded read of the database (``RoomHub.catch_up``); one too far behind
is closed with 1013 and resumes with ``since``."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest
from broadcaster import Broadcast

from service.chat.history import MAX_RESUME_GAP
from service.chat.messages import submit_message
from service.db.writer import MessageWriter
from service.errors import Unavailable
from service.realtime.hub import CatchUp, CatchUpLimits, RoomHub
from tests.support import Client, close_of, locked_out, make_token, messages_until


async def _post(writer: MessageWriter, room: str, count: int, prefix: str = "m") -> None:
    """Commit ``count`` messages, many per commit."""
    for start in range(0, count, 200):
        await asyncio.gather(
            *(
                submit_message(
                    writer=writer,
                    room=room,
                    author="writer",
                    body=f"{prefix} {i}",
                    client_msg_id=None,
                    max_chars=4000,
                )
                for i in range(start, min(count, start + 200))
            )
        )


class _Hub:
    """A ``RoomHub`` on a real pool, counting its catch-up reads."""

    def __init__(self, pool: asyncpg.Pool, limits: CatchUpLimits) -> None:
        self.reads = 0
        self.hub = RoomHub(
            Broadcast("memory://"), pool, 64, catch_up_limits=limits, on_catch_up_read=self._count
        )

    def _count(self) -> None:
        self.reads += 1


@pytest.fixture
async def stored_room(own_database):  # type: ignore[no-untyped-def]
    """A room with 30 messages, a writer and a read pool of one connection."""
    room = f"r-{uuid.uuid4().hex[:8]}"
    writer = MessageWriter(own_database, notify=True)
    await writer.start()
    pool = await asyncpg.create_pool(own_database, min_size=1, max_size=1)
    try:
        await _post(writer, room, 30)
        yield room, writer, pool
    finally:
        await pool.close()
        await writer.close()


def _seqs(window: CatchUp) -> list[int]:
    return list(range(window.first, window.last_seq + 1))


async def test_connections_asking_together_share_one_read(stored_room):  # type: ignore[no-untyped-def]
    room, _writer, pool = stored_room
    counted = _Hub(pool, CatchUpLimits(messages=100))
    afters = [30 - i % 7 for i in range(50)]  # 50 connections, up to 6 messages behind
    windows = await asyncio.gather(*(counted.hub.catch_up(room, after=a) for a in afters))
    assert counted.reads == 1
    assert all(w is windows[0] for w in windows)  # one read, one set of frames
    assert _seqs(windows[0]) == list(range(25, 31))  # after the lowest after, to the end
    assert len(windows[0].frames) == 6
    assert '"seq":25,' in windows[0].frames[0].text
    assert windows[0].frames[0].text.startswith('{"type":"message","room":')
    await counted.hub.close()


async def test_a_read_serves_only_requests_made_before_it_began(stored_room):  # type: ignore[no-untyped-def]
    """A request made while a read runs gets the next read, which sees later commits."""
    room, writer, pool = stored_room
    counted = _Hub(pool, CatchUpLimits(messages=100))
    held = await pool.acquire()  # the first read waits for the pool's only connection
    try:
        first = asyncio.ensure_future(counted.hub.catch_up(room, after=29))
        for _ in range(5):
            await asyncio.sleep(0)  # the read has begun: it waits in pool.acquire
        await _post(writer, room, 1, "later")
        second = [asyncio.ensure_future(counted.hub.catch_up(room, after=30)) for _ in range(3)]
        await asyncio.sleep(0)
    finally:
        await pool.release(held)
    windows = await asyncio.gather(first, *second)
    assert counted.reads == 2
    assert windows[1].last_seq == 31 and _seqs(windows[1]) == [31]
    assert windows[1] is windows[2] is windows[3]
    await counted.hub.close()


async def test_a_read_holds_the_newest_messages_within_its_limits(stored_room):  # type: ignore[no-untyped-def]
    room, _writer, pool = stored_room
    by_count = _Hub(pool, CatchUpLimits(messages=10))
    window = await by_count.hub.catch_up(room, after=5)
    assert _seqs(window) == list(range(21, 31))  # a connection at 5 is too far behind
    one_frame = len(window.frames[-1].text)
    by_bytes = _Hub(pool, CatchUpLimits(messages=100, bytes=3 * one_frame + 10))
    window = await by_bytes.hub.catch_up(room, after=0)
    assert _seqs(window) == [28, 29, 30]
    tiny = _Hub(pool, CatchUpLimits(messages=100, bytes=1))
    window = await tiny.hub.catch_up(room, after=0)
    assert _seqs(window) == [30]  # the newest always: a connection one behind is served
    empty = await tiny.hub.catch_up(f"never-{room}", after=0)
    assert (empty.first, empty.last_seq, empty.frames) == (1, 0, [])
    for counted in (by_count, by_bytes, tiny):
        await counted.hub.close()


async def test_a_read_never_hands_out_frames_across_a_hole(stored_room, own_database):  # type: ignore[no-untyped-def]
    """Seqs have no gaps unless history was deleted by hand; then a connection before the hole
    is too far behind rather than sent the wrong frames."""
    room, _writer, pool = stored_room
    conn = await asyncpg.connect(own_database)
    try:
        await conn.execute("DELETE FROM message WHERE seq = 25")
    finally:
        await conn.close()
    counted = _Hub(pool, CatchUpLimits())
    window = await counted.hub.catch_up(room, after=20)
    assert _seqs(window) == [26, 27, 28, 29, 30]
    assert [json.loads(f.text)["seq"] for f in window.frames] == [26, 27, 28, 29, 30]
    await counted.hub.close()


async def test_a_failed_read_is_unavailable_to_every_caller(stored_room):  # type: ignore[no-untyped-def]
    room, _writer, pool = stored_room
    counted = _Hub(pool, CatchUpLimits())
    await pool.close()
    results = await asyncio.gather(
        *(counted.hub.catch_up(room, after=0) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, Unavailable) for r in results), results
    assert counted.reads == 1
    await counted.hub.close()


async def test_closing_the_hub_answers_waiting_callers(stored_room):  # type: ignore[no-untyped-def]
    room, _writer, pool = stored_room
    counted = _Hub(pool, CatchUpLimits())
    held = await pool.acquire()
    try:
        running = asyncio.ensure_future(counted.hub.catch_up(room, after=0))
        for _ in range(5):
            await asyncio.sleep(0)  # its read waits for the pool
        waiting = asyncio.ensure_future(counted.hub.catch_up(room, after=0))
        await asyncio.sleep(0)
        await asyncio.wait_for(counted.hub.close(), 5)
        results = await asyncio.wait_for(
            asyncio.gather(running, waiting, return_exceptions=True), 5
        )
    finally:
        await pool.release(held)
    assert all(isinstance(r, Unavailable) for r in results), results


# --- real processes ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_listen_reconnect_costs_one_read_per_room_not_one_per_connection(
    own_database, pg_server_url, spawn
):
    """50 connections in one room resync after the LISTEN connection was cut while messages
    were committed, and more are committed while they catch up: each gets every message
    once, in order, from about one read."""
    server = spawn(own_database)
    room = f"r-{uuid.uuid4().hex[:8]}"
    clients = [await Client.connect(server, room, make_token(f"reader-{i}")) for i in range(50)]
    writer = MessageWriter(own_database, notify=True)
    try:
        await writer.start()
        await _post(writer, room, 5, "before")
        for client in clients:
            assert await messages_until(client, 5, timeout=30) == [1, 2, 3, 4, 5]
        assert server.metric("chat_catchup_reads_total") == 0
        async with locked_out(pg_server_url, own_database, "chat-listen"):
            await _post(writer, room, 40, "while deaf")
            await clients[0].assert_silent(0.3)
        meanwhile = asyncio.ensure_future(_post(writer, room, 20, "during the catch-up"))
        received = await asyncio.gather(*(messages_until(c, 65, timeout=30) for c in clients))
        await meanwhile
        for seqs in received:
            assert seqs == list(range(6, 66))
        # Nothing more for any of them: one window for all, not fifty in a row.
        await asyncio.gather(*(client.assert_silent(0.3) for client in clients))
        reads = server.metric("chat_catchup_reads_total")
        assert 1 <= reads <= 3, reads  # one per resync (a gap seen first may add one)
        assert server.metric("chat_slow_consumer_disconnects_total") == 0
    finally:
        await writer.close()
        for client in clients:
            await client.close()


@pytest.mark.slow
async def test_a_connection_too_far_behind_is_closed_and_resumes_with_since(
    own_database, pg_server_url, spawn
):
    """Past ``CHAT_CATCH_UP_LIMIT`` missed messages the connection is closed with 1013; its
    resume replays everything it missed up to 1000, and past that says ``recovered: false``."""
    server = spawn(own_database, CHAT_CATCH_UP_LIMIT="100")
    far, near = f"far-{uuid.uuid4().hex[:8]}", f"near-{uuid.uuid4().hex[:8]}"
    behind = await Client.connect(server, far, make_token("behind"))
    within = await Client.connect(server, near, make_token("within"))
    writer = MessageWriter(own_database, notify=True)
    try:
        await writer.start()
        async with locked_out(pg_server_url, own_database, "chat-listen"):
            await _post(writer, far, 150)
            await _post(writer, near, 100)
        assert await close_of(behind, 30) == (1013, "too far behind; reconnect with since")
        # within the limit
        assert await messages_until(within, 100, timeout=30) == list(range(1, 101))

        resumed = await Client.connect(server, far, make_token("behind"), since=0)
        assert resumed.ready["recovered"] is True and resumed.ready["last_seq"] == 150
        assert [m["seq"] for m in resumed.history] == list(range(1, 151))

        async with locked_out(pg_server_url, own_database, "chat-listen"):
            await _post(writer, far, MAX_RESUME_GAP + 1)
        assert (await close_of(resumed, 30))[0] == 1013
        last = 151 + MAX_RESUME_GAP
        again = await Client.connect(server, far, make_token("behind"), since=150)
        assert again.ready["recovered"] is False and again.ready["last_seq"] == last
        assert [m["seq"] for m in again.history] == list(range(last - 49, last + 1))  # history
        await within.assert_silent(0.2)
        await again.close()
    finally:
        await writer.close()
        await within.close()
        await behind.close()
