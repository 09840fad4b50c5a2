"""A broadcaster backend for Redis pub/sub, with the guarantees of ``ListenBackend``.

For ``CHAT_BROADCAST_URL=redis://...``: messages are still stored in PostgreSQL, and published
to Redis right after commit. broadcaster 0.3.1's ``RedisBackend`` returns from ``subscribe``
before Redis has confirmed it (a message published in between is silently missed) and never
reconnects; redis-py's own pub/sub reconnects behind the caller's back (a restarted Redis has
forgotten the subscriptions, and nobody learns that messages were missed). So this backend
speaks the few commands it needs itself, over connections it owns:

* ``subscribe`` returns only once Redis confirmed the subscription, so the hub's promise
  "anything committed after join is delivered" holds; it never raises: while Redis is down the
  channel is recorded and subscribed on reconnect.
* One supervisor task owns the subscriber connection. A lost connection (an error, EOF, or no
  answer to a ``PING`` while quiet: a silent partition) is reopened with capped, jittered
  backoff for as long as it takes; the loop catches everything but cancellation, so it cannot
  die. Once every channel is subscribed again (confirmed), ``RESYNC`` is emitted on every
  channel and subscribers catch up from the database (``service.realtime.hub``).
* ``publish`` never waits for the bus: it queues the payload and returns, so an ack depends on
  the commit only. One publisher task sends the queue in pipelined batches, each under a
  deadline. A batch that fails or times out (and whatever was queued while the bus is down,
  or beyond the queue's bound) marks its rooms for a resync: a ``RESYNC`` notice is published
  on each such room, retried with backoff until Redis takes it, so the room's listeners on
  every process catch up from the database even if nobody sends to the room again.

Publishing after commit means messages can arrive out of seq order; connections restore the
order by filling holes from the database (``service.realtime.websocket``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from broadcaster import Event

from service.realtime.backend import RESYNC, BroadcastBackend

log = logging.getLogger(__name__)

LOG_EVERY = 10.0
"""Seconds between two log lines about the same outage (the first failure is always logged)."""


class BusError(Exception):
    """Redis answered with an error, or not in the protocol."""


BUS_ERRORS = (OSError, EOFError, TimeoutError, ValueError, BusError, asyncio.LimitOverrunError)
"""What a lost, refused, silent or confused Redis connection raises here."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where and how to connect: ``redis://[user:password@]host[:port][/db]`` or ``rediss://``
    (TLS). Pub/sub ignores the database number."""

    host: str = "127.0.0.1"
    port: int = 6379
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a Redis URL: scheme {parts.scheme!r}")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            tls=parts.scheme == "rediss",
            username=username,
            password=password,
        )


class RespConnection:
    """One Redis connection speaking RESP2, just what pub/sub and PUBLISH need.

    Commands are written whole and at once (``send`` does not await), so tasks sharing the
    connection never interleave bytes. Reads are not cancellation-safe: a connection whose read
    was cancelled is closed, never reused.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, target: RedisTarget, deadline: float) -> RespConnection:
        """Connect (and AUTH) within ``deadline`` seconds."""
        async with asyncio.timeout(deadline):
            reader, writer = await asyncio.open_connection(
                target.host,
                target.port,
                ssl=ssl.create_default_context() if target.tls else None,
            )
            _keepalive(writer.get_extra_info("socket"))
            conn = cls(reader, writer)
            try:
                if target.password is not None:
                    auth = [target.username] if target.username else []
                    conn.send("AUTH", *auth, target.password)
                    await conn.drain()
                    reply = await conn.read()
                    if isinstance(reply, BusError):
                        raise reply
            except BaseException:
                conn.close()
                raise
        return conn

    def send(self, *args: str | bytes) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode() if isinstance(arg, str) else arg
            parts += [b"$%d\r\n" % len(data), data, b"\r\n"]
        self._writer.write(b"".join(parts))

    async def drain(self) -> None:
        await self._writer.drain()

    async def read(self) -> Any:
        """One reply; an error reply is returned as a ``BusError``, not raised (pipelines)."""
        line = await self._reader.readuntil(b"\r\n")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            return BusError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else (await self._reader.readexactly(size + 2))[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [await self.read() for _ in range(size)]
        raise BusError(f"not a Redis reply: {line[:40]!r}")

    def close(self) -> None:
        self._writer.transport.abort()  # no goodbye owed: a broken peer must not delay us


def _keepalive(sock: socket.socket | None) -> None:
    """A dead peer that sends no reset is noticed by the kernel too, not only by PING."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class _Outage:
    """Backoff and rate-limited logging for one kind of connection while Redis is away."""

    def __init__(self, what: str, max_backoff: float) -> None:
        self._what = what
        self._max_backoff = max_backoff
        self._delay = 0.05
        self.attempts = 0
        self._started = 0.0
        self._logged = float("-inf")

    async def failed(self, exc: BaseException) -> None:
        now = asyncio.get_running_loop().time()
        if self.attempts == 0:
            self._started = now
        self.attempts += 1
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            log.warning(
                "redis %s: attempt %d failed (%s); retrying with backoff, down for %.1fs",
                self._what,
                self.attempts,
                exc or type(exc).__name__,
                now - self._started,
            )
        await asyncio.sleep(self._delay * (0.5 + random.random()))  # noqa: S311 - jitter
        self._delay = min(self._delay * 2, self._max_backoff)

    def over(self) -> tuple[int, float]:
        """Ends the outage; returns how many attempts failed and for how long."""
        down = asyncio.get_running_loop().time() - self._started if self.attempts else 0.0
        attempts, self.attempts, self._delay = self.attempts, 0, 0.05
        self._logged = float("-inf")
        return attempts, down


class RedisPubSubBackend(BroadcastBackend):
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        health_interval: float = 5.0,
        max_backoff: float = 5.0,
        publish_queue_limit: int = 10_000,
        publish_batch: int = 256,
    ) -> None:
        self._target = RedisTarget.from_url(url)
        self._timeout = timeout
        self._health_interval = health_interval
        self._max_backoff = max_backoff
        self._queue_limit = publish_queue_limit
        self._batch = publish_batch
        self._channels: set[str] = set()
        self._conn: RespConnection | None = None
        """The subscriber connection while it is up (and every channel is subscribed on it)."""
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._lock = asyncio.Lock()
        """Serializes subscribe/unsubscribe with the (re)subscription of every channel."""
        self._last_reply = 0.0
        self._publisher: RespConnection | None = None
        self._outgoing: deque[tuple[str, str]] = deque()
        self._stale: set[str] = set()
        """Channels whose listeners must resync: a publish to them failed or was dropped."""
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.reconnects = 0
        self.publish_failures = 0
        """Messages whose publish failed or was dropped (their rooms were marked for resync)."""

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def connect(self) -> None:
        self._conn = await RespConnection.open(self._target, self._timeout)  # fail fast at start
        self._tasks = [
            asyncio.create_task(self._supervise(), name="redis-subscriber"),
            asyncio.create_task(self._publish_loop(), name="redis-publisher"),
        ]

    async def disconnect(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._drop()
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    async def subscribe(self, channel: str) -> None:
        async with self._lock:
            self._channels.add(channel)
            conn = self._conn
            if conn is None:
                return  # the reconnect subscribes it, then emits RESYNC
            confirmed = asyncio.get_running_loop().create_future()
            self._confirmations[channel] = confirmed
            try:
                conn.send("SUBSCRIBE", channel)
                async with asyncio.timeout(self._timeout):
                    await conn.drain()
                    await asyncio.shield(confirmed)
            except BUS_ERRORS as exc:
                log.warning("redis SUBSCRIBE %s failed (%r); reconnecting", channel, exc)
                self._drop(conn)  # the reconnect subscribes every channel, then emits RESYNC
            finally:
                self._confirmations.pop(channel, None)

    async def unsubscribe(self, channel: str) -> None:
        async with self._lock:
            self._channels.discard(channel)
            conn = self._conn
            if conn is not None:
                conn.send("UNSUBSCRIBE", channel)  # the reply is read (and ignored) by _read

    async def publish(self, channel: str, message: str) -> None:
        """Queue for the publisher task; never waits for Redis (the ack waits for the commit)."""
        if len(self._outgoing) >= self._queue_limit:
            self._mark_stale(channel)
        else:
            self._outgoing.append((channel, message))
        self._wake.set()

    async def publish_many(self, messages: list[tuple[str, str]]) -> None:
        """Each queued like ``publish``: the publisher task pipelines them anyway."""
        for channel, message in messages:
            await self.publish(channel, message)

    async def next_published(self) -> Event:
        return await self._events.get()

    # --- the subscriber connection ---

    def _drop(self, conn: RespConnection | None = None) -> None:
        """Close the subscriber connection (only if it is still ``conn``, when given)."""
        if self._conn is not None and (conn is None or conn is self._conn):
            self._conn.close()
            self._conn = None
            for confirmed in self._confirmations.values():
                if not confirmed.done():
                    confirmed.set_exception(ConnectionError("the subscriber connection was lost"))

    async def _supervise(self) -> None:
        """Read while connected, reconnect when not; ends only when cancelled."""
        outage = _Outage("pub/sub reconnect", self._max_backoff)
        while True:
            conn = self._conn
            if conn is None:
                try:
                    channels = await self._resubscribe()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # whatever it is, the next attempt may succeed
                    await outage.failed(exc)
                    continue
                attempts, down = outage.over()
                self.reconnects += 1
                log.warning(
                    "redis pub/sub restored after %d failed attempts (%.1fs); resyncing %d "
                    "channels",
                    attempts,
                    down,
                    len(channels),
                )
                for channel in channels:
                    self._events.put_nowait(Event(channel=channel, message=RESYNC))
                continue
            try:
                await self._read(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("redis pub/sub lost (%r); reconnecting", exc)
            self._drop(conn)

    async def _resubscribe(self) -> list[str]:
        """Open a subscriber connection and subscribe every channel, confirmed."""
        async with self._lock:
            conn = await RespConnection.open(self._target, self._timeout)
            try:
                channels = sorted(self._channels)
                if channels:
                    conn.send("SUBSCRIBE", *channels)
                    pending = set(channels)
                    async with asyncio.timeout(self._timeout + len(channels) / 10_000):
                        await conn.drain()
                        while pending:
                            reply = await conn.read()
                            if _kind(reply) == b"subscribe":
                                pending.discard(reply[1].decode())
                            else:
                                self._on_reply(reply)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._last_reply = asyncio.get_running_loop().time()
            return channels

    async def _read(self, conn: RespConnection) -> None:
        """Read until the connection fails, with a PING prober beside it for silence."""
        prober = asyncio.create_task(self._probe(conn), name="redis-pubsub-probe")
        try:
            while True:
                reply = await conn.read()
                self._last_reply = asyncio.get_running_loop().time()
                self._on_reply(reply)
                if prober.done():
                    prober.result()  # raises what the prober found
        finally:
            prober.cancel()

    async def _probe(self, conn: RespConnection) -> None:
        """A quiet connection is asked for a PONG; none within the timeout: it is dead."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(self._health_interval)
                if loop.time() - self._last_reply < self._health_interval:
                    continue
                sent = loop.time()
                conn.send("PING")
                await asyncio.wait_for(conn.drain(), self._timeout)
                await asyncio.sleep(self._timeout)
                if self._last_reply < sent:
                    raise TimeoutError(f"no answer to PING within {self._timeout}s")
        except BUS_ERRORS as exc:
            log.warning("redis pub/sub probe failed (%r)", exc)
            self._drop(conn)  # the reader's read fails at once

    def _on_reply(self, reply: Any) -> None:
        kind = _kind(reply)
        if kind == b"message":
            channel, payload = reply[1].decode(errors="replace"), reply[2].decode(errors="replace")
            self._events.put_nowait(Event(channel=channel, message=payload))
        elif kind == b"subscribe":
            confirmed = self._confirmations.get(reply[1].decode(errors="replace"))
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
        elif isinstance(reply, BusError):
            raise reply
        # unsubscribe confirmations and pongs need nothing

    # --- the publisher connection ---

    def _mark_stale(self, channel: str) -> None:
        self.publish_failures += 1
        self._stale.add(channel)

    async def _publish_loop(self) -> None:
        """Send what is queued; on failure mark its rooms stale and notify them once Redis is
        back. Ends only when cancelled."""
        outage = _Outage("publish", self._max_backoff)
        while True:
            if not self._outgoing and not self._stale:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[tuple[str, str]] = []
            try:
                conn = self._publisher
                if conn is None:
                    conn = self._publisher = await RespConnection.open(self._target, self._timeout)
                if self._stale:
                    stale = sorted(self._stale)
                    await self._pipeline(conn, [(channel, RESYNC) for channel in stale])
                    self._stale.difference_update(stale)
                    attempts, down = outage.over()
                    log.warning(
                        "redis publish: resync notices sent for %d rooms (after %d failed "
                        "attempts, %.1fs)",
                        len(stale),
                        attempts,
                        down,
                    )
                while self._outgoing and len(batch) < self._batch:
                    batch.append(self._outgoing.popleft())
                if batch:
                    await self._pipeline(conn, batch)
                outage.over()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the bus is down: what is queued is told by a resync
                if self._publisher is not None:
                    self._publisher.close()
                    self._publisher = None
                for channel, _ in batch:
                    self._mark_stale(channel)
                while self._outgoing:
                    self._mark_stale(self._outgoing.popleft()[0])
                await outage.failed(exc)

    async def _pipeline(self, conn: RespConnection, items: list[tuple[str, str]]) -> None:
        for channel, message in items:
            conn.send("PUBLISH", channel, message)
        async with asyncio.timeout(self._timeout):
            await conn.drain()
            for _ in items:
                reply = await conn.read()
                if isinstance(reply, BusError):
                    raise reply


def _kind(reply: Any) -> bytes | None:
    if isinstance(reply, list) and reply and isinstance(reply[0], bytes):
        return reply[0]
    return None
