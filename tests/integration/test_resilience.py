"""Faults on purpose: a deaf LISTEN connection, a database that goes away, replicas killed or
stopped, slow and dead peers, floods. Acknowledged messages survive all of them."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import tempfile
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from service.chat.envelope import channel_for
from service.chat.messages import submit_message
from service.db.embedded import EmbeddedPostgres
from service.db.migrate import upgrade
from service.db.writer import MessageWriter
from tests.support import (
    Client,
    close_of,
    locked_out,
    make_token,
    messages_until,
    small_buffer_socket,
)

pytestmark = pytest.mark.slow


async def _close_code(client: Client, timeout: float = 10) -> int:
    return (await close_of(client, timeout))[0]


async def test_clients_catch_up_on_what_was_committed_while_listen_was_down(
    own_database, pg_server_url, spawn
):
    """Cut the LISTEN connection and keep it from coming back while messages are committed."""
    server = spawn(own_database)
    room = f"r-{uuid.uuid4().hex[:8]}"
    client = await Client.connect(server, room, make_token("reader"))
    writer = MessageWriter(own_database, notify=True)
    try:
        await writer.start()  # connected before the door closes
        async with locked_out(pg_server_url, own_database, "chat-listen"):
            for i in range(5):
                await submit_message(
                    writer=writer,
                    room=room,
                    author="writer",
                    body=f"while deaf {i}",
                    client_msg_id=None,
                    max_chars=4000,
                )
            await client.assert_silent(0.5)  # nothing can arrive: the listener is gone
        assert await messages_until(client, 5) == [1, 2, 3, 4, 5]
        await client.send("after", "after-1")
        frames = await client.collect("ack", "message")
        assert frames["message"]["seq"] == 6
        await client.assert_silent(0.3)
    finally:
        await writer.close()
        await client.close()


async def test_database_down_gives_unavailable_never_a_false_ack(spawn, tmp_path):
    data_dir = Path(tempfile.mkdtemp(prefix="chat-down-"))
    pg = EmbeddedPostgres(data_dir)
    try:
        url = await asyncio.to_thread(pg.start)  # start() runs its own event loop
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        await asyncio.to_thread(upgrade, url)
        server = spawn(url, CHAT_DB_POOL_SIZE="2")
        room = f"r-{uuid.uuid4().hex[:8]}"
        reader = await Client.connect(server, room, make_token("reader"))
        writer = await Client.connect(server, room, make_token("writer"))
        await writer.send("before", "b")
        assert (await writer.collect("ack", "message"))["ack"]["seq"] == 1
        assert await messages_until(reader, 1) == [1]

        pg.stop()
        await writer.send("during", "d")
        error = await writer.recv_type("error", timeout=30)
        assert error["code"] == "unavailable" and error["client_msg_id"] == "d"
        r = httpx.get(f"{server.http}/healthz")
        assert r.status_code == 200  # the process is alive and answering

        await asyncio.to_thread(pg.start, port=port)
        for _attempt in range(100):  # retry like a client would, with the same id
            await writer.send("during", "d")
            frame = await writer.recv()
            while frame["type"] == "message":
                frame = await writer.recv()
            if frame["type"] == "ack":
                break
            assert frame["code"] == "unavailable"
            await asyncio.sleep(0.1)
        assert frame["type"] == "ack" and frame["seq"] == 2
        assert await messages_until(reader, 2) == [2]
        await reader.assert_silent(0.3)
        await reader.close()
        await writer.close()
    finally:
        pg.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_killed_replica_clients_resume_on_the_other_with_exactly_the_acked_messages(
    own_database, spawn
):
    doomed, survivor = spawn(own_database), spawn(own_database)
    room = f"r-{uuid.uuid4().hex[:8]}"
    readers = [await Client.connect(doomed, room, make_token(f"reader-{i}")) for i in range(4)]
    writer = await Client.connect(survivor, room, make_token("writer"))
    acked: list[int] = []

    async def write(n: int) -> None:
        for i in range(n):
            await writer.send(f"m{len(acked)}", f"w-{len(acked)}-{i}")
            acked.append((await writer.recv_type("ack"))["seq"])

    await write(10)
    seen = [await messages_until(r, 5) for r in readers]
    doomed.stop(signal.SIGKILL)
    for reader in readers:
        assert await _close_code(reader) == 1006
    await write(10)
    resumed = []
    for got in seen:
        again = await Client.connect(survivor, room, make_token("reader"), since=got[-1])
        assert again.ready["recovered"] is True
        got.extend(m["seq"] for m in again.history)
        resumed.append(again)
    await write(5)
    for again, got in zip(resumed, seen, strict=True):
        if got[-1] < acked[-1]:
            got.extend(await messages_until(again, acked[-1]))
        assert got == acked == list(range(1, 26))
        await again.assert_silent(0.2)
        await again.close()
    await writer.close()


async def _until(check, what: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    """Wait for a state the test can observe (not for time to pass), with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_sigterm_closes_with_1012_and_stores_the_sends_in_flight_before_exiting(
    own_database, spawn
):
    """Sends the server has received but not yet committed when SIGTERM lands are committed
    before the process exits (the commit is held back by a row lock until the drain has
    begun); their acks cannot follow the 1012, so a resend with the same ``client_msg_id`` on
    another replica is answered with the original seq, and nothing is stored twice."""
    server = spawn(own_database, CHAT_DRAIN_SECONDS="10")
    assert server.proc is not None
    room = f"r-{uuid.uuid4().hex[:8]}"
    client = await Client.connect(server, room, make_token("alice"))
    await client.send("acked before the stop", "s-0")
    first = (await client.collect("ack", "message"))["ack"]
    locker = await asyncpg.connect(own_database)
    try:
        holding = locker.transaction()
        await holding.start()
        await locker.execute("SELECT 1 FROM room WHERE name = $1 FOR UPDATE", room)
        in_flight = [f"s-{i}" for i in range(1, 4)]
        for cmid in in_flight:
            await client.send(f"in flight {cmid}", cmid)

        async def writer_blocked() -> bool:
            waiting = await locker.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
            received = await asyncio.to_thread(server.metric, "chat_messages_received_total")
            return bool(waiting) and received == 4

        await _until(writer_blocked, "the sends to reach the server and its commit to block")
        server.proc.send_signal(signal.SIGTERM)
        assert await _close_code(client) == 1012
        assert server.proc.poll() is None  # draining: the commit it waits for is still held
        await holding.commit()
        assert await asyncio.to_thread(server.proc.wait, 15) == 0
        stored = await locker.fetch(
            "SELECT m.seq, m.client_msg_id FROM message m JOIN room r ON r.id = m.room_id "
            "WHERE r.name = $1 ORDER BY m.seq",
            room,
        )
    finally:
        await locker.close()
    assert [r["client_msg_id"] for r in stored] == ["s-0", *in_flight]
    assert stored[0]["seq"] == first["seq"]

    other = spawn(own_database)
    async with await Client.connect(other, room, make_token("alice"), history=0) as again:
        for cmid in in_flight:
            await again.send(f"in flight {cmid}", cmid)
            ack = await again.recv_type("ack")
            assert ack["client_msg_id"] == cmid
            assert ack["seq"] == next(r["seq"] for r in stored if r["client_msg_id"] == cmid)
        await again.assert_silent(0.2)  # resends are not fanned out again


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_client_that_stops_reading_is_closed_with_1013_and_memory_stays_flat(
    own_database, spawn
):
    server = spawn(own_database, CHAT_OUTBOX_LIMIT="32")
    assert server.proc is not None
    room = f"r-{uuid.uuid4().hex[:8]}"
    body = secrets.token_urlsafe(3000)  # incompressible: per-message deflate is on
    stalled = [
        await Client.connect(
            server, room, make_token(f"slow-{i}"), sock=small_buffer_socket(server.port)
        )
        for i in range(3)
    ]
    for client in stalled:
        client.ws.transport.pause_reading()  # type: ignore[attr-defined]
    reader = await Client.connect(server, room, make_token("reader"))
    writer = await Client.connect(server, room, make_token("writer"))

    async def write(count: int) -> None:
        for _ in range(count):
            await writer.send(body, uuid.uuid4().hex)
            await writer.recv_type("ack")

    async def read(count: int) -> None:
        await messages_until(reader, count)

    await asyncio.gather(write(300), read(300))
    rss_before = _rss_kb(server.proc.pid)
    await asyncio.gather(write(1200), read(1500))
    rss_after = _rss_kb(server.proc.pid)
    for client in stalled:
        client.ws.transport.resume_reading()  # type: ignore[attr-defined]
        assert await _close_code(client, timeout=30) == 1013
    # 1200 messages x 4 kB x 3 stalled clients would be ~14 MB if anything buffered them.
    assert rss_after - rss_before < 6_000, (rss_before, rss_after)
    resumed = await Client.connect(server, room, make_token("slow-0"), since=1300)
    assert resumed.ready["recovered"] is True
    assert [m["seq"] for m in resumed.history] == list(range(1301, 1501))
    await resumed.close()
    await reader.close()
    await writer.close()


