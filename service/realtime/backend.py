"""A broadcaster backend for PostgreSQL LISTEN/NOTIFY that survives real use.

broadcaster 0.3.1's ``PostgresBackend`` runs LISTEN, UNLISTEN and publish over one asyncpg
connection with no lock ("another operation is in progress" when two rooms are joined at once)
and never reconnects (subscribers then wait forever). This backend, plugged in through
``Broadcast(backend=...)``:

* serializes every command on the LISTEN connection with a lock;
* publishes on a second connection, so a publish never waits behind a LISTEN;
* watches the LISTEN connection (termination callback plus a periodic ``SELECT 1``), reopens it
  with capped exponential backoff and LISTENs to every channel again;
* then emits a ``RESYNC`` event on every channel: PostgreSQL does not queue notifications for an
  absent listener, so subscribers must catch up from the database (``service.realtime.hub``).

``subscribe`` never fails: while the connection is down it only records the channel, which the
reconnect LISTENs to before it emits ``RESYNC``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import asyncpg
from broadcaster import Event
from broadcaster._backends.base import BroadcastBackend

log = logging.getLogger(__name__)

RESYNC = "\x00resync"
"""Payload of the synthetic event sent after a reconnect (no real payload starts with NUL)."""


class ListenBackend(BroadcastBackend):
    def __init__(
        self,
        dsn: str,
        *,
        health_interval: float = 5.0,
        health_timeout: float = 3.0,
        max_backoff: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._max_backoff = max_backoff
        self._channels: set[str] = set()
        self._conn: asyncpg.Connection | None = None
        self._publish_conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()
        self._lost = asyncio.Event()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._watchdog: asyncio.Task[None] | None = None
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def connect(self) -> None:
        self._conn = await self._open()
        self._watchdog = asyncio.create_task(self._watch(), name="listen-watchdog")

    async def disconnect(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for conn in (self._conn, self._publish_conn):
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)
        self._conn = self._publish_conn = None

    async def subscribe(self, channel: str) -> None:
        async with self._lock:
            self._channels.add(channel)
            if self.connected:
                try:
                    await self._conn.add_listener(channel, self._on_notify)  # type: ignore[union-attr]
                except (
                    OSError,
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                    asyncpg.InternalClientError,  # "another operation is in progress": dying
                ) as exc:
                    log.warning("LISTEN failed (%s); reconnecting", exc)
                    self._lost.set()

    async def unsubscribe(self, channel: str) -> None:
        async with self._lock:
            self._channels.discard(channel)
            if self.connected:
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await self._conn.remove_listener(channel, self._on_notify)  # type: ignore[union-attr]

    async def publish(self, channel: str, message: str) -> None:
        async with self._publish_lock:
            if self._publish_conn is None or self._publish_conn.is_closed():
                self._publish_conn = await asyncpg.connect(self._dsn)
            await self._publish_conn.execute("SELECT pg_notify($1, $2)", channel, message)

    async def next_published(self) -> Event:
        return await self._events.get()

    async def _open(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._dsn, server_settings={"application_name": "chat-listen"})
        conn.add_termination_listener(self._on_terminated)
        for channel in sorted(self._channels):
            await conn.add_listener(channel, self._on_notify)
        return conn

    def _on_terminated(self, conn: object) -> None:
        if conn is self._conn:  # not the one _reconnect itself just terminated
            self._lost.set()

    def _on_notify(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        self._events.put_nowait(Event(channel=channel, message=payload))

    async def _healthy(self) -> bool:
        if not self.connected:
            return False
        try:
            async with self._lock:
                await asyncio.wait_for(self._conn.fetchval("SELECT 1"), self._health_timeout)  # type: ignore[union-attr]
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        return True

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._health_interval)
            if self._lost.is_set() or not await self._healthy():
                await self._reconnect()

    async def _reconnect(self) -> None:
        log.warning("LISTEN connection lost; reconnecting")
        async with self._lock:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            delay = 0.05
            while True:
                self._lost.clear()
                try:
                    self._conn = await asyncio.wait_for(self._open(), self._health_timeout * 2)
                    break
                except (
                    OSError,
                    TimeoutError,
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                ) as exc:
                    log.warning("LISTEN reconnect failed (%s); retrying in %.2fs", exc, delay)
                    await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter
                    delay = min(delay * 2, self._max_backoff)
            channels = sorted(self._channels)
        self.reconnects += 1
        log.warning("LISTEN connection restored; resyncing %d channels", len(channels))
        for channel in channels:
            self._events.put_nowait(Event(channel=channel, message=RESYNC))
