"""A real ``redis-server`` of the test's own, and a TCP proxy that can go silent.

The server runs on a free loopback port with no persistence (``--save "" --appendonly no``), so
a SIGKILL loses nothing it needs and a restart on the same port is a fresh Redis: exactly what a
crashed and restarted Redis looks like to its clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support import free_port


def redis_server_binary() -> str | None:
    """Debian's ``redis-server`` (``.ci/run`` installs it), from PATH or its usual places."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server"):
        if Path(candidate).is_file():
            return candidate
    return None


SERVER_ARGS = "--bind 127.0.0.1 --appendonly no --daemonize no --loglevel warning".split()
"""Loopback only, nothing persisted (``--save ""`` too), in the foreground."""


class RedisServer:
    """``redis-server`` on a free port; ``kill`` (SIGKILL) and ``start`` again on the same port."""

    def __init__(self, binary: str, log_path: Path) -> None:
        self.binary = binary
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the port may still be in TIME_WAIT's hands for a moment after a kill
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--save", "", *SERVER_ARGS],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_ping(deadline):
                return
            self.kill()
            if time.monotonic() >= deadline:
                raise RuntimeError(f"redis-server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def _wait_ping(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5) as sock:
                    sock.settimeout(0.5)
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients beyond what the kernel does for a dead process."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None


class SilentProxy:
    """A TCP proxy to ``port`` that, on ``freeze()``, stops forwarding on the connections it
    has (without closing them: what a failed network path does); new connections pass."""

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._generation = 0
        self._frozen_below = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> SilentProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def freeze(self) -> None:
        """Existing connections go silent both ways: what is sent on them is dropped."""
        self._frozen_below = self._generation

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._generation += 1
        generation = self._generation
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer, generation)),
            asyncio.create_task(self._pipe(up_reader, writer, generation)),
        ]
        try:  # either side gone: both are
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
        for w in (writer, up_writer):
            w.transport.abort()
            self._writers.discard(w)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, generation: int
    ) -> None:
        while data := await reader.read(65536):
            if generation <= self._frozen_below:
                continue  # swallowed: neither delivered nor refused
            writer.write(data)
            await writer.drain()
