"""Alembic environment (async). The URL comes from code (``service.db.migrate``) or Settings."""

from __future__ import annotations

import asyncio
import logging.config
from contextlib import ExitStack

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from service.config import Settings, to_sqlalchemy_url
from service.db.migrate import include_name, record_compatibility
from service.db.models import Base
from service.embedded_mode import resolved_settings

config = context.config
if config.config_file_name is not None:
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        include_name=include_name,
        on_version_apply=record_compatibility,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_async_engine(to_sqlalchemy_url(url), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


def run_migrations_online() -> None:
    with ExitStack() as stack:
        url = config.get_main_option("sqlalchemy.url")
        if not url:
            url = stack.enter_context(resolved_settings(Settings())).require_database_url()
        asyncio.run(_run_async(url))


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported")
run_migrations_online()
