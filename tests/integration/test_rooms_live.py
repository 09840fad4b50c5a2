"""Rooms with members on live sockets, black-box with two replicas: non-members are refused
at the handshake, a removal, a leave or a deletion closes the user's sockets on every replica
within a second (4403), membership items travel in the stream and in a resume, and a member
removed while sending has every acked message before the removal's seq and none after."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.exceptions import InvalidStatus

from service.chat.envelope import channel_for
from service.db.writer import MessageWriter
from service.errors import Forbidden
from tests.support import Client, close_of, make_token

REVOKED_WITHIN = 1.0
"""Seconds within which a removal closes the user's sockets on every replica (issue 14)."""


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create_private(server: Any, room: str, owner: str, *members: str) -> dict[str, Any]:
    r = httpx.post(
        f"{server.http}/rooms",
        json={"name": room, "kind": "private", "members": list(members)},
        headers=_auth(owner),
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def refused_status(server: Any, room: str, token: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        await Client.connect(server, room, token)
    return refused.value.response.status_code


async def test_a_non_member_is_refused_at_the_handshake(server, second_server, room, alice, bob):
    create_private(server, room, alice)
    for replica in (server, second_server):
        assert await refused_status(replica, room, bob) == 403
    async with await Client.connect(second_server, room, alice) as member:
        assert member.ready["last_seq"] == 1  # the owner's "joined" item
    admin = make_token("ops", roles=["chat:admin"])
    async with await Client.connect(server, room, admin) as operator:
        assert operator.ready["room"] == room


async def test_a_never_used_name_is_open_but_a_direct_one_is_not(server, room, alice):
    async with await Client.connect(server, room, alice) as client:
        assert client.ready["last_seq"] == 0
    assert await refused_status(server, f"dm.{room}", alice) == 403
    r = httpx.post(
        f"{server.http}/rooms/dm.{room}/messages", json={"body": "hi"}, headers=_auth(alice)
    )
    assert r.status_code == 404


async def test_removal_closes_the_members_sockets_on_every_replica_within_a_second(
    server, second_server, room, alice, bob
):
    create_private(server, room, alice, "bob")
    bobs = [await Client.connect(replica, room, bob) for replica in (server, second_server)]
    watcher = await Client.connect(second_server, room, alice)
    try:
        started = time.monotonic()
        r = httpx.delete(f"{server.http}/rooms/{room}/members/bob", headers=_auth(alice))
        assert r.status_code == 204
        closes = await asyncio.gather(*(close_of(c, 5) for c in bobs))
        elapsed = time.monotonic() - started
        assert closes == [(4403, "you no longer have access to this room")] * 2
        assert elapsed < REVOKED_WITHIN, f"closed after {elapsed:.3f}s"
        removed = await watcher.recv_type("message")
        assert {k: removed[k] for k in ("kind", "author", "user", "action", "role")} == {
            "kind": "member",
            "author": "alice",
            "user": "bob",
            "action": "removed",
            "role": None,
        }
        await watcher.assert_silent(0.2)  # alice's socket stays open
        for replica in (server, second_server):
            assert await refused_status(replica, room, bob) == 403
        r = httpx.get(f"{second_server.http}/rooms/{room}/messages", headers=_auth(bob))
        assert r.status_code == 404
    finally:
        for client in (*bobs, watcher):
            await client.close()


async def test_leaving_closes_ones_own_sockets(server, second_server, room, alice, bob):
    create_private(server, room, alice, "bob")
    async with await Client.connect(second_server, room, bob) as client:
        r = httpx.delete(f"{server.http}/rooms/{room}/members/bob", headers=_auth(bob))
        assert r.status_code == 204
        assert (await close_of(client, 5))[0] == 4403


async def test_deleting_a_room_closes_every_socket_and_erases_it(
    server, second_server, room, alice, bob
):
    create_private(server, room, alice, "bob")
    httpx.post(f"{server.http}/rooms/{room}/messages", json={"body": "x"}, headers=_auth(bob))
    sockets = [
        await Client.connect(server, room, alice),
        await Client.connect(second_server, room, bob),
    ]
    try:
        started = time.monotonic()
        assert httpx.delete(f"{server.http}/rooms/{room}", headers=_auth(alice)).status_code == 204
        closes = await asyncio.gather(*(close_of(c, 5) for c in sockets))
        assert [code for code, _ in closes] == [4403, 4403]
        assert time.monotonic() - started < REVOKED_WITHIN
    finally:
        for client in sockets:
            await client.close()
    assert httpx.get(f"{server.http}/rooms/{room}", headers=_auth(alice)).status_code == 404
    r = httpx.get(f"{server.http}/rooms/{room}/messages", headers=_auth(alice))
    assert r.status_code == 404


async def test_a_public_room_deleted_closes_its_sockets_too(server, second_server, room, alice):
    r = httpx.post(
        f"{server.http}/rooms", json={"name": room, "kind": "public"}, headers=_auth(alice)
    )
    assert r.status_code == 201
    async with await Client.connect(second_server, room, make_token("carol")) as carol:
        assert httpx.delete(f"{server.http}/rooms/{room}", headers=_auth(alice)).status_code == 204
        assert (await close_of(carol, 5))[0] == 4403


async def test_a_name_made_private_closes_the_sockets_open_on_it(
    server, second_server, room, alice, bob
):
    """A socket accepted on a never-used name (a public room to be) loses it when the name
    becomes a private room, members included (they reconnect and are let in)."""
    outsider = await Client.connect(second_server, room, bob)
    insider = await Client.connect(server, room, alice)
    try:
        create_private(server, room, alice)
        closes = await asyncio.gather(close_of(outsider, 5), close_of(insider, 5))
        assert [code for code, _ in closes] == [4403, 4403]
    finally:
        await outsider.close()
        await insider.close()
    assert await refused_status(second_server, room, bob) == 403
    async with await Client.connect(second_server, room, alice, since=0) as again:
        assert again.ready["recovered"] is True


async def test_membership_items_replay_on_resume_but_not_in_history(
    server, second_server, room, alice, bob
):
    create_private(server, room, alice, "bob")
    for i in range(3):
        r = httpx.post(
            f"{server.http}/rooms/{room}/messages", json={"body": f"m{i}"}, headers=_auth(bob)
        )
        assert r.status_code == 201
    r = httpx.put(
        f"{server.http}/rooms/{room}/members/bob", json={"role": "admin"}, headers=_auth(alice)
    )
    assert r.status_code == 200
    async with await Client.connect(second_server, room, bob, since=0) as resumed:
        kinds = [(f["seq"], f["kind"]) for f in resumed.history]
        assert kinds == [
            (1, "member"),
            (2, "member"),
            (3, "text"),
            (4, "text"),
            (5, "text"),
            (6, "member"),
        ]
        assert resumed.history[-1]["action"] == "role"
        assert resumed.history[-1]["role"] == "admin"
        assert resumed.ready["last_seq"] == 6
    async with await Client.connect(server, room, bob, history=10) as fresh:
        assert [f["body"] for f in fresh.history] == ["m0", "m1", "m2"]
        assert {f["kind"] for f in fresh.history} == {"text"}
        assert fresh.ready["last_seq"] == 6
        # Live, every kind arrives, in seq order after the replay.
        r = httpx.put(
            f"{server.http}/rooms/{room}/members/carol",
            json={"role": "member"},
            headers=_auth(alice),
        )
        assert r.status_code == 201
        live = await fresh.recv_type("message")
        assert (live["seq"], live["kind"], live["user"], live["action"]) == (
            7,
            "member",
            "carol",
            "joined",
        )


async def test_a_member_removed_while_sending_keeps_what_was_acked_before_and_nothing_after(
    server, second_server, room, alice, bob
):
    create_private(server, room, alice, "bob")
    sender = await Client.connect(second_server, room, bob)
    acked: dict[int, int] = {}
    refused: list[str] = []
    sent = 0

    async def send_until_closed() -> None:
        nonlocal sent
        while True:
            sent += 1
            await sender.send(f"n{sent}", client_msg_id=f"c{sent}")
            await asyncio.sleep(0.002)

    async def read_until_closed() -> tuple[int, str]:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                frame = await sender.recv(5)
                if frame["type"] == "ack":
                    acked[int(frame["client_msg_id"][1:])] = frame["seq"]
                elif frame["type"] == "error":
                    assert frame["code"] == "forbidden", frame
                    refused.append(frame["client_msg_id"])
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code, closed.rcvd.reason

    writer = asyncio.create_task(send_until_closed())
    reader = asyncio.create_task(read_until_closed())
    try:
        await asyncio.sleep(0.3)
        r = httpx.delete(f"{server.http}/rooms/{room}/members/bob", headers=_auth(alice))
        assert r.status_code == 204
        code, _ = await asyncio.wait_for(reader, 5)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await sender.close()
    assert code == 4403
    assert len(acked) > 10, "the sender did not get going before the removal"

    r = httpx.get(
        f"{server.http}/rooms/{room}/messages",
        params={"events": "all", "limit": 500, "after": 0},
        headers=_auth(alice),
    )
    items = r.json()["messages"]
    (removal,) = [i for i in items if i["kind"] == "member" and i["action"] == "removed"]
    stored = {i["seq"]: i for i in items if i["kind"] == "text"}
    assert all(i["author"] == "bob" for i in stored.values())
    assert max(stored) < removal["seq"], "a message of bob's was stored after his removal"
    for n, seq in acked.items():  # every ack is a stored message of his, before the removal
        assert stored[seq]["client_msg_id"] == f"c{n}"
    assert len(stored) >= len(acked)


async def test_a_send_to_a_deleted_room_does_not_make_it_anew(server, database_url, room, alice):
    """The writer is told which room the sender was let into: once that room is deleted, a
    send still on its way is refused, not stored in a new public room of the same name."""
    made = create_private(server, room, alice)
    assert made["kind"] == "private"
    conn = await asyncpg.connect(database_url)
    try:
        room_id = await conn.fetchval("SELECT id FROM room WHERE name = $1", room)
    finally:
        await conn.close()
    assert httpx.delete(f"{server.http}/rooms/{room}", headers=_auth(alice)).status_code == 204
    writer = MessageWriter(database_url, notify=True)
    await writer.start()
    try:
        stored = writer.submit(
            room=room,
            channel=channel_for(room),
            author="alice",
            body="late",
            client_msg_id="late-1",
            room_id=room_id,
        )
        with pytest.raises(Forbidden):
            await asyncio.wait_for(stored, 10)
    finally:
        await writer.close()
    assert httpx.get(f"{server.http}/rooms/{room}", headers=_auth(alice)).status_code == 404
