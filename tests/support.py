"""Test helpers: server processes, tokens and a websocket client with timeouts on every read.

Timing, for whoever writes the next test: wait for the state you need (a frame, a log line, a
metric, a lock wait in ``pg_stat_activity``), polling with a deadline, never for time to pass.
The sleeps left in the suite are of three kinds, none a race window: a poll's interval; waiting
out a timer under test (a rate limit's ``retry_after``, a token bucket's refill, a header
deadline, a JWKS refetch interval); and proving that something does not happen within a
moment (a thread's exit that must not stop PostgreSQL). ``test_fanout``'s pacing spreads
joins among writes; its assertions hold whatever the interleaving. Servers bind port 0 and
report the port; ``free_port`` remains for what cannot (nginx, a restart on the same address, a
start-up that is refused before it binds).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import jwt
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from service.client.connection import Connection, room_url

JWT_SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"
RECV_TIMEOUT = 10.0


def make_token(user: str, *, ttl: int = 3600, secret: str = JWT_SECRET, **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": user, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def database_url_for(server_url: str, database: str) -> str:
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextlib.asynccontextmanager
async def locked_out(pg_server_url: str, database_url: str, application_name: str):  # type: ignore[no-untyped-def]
    """Terminate ``application_name``'s sessions and keep new connections out meanwhile."""
    db_name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(database_url_for(pg_server_url, "postgres"))
    try:
        await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS false')
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = $2",
            application_name,
            db_name,
        )
        assert killed == 1, f"{killed} sessions of {application_name}"
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true')
        await admin.close()


def small_buffer_socket(port: int) -> socket.socket:
    """A connected socket with a tiny receive buffer: a client that stops reading is felt by the
    server after a few kilobytes instead of megabytes of kernel buffering."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


BOUND_PORT = re.compile(rb"Uvicorn running on https?://[^:\s]+:(\d+)")
"""uvicorn's start-up line names the port it bound, also when asked for port 0."""


