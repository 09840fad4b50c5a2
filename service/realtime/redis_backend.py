"""A broadcaster backend for Redis pub/sub, with the guarantees of ``ListenBackend``.

For ``CHAT_BROADCAST_URL=redis://...``: messages are still stored in PostgreSQL, and published
to Redis right after commit. broadcaster 0.3.1's ``RedisBackend`` returns from ``subscribe``
before Redis has confirmed it (a message published in between is silently missed) and never
reconnects. This one:

* returns from ``subscribe`` only once Redis confirmed the subscription, so the hub's promise
  "anything committed after join is delivered" holds;
* reopens a lost connection with capped backoff, subscribes again, then emits ``RESYNC`` on
  every channel so subscribers catch up from the database;
* never raises from ``subscribe``: while Redis is down the channel is recorded and subscribed on
  reconnect (followed by ``RESYNC``).

Publishing after commit means messages can arrive out of seq order; connections restore the
order by filling holes from the database (``service.realtime.websocket``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

from broadcaster import Event
from broadcaster._backends.base import BroadcastBackend
from redis import asyncio as redis
from redis.exceptions import RedisError

from service.realtime.backend import RESYNC

log = logging.getLogger(__name__)


class RedisPubSubBackend(BroadcastBackend):
    def __init__(self, url: str, *, confirm_timeout: float = 5.0, max_backoff: float = 5.0) -> None:
        self._url = url
        self._confirm_timeout = confirm_timeout
        self._max_backoff = max_backoff
        self._client: Any = None
        self._pubsub: Any = None
        self._channels: set[str] = set()
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self.connected = False
        self.reconnects = 0

    async def connect(self) -> None:
        self._client = redis.Redis.from_url(self._url)
        await self._client.ping()
        self._pubsub = self._client.pubsub()
        self.connected = True
        self._reader = asyncio.create_task(self._read(), name="redis-pubsub-reader")

    async def disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()
            await self._client.aclose()

    async def subscribe(self, channel: str) -> None:
        async with self._lock:
            self._channels.add(channel)
            if not self.connected:
                return  # subscribed on reconnect, followed by RESYNC
            confirmed = asyncio.get_running_loop().create_future()
            self._confirmations[channel] = confirmed
            try:
                await self._pubsub.subscribe(channel)
                await asyncio.wait_for(asyncio.shield(confirmed), self._confirm_timeout)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("SUBSCRIBE %s failed (%s); it is retried on reconnect", channel, exc)
            finally:
                self._confirmations.pop(channel, None)

    async def unsubscribe(self, channel: str) -> None:
        async with self._lock:
            self._channels.discard(channel)
            if self.connected:
                with contextlib.suppress(RedisError, OSError):
                    await self._pubsub.unsubscribe(channel)

    async def publish(self, channel: str, message: str) -> None:
        await self._client.publish(channel, message)

    async def next_published(self) -> Event:
        return await self._events.get()

    async def _read(self) -> None:
        delay = 0.05
        while True:
            try:
                if not self._pubsub.subscribed:
                    await asyncio.sleep(0.05)  # redis-py reads nothing before a SUBSCRIBE
                    continue
                message = await self._pubsub.get_message(timeout=1.0)
                delay = 0.05
            except (RedisError, OSError) as exc:
                self.connected = False
                log.warning("redis pub/sub lost (%s); reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter
                delay = min(delay * 2, self._max_backoff)
                await self._resubscribe()
                continue
            if message is None:
                continue
            channel = message["channel"].decode()
            if message["type"] == "subscribe":
                confirmed = self._confirmations.get(channel)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
            elif message["type"] == "message":
                self._events.put_nowait(Event(channel=channel, message=message["data"].decode()))

    async def _resubscribe(self) -> None:
        async with self._lock:
            try:
                await self._pubsub.aclose()
                self._pubsub = self._client.pubsub()
                channels = sorted(self._channels)
                if channels:
                    await self._pubsub.subscribe(*channels)
            except (RedisError, OSError):
                return  # the reader loop tries again
            self.connected = True
        self.reconnects += 1
        for channel in channels:
            self._events.put_nowait(Event(channel=channel, message=RESYNC))
