"""Fixtures: a real PostgreSQL (embedded unless CHAT_TEST_DATABASE_URL is set), a fresh migrated
database per test session, and real ``chat-service serve`` processes on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from service.db.migrate import upgrade
from tests.support import JWT_SECRET, ServerProcess, database_url_for, make_token


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A PostgreSQL server: CHAT_TEST_DATABASE_URL's, or an embedded one for the session."""
    url = os.environ.get("CHAT_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from service.db.embedded import EmbeddedPostgres

    data_dir = Path(tempfile.mkdtemp(prefix="chat-test-pg-"))
    try:
        with EmbeddedPostgres(data_dir) as server:
            yield server.superuser_url
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def _create_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def fresh_database(pg_server_url: str) -> Iterator[object]:
    """A factory of empty databases on the test server, dropped at the end of the session
    on CHAT_TEST_DATABASE_URL's server (an embedded one is deleted whole: dropping its databases
    first only costs time, up to seconds a drop)."""
    created: list[str] = []

    def make() -> str:
        name = f"chat_test_{uuid.uuid4().hex[:12]}"
        asyncio.run(_create_database(pg_server_url, name))
        created.append(name)
        return database_url_for(pg_server_url, name)

    yield make
    if os.environ.get("CHAT_TEST_DATABASE_URL"):
        for name in created:
            asyncio.run(_drop_database(pg_server_url, name))


@pytest.fixture(scope="session")
def database_url(fresh_database) -> str:  # type: ignore[no-untyped-def]
    """One migrated database shared by the servers of the session (tests use unique rooms)."""
    url = fresh_database()
    upgrade(url)
    return url


@pytest.fixture
def own_database(fresh_database) -> str:  # type: ignore[no-untyped-def]
    """A migrated database of the test's own, for faults that would disturb other tests."""
    url = fresh_database()
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def server_log_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chat-test-logs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def server(database_url: str, server_log_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(database_url, log_path=server_log_dir / "server-a.log") as proc:
        yield proc


@pytest.fixture(scope="session")
def second_server(database_url: str, server_log_dir: Path) -> Iterator[ServerProcess]:
    """Another process on the same database: fan-out between them goes through LISTEN/NOTIFY."""
    with ServerProcess(database_url, log_path=server_log_dir / "server-b.log") as proc:
        yield proc


@pytest.fixture
def spawn(tmp_path) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """Start extra servers (stopped at the end): ``spawn(database_url, **env)``."""
    started: list[ServerProcess] = []

    def start(database_url: str, **env: str) -> ServerProcess:
        proc = ServerProcess(
            database_url, log_path=tmp_path / f"server-{len(started)}.log", env=env
        )
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop(signal.SIGKILL)


@pytest.fixture
def room() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def alice() -> str:
    return make_token("alice")


@pytest.fixture
def bob() -> str:
    return make_token("bob")


__all__ = ["JWT_SECRET"]
