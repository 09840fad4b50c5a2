"""``CHAT_BROADCAST_URL=redis://``: messages are stored in PostgreSQL and fanned out through Redis
pub/sub, with the same guarantees: every message, exactly once, in seq order, on every process.
Skipped where no Redis server answers on 127.0.0.1:6379 (or CHAT_TEST_REDIS_URL)."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from service.db.migrate import upgrade
from service.realtime.envelope import channel_for
from tests.support import Client, ServerProcess, make_token

REDIS_URL = os.environ.get("CHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _redis_up() -> bool:
    parts = urlsplit(REDIS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 0.5):
            return True
    except OSError:
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _redis_up(), reason="no Redis server to broadcast through"),
]


async def test_fan_out_through_redis_across_processes(fresh_database, tmp_path):
    url = await asyncio.to_thread(fresh_database)
    await asyncio.to_thread(upgrade, url)
    env = {"CHAT_BROADCAST_URL": REDIS_URL}
    room = f"r-{uuid.uuid4().hex[:8]}"
    with (
        ServerProcess(url, log_path=tmp_path / "a.log", env=env) as a,
        ServerProcess(url, log_path=tmp_path / "b.log", env=env) as b,
    ):
        listeners = [
            await Client.connect(p, room, make_token(f"l{i}")) for i, p in enumerate([a, b])
        ]
        senders = [await Client.connect(p, room, make_token(f"s{i}")) for i, p in enumerate([a, b])]
        redis = Redis.from_url(REDIS_URL)
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
