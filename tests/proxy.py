"""A TCP proxy that can go silent: a network path that dies without a reset.

``freeze()`` stops forwarding on every connection open at that moment without closing any of
them: both ends keep a healthy-looking socket (the kernel still acknowledges what they send)
and never hear from the other side again, as behind a firewall that forgot its state. New
connections pass, as after a failover. The proxy runs its own event loop in a thread, so a
test may block (start a server, wait on it) without stalling the traffic it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class SilentProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._frozen: list[asyncio.Event] = []
        self._live: list[asyncio.Event] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.connections = 0

    def start(self) -> SilentProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0), timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def retarget(self, host: str, port: int) -> None:
        """Send new connections to ``host:port`` from now on (a failover); open ones stay."""
        self._target = (host, port)

    def freeze(self) -> int:
        """Stop forwarding on the open connections, for good; returns how many there were."""

        async def freeze() -> int:
            frozen, self._live = self._live, []
            for flag in frozen:
                flag.set()
            self._frozen.extend(frozen)
            return len(frozen)

        return self._call(freeze(), timeout=10)

    def close(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        with contextlib.suppress(Exception):
            self._call(close(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> SilentProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro, *, timeout: float):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # by close(): not an error to report
            await self._forward(reader, writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        frozen = asyncio.Event()
        self._live.append(frozen)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer, frozen),
            self._pump(up_reader, writer, frozen),
            return_exceptions=True,
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frozen: asyncio.Event
    ) -> None:
        try:
            while data := await reader.read(65536):
                if frozen.is_set():
                    await asyncio.Event().wait()  # hold it: never forwarded, never closed
                writer.write(data)
                await writer.drain()
        finally:
            if not frozen.is_set():
                writer.transport.abort()
