"""The schema exists only through Alembic: up, down, up again, and it matches the models."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from service.config import to_sqlalchemy_url
from service.db.migrate import downgrade, include_name, upgrade
from service.db.models import Base


async def _inspect(url: str):  # type: ignore[no-untyped-def]
    engine = create_async_engine(to_sqlalchemy_url(url))
    try:
        async with engine.connect() as conn:

            def read(sync_conn):  # type: ignore[no-untyped-def]
                tables = set(inspect(sync_conn).get_table_names())
                opts = {"compare_type": True, "include_name": include_name}  # as env.py has it
                context = MigrationContext.configure(sync_conn, opts=opts)
                return tables, compare_metadata(context, Base.metadata)

            return await conn.run_sync(read)
    finally:
        await engine.dispose()


def test_upgrade_downgrade_upgrade(fresh_database):
    url = fresh_database()
    upgrade(url)
    tables, _ = asyncio.run(_inspect(url))
    assert {"room", "message", "alembic_version"} <= tables
    downgrade(url)
    tables, _ = asyncio.run(_inspect(url))
    assert tables <= {"alembic_version"}
    upgrade(url)
    tables, diff = asyncio.run(_inspect(url))
    assert {"room", "message"} <= tables
    assert diff == []


def test_models_and_migrations_agree(database_url):
    _, diff = asyncio.run(_inspect(database_url))
    assert diff == [], f"models and migrations disagree: {diff}"


def test_drift_is_detected(fresh_database):
    """The comparison above can fail: a column the models do not know is reported."""
    url = fresh_database()
    upgrade(url)

    async def add_column() -> None:
        engine = create_async_engine(to_sqlalchemy_url(url))
        async with engine.begin() as conn:
            await conn.exec_driver_sql("ALTER TABLE message ADD COLUMN pinned_at timestamptz")
        await engine.dispose()

    asyncio.run(add_column())
    _, diff = asyncio.run(_inspect(url))
    assert any("pinned_at" in str(d) for d in diff)
