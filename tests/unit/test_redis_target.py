"""``CHAT_BROADCAST_URL=redis://...`` is parsed by the Redis backend itself (it needs no client
library): credentials, TLS and defaults, and a clear error for anything else."""

from __future__ import annotations

import pytest

from service.realtime.redis_backend import RedisTarget


def test_defaults_and_credentials():
    assert RedisTarget.from_url("redis://") == RedisTarget()
    target = RedisTarget.from_url("rediss://chat:p%40ss%3Aword@redis.internal:6380/3")
    assert (target.host, target.port, target.tls) == ("redis.internal", 6380, True)
    assert (target.username, target.password) == ("chat", "p@ss:word")
    assert RedisTarget.from_url("redis://:secret@h").password == "secret"
    assert RedisTarget.from_url("redis://:secret@h").username is None


@pytest.mark.parametrize("url", ["http://h:6379", "unix:///tmp/redis.sock", "redis://h:99999"])
def test_anything_else_is_refused_clearly(url):
    with pytest.raises(ValueError):
        RedisTarget.from_url(url)
