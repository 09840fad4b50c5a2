"""Connections to PostgreSQL, made by the app lifespan (never at import).

* An asyncpg pool for reads (history, rooms): prepared statements, one statement per read.
* A small SQLAlchemy engine for the schema check at start-up and in ``/readyz`` (Alembic
  speaks SQLAlchemy).
* Writes go through ``service.db.writer`` on a connection of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.config import Settings, to_asyncpg_dsn
from service.errors import Unavailable

TIMEOUT = 10.0
"""Seconds for a connect, a pool checkout or a statement before the database counts as down."""


def create_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        settings.sqlalchemy_url,
        pool_size=1,
        max_overflow=1,
        pool_pre_ping=True,
        hide_parameters=True,  # SQL errors are logged; message bodies must not be
        pool_timeout=TIMEOUT,
        connect_args={"timeout": TIMEOUT, "server_settings": {"application_name": "chat-service"}},
    )


async def create_pool(settings: Settings) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        to_asyncpg_dsn(settings.require_database_url()),
        min_size=1,
        max_size=settings.db_pool_size,
        timeout=TIMEOUT,
        command_timeout=TIMEOUT,
        server_settings={"application_name": "chat-service"},
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


async def connect(dsn: str, application_name: str) -> asyncpg.Connection:
    """A connection of its own; any failure to open it counts as "unavailable"."""
    try:
        return await asyncpg.connect(
            dsn, timeout=TIMEOUT, server_settings={"application_name": application_name}
        )
    except Exception as exc:
        raise _CannotConnect(exc) from exc


@asynccontextmanager
async def reading(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection; "the database is not there" becomes ``Unavailable``, and so does
    any failure to get a connection (refused, timed out, "not currently accepting
    connections"): that is never a bug in the read."""
    try:
        conn = await pool.acquire(timeout=TIMEOUT)
    except Exception as exc:
        raise Unavailable("the database is unavailable, try again") from exc
    try:
        yield conn
    except Exception as exc:
        if is_unavailable(exc):
            raise Unavailable("the database is unavailable, try again") from exc
        raise
    finally:
        await pool.release(conn)