async def test_a_half_open_peer_is_reaped_by_keepalive(own_database, spawn):
    server = spawn(
        own_database,
        CHAT_WS_PING_INTERVAL="0.2",
        CHAT_WS_PING_TIMEOUT="0.3",
        CHAT_MAX_CONNECTIONS_PER_USER="1",
    )
    room = f"r-{uuid.uuid4().hex[:8]}"
    token = make_token("ghost")
    ghost = await Client.connect(server, room, token)
    ghost.ws.transport.pause_reading()  # type: ignore[attr-defined]  # never answers a ping
    with pytest.raises(InvalidStatus) as refused:  # over the cap while the ghost lives
        await Client.connect(server, room, token)
    assert refused.value.response.status_code == 429
    try:
        for _attempt in range(50):
            await asyncio.sleep(0.1)
            try:
                replacement = await Client.connect(server, room, token)
            except InvalidStatus:
                continue
            try:
                await replacement.assert_silent(0.5)  # not closed: the ghost's slot was freed
            except ConnectionClosed:
                continue
            finally:
                await replacement.close()
            break
        else:
            raise AssertionError("the half-open connection was never reaped")
    finally:
        ghost.ws.transport.abort()  # type: ignore[attr-defined]  # it never reads its close


async def test_floods_are_rate_limited_with_a_retry_hint(own_database, spawn):
    server = spawn(own_database, CHAT_SEND_RATE="2", CHAT_USER_SEND_RATE="100")
    room = f"r-{uuid.uuid4().hex[:8]}"
    client = await Client.connect(server, room, make_token("flooder"))
    for i in range(10):
        await client.send(f"flood {i}", f"f-{i}")
    replies = []
    while len(replies) < 10:
        frame = await client.recv()
        if frame["type"] in ("ack", "error"):
            replies.append(frame)
    limited = [f for f in replies if f["type"] == "error"]
    assert 4 <= len(limited) <= 7, replies  # a burst of 4 (twice the rate) goes through
    assert {f["code"] for f in limited} == {"rate_limited"}
    assert all(0 < f["retry_after"] <= 1 for f in limited)
    await asyncio.sleep(max(f["retry_after"] for f in limited))
    await client.send("after waiting", "f-late")
    assert (await client.recv_type("ack"))["client_msg_id"] == "f-late"
    await client.close()

    rest = spawn(own_database, CHAT_USER_SEND_RATE="1")
    headers = {"Authorization": f"Bearer {make_token('poster')}"}
    codes = []
    async with httpx.AsyncClient(headers=headers) as http:
        for i in range(5):
            r = await http.post(f"{rest.http}/rooms/{room}/messages", json={"body": f"{i}"})
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["code"] == "rate_limited"
    assert codes.count(201) == 2 and codes.count(429) == 3


