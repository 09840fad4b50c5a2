"""Fan-out guarantees, across two server processes sharing one database:

every connection of a room receives every message committed while it is connected, exactly
once, in seq order; seqs are 1, 2, 3... per room in commit order; resends are no-ops; messages
larger than a NOTIFY payload still arrive whole.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest

from tests.support import Client, make_token

pytestmark = pytest.mark.slow


async def _messages_until(client: Client, last_seq: int, timeout: float = 20) -> list[dict]:
    """Every message frame until seq ``last_seq`` arrives."""
    got: list[dict] = []
    while not got or got[-1]["seq"] < last_seq:
        frame = await client.recv(timeout)
        if frame["type"] == "message":
            got.append(frame)
    return got


async def _stored_seqs(database_url: str, room: str) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT m.seq FROM message m JOIN room r ON r.id = m.room_id "
            "WHERE r.name = $1 ORDER BY m.seq",
            room,
        )
    finally:
        await conn.close()
    return [r["seq"] for r in rows]


async def test_every_connection_on_both_processes_gets_every_message_in_order(
    server, second_server, database_url, room
):
    per_sender = 40
    listeners = [
        await Client.connect(proc, room, make_token(f"listener-{i}"))
        for i, proc in enumerate([server, second_server] * 3)
    ]
    senders = [
        await Client.connect(proc, room, make_token(f"sender-{i}"))
        for i, proc in enumerate([server, second_server])
    ]

    async def blast(client: Client, name: str) -> list[dict]:
        for i in range(per_sender):
            await client.send(f"{name} #{i}", f"{name}-{i}")
        acks = []
        while len(acks) < per_sender:
            frame = await client.recv()
            if frame["type"] == "ack":
                acks.append(frame)
        return acks

    acks = await asyncio.gather(*(blast(c, f"s{i}") for i, c in enumerate(senders)))
    total = per_sender * len(senders)
    acked = sorted(a["seq"] for batch in acks for a in batch)
    assert acked == list(range(1, total + 1))

    for client in listeners:
        got = await _messages_until(client, total)
        assert [m["seq"] for m in got] == list(range(1, total + 1))
        # Each sender's messages arrive in the order it sent them.
        for i in range(len(senders)):
            mine = [m["body"] for m in got if m["author"] == f"sender-{i}"]
            assert mine == [f"s{i} #{n}" for n in range(per_sender)]
        await client.assert_silent(0.2)
    assert await _stored_seqs(database_url, room) == list(range(1, total + 1))
    for client in listeners + senders:
        await client.close()


async def test_messages_sent_during_connect_are_neither_lost_nor_duplicated(
    server, second_server, room
):
    """Clients join while another process writes: replay and live stream must meet exactly."""
    total = 150
    writer = await Client.connect(server, room, make_token("writer"))
    joined: list[tuple[Client, int]] = []

    async def write() -> None:
        for i in range(total):
            await writer.send(f"m{i}", f"w-{i}")
            if i % 10 == 0:
                await asyncio.sleep(0.005)

    async def join() -> None:
        for i in range(12):
            proc = second_server if i % 2 else server
            history = [0, 3, 50][i % 3]
            client = await Client.connect(proc, room, make_token(f"j{i}"), history=history)
            joined.append((client, history))
            await asyncio.sleep(0.01)

    await asyncio.gather(write(), join())
    for client, history in joined:
        last = client.ready["last_seq"]
        replayed = [m["seq"] for m in client.history]
        assert replayed == list(range(max(1, last - history + 1), last + 1))
        live = [m["seq"] for m in await _messages_until(client, total)] if last < total else []
        assert live == list(range(last + 1, total + 1)), (history, last)
        await client.assert_silent(0.1)
        await client.close()
    await writer.close()


async def test_resend_with_same_client_msg_id_is_a_no_op(server, second_server, database_url, room):
    alice, bob = make_token("alice"), make_token("bob")
    async with (
        await Client.connect(server, room, alice) as sender,
        await Client.connect(second_server, room, bob) as listener,
    ):
        await sender.send("once", "dup-1")
        first = (await sender.collect("ack", "message"))["ack"]
        await sender.send("once, again", "dup-1")
        again = await sender.recv()
        assert again == first
        assert (await listener.recv_type("message"))["seq"] == first["seq"]
        await listener.assert_silent(0.3)
        await sender.assert_silent(0.1)

        # The same id from another author, or in another room, is a different message.
        await listener.send("bob's", "dup-1")
        bobs = (await listener.collect("ack", "message"))["ack"]
        assert bobs["seq"] == first["seq"] + 1
    assert await _stored_seqs(database_url, room) == [1, 2]


async def test_concurrent_resends_store_one_message(server, second_server, database_url, room):
    headers = {"Authorization": f"Bearer {make_token('alice')}"}
    body = {"body": "exactly once", "client_msg_id": f"c-{uuid.uuid4()}"}
    async with httpx.AsyncClient(headers=headers) as http:
        replies = await asyncio.gather(
            *(
                http.post(f"{proc.http}/rooms/{room}/messages", json=body)
                for proc in [server, second_server] * 6
            )
        )
    assert {r.status_code for r in replies} == {201}
    assert len({r.json()["id"] for r in replies}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in replies) == 11
    assert await _stored_seqs(database_url, room) == [1]


async def test_seq_is_gap_free_under_concurrent_writers(server, second_server, database_url, room):
    headers = {"Authorization": f"Bearer {make_token('alice')}"}
    async with httpx.AsyncClient(headers=headers) as http:

        async def post(i: int) -> int:
            proc = server if i % 2 else second_server
            r = await http.post(f"{proc.http}/rooms/{room}/messages", json={"body": f"n{i}"})
            assert r.status_code == 201
            return int(r.json()["seq"])

        seqs = await asyncio.gather(*(post(i) for i in range(60)))
    assert sorted(seqs) == list(range(1, 61))
    assert await _stored_seqs(database_url, room) == list(range(1, 61))


async def test_message_over_the_notify_payload_limit_arrives_whole_everywhere(
    server, second_server, room
):
    body = "\U0001f600" * 4000  # 16,000 bytes of UTF-8: twice PostgreSQL's NOTIFY limit
    async with (
        await Client.connect(server, room, make_token("alice")) as sender,
        await Client.connect(second_server, room, make_token("bob")) as far,
        await Client.connect(server, room, make_token("carol")) as near,
    ):
        await sender.send(body, "big")
        frames = await sender.collect("ack", "message")
        assert frames["message"]["body"] == body
        for client in (far, near):
            message = await client.recv_type("message")
            assert message["body"] == body and message["seq"] == frames["ack"]["seq"]
        await sender.send("small after big", "small")
        for client in (far, near):
            assert (await client.recv_type("message"))["body"] == "small after big"
    async with await Client.connect(second_server, room, make_token("dave"), since=0) as late:
        assert [m["body"] for m in late.history] == [body, "small after big"]


async def test_compressed_and_plain_connections_get_the_same_frames(server, room, alice, bob):
    """A message is framed once per process for every connection without compression, and per
    connection for those that negotiated permessage-deflate: both read the same frames."""
    plain = [await Client.connect(server, room, bob, compression=None) for _ in range(2)]
    deflated = await Client.connect(server, room, bob)
    assert plain[0].ws.protocol.extensions == []
    assert deflated.ws.protocol.extensions  # negotiated
    bodies = ["short", "é" * 200, "é" * 4000]  # 7- and 16-bit lengths; too big for a NOTIFY
    async with await Client.connect(server, room, alice) as sender:
        for i, body in enumerate(bodies):
            await sender.send(body, f"c-{i}")
        for client in (*plain, deflated):
            got = await _messages_until(client, 3)
            assert [m["body"] for m in got] == bodies
            await client.close()
