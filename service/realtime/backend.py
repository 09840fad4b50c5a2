"""A broadcaster backend for PostgreSQL LISTEN/NOTIFY that survives real use.

broadcaster 0.3.1's ``PostgresBackend`` runs LISTEN, UNLISTEN and publish over one asyncpg
connection with no lock ("another operation is in progress" when two rooms are joined at once)
and never reconnects (subscribers then wait forever). This backend, plugged in through
``Broadcast(backend=...)``:

* serializes every command on the LISTEN connection with a lock, and gives each command a
  deadline (``timeout``): a network path that dies without a reset answers nothing, ever;
* publishes on a second connection, so a publish never waits behind a LISTEN;
* watches the LISTEN connection: a termination callback, and a ``SELECT 1`` every
  ``probe_interval`` while no other command is in flight (a command in flight is the probe: it
  has the same deadline), so the probe never queues behind a stuck LISTEN;
* drops a connection whose command missed its deadline (``on_silence`` is told, so the app can
  retire its pooled connections, which crossed the same path), reopens it with capped
  exponential backoff and LISTENs to every channel again, without holding the lock while it
  waits, so joining a room never hangs behind the reconnect;
* then emits a ``RESYNC`` event on every channel: PostgreSQL does not queue notifications for an
  absent listener, so subscribers must catch up from the database (``service.realtime.hub``).

``subscribe`` never fails: while the connection is down it only records the channel, which the
reconnect LISTENs to before it emits ``RESYNC``. ``connected`` (``/readyz``, ``chat_listen_up``)
is false while the connection is down, and as soon as a command on it has been unanswered for
half its deadline: a deaf process says so before the deadline runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeGuard, TypeVar

import asyncpg
from broadcaster import Event

try:  # broadcaster's public name for it (its __all__, 0.3.0 and 0.3.1)
    from broadcaster import BroadcastBackend as BroadcastBackend  # re-exported: redis_backend
except ImportError:  # a release that stops exporting it: Broadcast(backend=...) duck-types
    BroadcastBackend = object  # type: ignore[misc,assignment]

from service.db.engine import DEFAULT_KEEPALIVE, Keepalive

log = logging.getLogger(__name__)

RESYNC = "\x00resync"
"""Payload of the synthetic event sent after a reconnect (no real payload starts with NUL)."""

_T = TypeVar("_T")

_NETWORK_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # "another operation is in progress": dying
)


class ListenBackend(BroadcastBackend):
    def __init__(
        self,
        dsn: str,
        *,
        probe_interval: float = 2.0,
        timeout: float = 3.0,
        connect_timeout: float = 5.0,
        max_backoff: float = 5.0,
        keepalive: Keepalive = DEFAULT_KEEPALIVE,
        on_silence: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._dsn = dsn
        self._probe_interval = probe_interval
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_backoff = max_backoff
        self._keepalive = keepalive
        self._on_silence = on_silence
        """Called when a command went unanswered past its deadline: the network path is
        suspect. Not when the server ended the connection (it answered: the path works)."""
        self._channels: set[str] = set()
        self._conn: asyncpg.Connection | None = None
        self._publish_conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()
        self._busy_since: float | None = None
        """When the command in flight on the LISTEN connection was sent (monotonic)."""
        self._lost = asyncio.Event()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._watchdog: asyncio.Task[None] | None = None
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """Up, and not sitting on a command unanswered for half its deadline."""
        if not self._usable(self._conn):
            return False
        since = self._busy_since
        return since is None or time.monotonic() - since < self._timeout / 2

    async def connect(self) -> None:
        await self._open()
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
                conn.terminate()  # no-op once closed; a silent peer never answers the close
        self._conn = self._publish_conn = None

    async def subscribe(self, channel: str) -> None:
        async with self._lock:
            self._channels.add(channel)
            conn = self._conn
            if self._usable(conn):
                try:
                    await self._command(conn.add_listener(channel, self._on_notify))
                except _NETWORK_ERRORS as exc:
                    await self._drop(conn, f"LISTEN failed ({_describe(exc)})", exc)

    async def unsubscribe(self, channel: str) -> None:
        async with self._lock:
            self._channels.discard(channel)
            conn = self._conn
            if self._usable(conn):
                try:
                    await self._command(conn.remove_listener(channel, self._on_notify))
                except _NETWORK_ERRORS as exc:
                    await self._drop(conn, f"UNLISTEN failed ({_describe(exc)})", exc)

    async def publish(self, channel: str, message: str) -> None:
        await self._notify("SELECT pg_notify($1, $2)", channel, message)

    async def publish_many(self, messages: list[tuple[str, str]]) -> None:
        """``(channel, message)`` pairs in one transaction: one commit, and one wake-up of
        every listening connection of the database, where a ``publish`` each costs one of each
        per message (and a NOTIFY's commit takes a lock that every NOTIFYing commit takes, the
        writer's included). Identical pairs are delivered once (PostgreSQL folds them)."""
        if messages:
            await self._notify(
                "SELECT pg_notify(c, m) FROM unnest($1::text[], $2::text[])"
                " WITH ORDINALITY AS t(c, m, n) ORDER BY n",
                [channel for channel, _ in messages],
                [message for _, message in messages],
            )

    async def _notify(self, query: str, *args: object) -> None:
        """Within one deadline, the wait for the connection included; a connection that
        missed it is dropped (its next publish opens a new one)."""
        async with asyncio.timeout(self._timeout):
            async with self._publish_lock:
                conn = self._publish_conn
                if conn is None or conn.is_closed():
                    conn = self._publish_conn = await self._connect("chat-publish")
                try:
                    await conn.execute(query, *args)
                except asyncpg.PostgresError:
                    raise  # the server answered: the connection is fine
                except BaseException:
                    conn.terminate()
                    self._publish_conn = None
                    raise

    async def next_published(self) -> Event:
        return await self._events.get()

    @staticmethod
    def _usable(conn: asyncpg.Connection | None) -> TypeGuard[asyncpg.Connection]:
        return conn is not None and not conn.is_closed()

    async def _command(self, operation: Awaitable[_T]) -> _T:
        """One command on the LISTEN connection (the caller holds the lock), with its deadline."""
        self._busy_since = time.monotonic()
        try:
            return await asyncio.wait_for(operation, self._timeout)
        finally:
            self._busy_since = None

    async def _connect(self, application_name: str) -> asyncpg.Connection:
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            server_settings={"application_name": application_name},
        )
        self._keepalive.apply(conn)
        return conn

    async def _open(self) -> list[str]:
        """Open a LISTEN connection, listen to every channel and make it the current one;
        returns the channels. Only the LISTENs hold the lock: a join while it connects only
        records its channel, which the LISTENs include; one during the LISTENs waits for them,
        then LISTENs on the new connection itself."""
        conn = await self._connect("chat-listen")
        try:
            conn.add_termination_listener(self._on_terminated)
            async with self._lock:
                channels = sorted(self._channels)
                for channel in channels:
                    await self._command(conn.add_listener(channel, self._on_notify))
                self._conn = conn
        except BaseException:
            conn.terminate()
            raise
        return channels

    async def _drop(
        self, conn: asyncpg.Connection | None, reason: str, exc: BaseException | None = None
    ) -> None:
        """Give up on ``conn`` now: terminating it fails whatever waits on it at once; the
        watchdog reconnects."""
        if conn is None or conn is not self._conn:
            return  # already dropped
        log.warning("LISTEN connection lost: %s; reconnecting", reason)
        self._conn = None
        conn.terminate()
        self._lost.set()
        if isinstance(exc, TimeoutError) and self._on_silence is not None:
            try:
                await self._on_silence()
            except Exception:
                log.exception("on_silence failed")

    def _on_terminated(self, conn: object) -> None:
        if conn is self._conn:  # not one that was dropped on purpose
            self._lost.set()

    def _on_notify(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        # A str: asyncpg's stubs say object for every listener's payload.
        self._events.put_nowait(Event(channel=channel, message=payload))  # type: ignore[arg-type]

    async def _probe(self) -> None:
        """``SELECT 1`` with the commands' deadline; skipped while a command is in flight (it
        has the same deadline and drops the connection if it misses it)."""
        conn = self._conn
        if conn is None or self._lock.locked():
            return
        async with self._lock:  # free: taken at once, nothing queues
            if conn is not self._conn:
                return
            try:
                await self._command(conn.fetchval("SELECT 1"))
            except _NETWORK_ERRORS as exc:
                await self._drop(conn, f"probe failed ({_describe(exc)})", exc)

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._probe_interval)
            if self._lost.is_set() or not self._usable(self._conn):
                await self._reconnect()
            else:
                await self._probe()

    async def _reconnect(self) -> None:
        await self._drop(self._conn, "connection closed")
        delay = 0.05
        while True:
            self._lost.clear()
            try:
                channels = await self._open()
                break
            except _NETWORK_ERRORS as exc:
                log.warning(
                    "LISTEN reconnect failed (%s); retrying in %.2fs", _describe(exc), delay
                )
                await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter
                delay = min(delay * 2, self._max_backoff)
        self.reconnects += 1
        log.warning("LISTEN connection restored; resyncing %d channels", len(channels))
        for channel in channels:
            self._events.put_nowait(Event(channel=channel, message=RESYNC))


def _describe(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
