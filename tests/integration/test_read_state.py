"""Read state (issue 15), black-box against two replicas: read cursors moved by ``read`` frames
and ``PUT /rooms/{room}/read``, exact unread and mention counts in ``GET /rooms`` and
``GET /rooms/{room}`` for a user who read part of a room from two devices on two replicas,
the ``read`` sync to the user's other sockets, ``receipt`` frames in small rooms only (and
coalesced), members' cursors, and counts that stay exact at a size no cap survives."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from tests.redis_support import RedisServer, redis_server_binary
from tests.support import Client, ServerProcess, frames_of, make_token


def uid(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def call(server: Any, token: str, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.request(method, f"{server.http}{path}", headers=headers, timeout=10, **kw)


def say(server: Any, token: str, room: str, body: str, **extra: Any) -> int:
    r = call(server, token, "POST", f"/rooms/{room}/messages", json={"body": body, **extra})
    assert r.status_code == 201, r.text
    return r.json()["seq"]  # type: ignore[no-any-return]


def private_room(server: Any, owner: str, *members: str) -> str:
    name = uid("r")
    r = call(
        server, owner, "POST", "/rooms", json={"name": name, "kind": "private", "members": members}
    )
    assert r.status_code == 201, r.text
    return name


def entry(server: Any, token: str, room: str) -> dict[str, Any]:
    """The room's entry in the caller's ``GET /rooms?mine=true``, checked against
    ``GET /rooms/{room}`` (both must say the same)."""
    listed = call(server, token, "GET", "/rooms", params={"mine": "true", "limit": 1000})
    assert listed.status_code == 200, listed.text
    found = [r for r in listed.json()["rooms"] if r["name"] == room]
    assert len(found) == 1, listed.json()
    one = call(server, token, "GET", f"/rooms/{room}")
    assert one.status_code == 200, one.text
    assert one.json() == found[0]
    return found[0]


async def eventually(check: Any, timeout: float = 5.0) -> Any:
    """``check()`` once it stops raising ``AssertionError`` (cursors move within a flush)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# 1. Exact counts for a user who read part of a room, from two devices on two replicas


async def test_unread_counts_are_exact_across_two_replicas_and_two_devices(server, second_server):
    alice, bob = uid("alice"), uid("bob")
    a, b = make_token(alice), make_token(bob)
    room = private_room(server, a, bob)
    start = entry(server, b, room)
    assert start["unread"] == 0 and start["mentions"] == 0  # a new member has read it all
    assert start["last_read_seq"] <= start["last_seq"]  # before the member items

    phone = await Client.connect(server, room, b)
    laptop = await Client.connect(second_server, room, b)
    try:
        seqs = [say(server if i % 2 else second_server, a, room, f"m{i}") for i in range(10)]
        mention = say(server, a, room, f"look @{bob}, and @{bob} again")
        seqs.append(mention)
        assert entry(second_server, b, room)["unread"] == 11
        assert entry(server, b, room)["mentions"] == 1

        # The phone reads up to the fourth message; the laptop hears of it.
        await phone.send_json({"type": "read", "seq": seqs[3]})
        synced = await laptop.recv_type("read")
        assert synced == {"type": "read", "room": room, "seq": seqs[3]}
        state = await eventually(lambda: _with_unread(entry(second_server, b, room), 7))
        assert state["last_read_seq"] == seqs[3] and state["mentions"] == 1

        # Two of the unread ones deleted, one of the read ones too: only unread ones count.
        for target in (seqs[5], seqs[8], seqs[1]):
            r = call(server, a, "DELETE", f"/rooms/{room}/messages/{target}")
            assert r.status_code == 200, r.text
        assert entry(server, b, room)["unread"] == 5

        # Never back: an older seq changes nothing; a reaction is no unread message.
        await laptop.send_json({"type": "read", "seq": seqs[0]})
        r = call(second_server, a, "PUT", f"/rooms/{room}/messages/{seqs[9]}/reactions/👍")
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.6)
        state = entry(second_server, b, room)
        assert state["last_read_seq"] == seqs[3] and state["unread"] == 5

        # Reading past the mention clears it; posting moves the poster's cursor past it all.
        await laptop.send_json({"type": "read", "seq": seqs[9]})
        await eventually(lambda: _with_unread(entry(server, b, room), 1))
        assert entry(server, b, room)["mentions"] == 1
        await laptop.send_json({"type": "read", "seq": mention})
        await eventually(lambda: _with_unread(entry(server, b, room), 0))
        assert entry(server, b, room)["mentions"] == 0
        say(server, a, room, "one more")
        own = say(second_server, b, room, "read it all")
        state = entry(server, b, room)
        assert state["last_read_seq"] == own and state["unread"] == 0
        assert entry(server, a, room)["unread"] == 1  # bob's message, for alice
    finally:
        await phone.close()
        await laptop.close()


