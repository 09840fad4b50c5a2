"""The websocket protocol (docs/protocol.md): acks, fan-out frames, errors, limits."""

from __future__ import annotations

import json

import asyncpg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support import Client


async def test_send_is_acked_after_storing_and_fanned_out(server, database_url, room, alice, bob):
    async with (
        await Client.connect(server, room, alice) as sender,
        await Client.connect(server, room, bob) as listener,
    ):
        assert sender.ready == {
            "type": "ready",
            "room": room,
            "last_seq": 0,
            "recovered": False,
            "presence": {"count": 1, "users": [{"user": "alice", "name": None}]},
        }
        await sender.send("hello", "m-1")
        frames = await sender.collect("ack", "message")
        ack = frames["ack"]
        assert ack["client_msg_id"] == "m-1" and ack["seq"] == 1
        assert set(ack) == {"type", "client_msg_id", "seq", "id", "created_at"}

        # The ack is sent only after commit: the row is visible to any other connection now.
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow(
                "SELECT m.id, m.author, m.body FROM message m JOIN room r ON r.id = m.room_id "
                "WHERE r.name = $1 AND m.seq = 1",
                room,
            )
        finally:
            await conn.close()
        assert row is not None and row["id"] == ack["id"]
        assert (row["author"], row["body"]) == ("alice", "hello")

        for message in (frames["message"], await listener.recv_type("message")):
            assert message == {
                "type": "message",
                "room": room,
                "seq": 1,
                "id": ack["id"],
                "created_at": ack["created_at"],
                "kind": "text",
                "author": "alice",
                "body": "hello",
                "client_msg_id": "m-1",
                "edited_at": None,
                "deleted": False,
                "reply_to": None,
            }


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("this is not json", "invalid_json"),
        ("[1, 2, 3]", "invalid_frame"),
        ('{"type": "shout", "body": "x"}', "unknown_type"),
        ('{"body": "no type"}', "unknown_type"),
        ('{"type": "send", "body": ""}', "empty_body"),
        ('{"type": "send", "body": "   \\n\\t "}', "empty_body"),
        ('{"type": "send", "body": 42}', "invalid_frame"),
        ('{"type": "send"}', "invalid_frame"),
        ('{"type": "send", "body": "nul \\u0000 char"}', "invalid_body"),
        ('{"type": "send", "body": "lone \\ud800 surrogate"}', "invalid_body"),
        ('{"type": "send", "body": "ok", "client_msg_id": 7}', "invalid_client_msg_id"),
        ('{"type": "send", "body": "ok", "client_msg_id": ""}', "invalid_client_msg_id"),
        ("[" * 20_000 + "]" * 20_000, "invalid_json"),
    ],
)
async def test_bad_frames_get_an_error_and_the_connection_stays_open(
    server, room, alice, frame, code
):
    async with await Client.connect(server, room, alice) as client:
        await client.ws.send(frame)
        error = await client.recv()
        assert error["type"] == "error" and error["code"] == code, error
        assert error["detail"]
        await client.send("still here", "after-error")
        assert (await client.recv_type("ack"))["client_msg_id"] == "after-error"


async def test_error_echoes_the_client_msg_id(server, room, alice):
    async with await Client.connect(server, room, alice) as client:
        await client.send("", "empty-1")
        error = await client.recv()
        assert error == {
            "type": "error",
            "code": "empty_body",
            "detail": error["detail"],
            "client_msg_id": "empty-1",
        }


async def test_binary_frames_are_refused_with_an_error(server, room, alice):
    async with await Client.connect(server, room, alice) as client:
        await client.ws.send(b'{"type": "send", "body": "x"}')
        assert (await client.recv())["code"] == "binary_not_supported"
        await client.send_json({"type": "ping"})
        assert await client.recv() == {"type": "pong"}


async def test_body_length_limit_is_in_characters(server, room, alice):
    async with await Client.connect(server, room, alice) as client:
        await client.send("é" * 4000, "at-limit")
        assert (await client.recv_type("ack"))["client_msg_id"] == "at-limit"
        await client.send("x" * 4001, "over")
        error = await client.recv_type("error")
        assert error["code"] == "body_too_long" and error["client_msg_id"] == "over"


async def test_frames_far_over_the_limit_close_with_1009(server, room, alice):
    client = await Client.connect(server, room, alice)
    await client.ws.send(json.dumps({"type": "send", "body": "x" * 2_000_000}))
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


@pytest.mark.parametrize(
    "name", ["has space", "a" * 65, "semi;colon", "quote'", "émoji", "slash%2Fx"]
)
async def test_bad_room_names_are_refused_before_accept(server, alice, name):
    with pytest.raises(InvalidStatus) as refused:
        await Client.connect(server, name, alice)
    assert refused.value.response.status_code in (403, 404)


@pytest.mark.parametrize(
    "params",
    [{"history": -1}, {"history": 501}, {"history": "x"}, {"since": -5}, {"since": 2**63}],
)
async def test_bad_parameters_are_refused_before_accept(server, room, alice, params):
    with pytest.raises(InvalidStatus) as refused:
        await Client.connect(server, room, alice, **params)
    assert refused.value.response.status_code == 403


async def test_room_name_edge_lengths_work(server, alice):
    for name in ("a", "Z" * 64, "a.b-c_d"):
        async with await Client.connect(server, name, alice) as client:
            assert client.ready["room"] == name


async def test_handshake_answers_with_the_request_id(server, room, alice):
    url = f"{server.ws}/ws/rooms/{room}?token={alice}"
    async with connect(url, additional_headers={"X-Request-ID": "ws-req-7"}) as ws:
        assert ws.response.headers["x-request-id"] == "ws-req-7"
    async with connect(url) as ws:
        assert len(ws.response.headers["x-request-id"]) == 16  # one of the server's own
