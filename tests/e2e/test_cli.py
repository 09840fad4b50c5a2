"""The CLI as an operator uses it, and the quick start: ``chat-service serve`` with no database
URL runs an embedded PostgreSQL, keeps its data, and leaves no postgres behind when it exits."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import jwt
import pytest

from tests.support import JWT_SECRET, Client, EmbeddedServer, free_port

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "service"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    return {**env, **extra}


def test_token_command_prints_a_token_the_service_accepts():
    out = subprocess.run(
        [*CLI, "token", "alice", "--ttl", "120", "--name", "Alice"],
        env=_env(CHAT_JWT_SECRET=JWT_SECRET, CHAT_DATABASE_URL="postgresql://unused/x"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    claims = jwt.decode(out, JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["name"] == "Alice"
    assert 100 < claims["exp"] - time.time() <= 121


def test_service_refuses_to_start_without_jwt_settings(database_url):
    result = subprocess.run(
        [*CLI, "serve", "--port", str(free_port())],
        env=_env(CHAT_DATABASE_URL=database_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "CHAT_JWT_SECRET" in result.stderr


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


def test_migrate_command_and_plain_alembic(fresh_database):
    url = fresh_database()
    subprocess.run(
        [*CLI, "migrate"], env=_env(CHAT_DATABASE_URL=url, CHAT_JWT_SECRET=JWT_SECRET), check=True
    )
    assert {"room", "message", "alembic_version"} <= asyncio.run(_tables(url))

    other = fresh_database()
    alembic = Path(sys.executable).with_name("alembic")
    subprocess.run(
        [str(alembic), "upgrade", "head"],
        cwd=REPO,
        env=_env(CHAT_DATABASE_URL=other, CHAT_JWT_SECRET=JWT_SECRET),
        check=True,
    )
    assert {"room", "message"} <= asyncio.run(_tables(other))


def _postgres_pids(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "postgres" in cmdline and needle in cmdline:
            pids.append(int(entry.name))
    return pids


def _wait_no_postgres(needle: str, timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _postgres_pids(needle)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chat-quickstart-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
async def test_quick_start_with_embedded_postgres(data_dir, tmp_path):
    first = EmbeddedServer(tmp_path / "first.log", data_dir=data_dir)
    first.start()
    try:
        assert "<html" in httpx.get(f"{first.http}/").text.lower()
        token = httpx.post(f"{first.http}/auth/dev-token", json={"user": "newcomer"}).json()[
            "token"
        ]
        async with await Client.connect(first, "lobby", token) as client:
            await client.send("kept across restarts", "q-1")
            assert (await client.recv_type("ack"))["seq"] == 1
        assert "demo page at http://127.0.0.1" in (tmp_path / "first.log").read_text()
    finally:
        assert first.stop(signal.SIGTERM) == 0
    assert _wait_no_postgres(str(data_dir)) == []

    # Second run: same data and secret (the old token still works), then a hard kill.
    second = EmbeddedServer(tmp_path / "second.log", data_dir=data_dir)
    started = time.monotonic()
    second.start()
    restart_seconds = time.monotonic() - started
    try:
        async with await Client.connect(second, "lobby", token) as client:
            assert [m["body"] for m in client.history] == ["kept across restarts"]
        minted = subprocess.run(
            [*CLI, "token", "ops"],
            env=_env(CHAT_DATA_DIR=str(data_dir)),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        r = httpx.get(f"{second.http}/rooms", headers={"Authorization": f"Bearer {minted}"})
        assert r.status_code == 200 and r.json()["rooms"][0]["name"] == "lobby"
    finally:
        second.stop(signal.SIGKILL)
    assert _wait_no_postgres(str(data_dir)) == [], "postgres outlived a kill -9 of the service"
    print(f"embedded restart to healthy: {restart_seconds:.2f}s")