async def test_session_cookie_is_refused_from_a_foreign_origin(own_database, spawn):
    server = spawn(own_database, CHAT_ALLOWED_ORIGINS="https://app.example.com")
    token = make_token("alice")
    url = f"{server.ws}/ws/rooms/lobby"
    cookie = {"Cookie": f"session={token}"}
    with pytest.raises(Exception) as refused:
        await connect(url, additional_headers=cookie, origin="https://evil.example")
    assert getattr(refused.value, "response", None) is not None
    assert refused.value.response.status_code == 403  # type: ignore[attr-defined]
    for origin in ("https://app.example.com", f"http://127.0.0.1:{server.port}"):
        async with connect(url, additional_headers=cookie, origin=origin) as ws:  # type: ignore[arg-type]
            assert '"ready"' in await asyncio.wait_for(ws.recv(), 5)
    bearer = {"Authorization": f"Bearer {token}"}
    async with connect(url, additional_headers=bearer, origin="https://evil.example") as ws:  # type: ignore[arg-type]
        assert '"ready"' in await asyncio.wait_for(ws.recv(), 5)


async def test_a_dead_room_stream_closes_its_connections_with_1011_not_as_slow_consumers(
    own_database, spawn
):
    """A payload the hub cannot decode stands in for a bug in the room's stream: its
    connections are told the stream was lost (not that they fell behind), and the room's next
    connect starts a stream that works."""
    server = spawn(own_database)
    room = f"r-{uuid.uuid4().hex[:8]}"
    clients = [await Client.connect(server, room, make_token(f"u{i}")) for i in range(2)]
    conn = await asyncpg.connect(own_database)
    try:
        await conn.execute("SELECT pg_notify($1, 'not a notification')", channel_for(room))
    finally:
        await conn.close()
    for client in clients:
        closed = await close_of(client)
        assert closed == (1011, "room stream lost; reconnect with since")
    assert server.metric("chat_room_stream_lost_disconnects_total") == 2
    assert server.metric("chat_slow_consumer_disconnects_total") == 0
    assert f"room stream room-{room} failed" in server.log_path.read_text()
    again = await Client.connect(server, room, make_token("u0"), since=0)
    await again.send("after", "c-after")
    assert (await again.recv_type("message"))["body"] == "after"
    await again.close()


