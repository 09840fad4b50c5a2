"""Presence and typing (issue 16), black-box against several replicas: who is here in
``ready`` and as coalesced ``presence`` frames on every replica, no flicker on a reconnect
within the grace period (a socket dropped, a replica drained with 1012), a killed replica's
users reported offline within the timeout, presence hidden from non-members of private rooms,
and ``typing`` frames to the others only, coalesced, expiring, ended by a message."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.redis_support import RedisServer, redis_server_binary
from tests.support import Client, ServerProcess, frames_of, make_token

GRACE = 1.5
TIMEOUT = 3.0
INTERVAL = 0.3
TYPING_TTL = 1.5
ENV = {
    "CHAT_PRESENCE_GRACE": str(GRACE),
    "CHAT_PRESENCE_TIMEOUT": str(TIMEOUT),
    "CHAT_PRESENCE_INTERVAL": str(INTERVAL),
    "CHAT_TYPING_TIMEOUT": str(TYPING_TTL),
}


def uid(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def replicas(database_url, server_log_dir):  # type: ignore[no-untyped-def]
    """Two replicas with short presence timers (the defaults are seconds to tens of them),
    shared by the tests that stop neither (each uses rooms of its own)."""
    pair = [
        ServerProcess(database_url, log_path=server_log_dir / f"presence-{i}.log", env=ENV)
        for i in range(2)
    ]
    for proc in pair:
        proc.start()
    yield pair
    for proc in pair:
        proc.stop()


def present(server: ServerProcess, token: str, room: str, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{server.http}/rooms/{room}/presence",
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def present_ids(server: ServerProcess, token: str, room: str) -> list[str]:
    r = present(server, token, room, limit=1000)
    assert r.status_code == 200, r.text
    return [u["user"] for u in r.json()["users"]]


async def until(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def join(server: ServerProcess, room: str, user: str, **claims: Any) -> Client:
    return await Client.connect(server, room, make_token(user, **claims), signals=True)


async def presence_until(
    client: Client,
    *,
    online: set[str] = frozenset(),
    offline: set[str] = frozenset(),
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """Presence frames until ``online`` have come and ``offline`` gone (net of every frame)."""
    seen: list[dict[str, Any]] = []
    came: set[str] = set()
    went: set[str] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (online <= came and offline <= went):
        frame = await client.recv(max(deadline - loop.time(), 0.001))
        if frame["type"] != "presence":
            continue
        seen.append(frame)
        came = (came | set(frame["online"])) - set(frame["offline"])
        went = (went | set(frame["offline"])) - set(frame["online"])
    return seen


# 1. Who is here: in ready, as frames, on every replica


async def test_presence_in_ready_and_as_frames_across_two_replicas(replicas):
    a, b = replicas
    room, alice, bob = uid("r"), uid("alice"), uid("bob")
    first = await join(a, room, alice, name="Alice")
    assert first.ready["presence"] == {"count": 1, "users": [{"user": alice, "name": "Alice"}]}
    await until(lambda: present_ids(b, make_token(bob), room) == [alice])

    second = await join(b, room, bob)  # on the other replica: it learns of alice there
    assert second.ready["presence"]["count"] == 2
    assert {u["user"] for u in second.ready["presence"]["users"]} == {alice, bob}
    assert {"user": alice, "name": "Alice"} in second.ready["presence"]["users"]

    got = await presence_until(first, online={bob})
    assert all(f["room"] == room for f in got)

    await second.close()  # gone for good: offline once the grace period is over
    started = time.monotonic()
    await presence_until(first, offline={bob}, timeout=GRACE + 5)
    assert time.monotonic() - started >= GRACE - 0.3  # not before the grace period
    assert present_ids(a, make_token(alice), room) == [alice]
    await first.close()


async def test_ready_lists_a_capped_page_and_rest_pages_the_rest(spawn, database_url):
    server = spawn(database_url, **ENV, CHAT_PRESENCE_READY_LIMIT="3")
    room = uid("r")
    users = sorted(uid(f"p{i}") for i in range(5))
    clients = [await join(server, room, u) for u in users]
    last = await join(server, room, users[0])  # a second socket: one user, counted once
    assert last.ready["presence"]["count"] == 5
    assert [u["user"] for u in last.ready["presence"]["users"]] == users[:3]

    token = make_token(users[0])
    await until(lambda: len(present_ids(server, token, room)) == 5)
    page = present(server, token, room, limit=2).json()
    assert [u["user"] for u in page["users"]] == users[:2] and page["next_after"] == users[1]
    page = present(server, token, room, limit=2, after=page["next_after"]).json()
    assert [u["user"] for u in page["users"]] == users[2:4]
    page = present(server, token, room, limit=2, after=page["next_after"]).json()
    assert [u["user"] for u in page["users"]] == users[4:] and page["next_after"] is None
    assert present(server, token, room, limit=0).status_code == 422
    for client in [*clients, last]:
        await client.close()


async def test_a_burst_of_arrivals_is_a_few_frames(replicas):
    """Forty users arriving at once on two replicas: each socket hears of all of them in a
    handful of frames (one per interval at most), not forty."""
    a, b = replicas
    room, watcher = uid("r"), uid("w")
    client = await join(a, room, watcher)
    crowd = [uid("c") for _ in range(40)]
    started = time.monotonic()
    others = await asyncio.gather(*(join(a if i % 2 else b, room, u) for i, u in enumerate(crowd)))
    got = await presence_until(client, online=set(crowd), timeout=15)
    elapsed = time.monotonic() - started
    assert len(got) <= elapsed / INTERVAL + 2, (len(got), elapsed)
    for c in others:
        await c.close()
    await client.close()


# 2. No flicker


async def test_a_reconnect_within_the_grace_period_is_never_reported(replicas):
    a, b = replicas
    room, alice, bob = uid("r"), uid("alice"), uid("bob")
    watcher = await join(a, room, alice)
    bobs = await join(a, room, bob)
    await presence_until(watcher, online={bob})
    await bobs.close()
    await asyncio.sleep(GRACE / 3)
    bobs = await join(b, room, bob)  # back, on the other replica
    assert [
        f for f in await frames_of(watcher, "presence", GRACE * 2 + 1) if bob in f["offline"]
    ] == []
    assert bob in present_ids(a, make_token(alice), room)
    await bobs.close()
    await watcher.close()


async def test_a_drained_replica_s_users_moving_to_another_are_never_reported(spawn, database_url):
    """A replica shut down (its sockets closed with 1012) keeps its users present for the
    grace period: the ones that resume on another replica are never offline; the one that
    does not come back is, after it."""
    a, b = spawn(database_url, **ENV), spawn(database_url, **ENV)
    room, alice, bob, carol = uid("r"), uid("alice"), uid("bob"), uid("carol")
    watcher = await join(b, room, alice)
    bobs = await join(a, room, bob)
    carols = await join(a, room, carol)
    await presence_until(watcher, online={bob, carol})
    a.stop(signal.SIGTERM)
    bobs = await join(b, room, bob)  # bob resumes on the replica that is left
    got = await presence_until(watcher, offline={carol}, timeout=GRACE + TIMEOUT + 5)
    assert not any(bob in f["offline"] for f in got)
    assert [f for f in await frames_of(watcher, "presence", 1) if bob in f["offline"]] == []
    assert sorted(present_ids(b, make_token(alice), room)) == sorted([alice, bob])
    await bobs.close()
    await watcher.close()
    del carols


# 3. A replica that dies


async def test_a_killed_replica_s_users_go_offline_within_the_timeout(spawn, database_url):
    a, doomed = spawn(database_url, **ENV), spawn(database_url, **ENV)
    room, alice, bob, carol = uid("r"), uid("alice"), uid("bob"), uid("carol")
    watcher = await join(a, room, alice)
    bobs = await join(doomed, room, bob)
    carols = await join(doomed, room, carol)
    await presence_until(watcher, online={bob, carol})
    doomed.stop(signal.SIGKILL)
    killed = time.monotonic()
    carols = await join(a, room, carol)  # carol reconnects elsewhere at once; bob does not
    got = await presence_until(watcher, offline={bob}, timeout=TIMEOUT + 5)
    assert time.monotonic() - killed <= TIMEOUT + 1.0  # the timeout, and one frame interval
    assert not any(carol in f["offline"] for f in got)
    assert sorted(present_ids(a, make_token(alice), room)) == sorted([alice, carol])
    await carols.close()
    await watcher.close()
    del bobs


# 4. Private rooms


async def test_presence_of_a_private_room_is_for_its_members(replicas):
    a, b = replicas
    room, owner, member, stranger = uid("r"), uid("o"), uid("m"), uid("s")
    r = httpx.post(
        f"{a.http}/rooms",
        json={"name": room, "kind": "private", "members": [member]},
        headers={"Authorization": f"Bearer {make_token(owner)}"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    client = await join(a, room, owner)
    await until(lambda: present_ids(b, make_token(member), room) == [owner])
    refused = present(b, make_token(stranger), room)
    assert refused.status_code == 404, refused.text
    assert present(b, make_token(stranger), uid("dm.")).status_code == 404
    # A public room next door hears nothing of this one.
    public, other = uid("pub"), uid("x")
    neighbour = await join(b, public, other)
    assert neighbour.ready["presence"]["users"] == [{"user": other, "name": None}]
    second = await join(a, room, member)
    await client.send_json({"type": "typing"})
    assert (await second.recv_type("typing"))["users"] == [owner]
    heard = await frames_of(neighbour, "presence", 1) + await frames_of(neighbour, "typing", 0.5)
    assert not [
        f
        for f in heard
        if f["room"] != public
        or {owner, member} & {*f.get("online", ()), *f.get("offline", ()), *f.get("users", ())}
    ]
    for c in (client, second, neighbour):
        await c.close()


# 5. Typing


async def test_typing_reaches_the_others_only_and_expires(replicas):
    a, b = replicas
    room, alice, bob = uid("r"), uid("alice"), uid("bob")
    typer = await join(a, room, alice)
    own_other = await join(b, room, alice)  # alice's second device
    reader = await join(b, room, bob)
    await typer.send_json({"type": "typing"})
    got = await reader.recv_type("typing")
    assert got == {"type": "typing", "room": room, "users": [alice]}
    started = time.monotonic()
    got = await reader.recv_type("typing", timeout=TYPING_TTL + 3)
    assert got["users"] == [] and time.monotonic() - started >= TYPING_TTL - 0.7
    # Never to alice's own sockets, neither the one that typed nor her other device.
    assert await frames_of(typer, "typing", 0.3) == []
    assert await frames_of(own_other, "typing", 0.3) == []
    for c in (typer, own_other, reader):
        await c.close()


async def test_a_message_ends_typing_and_excess_typing_is_dropped(replicas):
    a, b = replicas
    room, alice, bob = uid("r"), uid("alice"), uid("bob")
    typer = await join(a, room, alice)
    reader = await join(b, room, bob)
    for _ in range(20):  # a flood: no error, and not twenty frames
        await typer.send_json({"type": "typing"})
    assert (await reader.recv_type("typing"))["users"] == [alice]
    await typer.send("done typing")
    got = await reader.recv_type("typing", timeout=TYPING_TTL / 2)  # before it would expire
    assert got["users"] == []
    assert [f for f in await frames_of(typer, "error", 0.5)] == []
    await typer.send_json({"type": "ping"})
    assert (await typer.recv_type("pong"))["type"] == "pong"
    for c in (typer, reader):
        await c.close()


async def test_typing_frames_are_coalesced_however_many_type(replicas):
    """Thirty users typing at once: each reader gets at most one frame per 500 ms, and the
    last one names everyone typing."""
    a, b = replicas
    room = uid("r")
    reader = await join(a, room, uid("reader"))
    typers = [await join(a if i % 2 else b, room, uid("t")) for i in range(30)]
    for t in typers:
        await t.send_json({"type": "typing"})
    got = await frames_of(reader, "typing", 1.2)
    assert 1 <= len(got) <= 1.2 / 0.5 + 1, got
    assert len(got[-1]["users"]) >= 20  # all, or nearly (more come within 500 ms)
    for t in typers:
        await t.close()
    await reader.close()


# 6. The same on the Redis bus


@pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server binary")
async def test_presence_and_typing_travel_the_redis_bus(database_url, tmp_path):
    """With Redis as the bus, presence changes are published after their commit and typing
    at once: both reach the other process's sockets."""
    redis = RedisServer(redis_server_binary(), tmp_path / "redis.log")  # type: ignore[arg-type]
    redis.start()
    env = {**ENV, "CHAT_BROADCAST_URL": redis.url}
    room, alice, bob = uid("r"), uid("alice"), uid("bob")
    try:
        with (
            ServerProcess(database_url, log_path=tmp_path / "a.log", env=env) as one,
            ServerProcess(database_url, log_path=tmp_path / "b.log", env=env) as two,
        ):
            watcher = await join(one, room, alice)
            bobs = await join(two, room, bob)
            await presence_until(watcher, online={bob})
            await bobs.send_json({"type": "typing"})
            assert (await watcher.recv_type("typing"))["users"] == [bob]
            await bobs.close()
            await presence_until(watcher, offline={bob}, timeout=GRACE + 5)
            await watcher.close()
    finally:
        redis.kill()