def free_port() -> int:
    """A port that was free a moment ago, for what cannot bind port 0 and report it (nginx,
    a fixed address to restart on, a refused start-up that never binds). Another process may
    take it before it is used: prefer port 0 where a server can report what it bound."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m service serve`` on a free port, as a user would run it."""

    def __init__(
        self,
        database_url: str,
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        """``preexec_fn`` runs in the child before the server starts (e.g. to lower a limit)."""
        self.database_url = database_url
        self.log_path = log_path
        self.extra_env = env or {}
        self.preexec_fn = preexec_fn
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        env = {
            **os.environ,
            "CHAT_DATABASE_URL": self.database_url,
            "CHAT_JWT_SECRET": JWT_SECRET,
            "CHAT_DEV_AUTH": "true",
            # The shared test servers carry bursts far above a human's rate limits; the limits
            # themselves are tested on servers of their own.
            "CHAT_SEND_RATE": "10000",
            "CHAT_USER_SEND_RATE": "10000",
            "CHAT_MAX_CONNECTIONS_PER_USER": "1000",
            "CHAT_WS_CONNECT_RATE": "10000",
            "CHAT_WS_CONNECT_BURST": "10000",
            "CHAT_WS_REPLAY_BUDGET": str(2**40),
            "CHAT_WS_PING_RATE": "10000",
            "CHAT_WS_AUTH_RATE": "10000",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        # Port 0: the server binds a port of its own and logs it, so no other process can take
        # it between a probe and the bind (as with ``free_port``).
        with self.log_path.open("ab") as log:
            offset = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--port", "0"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self.preexec_fn,  # noqa: PLW1509 - only sets resource limits
            )
        if not self._wait_ready(timeout, offset):
            self.stop()
            raise RuntimeError(f"server did not start:\n{self.log_path.read_text()[-3000:]}")

    def _wait_ready(self, timeout: float, offset: int | None = None) -> bool:
        """Until ``/healthz`` answers; with ``offset``, on the port the server logged (from
        ``offset`` in the log) when it bound port 0."""
        deadline = time.monotonic() + timeout
        if offset is not None:
            self.port = 0
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            if not self.port:
                with self.log_path.open("rb") as log:
                    log.seek(offset)
                    bound = BOUND_PORT.search(log.read())
                if bound:
                    self.port = int(bound[1])
            if self.port:
                try:
                    if httpx.get(f"{self.http}/healthz", timeout=1).status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        return False

    def rss_kb(self) -> int:
        """The server's resident memory (VmRSS), from /proc."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def metric(self, name: str) -> float:
        """One sample of ``GET /metrics`` (``name`` with its labels), 0 when absent."""
        for line in httpx.get(f"{self.http}/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedServer(ServerProcess):
    """``chat-service serve`` as the README's quick start runs it: no database URL, so its own
    PostgreSQL, with the data in ``data_dir`` (default: ``./.chat-data`` under ``cwd``)."""

    def __init__(
        self, log_path: Path, *, data_dir: Path | None = None, cwd: Path | None = None
    ) -> None:
        super().__init__("", log_path=log_path)
        self.data_dir = data_dir
        self.cwd = cwd

    def start(self, timeout: float = 90.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.data_dir is not None:
            env["CHAT_DATA_DIR"] = str(self.data_dir)
        with self.log_path.open("ab") as log:
            offset = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--port", "0"],
                env=env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not self._wait_ready(timeout, offset):
            self.stop()
            raise RuntimeError(self.log_path.read_text()[-3000:])


SIGNALS = frozenset({"presence", "typing"})
"""Frames a test that is not about them never sees (``Client(signals=True)`` does): other
users' sockets come and go in every multi-user test."""


class Client:
    """Raw frames on ``service.client``'s low-level ``Connection``, for tests that need the exact
    frames and close codes (the protocol's rules, resume and resend, are ``ChatClient``'s, and
    tested in test_client.py); every read has a timeout so a missing frame fails, not hangs."""

    def __init__(self, conn: Connection, *, signals: bool = False) -> None:
        self.conn = conn
        self.history: list[dict[str, Any]] = []
        self.ready: dict[str, Any] = {}
        self.skipped = frozenset() if signals else SIGNALS

    @property
    def ws(self) -> ClientConnection:
        """websockets' connection underneath, for tests that write raw bytes or pause it."""
        return self.conn.ws

    @classmethod
    async def connect(
        cls,
        server: Any,
        room: str,
        token: str | None,
        *,
        sock: socket.socket | None = None,
        compression: str | None = "deflate",
        signals: bool = False,
        **params: Any,
    ) -> Client:
        """``compression=None`` offers no permessage-deflate (browsers do offer it)."""
        url = room_url(server.ws, room, **params, token=token)
        conn = await Connection.open(
            url,
            timeout=RECV_TIMEOUT,
            sock=sock,
            compression="deflate" if compression else None,
        )
        client = cls(conn, signals=signals)
        try:
            while True:
                frame = await client.recv()
                if frame["type"] == "ready":
                    client.ready = frame
                    return client
                assert frame["type"] == "message", frame
                client.history.append(frame)
        except BaseException:
            await conn.ws.close()  # no socket left behind for a test that expected this to fail
            raise

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        """The next frame (but ``presence`` and ``typing`` ones, unless ``signals``)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = max(deadline - asyncio.get_running_loop().time(), 0.001)
            frame = await self.conn.recv(left)
            if frame.get("type") not in self.skipped:
                return frame

    async def recv_type(self, kind: str, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        """The next frame of ``kind``; frames of other kinds in between are dropped."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            frame = await self.recv(max(remaining, 0.001))
            if frame["type"] == kind:
                return frame

    async def collect(self, *kinds: str, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        """Read until one frame of each kind has arrived (in any order); returns them by kind."""
        found: dict[str, Any] = {}
        while set(kinds) - set(found):
            frame = await self.recv(timeout)
            found.setdefault(frame["type"], frame)
        return found

    async def send_json(self, frame: dict[str, Any]) -> None:
        await self.conn.send(frame, RECV_TIMEOUT)

    async def send(self, body: str, client_msg_id: str | None = None) -> None:
        frame: dict[str, Any] = {"type": "send", "body": body}
        if client_msg_id is not None:
            frame["client_msg_id"] = client_msg_id
        await self.send_json(frame)

    async def assert_silent(self, timeout: float = 0.3) -> None:
        """Prove that nothing arrives within ``timeout`` (nothing ``recv`` would return)."""
        try:
            frame = await self.recv(timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {frame!r}")

    async def close(self) -> None:
        """Unread frames are dropped meanwhile (``Connection.close``)."""
        await self.conn.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def frames_of(client: Client, kind: str, seconds: float) -> list[dict[str, Any]]:
    """Every frame of ``kind`` that arrives within ``seconds`` (the others are dropped)."""
    found: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            frame = await client.recv(left)
        except TimeoutError:
            break
        if frame["type"] == kind:
            found.append(frame)
    return found


async def messages_until(client: Client, last_seq: int, timeout: float = 20) -> list[int]:
    """The seqs of the message frames ``client`` receives until it has ``last_seq``."""
    seqs: list[int] = []
    while not seqs or seqs[-1] < last_seq:
        frame = await client.recv(timeout)
        if frame["type"] == "message":
            seqs.append(frame["seq"])
    return seqs


async def close_of(client: Client, timeout: float = 10) -> tuple[int, str]:
    """The close code and reason, once every frame before them was read (1006: none came)."""
    try:
        while True:
            await asyncio.wait_for(client.ws.recv(), timeout)
    except ConnectionClosed as closed:
        return (closed.rcvd.code, closed.rcvd.reason) if closed.rcvd else (1006, "")
