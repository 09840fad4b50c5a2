"""Engine and sessionmaker factories: called from the app lifespan, never at import."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service.config import Settings
from service.errors import Unavailable

SessionMaker = async_sessionmaker[AsyncSession]


def create_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        settings.sqlalchemy_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=True,
        hide_parameters=True,  # SQL errors are logged; message bodies must not be
        pool_timeout=10,
        connect_args={"timeout": 10, "server_settings": {"application_name": "chat-service"}},
    )


def create_sessionmaker(engine: AsyncEngine) -> SessionMaker:
    return async_sessionmaker(engine, expire_on_commit=False)


@contextmanager
def translate_db_errors() -> Iterator[None]:
    """Turn "the database is not there" into ``Unavailable``; everything else stays a bug."""
    try:
        yield
    except (TimeoutError, OSError, sa_exc.TimeoutError, sa_exc.InterfaceError) as exc:
        raise Unavailable("the database is unavailable, try again") from exc
    except sa_exc.DBAPIError as exc:
        if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError):
            raise Unavailable("the database is unavailable, try again") from exc
        orig = getattr(exc, "orig", None)
        if "ConnectionDoesNotExist" in type(orig).__name__ or "CannotConnectNow" in repr(orig):
            raise Unavailable("the database is unavailable, try again") from exc
        raise