async def test_a_replica_stalled_past_the_timeout_is_reaped_then_writes_its_users_again(
    spawn, database_url
):
    """A replica that stops for longer than the timeout (SIGSTOP: no heartbeat, no reset, its
    sockets still open) is reaped by the others, its users reported offline; once it runs
    again its next heartbeat finds it reaped: it registers again and its users come back."""
    a, b = spawn(database_url, **ENV), spawn(database_url, **ENV)
    room, alice, bob = uid("r"), uid("alice"), uid("bob")
    watcher = await join(a, room, alice)
    bobs = await join(b, room, bob)
    await presence_until(watcher, online={bob})
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    try:
        await presence_until(watcher, offline={bob}, timeout=TIMEOUT + 3)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    await presence_until(watcher, online={bob}, timeout=TIMEOUT + 3)
    assert sorted(present_ids(a, make_token(alice), room)) == sorted([alice, bob])
    await bobs.send("still here")  # the stalled replica's socket works again
    assert (await watcher.recv_type("message"))["body"] == "still here"
    await bobs.close()
    await watcher.close()


async def test_typing_ends_when_the_typer_s_last_socket_closes(replicas):
    a, b = replicas
    room, alice, bob = uid("r"), uid("alice"), uid("bob")
    typer = await join(a, room, alice)
    reader = await join(b, room, bob)
    await typer.send_json({"type": "typing"})
    assert (await reader.recv_type("typing"))["users"] == [alice]
    await typer.close()
    got = await reader.recv_type("typing", timeout=TYPING_TTL / 2)  # before it would expire
    assert got["users"] == []
    await reader.close()


def test_a_cursor_no_user_id_can_hold_is_a_422_not_a_500(replicas):
    a, _ = replicas
    token = make_token(uid("u"))
    for after in ("a\x00b", "\x1f", "é\u2028"):
        r = present(a, token, uid("r"), after=after)
        assert r.status_code == 422, (after, r.status_code, r.text)
    assert present(a, token, uid("r"), after="zz").json() == {"users": [], "next_after": None}