def _with_unread(state: dict[str, Any], unread: int) -> dict[str, Any]:
    assert state["unread"] == unread, state
    return state


# 2. REST


async def test_rest_moves_the_cursor_forward_only_and_only_for_members(server, second_server):
    alice, bob, carol = uid("alice"), uid("bob"), uid("carol")
    a, b, c = make_token(alice), make_token(bob), make_token(carol)
    room = private_room(server, a, bob)
    seqs = [say(server, a, room, f"m{i}") for i in range(4)]
    laptop = await Client.connect(second_server, room, b)
    try:
        r = call(server, b, "PUT", f"/rooms/{room}/read", json={"seq": seqs[1]})
        assert r.status_code == 204, r.text
        assert entry(second_server, b, room)["unread"] == 2  # at once: no flush to wait for
        assert (await laptop.recv_type("read"))["seq"] == seqs[1]
        r = call(server, b, "PUT", f"/rooms/{room}/read", json={"seq": seqs[0]})
        assert r.status_code == 204
        assert entry(server, b, room)["last_read_seq"] == seqs[1]
        # Past the end: the end.
        r = call(server, b, "PUT", f"/rooms/{room}/read", json={"seq": 10**12})
        assert r.status_code == 204
        state = entry(server, b, room)
        assert state["last_read_seq"] == state["last_seq"] and state["unread"] == 0
    finally:
        await laptop.close()

    # Not a member of a private room: it does not exist for them; of a public one: 403.
    r = call(server, c, "PUT", f"/rooms/{room}/read", json={"seq": 1})
    assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    public = uid("p")
    say(server, a, public, "hello")
    r = call(server, c, "PUT", f"/rooms/{public}/read", json={"seq": 1})
    assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
    listed = call(server, c, "GET", "/rooms", params={"limit": 1000}).json()["rooms"]
    mine = [x for x in listed if x["name"] == public]
    assert mine and mine[0]["last_read_seq"] is None
    assert mine[0]["unread"] is None and mine[0]["mentions"] is None

    for bad in ({"seq": -1}, {"seq": "3"}, {"seq": 1.5}, {}, {"seq": 1, "x": 2}):
        r = call(server, b, "PUT", f"/rooms/{room}/read", json=bad)
        assert r.status_code == 422, (bad, r.text)


async def test_an_invalid_read_frame_gets_an_error_and_a_valid_one_no_answer(server):
    alice, bob = uid("alice"), uid("bob")
    a, b = make_token(alice), make_token(bob)
    room = private_room(server, a, bob)
    seq = say(server, a, room, "hi")
    async with await Client.connect(server, room, b) as client:
        for bad in ({"type": "read"}, {"type": "read", "seq": -1}, {"type": "read", "seq": True}):
            await client.send_json(bad)
            error = await client.recv()
            assert error["type"] == "error" and error["code"] == "invalid_frame", error
        await client.send_json({"type": "read", "seq": seq})
        frame = await client.recv()  # the sync comes to this socket too: no answer otherwise
        assert frame == {"type": "read", "room": room, "seq": seq}
        await client.assert_silent(0.6)


# 3. Receipts: small rooms only, coalesced


