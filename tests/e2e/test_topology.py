"""The docker-compose topology without Docker: PostgreSQL, ``chat-service migrate``, two
``chat-service serve`` replicas and nginx with the very nginx.conf the compose file mounts, all
on loopback. Messages cross between clients that nginx put on different replicas."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.support import JWT_SECRET, RECV_TIMEOUT, Client, ServerProcess, free_port, make_token

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
NGINX_CONF = REPO / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_file_is_valid():
    env = {**os.environ, "POSTGRES_PASSWORD": "pw", "CHAT_JWT_SECRET": secrets.token_urlsafe(48)}
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for service in ("db", "migrate", "app1", "app2", "lb"):
        assert f"  {service}:" in result.stdout
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf" in COMPOSE.read_text()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_refuses_to_start_with_the_example_env_file(tmp_path):
    """``cp .env.example .env && docker compose up`` stops at the empty secrets; a placeholder
    put there instead is refused by the service itself (tests/e2e/test_safe_defaults.py)."""
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    env = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "CHAT_JWT_SECRET")}

    def config() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "config"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    refused = config()
    assert refused.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in refused.stderr
    text = (tmp_path / ".env").read_text()
    text = text.replace("POSTGRES_PASSWORD=\n", f"POSTGRES_PASSWORD={secrets.token_urlsafe(24)}\n")
    (tmp_path / ".env").write_text(text)
    refused = config()
    assert refused.returncode != 0 and "set CHAT_JWT_SECRET in .env" in refused.stderr
    text = text.replace("CHAT_JWT_SECRET=\n", f"CHAT_JWT_SECRET={secrets.token_urlsafe(48)}\n")
    (tmp_path / ".env").write_text(text)
    accepted = config()
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.count('CHAT_DEV_AUTH: "false"') == 3  # migrate, app1, app2


@pytest.fixture
def nginx(tmp_path) -> Iterator[object]:  # type: ignore[no-untyped-def]
    if NGINX is None:
        pytest.skip("nginx not installed")
    started: list[subprocess.Popen[bytes]] = []

    def start(upstreams: list[int]) -> int:
        port = free_port()
        conf = NGINX_CONF.read_text()
        conf = conf.replace("server app1:8000", f"server 127.0.0.1:{upstreams[0]}")
        conf = conf.replace("server app2:8000", f"server 127.0.0.1:{upstreams[1]}")
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        conf = conf.replace("/tmp/nginx", str(tmp_path / "nginx"))  # noqa: S108 - the conf's path
        assert "app1" not in conf and "app2" not in conf
        path = tmp_path / "nginx.conf"
        path.write_text(conf)
        with (tmp_path / "nginx.log").open("wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [NGINX, "-c", str(path), "-p", str(tmp_path), "-g", "daemon off;"], stderr=log
            )
        started.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return port
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError((tmp_path / "nginx.log").read_text())

    yield start
    for proc in started:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(10)


class _Lb:
    def __init__(self, port: int) -> None:
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"


def _connections(replica: ServerProcess) -> float:
    for line in httpx.get(f"{replica.http}/metrics").text.splitlines():
        if line.startswith("chat_connections "):
            return float(line.split()[1])
    raise AssertionError("no chat_connections metric")


async def test_messages_cross_replicas_behind_nginx(fresh_database, nginx, tmp_path, room):
    url = await asyncio.to_thread(fresh_database)  # it runs an event loop of its own
    env = {**os.environ, "CHAT_DATABASE_URL": url, "CHAT_JWT_SECRET": JWT_SECRET}
    subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, check=True)
    with (
        ServerProcess(url, log_path=tmp_path / "app1.log") as app1,
        ServerProcess(url, log_path=tmp_path / "app2.log") as app2,
    ):
        lb = _Lb(nginx([app1.port, app2.port]))
        clients = [await Client.connect(lb, room, make_token(f"user-{i}")) for i in range(4)]
        assert _connections(app1) >= 1 and _connections(app2) >= 1  # spread over both
        for i, sender in enumerate(clients):
            await sender.send(f"hello from {i}", f"lb-{i}")
        for client in clients:
            bodies = []
            while len(bodies) < 4:
                frame = await client.recv()
                if frame["type"] == "message":
                    bodies.append(frame["body"])
            assert sorted(bodies) == sorted(f"hello from {i}" for i in range(4))
            await client.close()
        r = httpx.get(
            f"{lb.http}/rooms/{room}/messages",
            headers={"Authorization": f"Bearer {make_token('reader')}"},
        )
        assert [m["seq"] for m in r.json()["messages"]] == [1, 2, 3, 4]
        assert httpx.get(f"{lb.http}/readyz").status_code == 200


async def test_the_demo_pages_cookie_login_passes_the_origin_check_behind_nginx(
    database_url, nginx, tmp_path, room
):
    """A browser on the service's own page, through the load balancer: the session cookie and
    an Origin with nginx's port; the service must see the same host and port in Host."""
    with (
        ServerProcess(database_url, log_path=tmp_path / "app1.log") as app1,
        ServerProcess(database_url, log_path=tmp_path / "app2.log") as app2,
    ):
        port = nginx([app1.port, app2.port])
        lb = _Lb(port)
        own_page = {"Origin": f"http://127.0.0.1:{port}", "Cookie": f"session={make_token('web')}"}
        for _ in range(2):  # one websocket per replica
            ws = await asyncio.wait_for(
                connect(
                    f"{lb.ws}/ws/rooms/{room}",
                    additional_headers=own_page,
                    open_timeout=RECV_TIMEOUT,
                ),
                RECV_TIMEOUT,
            )
            try:
                while True:
                    frame = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
                    if '"type":"ready"' in frame.replace(" ", ""):
                        break
            finally:
                await ws.close()
        r = httpx.get(f"{lb.http}/rooms", headers=own_page, timeout=RECV_TIMEOUT)
        assert r.status_code == 200, r.text
        # Another site's page with the same cookie is still refused.
        evil = {**own_page, "Origin": "http://evil.example"}
        r = httpx.get(f"{lb.http}/rooms", headers=evil, timeout=RECV_TIMEOUT)
        assert r.status_code == 401
