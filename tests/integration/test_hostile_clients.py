"""Hostile clients cannot take the service down (issue 11): connect floods, replay floods,
ping floods and invalid UTF-8 floods cost their sender, not the server or the other clients;
a database outage closes new websockets with 1013 instead of leaving them hanging."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode

from tests.support import Client, ServerProcess, database_url_for, make_token


def _room() -> str:
    return f"h-{uuid.uuid4().hex[:12]}"


async def _refusal(
    server: ServerProcess, room: str, token: str, **params: object
) -> httpx.Response:
    """The HTTP response of a handshake the server refuses."""
    with pytest.raises(InvalidStatus) as refused:
        client = await Client.connect(server, room, token, **params)
        await client.close()
    response = refused.value.response
    return httpx.Response(
        response.status_code,
        headers=list(response.headers.raw_items()),
        content=bytes(response.body),
    )


async def _close_of(server: ServerProcess, room: str, token: str) -> tuple[int, str]:
    """Code and reason of a connection the server accepts and closes before ``ready``."""
    try:
        client = await Client.connect(server, room, token, history=0)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame"
        return closed.rcvd.code, closed.rcvd.reason
    await client.close()
    raise AssertionError("the connection was not closed")


def _log_problems(server: ServerProcess, *, tracebacks: bool = True) -> list[str]:
    """ERROR lines, and (unless told otherwise) lines with a traceback at any level."""
    lines = server.log_path.read_text().splitlines()
    return [
        line
        for line in lines
        if '"level": "error"' in line
        or '"level": "critical"' in line
        or (tracebacks and "Traceback" in line)
    ]


async def test_connects_over_the_rate_are_refused_with_429_and_retry_after(own_database, spawn):
    server = spawn(own_database, CHAT_WS_CONNECT_RATE="0.5", CHAT_WS_CONNECT_BURST="3")
    room, token = _room(), make_token("eager")
    clients = [await Client.connect(server, room, token, history=0) for _ in range(3)]
    refused = await _refusal(server, room, token)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    assert refused.json()["code"] == "rate_limited"
    assert refused.headers["x-request-id"]
    other = await Client.connect(server, room, make_token("someone-else"), history=0)
    for client in clients:  # an open connection is not what is counted: connects are
        await client.close()
    assert (await _refusal(server, room, token)).status_code == 429
    await asyncio.sleep(int(refused.headers["retry-after"]))
    again = await Client.connect(server, room, token, history=0)
    for client in (other, again):
        await client.close()
    assert _log_problems(server) == []


async def test_connections_per_user_are_capped_before_accept(own_database, spawn):
    server = spawn(own_database, CHAT_MAX_CONNECTIONS_PER_USER="2")
    room, token = _room(), make_token("greedy")
    first, second = [await Client.connect(server, room, token, history=0) for _ in range(2)]
    refused = await _refusal(server, room, token)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["code"] == "too_many_connections"
    await first.close()
    for _attempt in range(50):  # the server sees the close shortly after the client
        with contextlib.suppress(InvalidStatus):
            third = await Client.connect(server, room, token, history=0)
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("a closed connection still counts")
    await third.assert_silent(0.2)
    for client in (second, third):
        await client.close()


async def _post(server: ServerProcess, room: str, bodies: list[str]) -> None:
    headers = {"Authorization": f"Bearer {make_token('poster')}"}
    async with httpx.AsyncClient(base_url=server.http, headers=headers, timeout=10) as http:
        for body in bodies:
            r = await http.post(f"/rooms/{room}/messages", json={"body": body})
            assert r.status_code == 201, r.text


async def test_replay_budget_refuses_fresh_connects_but_never_truncates_a_resume(
    own_database, spawn
):
    """A budget of 20 kB and no refill to speak of: one resume of 40 kB is let in whole and
    puts the user in debt; the next connect is refused until the debt is paid off."""
    server = spawn(own_database, CHAT_WS_REPLAY_BUDGET="20000", CHAT_WS_REPLAY_INTERVAL="3600")
    room, token = _room(), make_token("reader")
    first = await Client.connect(server, room, token, history=0)
    since = first.ready["last_seq"]
    await first.close()
    await _post(server, room, [f"{i:03d} " + "x" * 996 for i in range(40)])

    resumed = await Client.connect(server, room, token, since=since)
    assert resumed.ready["recovered"] is True
    assert [m["seq"] for m in resumed.history] == list(range(since + 1, since + 41))
    await resumed.close()

    for params in ({"history": 0}, {"since": since + 40}, {}):
        refused = await _refusal(server, room, token, **params)
        assert refused.status_code == 429, params
        assert refused.json()["code"] == "rate_limited"
        assert "replayed" in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) > 60  # 20 kB of debt at 5.6 bytes/s
    other = await Client.connect(server, room, make_token("someone-else"), history=50)
    assert len(other.history) == 40  # another user's budget is its own
    await other.close()


async def test_pings_over_the_rate_are_dropped_without_a_pong(own_database, spawn):
    server = spawn(own_database, CHAT_WS_PING_RATE="1")  # bursts of 5
    client = await Client.connect(server, _room(), make_token("pinger"), history=0)
    for _ in range(200):
        await client.send_json({"type": "ping"})
    await client.send("still heard", "after-flood")
    frames = []
    while not frames or frames[-1]["type"] != "ack":
        frames.append(await client.recv())
    pongs = [f for f in frames if f["type"] == "pong"]
    assert 5 <= len(pongs) <= 6, frames  # the burst, and at most one refilled meanwhile
    assert frames[-1]["client_msg_id"] == "after-flood"
    await asyncio.sleep(1.1)
    await client.send_json({"type": "ping"})
    assert (await client.recv_type("pong", timeout=5))["type"] == "pong"
    await client.close()


async def test_invalid_utf8_floods_are_closed_with_1007_and_logged_quietly(own_database, spawn):
    server = spawn(own_database)
    room = _room()
    raw = Frame(Opcode.TEXT, b"\xff\xfe not utf-8").serialize(mask=True, extensions=[])

    async def flood(user: int) -> int:
        client = await Client.connect(server, room, make_token(f"bad-{user}"), history=0)
        client.ws.transport.write(raw * 200)  # past the client library's own UTF-8 encoding
        try:
            while True:
                await client.recv()
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code

    # The room is busy meanwhile: the server has frames to send to sockets whose protocol has
    # just failed them (on uvicorn's legacy websockets protocol such a send raises websockets'
    # own ConnectionClosed, which is a peer gone, not a failure to log).
    talker = await Client.connect(server, room, make_token("talker"), history=0)
    stop = asyncio.Event()

    async def talk() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await talker.send(f"busy {n}", f"busy-{n}")
            await talker.recv_type("ack")

    talking = asyncio.create_task(talk())
    try:
        for _round in range(3):
            assert await asyncio.gather(*(flood(i) for i in range(20))) == [1007] * 20
    finally:
        stop.set()
        await talking
        await talker.close()
    lines = server.log_path.read_text().splitlines()
    assert _log_problems(server) == []
    noted = [json.loads(line) for line in lines if "invalid UTF-8" in line]
    assert {entry["level"] for entry in noted} <= {"info"}
    if not any('"public ASGI path' in line for line in lines):
        assert noted  # uvicorn's legacy websockets protocol (uvicorn < 0.35) logs none at all
    assert len(noted) <= 30  # 60 connections, a budget of 20 lines plus 5 a second
    healthy = await Client.connect(server, room, make_token("fine"), history=0)
    await healthy.send("ok", "ok-1")
    assert (await healthy.recv_type("ack"))["client_msg_id"] == "ok-1"
    await healthy.close()


@contextlib.asynccontextmanager
async def _database_out(pg_server_url: str, database_url: str) -> AsyncIterator[None]:
    """Every session of the database terminated, and no new one let in, until the exit."""
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(database_url_for(pg_server_url, "postgres"))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()


async def test_database_outage_closes_new_websockets_with_1013_in_time(
    own_database, pg_server_url, spawn
):
    server = spawn(own_database, CHAT_WS_CONNECT_TIMEOUT="2")
    live_room, new_room = _room(), _room()
    watcher = await Client.connect(server, live_room, make_token("watcher"), history=0)
    async with _database_out(pg_server_url, own_database):
        for room in (new_room, live_room):  # no stream yet / a stream that lost its LISTEN
            started = time.monotonic()
            code, reason = await _close_of(server, room, make_token("newcomer"))
            took = time.monotonic() - started
            assert code == 1013 and "database" in reason, (room, code, reason)
            assert took < 2 + 3, f"closed after {took:.1f}s"
    for _attempt in range(100):  # back to normal once the database is
        try:
            client = await Client.connect(server, new_room, make_token("newcomer"), history=0)
            break
        except ConnectionClosed:
            await asyncio.sleep(0.2)
    else:
        raise AssertionError("no connect succeeded after the outage")
    await client.send("after the outage", "after-1")
    assert (await client.recv_type("ack", timeout=20))["client_msg_id"] == "after-1"
    await client.close()
    await watcher.close()
    assert _log_problems(server, tracebacks=False) == []  # asyncpg's pool warns with one


@pytest.mark.parametrize("name", [".", "..", "...", "%2E", "%2e%2E"])
async def test_rooms_made_only_of_dots_are_refused(server, alice, name):
    url = f"{server.ws}/ws/rooms/{name}?token={alice}"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, open_timeout=10):
            pass
    assert refused.value.response.status_code == 403
    headers = {"Authorization": f"Bearer {alice}"}
    async with httpx.AsyncClient(base_url=server.http, headers=headers, timeout=10) as http:
        for method, path in (("GET", "messages"), ("POST", "messages")):
            # httpx removes "." and ".." segments, as RFC 3986 says; the percent-encoded
            # spellings and "..." reach the server
            r = await http.request(method, f"/rooms/{name}/{path}", json={"body": "x"})
            if name in (".", ".."):
                assert r.status_code in (404, 405), (name, r.status_code)
            else:
                assert r.status_code == 422, (name, method, r.status_code, r.text)


async def test_malformed_http_requests_are_logged_at_info_within_a_budget(database_url, spawn):
    """uvicorn says "Invalid HTTP request received." at WARNING for each one: a client can
    make as many as it likes, so they are INFO lines, at most a burst plus a few a second."""
    server = spawn(database_url)

    async def garbage() -> bytes:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", server.port), 5
        )
        try:
            writer.write(b"NOT HTTP AT ALL\x00\r\n\r\n")
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    answers = await asyncio.gather(*(garbage() for _ in range(150)))
    assert all(answer.startswith(b"HTTP/1.1 400") for answer in answers)
    async with httpx.AsyncClient(base_url=server.http, timeout=5) as http:
        assert (await http.get("/healthz")).status_code == 200
    entries = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    noted = [e for e in entries if e["msg"].startswith("Invalid HTTP request")]
    assert noted and {e["level"] for e in noted} == {"info"}
    assert len(noted) <= 30  # a burst of 20, then 5 a second
    assert _log_problems(server) == []
