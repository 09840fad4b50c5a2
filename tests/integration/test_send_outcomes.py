"""An ack's outcome is never misreported, and the writer's queue is bounded (issue 12).

A small TCP proxy sits between a real server and PostgreSQL. It reads the client's side of the
PostgreSQL protocol and, once it has forwarded the Bind that carries a chosen message and the
Sync after it (the batch's commit), it freezes that connection (nothing more is forwarded
either way, nothing is closed: a silent partition) or cuts it (the server's side is closed, as
a dropped connection). PostgreSQL commits; the server never hears so. Its client must be told
``outcome_unknown`` with an id, and a resend with that id must get the original seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from tests.support import Client, ServerProcess, make_token

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


class _Link:
    """One proxied connection."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.frozen = False
        self.marked = False


class PgProxy:
    """Forwards TCP connections to PostgreSQL; see the module docstring."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        self._database_url = database_url
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._listener: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self._marker: bytes | None = None
        self._mode = "freeze"
        self.committed = asyncio.Event()
        """Set once the marked batch's Sync has been forwarded to PostgreSQL."""

    @property
    def url(self) -> str:
        parts = urlsplit(self._database_url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> None:
        self._listener = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._listener.sockets[0].getsockname()[1]

    def after_commit(self, marker: bytes, mode: str) -> None:
        """Freeze (``"freeze"``) or cut (``"cut"``) the connection that commits ``marker``."""
        self._marker, self._mode = marker, mode
        self.committed.clear()

    async def refuse(self) -> None:
        """Stop listening (connects are refused) and close every connection."""
        assert self._listener is not None
        self._listener.close()
        for link in self._links:
            link.client.transport.abort()
            link.server.transport.abort()
        self._links.clear()
        await self._listener.wait_closed()
        self._listener = None

    async def close(self) -> None:
        if self._listener is not None:
            await self.refuse()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.append(link)
        for pump in (self._upstream(reader, link), self._downstream(up_reader, link)):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _upstream(self, reader: asyncio.StreamReader, link: _Link) -> None:
        """Client -> PostgreSQL, message by message: startup messages have no type byte."""
        startup = True
        buf = b""
        while not link.frozen:
            data = await reader.read(65536)
            if not data:
                link.server.transport.abort()
                return
            buf += data
            while not link.frozen:
                head = 4 if startup else 5
                if len(buf) < head:
                    break
                size = int.from_bytes(buf[head - 4 : head], "big") + head - 4
                if len(buf) < size:
                    break
                message, buf = buf[:size], buf[size:]
                link.server.write(message)
                if startup:
                    startup = int.from_bytes(message[4:8], "big") in (_SSL_REQUEST, _GSSENC_REQUEST)
                elif message[:1] == b"B" and self._marker is not None and self._marker in message:
                    link.marked = True
                elif message[:1] == b"S" and link.marked:
                    # The commit is on its way; from now on the client hears nothing.
                    link.frozen = True
                    self._marker = None
                    self.committed.set()
                    if self._mode == "cut":
                        link.client.transport.abort()
        await asyncio.Event().wait()  # frozen: read nothing more, close nothing

    async def _downstream(self, reader: asyncio.StreamReader, link: _Link) -> None:
        """PostgreSQL -> client, until the link freezes."""
        while True:
            data = await reader.read(65536)
            if link.frozen:
                await asyncio.Event().wait()
            if not data:
                link.client.transport.abort()
                return
            link.client.write(data)


@pytest.fixture
async def proxy(own_database: str) -> AsyncIterator[PgProxy]:
    made = PgProxy(own_database)
    await made.start()
    yield made
    await made.close()


@contextlib.asynccontextmanager
async def running(database_url: str, log_path: Path, **env: str) -> AsyncIterator[ServerProcess]:
    """A server started and stopped off the event loop, which carries the proxy."""
    server = ServerProcess(database_url, log_path=log_path, env=env)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def _rows(database_url: str, room: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT m.seq, m.body, m.client_msg_id FROM message m JOIN room r ON r.id = m.room_id"
            " WHERE r.name = $1 ORDER BY m.seq",
            room,
        )
    finally:
        await conn.close()


async def _until_error(client: Client, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """The next error frame (within the client's read timeout); other frames go to ``seen``."""
    while True:
        frame = await client.recv()
        if frame["type"] == "error":
            return frame
        seen.append(frame)


async def test_a_commit_that_is_never_confirmed_is_outcome_unknown_and_a_resend_is_not_stored_twice(
    proxy: PgProxy, own_database: str, tmp_path: Path
) -> None:
    room = f"o-{uuid.uuid4().hex[:12]}"
    async with running(proxy.url, tmp_path / "server.log", CHAT_SEND_DEADLINE="1") as server:
        client = await Client.connect(server, room, make_token("alice"))
        seen: list[dict[str, Any]] = []
        await client.send("warm-up", "w-1")  # the writer's connection is open and prepared
        seen.extend((await client.collect("ack", "message")).values())

        body = f"doomed-{uuid.uuid4().hex}"
        proxy.after_commit(body.encode(), "freeze")
        sent_at = asyncio.get_running_loop().time()
        await client.send(body)  # no client_msg_id: the server assigns one
        error = await _until_error(client, seen)
        # Answered at the send deadline (1 s), not when the kernel gives up on the connection
        # (minutes); the margin is for a loaded machine.
        assert asyncio.get_running_loop().time() - sent_at < 1 + 4
        assert proxy.committed.is_set()
        assert error["code"] == "outcome_unknown", error
        assigned = error["client_msg_id"]
        assert assigned.startswith("~"), error

        await client.send(body, assigned)  # the retry the error asks for
        while (frame := await client.recv())["type"] != "ack":
            seen.append(frame)
        assert frame["seq"] == 2 and frame["client_msg_id"] == assigned

        await client.send("after", "w-2")  # the writer works again, seqs without a hole
        while (frame := await client.recv())["type"] != "ack":
            seen.append(frame)
        assert frame["seq"] == 3
        while len([f for f in seen if f["type"] == "message"]) < 3:
            seen.append(await client.recv())
        await client.assert_silent(0.3)
        await client.close()

    rows = await _rows(own_database, room)
    assert [(r["seq"], r["body"], r["client_msg_id"]) for r in rows] == [
        (1, "warm-up", "w-1"),
        (2, body, assigned),  # stored once, by the batch whose commit went unconfirmed
        (3, "after", "w-2"),
    ]
    messages = [(f["seq"], f["client_msg_id"]) for f in seen if f["type"] == "message"]
    assert messages == [(1, "w-1"), (2, assigned), (3, "w-2")]  # fanned out once each


async def test_rest_a_dropped_connection_after_the_commit_is_a_503_outcome_unknown_with_an_id(
    proxy: PgProxy, own_database: str, tmp_path: Path
) -> None:
    room = f"o-{uuid.uuid4().hex[:12]}"
    headers = {"Authorization": f"Bearer {make_token('bob')}"}
    async with (
        running(proxy.url, tmp_path / "server.log") as server,
        httpx.AsyncClient(base_url=server.http, headers=headers, timeout=15) as http,
    ):
        url = f"/rooms/{room}/messages"
        assert (await http.post(url, json={"body": "warm-up"})).status_code == 201
        body = f"cut-{uuid.uuid4().hex}"
        proxy.after_commit(body.encode(), "cut")
        r = await http.post(url, json={"body": body})
        assert proxy.committed.is_set()
        assert r.status_code == 503, r.text
        answer = r.json()
        assert answer["code"] == "outcome_unknown" and answer["detail"]
        assigned = answer["client_msg_id"]

        again = await http.post(url, json={"body": body, "client_msg_id": assigned})
        assert again.status_code == 201, again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert (again.json()["seq"], again.json()["client_msg_id"]) == (2, assigned)

        invented = await http.post(url, json={"body": "x", "client_msg_id": "~mine"})
        assert invented.status_code == 422  # the server's id namespace is not the client's
        errors = (await http.get("/metrics")).text
        assert 'chat_errors_total{code="outcome_unknown"} 1.0' in errors
    rows = await _rows(own_database, room)
    assert [(r["seq"], r["body"]) for r in rows] == [(1, "warm-up"), (2, body)]


async def test_a_refused_connection_is_unavailable_and_stores_nothing(
    proxy: PgProxy, own_database: str, tmp_path: Path
) -> None:
    room = f"o-{uuid.uuid4().hex[:12]}"
    async with running(proxy.url, tmp_path / "server.log", CHAT_SEND_DEADLINE="2") as server:
        client = await Client.connect(server, room, make_token("carol"))
        await client.send("warm-up", "w-1")
        await client.recv_type("ack")
        await proxy.refuse()

        seen: list[dict[str, Any]] = []
        # Whether the writer noticed its connection die before this send is a race: if not,
        # the batch went out on a dead connection and nobody can say it was not stored.
        await client.send("first while refused", "r-1")
        first = await _until_error(client, seen)
        assert (
            first["code"] in ("unavailable", "outcome_unknown") and first["client_msg_id"] == "r-1"
        )
        await client.send("second while refused")  # now there is no connection: refused
        second = await _until_error(client, seen)
        assert second["code"] == "unavailable", second
        assert second["client_msg_id"].startswith("~")
        async with httpx.AsyncClient(base_url=server.http, timeout=15) as http:
            r = await http.post(
                f"/rooms/{room}/messages",
                json={"body": "third while refused", "client_msg_id": "r-3"},
                headers={"Authorization": f"Bearer {make_token('carol')}"},
            )
        assert r.status_code == 503
        assert r.json() == {
            "detail": "the database is unavailable, try again",
            "code": "unavailable",
            "client_msg_id": "r-3",
        }
        await client.close()
    assert [r["body"] for r in await _rows(own_database, room)] == ["warm-up"]


async def _burst(client: Client, prefix: str, count: int) -> list[tuple[float, dict[str, Any]]]:
    """Send ``count`` messages without waiting, then read an answer to each (in order)."""
    loop = asyncio.get_running_loop()
    sent_at = []
    for i in range(count):
        await client.send(f"{prefix} {i}", f"{prefix}-{i}")
        sent_at.append(loop.time())
    answers = []
    while len(answers) < count:
        frame = await client.recv(timeout=20)
        if frame["type"] in ("ack", "error"):
            answers.append((loop.time() - sent_at[len(answers)], frame))
    return answers


async def _metric(http: httpx.AsyncClient, name: str) -> float:
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def _writer_waits_on_a_lock(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(200):
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
                " AND wait_event_type = 'Lock'",
                "chat-service-writer",
            )
            if waiting:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the writer never waited on the room's lock")
    finally:
        await conn.close()


async def test_past_the_queue_limit_sends_are_overloaded_and_nothing_acked_is_lost(
    own_database: str, tmp_path: Path
) -> None:
    room = f"o-{uuid.uuid4().hex[:12]}"
    deadline = 10.0
    async with (
        running(
            own_database,
            tmp_path / "server.log",
            CHAT_WRITER_QUEUE_LIMIT="20",
            CHAT_SEND_DEADLINE=str(deadline),
        ) as server,
        httpx.AsyncClient(base_url=server.http, timeout=15) as http,
    ):
        first = await Client.connect(server, room, make_token("first"))
        await first.send("first", "first")
        await first.recv_type("ack")
        clients = [await Client.connect(server, room, make_token(f"u{i}")) for i in range(4)]

        # Hold the room's row: one batch waits on it and the queue behind it fills, and stays
        # full, until the row is let go. More is offered than the database can commit.
        blocker = await asyncpg.connect(own_database)
        held = blocker.transaction()
        await held.start()
        await blocker.execute("SELECT 1 FROM room WHERE name = $1 FOR UPDATE", room)
        await first.send("blocked", "blocked")
        await _writer_waits_on_a_lock(own_database)
        bursts = [asyncio.create_task(_burst(c, f"c{i}", 30)) for i, c in enumerate(clients)]
        for _ in range(200):  # until the server has read every send (answers wait their turn)
            if await _metric(http, "chat_messages_received_total") >= 122:
                break
            await asyncio.sleep(0.05)
        overloaded_post = await http.post(
            f"/rooms/{room}/messages",
            json={"body": "rest while full", "client_msg_id": "rest-1"},
            headers={"Authorization": f"Bearer {make_token('rest')}"},
        )
        await held.rollback()
        await blocker.close()
        blocked_ack = await first.recv_type("ack")
        locked = [a for burst in await asyncio.gather(*bursts) for a in burst]

        # And a burst without a lock: more than a batch at once, from four connections.
        bursts = [_burst(c, f"d{i}", 60) for i, c in enumerate(clients)]
        free = [a for burst in await asyncio.gather(*bursts) for a in burst]
        overloaded_metric = await _metric(http, 'chat_errors_total{code="overloaded"}')
        for client in (first, *clients):
            await client.close()

    assert overloaded_post.status_code == 503
    assert overloaded_post.json()["code"] == "overloaded"
    assert int(overloaded_post.headers["retry-after"]) >= 1

    assert blocked_ack["seq"] == 2
    locked_acks = [f for _, f in locked if f["type"] == "ack"]
    assert len(locked_acks) == 20  # what the queue held; the other 100 were refused at once
    answers = locked + free
    acked = [blocked_ack] + [f for _, f in answers if f["type"] == "ack"]
    refused = [f for _, f in answers if f["type"] == "error"]
    assert len(acked) + len(refused) == 1 + 4 * 90  # every send answered
    assert {f["code"] for f in refused} == {"overloaded"}, refused[:3]
    assert all(0 < f["retry_after"] <= deadline for f in refused)
    assert overloaded_metric == len(refused) + 1  # and the REST one
    assert max(latency for latency, f in answers if f["type"] == "ack") < deadline

    rows = await _rows(own_database, room)
    stored = {r["client_msg_id"]: r["seq"] for r in rows}
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))  # no hole, no duplicate
    assert len(rows) == 1 + len(acked)
    assert all(stored[f["client_msg_id"]] == f["seq"] for f in acked)
    assert not {f["client_msg_id"] for f in refused} & set(stored)  # refused: not stored
    assert "rest-1" not in stored