async def test_invalid_utf8_text_frame_closes_with_1007(server, room, alice):
    from websockets.frames import Frame, Opcode

    client = await Client.connect(server, room, alice)
    raw = Frame(Opcode.TEXT, b"\xff\xfe not utf-8").serialize(mask=True, extensions=[])
    client.ws.transport.write(raw)  # bypasses the client library's own UTF-8 encoding
    assert await _close_code(client) == 1007


async def test_internal_errors_leak_nothing_and_are_logged_with_the_request_id(own_database, spawn):
    server = spawn(own_database)
    room = f"r-{uuid.uuid4().hex[:8]}"
    client = await Client.connect(server, room, make_token("alice"))
    conn = await asyncpg.connect(own_database)
    try:
        await conn.execute("ALTER TABLE message RENAME TO message_gone")  # a bug, in effect
        r = httpx.post(
            f"{server.http}/rooms/{room}/messages",
            json={"body": "x"},
            headers={"Authorization": f"Bearer {make_token('alice')}", "X-Request-ID": "req-42"},
        )
        assert r.status_code == 500
        assert r.json() == {"detail": "internal error", "code": "internal", "request_id": "req-42"}
        assert r.headers["x-request-id"] == "req-42"
        await client.send("boom")
        assert await _close_code(client) == 1011
    finally:
        await conn.execute("ALTER TABLE message_gone RENAME TO message")
        await conn.close()
    log = server.log_path.read_text()
    assert '"request_id": "req-42"' in log and "UndefinedTable" in log  # in the log only
    assert "boom" not in log  # nor message bodies, even in SQL error parameters