async def test_receipts_reach_the_room_coalesced_to_one_per_user_per_second(server, second_server):
    alice, bob = uid("alice"), uid("bob")
    a, b = make_token(alice), make_token(bob)
    room = private_room(server, a, bob)
    seqs = [say(server, a, room, f"m{i}") for i in range(30)]
    watcher = await Client.connect(second_server, room, a)
    reader = await Client.connect(server, room, b)
    try:
        for seq in seqs:  # 30 read frames in ~1.5 s
            await reader.send_json({"type": "read", "seq": seq})
            await asyncio.sleep(0.05)
        receipts = await frames_of(watcher, "receipt", 3.0)
        assert receipts, "no receipt"
        assert all(r["room"] == room and r["user"] == bob for r in receipts)
        assert receipts[-1]["seq"] == seqs[-1]  # the last position always goes out
        assert len(receipts) <= 3, receipts  # ~1.5 s of reads: one a second, not 30
        members = call(server, a, "GET", f"/rooms/{room}/members").json()["members"]
        assert {m["user"]: m["last_read_seq"] for m in members}[bob] == seqs[-1]
    finally:
        await watcher.close()
        await reader.close()


async def test_no_receipts_in_a_room_over_the_limit_but_the_sync_still_works(spawn, own_database):
    server: ServerProcess = spawn(own_database, CHAT_RECEIPTS_MAX_MEMBERS="2")
    alice, bob = uid("alice"), uid("bob")
    a, b = make_token(alice), make_token(bob)
    small = private_room(server, a, bob)
    big = private_room(server, a, bob, uid("carol"))
    for room, receipts in ((small, 1), (big, 0)):
        seq = say(server, a, room, "hi")
        watcher = await Client.connect(server, room, a)
        phone = await Client.connect(server, room, b)
        laptop = await Client.connect(server, room, b)
        try:
            await phone.send_json({"type": "read", "seq": seq})
            assert (await laptop.recv_type("read"))["seq"] == seq
            assert len(await frames_of(watcher, "receipt", 1.5)) == receipts, room
        finally:
            for client in (watcher, phone, laptop):
                await client.close()


# 4. Mentions follow edits and deletes; members' cursors; a new member


async def test_mentions_follow_edits_and_deletes(server, second_server):
    alice, bob = uid("alice"), uid("bob")
    a, b = make_token(alice), make_token(bob)
    room = private_room(server, a, bob)
    plain = say(server, a, room, "no mention here, mail bob@example.com")
    tagged = say(server, a, room, f"@{bob}: see this")
    assert entry(server, b, room)["mentions"] == 1
    r = call(
        second_server, a, "PATCH", f"/rooms/{room}/messages/{plain}", json={"body": f"@{bob}."}
    )
    assert r.status_code == 200, r.text
    assert entry(server, b, room)["mentions"] == 2
    r = call(
        second_server, a, "PATCH", f"/rooms/{room}/messages/{tagged}", json={"body": "never mind"}
    )
    assert r.status_code == 200, r.text
    assert entry(server, b, room)["mentions"] == 1
    r = call(server, a, "DELETE", f"/rooms/{room}/messages/{plain}")
    assert r.status_code == 200, r.text
    state = entry(server, b, room)
    assert state["mentions"] == 0 and state["unread"] == 1


async def test_a_member_added_later_starts_with_nothing_unread(server):
    alice, bob = uid("alice"), uid("bob")
    a, b = make_token(alice), make_token(bob)
    room = private_room(server, a)
    for i in range(5):
        say(server, a, room, f"before {i}")
    r = call(server, a, "PUT", f"/rooms/{room}/members/{bob}", json={"role": "member"})
    assert r.status_code in (200, 201), r.text
    assert entry(server, b, room)["unread"] == 0
    say(server, a, room, "after")
    assert entry(server, b, room)["unread"] == 1
    r = call(server, a, "PUT", f"/rooms/{room}/members/{bob}", json={"role": "admin"})
    assert r.status_code == 200, r.text
    assert entry(server, b, room)["unread"] == 1  # a role change keeps the cursor


