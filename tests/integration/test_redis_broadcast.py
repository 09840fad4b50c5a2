"""``CHAT_BROADCAST_URL=redis://``: messages are stored in PostgreSQL and fanned out through Redis
pub/sub, with the same guarantees as LISTEN/NOTIFY: every message, exactly once, in seq order,
on every process, through a Redis crash and restart, and through a publish lost on a silent bus.

Each test starts its own ``redis-server`` (Debian's package; ``.ci/run`` installs it) on a free
port and kills it with SIGKILL where the test says so. Skipped only where no ``redis-server``
binary can be found.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from service.chat.envelope import channel_for
from service.db.migrate import upgrade
from service.realtime.backend import RESYNC
from service.realtime.redis_backend import RedisPubSubBackend
from tests.redis_support import RedisServer, SilentProxy, redis_server_binary
from tests.support import Client, ServerProcess, close_of, make_token

REDIS_SERVER = redis_server_binary()

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="no redis-server binary (Debian package redis-server; .ci/run installs it)",
)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:  # type: ignore[no-untyped-def]
    server = RedisServer(REDIS_SERVER, tmp_path / "redis.log")  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def _next_events(backend: RedisPubSubBackend, count: int, timeout: float) -> list:  # type: ignore[type-arg]
    async with asyncio.timeout(timeout):
        return [await backend.next_published() for _ in range(count)]


async def test_the_subscriber_reconnects_for_as_long_as_it_takes_and_resyncs_every_channel(
    redis_server, caplog
):
    """Redis killed, a channel subscribed while it is down, Redis back on the same port: every
    channel is subscribed again and gets one RESYNC; the attempts are logged, rate-limited."""
    caplog.set_level(logging.WARNING, "service.realtime.redis_backend")
    backend = RedisPubSubBackend(redis_server.url, timeout=1.0, max_backoff=0.3)
    await backend.connect()
    try:
        await backend.subscribe("a")
        await backend.subscribe("b")
        await asyncio.to_thread(redis_server.kill)
        async with asyncio.timeout(5):
            while backend.connected:  # noqa: ASYNC110 - a property of the code under test
                await asyncio.sleep(0.01)
        await asyncio.wait_for(backend.subscribe("c"), 0.5)  # while down: returns at once
        await asyncio.sleep(2.5)  # the outage: several attempts, past the backoff's cap
        await asyncio.to_thread(redis_server.start)
        events = await _next_events(backend, 3, 10)
        assert sorted(e.channel for e in events) == ["a", "b", "c"]
        assert {e.message for e in events} == {RESYNC}
        assert backend.connected and backend.reconnects == 1
        await backend.publish("c", "after")
        event = await backend.next_published()  # subscribed again: its own publish comes back
        assert (event.channel, event.message) == ("c", "after")
    finally:
        await backend.disconnect()
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failed and "attempt 1 failed" in failed[0]
    assert len(failed) <= 2, failed  # ~10 attempts in 2.5 s, logged once
    restored = [r.getMessage() for r in caplog.records if "restored after" in r.getMessage()]
    attempts = int(re.search(r"after (\d+) failed attempts", restored[0]).group(1))  # type: ignore[union-attr]
    assert attempts >= 5  # it kept trying


async def test_a_publish_on_a_silent_bus_returns_at_once_and_its_channel_is_resynced(
    redis_server,
):
    """The publisher's path to Redis goes silent (no reset): ``publish`` does not wait for it,
    and the listener, whose own connection is fine, gets a RESYNC for the channel although
    nothing else is published there."""
    async with SilentProxy(redis_server.port) as proxy:
        listener = RedisPubSubBackend(redis_server.url, timeout=1.0)
        publisher = RedisPubSubBackend(proxy.url(), timeout=0.5, max_backoff=0.3)
        await listener.connect()
        await publisher.connect()
        try:
            await listener.subscribe("room")
            await publisher.publish("room", "first")
            assert (await _next_events(listener, 1, 5))[0].message == "first"
            proxy.freeze()
            started = time.monotonic()
            await asyncio.wait_for(publisher.publish("room", "lost"), 0.2)
            assert time.monotonic() - started < 0.2
            event = (await _next_events(listener, 1, 10))[0]
            assert (event.channel, event.message) == ("room", RESYNC)
            assert publisher.publish_failures == 1
            assert listener.reconnects == 0  # the RESYNC came over the bus, from the publisher
        finally:
            await publisher.disconnect()
            await listener.disconnect()


async def _migrated(fresh_database) -> str:  # type: ignore[no-untyped-def]
    url = await asyncio.to_thread(fresh_database)
    await asyncio.to_thread(upgrade, url)
    return url  # type: ignore[no-any-return]


async def _seqs_until(client: Client, last: int, deadline: float) -> list[int]:
    """Message seqs until ``last`` has arrived, within the loop-time ``deadline``."""
    seqs: list[int] = []
    while last not in seqs:
        remaining = deadline - asyncio.get_running_loop().time()
        frame = await client.recv(max(remaining, 0.001))
        if frame["type"] == "message":
            seqs.append(frame["seq"])
    return seqs


@pytest.mark.slow
async def test_fan_out_through_redis_across_processes(fresh_database, redis_server, tmp_path):
    url = await _migrated(fresh_database)
    env = {"CHAT_BROADCAST_URL": redis_server.url}
    room = f"r-{uuid.uuid4().hex[:8]}"
    with (
        ServerProcess(url, log_path=tmp_path / "a.log", env=env) as a,
        ServerProcess(url, log_path=tmp_path / "b.log", env=env) as b,
    ):
        listeners = [
            await Client.connect(p, room, make_token(f"l{i}")) for i, p in enumerate([a, b])
        ]
        senders = [await Client.connect(p, room, make_token(f"s{i}")) for i, p in enumerate([a, b])]
        redis = Redis.from_url(redis_server.url)
        try:  # each process subscribed once to the room's channel: fan-out goes through Redis
            subscribers = dict(await redis.pubsub_numsub(channel_for(room)))
        finally:
            await redis.aclose()
        assert subscribers[channel_for(room).encode()] == 2
        total = 60
        for i in range(total):
            await senders[i % 2].send(f"m{i}", f"id-{i}")
        for client in listeners:
            seqs: list[int] = []
            while len(seqs) < total:
                frame = await client.recv()
                if frame["type"] == "message":
                    seqs.append(frame["seq"])
            assert seqs == list(range(1, total + 1))
            await client.assert_silent(0.2)
        big = "\U0001f600" * 4000
        await senders[0].send(big, "big")
        for client in listeners:
            assert (await client.recv_type("message"))["body"] == big
        for client in listeners + senders:
            await client.close()


@pytest.mark.slow
async def test_redis_killed_and_restarted_mid_traffic_loses_and_duplicates_nothing(
    fresh_database, redis_server, tmp_path
):
    """Two replicas; Redis SIGKILLed mid-traffic and started again on the same port 2 s later.
    Within 30 s every acked message reaches every client exactly once, in order; acks while
    Redis is down are not held up by it; both replicas log the outage and the recovery."""
    url = await _migrated(fresh_database)
    env = {"CHAT_BROADCAST_URL": redis_server.url}
    room = f"r-{uuid.uuid4().hex[:8]}"
    with (
        ServerProcess(url, log_path=tmp_path / "a.log", env=env) as a,
        ServerProcess(url, log_path=tmp_path / "b.log", env=env) as b,
    ):
        listeners = [
            await Client.connect(p, room, make_token(f"l{i}")) for i, p in enumerate([a, b])
        ]
        senders = [await Client.connect(p, room, make_token(f"s{i}")) for i, p in enumerate([a, b])]
        acked: list[int] = []

        async def send(i: int) -> float:
            started = time.monotonic()
            await senders[i % 2].send(f"m{i}", f"id-{i}")
            ack = await senders[i % 2].recv_type("ack", timeout=10)
            acked.append(ack["seq"])
            return time.monotonic() - started

        for i in range(10):
            await send(i)
        await asyncio.to_thread(redis_server.kill)
        killed = time.monotonic()
        down_latencies = [await send(i) for i in range(10, 20)]
        await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - killed)))
        await asyncio.to_thread(redis_server.start)
        for i in range(20, 30):  # while the replicas find Redis again
            await send(i)
        assert sorted(acked) == list(range(1, 31))
        deadline = asyncio.get_running_loop().time() + 30
        for client in listeners:
            assert await _seqs_until(client, 30, deadline) == list(range(1, 31))
        for client in listeners:
            await client.assert_silent(0.3)
        # the ack depends on the commit, not on the bus (measured: a few ms each)
        assert max(down_latencies) < 2.0, down_latencies
        for client in listeners + senders:
            await client.close()
    for log in (tmp_path / "a.log", tmp_path / "b.log"):
        text = log.read_text()
        assert "redis pub/sub lost" in text
        assert "redis pub/sub reconnect: attempt 1 failed" in text
        assert len(re.findall(r"pub/sub reconnect: attempt \d+ failed", text)) <= 2
        assert "redis pub/sub restored after" in text


@pytest.mark.slow
async def test_a_publish_lost_on_a_silent_bus_reaches_listeners_without_further_traffic(
    fresh_database, redis_server, tmp_path
):
    """Replica A reaches Redis through a proxy that goes silent (no reset); B directly. A send
    to A is acked at once (the commit, not the bus, decides), and B's listener gets it within
    30 s although nothing else is ever sent to the room."""
    url = await _migrated(fresh_database)
    room = f"r-{uuid.uuid4().hex[:8]}"
    async with SilentProxy(redis_server.port) as proxy:
        a = ServerProcess(
            url,
            log_path=tmp_path / "a.log",
            env={
                "CHAT_BROADCAST_URL": proxy.url(),
                "CHAT_REDIS_TIMEOUT": "1",
                "CHAT_REDIS_HEALTH_INTERVAL": "1",
            },
        )
        b = ServerProcess(
            url, log_path=tmp_path / "b.log", env={"CHAT_BROADCAST_URL": redis_server.url}
        )
        try:
            await asyncio.to_thread(a.start)  # the proxy runs on this loop meanwhile
            await asyncio.to_thread(b.start)
            listener = await Client.connect(b, room, make_token("listener"))
            sender = await Client.connect(a, room, make_token("sender"))
            await sender.send("before", "before-1")
            assert (await sender.collect("ack", "message"))["ack"]["seq"] == 1
            assert (await listener.recv_type("message"))["seq"] == 1
            proxy.freeze()
            started = time.monotonic()
            await sender.send("while silent", "silent-1")
            ack = await sender.recv_type("ack", timeout=5)
            ack_latency = time.monotonic() - started
            assert ack["seq"] == 2
            assert ack_latency < 1.0, ack_latency  # never waits for the bus (measured: ms)
            frame = await listener.recv_type("message", timeout=30)
            assert (frame["seq"], frame["body"]) == (2, "while silent")
            await listener.assert_silent(0.3)
            await listener.close()
            await sender.close()
        finally:
            await asyncio.to_thread(a.stop)
            await asyncio.to_thread(b.stop)
    assert "resync notices sent for 1 rooms" in (tmp_path / "a.log").read_text()


@pytest.mark.slow
async def test_membership_changes_travel_the_redis_bus(fresh_database, redis_server, tmp_path):
    """With Redis as the bus, a member item and a room's closing are published after their
    commit: a removal closes the user's socket on the other process (4403), a deletion
    every socket, and the members see the item."""
    url = await _migrated(fresh_database)
    env = {"CHAT_BROADCAST_URL": redis_server.url}
    room = f"r-{uuid.uuid4().hex[:8]}"
    alice, bob = make_token("alice"), make_token("bob")
    with (
        ServerProcess(url, log_path=tmp_path / "a.log", env=env) as a,
        ServerProcess(url, log_path=tmp_path / "b.log", env=env) as b,
    ):
        headers = {"Authorization": f"Bearer {alice}"}
        async with httpx.AsyncClient(base_url=a.http, headers=headers) as rest:
            made = await rest.post(
                "/rooms", json={"name": room, "kind": "private", "members": ["bob"]}
            )
            assert made.status_code == 201
            watcher = await Client.connect(b, room, alice)
            removed = await Client.connect(b, room, bob)
            try:
                assert (await rest.delete(f"/rooms/{room}/members/bob")).status_code == 204
                assert (await close_of(removed, 5))[0] == 4403
                item = await watcher.recv_type("message")
                assert (item["kind"], item["user"], item["action"]) == ("member", "bob", "removed")
                assert (await rest.delete(f"/rooms/{room}")).status_code == 204
                assert (await close_of(watcher, 5))[0] == 4403
            finally:
                await watcher.close()
                await removed.close()
