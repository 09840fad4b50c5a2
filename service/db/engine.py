"""Connections to PostgreSQL, made by the app lifespan (never at import).

* An asyncpg pool for reads (history, rooms): prepared statements, one statement per read.
* A small SQLAlchemy engine for the schema check at start-up and in ``/readyz`` (Alembic
  speaks SQLAlchemy).
* Writes go through ``service.db.writer`` on a connection of their own.

A network path can die without a reset (a failover, a firewall forgetting its state): a
connection then hangs until the kernel gives up, ~15 minutes. So every connection gets TCP
keepalives and ``TCP_USER_TIMEOUT`` (``Keepalive``), every connect and statement a deadline
(``CHAT_DB_TIMEOUT``), and a read that failed for the network drops its connection instead of
giving it back to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.config import Settings, to_asyncpg_dsn
from service.errors import Unavailable

log = logging.getLogger(__name__)

TIMEOUT = 10.0
"""Seconds for a connect, a pool checkout or a statement before the database counts as down
(where no setting says otherwise: the writer, a pool checkout's wait for a free connection)."""


@dataclass(frozen=True, slots=True)
class Keepalive:
    """TCP options for a database connection; the defaults are the settings' defaults.

    asyncpg has no keepalive parameters (libpq's ``keepalives_idle`` and friends are not
    asyncpg's, and ``server_settings`` only sets the server's side), so they are set on the
    connection's socket, which asyncpg exposes only through its transport (``_transport``).
    """

    idle: int = 10
    interval: int = 5
    count: int = 3
    user_timeout: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Keepalive:
        return cls(
            idle=settings.tcp_keepalive_idle,
            interval=settings.tcp_keepalive_interval,
            count=settings.tcp_keepalive_count,
            user_timeout=settings.tcp_user_timeout,
        )

    def apply(self, conn: asyncpg.Connection) -> None:
        """Set the options on ``conn``'s socket (a Unix socket has none to set)."""
        transport = getattr(conn, "_transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
        for name, value in (
            ("TCP_KEEPIDLE", self.idle),
            ("TCP_KEEPINTVL", self.interval),
            ("TCP_KEEPCNT", self.count),
            ("TCP_USER_TIMEOUT", int(self.user_timeout * 1000)),  # milliseconds
        ):
            if hasattr(socket, name):  # Linux has them all; others keep their defaults
                options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
        for level, option, value in options:
            try:
                sock.setsockopt(level, option, value)
            except OSError as exc:  # pragma: no cover - a kernel without the option
                log.warning("cannot set TCP option %s on a database connection: %s", option, exc)


DEFAULT_KEEPALIVE = Keepalive()


def create_engine(settings: Settings) -> AsyncEngine:
    """Two connections at most however many ``/readyz`` calls arrive (anyone may ask); a
    connection whose check was cut off by its deadline is replaced, not reused."""
    dsn = to_asyncpg_dsn(settings.require_database_url())
    keepalive = Keepalive.from_settings(settings)

    async def open_connection() -> asyncpg.Connection:
        conn = await asyncpg.connect(
            dsn,
            timeout=settings.db_timeout,
            command_timeout=settings.db_timeout,
            server_settings={"application_name": "chat-service"},
        )
        keepalive.apply(conn)
        return conn

    return create_async_engine(
        settings.sqlalchemy_url,
        pool_size=1,
        max_overflow=1,
        pool_pre_ping=True,
        hide_parameters=True,  # SQL errors are logged; message bodies must not be
        pool_timeout=settings.db_timeout,
        async_creator=open_connection,
    )


GENERIC_PLANS = {"plan_cache_mode": "force_generic_plan"}
"""The reads' statements are planned once per connection, not once per execution. PostgreSQL
otherwise re-plans a prepared statement for each execution while a plan made for its
parameters looks cheaper than a generic one, as it always does for the history reads (their
``LIMIT $4``), and planning them costs more than running them: it inlines
``chat_message_json`` (migrations 0004, 0005), parsing its body every time. Measured on a
REST page of a 200,000-message room (``EXPLAIN``-free, asyncpg round trip, median): 460-600 µs
re-planned, 160-190 µs generic. Every read here is an index range scan of one room whatever its
parameters, so the generic plan is the plan.

The writer's connection too (``connect``): ``chat_post_messages`` stores a batch of ten or more
messages with one statement (migration 0007), which a custom plan would re-plan at every call,
for about a third of its cost at a batch of sixteen (callgrind)."""


def session_settings(settings: Settings) -> dict[str, str]:
    """What every connection that stores stream items sets: with ``CHAT_WEBHOOK_URL``, the
    switch that makes migration 0009's trigger queue them for the global webhook. Per
    connection, so a replica without the URL (or an older release) queues nothing for it."""
    return {"chat.webhook": "on"} if settings.webhook_url else {}


async def create_pool(settings: Settings) -> asyncpg.Pool:
    keepalive = Keepalive.from_settings(settings)

    async def init(conn: asyncpg.Connection) -> None:
        keepalive.apply(conn)

    return await asyncpg.create_pool(
        to_asyncpg_dsn(settings.require_database_url()),
        min_size=1,
        max_size=settings.db_pool_size,
        timeout=settings.db_timeout,
        command_timeout=settings.db_timeout,
        server_settings={
            "application_name": "chat-service",
            **GENERIC_PLANS,
            **session_settings(settings),
        },
        init=init,
        reset=_keep_session,
    )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """The pool's reset after each checkout, instead of asyncpg's ``RESET ALL; UNLISTEN *;
    ...``: a read leaves no session state (no SET, LISTEN, lock or cursor), and that query was
    one more round trip per read (a pooled history query: 1.04 -> 0.79 ms). asyncpg still
    rolls back a transaction left open."""


class _CannotConnect(Exception):
    """Opening a connection failed, for whatever reason (refused, not allowed, auth)."""


def is_unavailable(exc: BaseException) -> bool:
    """The database is down, restarting or unreachable (retry later), as opposed to a bug."""
    unreachable = (
        _CannotConnect,
        OSError,
        TimeoutError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
    )
    if isinstance(exc, unreachable):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        # 08 connection exception, 53 insufficient resources, 57 operator intervention
        # (shutdown, restart); 40001/40P01 never happen here but would be worth a retry too.
        state = getattr(exc, "sqlstate", "") or ""
        return state[:2] in ("08", "53", "57") or state in ("40001", "40P01")
    return False


def rolled_back(exc: BaseException | None) -> bool:
    """The server answered the statement with an ERROR (not FATAL): its transaction rolled
    back. A dropped connection (``ConnectionDoesNotExistError``) has no severity."""
    if not isinstance(exc, asyncpg.PostgresError):
        return False
    severity = getattr(exc, "severity_en", None) or getattr(exc, "severity", None)
    return severity == "ERROR"


async def connect(
    dsn: str,
    application_name: str,
    *,
    keepalive: Keepalive = DEFAULT_KEEPALIVE,
    extra_settings: Mapping[str, str] | None = None,
) -> asyncpg.Connection:
    """A connection of its own, with keepalives; any failure to open it counts as
    "unavailable"."""
    try:
        conn = await asyncpg.connect(
            dsn,
            timeout=TIMEOUT,
            server_settings={
                "application_name": application_name,
                **GENERIC_PLANS,
                **(extra_settings or {}),
            },
        )
    except Exception as exc:
        raise _CannotConnect(exc) from exc
    keepalive.apply(conn)
    return conn


@asynccontextmanager
async def reading(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
    """A pooled connection; "the database is not there" becomes ``Unavailable``, and so does
    any failure to get a connection (refused, timed out, "not currently accepting
    connections"): that is never a bug in the read."""
    try:
        conn = await pool.acquire(timeout=TIMEOUT)
    except Exception as exc:
        raise Unavailable("the database is unavailable, try again") from exc
    try:
        yield conn
    except asyncio.CancelledError:
        # Cut off mid-read (a deadline, a client gone): the answer may still be on its way,
        # or never come (a silent partition). Dropped, so the next read gets a sound one.
        conn.terminate()
        raise
    except Exception as exc:
        if is_unavailable(exc):
            if not isinstance(exc, asyncpg.PostgresError):
                # No answer (a deadline, a broken socket): the connection may wait forever
                # for one (a silent partition), so it is dropped, not reused.
                conn.terminate()
            raise Unavailable("the database is unavailable, try again") from exc
        raise
    finally:
        await pool.release(conn)