# 5. Exact at a size no cap survives


@pytest.mark.slow
async def test_counts_are_exact_with_seventy_thousand_unread(server, database_url):
    """70,000 is past any round cap and past 65,535 (a 16-bit count). What is read is the
    counters: the messages before the last are seeded in one statement with the counters
    ``chat_post_messages`` keeps (migration 0007); the last is posted, so the writer carries
    them on from there and moves its author's cursor."""
    alice, bob = uid("alice"), uid("bob")
    a, b = make_token(alice), make_token(bob)
    room = private_room(server, a, bob)
    first = say(server, a, room, "first")
    r = call(server, b, "PUT", f"/rooms/{room}/read", json={"seq": first})
    assert r.status_code == 204
    count = 70_000
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            room_id, last_seq, texts = await conn.fetchrow(
                "SELECT id, last_seq, text_count FROM room WHERE name = $1 FOR UPDATE", room
            )
            await conn.execute(  # one in a thousand mentions bob: g = 1, 1001, ...
                "INSERT INTO message (room_id, seq, author, body, client_msg_id, text_no) "
                "SELECT $1, $2 + g, $3, 'm' || g || CASE WHEN g % 1000 = 1 THEN ' @' || $4 "
                "ELSE '' END, 'seed-' || g, $5 + g FROM generate_series(1, $6::bigint) AS g",
                room_id,
                last_seq,
                alice,
                bob,
                texts,
                count - 1,
            )
            await conn.execute(
                "INSERT INTO message_mention (room_id, user_id, seq) "
                "SELECT $1, $2, $3 + g FROM generate_series(1, $4::bigint, 1000) AS g",
                room_id,
                bob,
                last_seq,
                count - 1,
            )
            await conn.execute(
                "UPDATE room SET last_seq = last_seq + $2, text_count = text_count + $2 "
                "WHERE id = $1",
                room_id,
                count - 1,
            )
            await conn.execute(
                "UPDATE room_member SET last_mention_seq = (SELECT max(seq) FROM message_mention"
                " WHERE room_id = $1 AND user_id = $2) WHERE room_id = $1 AND user_id = $2",
                room_id,
                bob,
            )
    finally:
        await conn.close()
    last = say(server, a, room, "the last one")
    assert last == last_seq + count
    state = entry(server, b, room)
    assert state["unread"] == count and state["mentions"] == count // 1000
    assert entry(server, a, room)["unread"] == 0


# 6. The same signals on the Redis bus


@pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server binary")
async def test_read_sync_and_receipts_travel_the_redis_bus(own_database, tmp_path):
    """With Redis as the bus the process that moved a cursor publishes its signals after the
    commit: the user's other device and the room's other members on the other process."""
    redis = RedisServer(redis_server_binary(), tmp_path / "redis.log")  # type: ignore[arg-type]
    redis.start()
    env = {"CHAT_BROADCAST_URL": redis.url}
    alice, bob = uid("alice"), uid("bob")
    a, b = make_token(alice), make_token(bob)
    try:
        with (
            ServerProcess(own_database, log_path=tmp_path / "a.log", env=env) as one,
            ServerProcess(own_database, log_path=tmp_path / "b.log", env=env) as two,
        ):
            room = private_room(one, a, bob)
            seqs = [say(two, a, room, f"m{i}") for i in range(3)]
            phone = await Client.connect(one, room, b)
            laptop = await Client.connect(two, room, b)
            watcher = await Client.connect(two, room, a)
            try:
                await phone.send_json({"type": "read", "seq": seqs[1]})
                assert (await laptop.recv_type("read"))["seq"] == seqs[1]
                receipt = await watcher.recv_type("receipt")
                assert (receipt["user"], receipt["seq"]) == (bob, seqs[1])
                assert entry(two, b, room)["unread"] == 1
            finally:
                for client in (phone, laptop, watcher):
                    await client.close()
    finally:
        redis.kill()
