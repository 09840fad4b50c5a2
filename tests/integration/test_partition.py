"""A network path to PostgreSQL that dies without a reset (``tests.proxy.SilentProxy``).

Nothing on such a path fails: it only never answers. Every command needs a deadline, the
LISTEN connection must be found dead and replaced, and the process must say it is deaf while
it is.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from service.config import Settings, to_asyncpg_dsn
from service.db.engine import Keepalive, connect, create_engine, create_pool, reading
from service.errors import Unavailable
from service.realtime.backend import RESYNC, ListenBackend
from tests.proxy import SilentProxy
from tests.support import JWT_SECRET, Client, ServerProcess, make_token

KEEPALIVE = Keepalive(idle=7, interval=3, count=4, user_timeout=12.5)


def _via(proxy: SilentProxy, database_url: str) -> str:
    """``database_url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(database_url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def proxy(own_database: str) -> Iterator[SilentProxy]:
    parts = urlsplit(own_database)
    with SilentProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as silent:
        yield silent


def _settings(database_url: str, **values: object) -> Settings:
    return Settings(database_url=database_url, jwt_secret=JWT_SECRET, **values)  # type: ignore[arg-type]


def _socket_options(conn: object) -> tuple[int, int, int, int, int]:
    sock = conn._transport.get_extra_info("socket")  # type: ignore[attr-defined]
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )


async def test_every_database_connection_has_keepalives(own_database: str) -> None:
    """Pool, readiness engine, LISTEN and publish connections, and the writer's (``connect``)."""
    settings = _settings(
        own_database,
        tcp_keepalive_idle=KEEPALIVE.idle,
        tcp_keepalive_interval=KEEPALIVE.interval,
        tcp_keepalive_count=KEEPALIVE.count,
        tcp_user_timeout=KEEPALIVE.user_timeout,
    )
    expected = (1, 7, 3, 4, 12500)
    pool = await create_pool(settings)
    try:
        async with reading(pool) as conn:
            assert _socket_options(conn) == expected
    finally:
        await pool.close()

    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            assert _socket_options(raw.driver_connection) == expected
    finally:
        await engine.dispose()

    backend = ListenBackend(to_asyncpg_dsn(own_database), keepalive=KEEPALIVE)
    await backend.connect()
    try:
        await backend.publish("keepalive-test", "x")
        assert _socket_options(backend._conn) == expected  # noqa: SLF001
        assert _socket_options(backend._publish_conn) == expected  # noqa: SLF001
    finally:
        await backend.disconnect()

    writer_conn = await connect(to_asyncpg_dsn(own_database), "chat-service-writer")
    try:  # the writer's connection: the defaults (the settings' defaults)
        assert _socket_options(writer_conn) == (1, 10, 5, 3, 30000)
    finally:
        await writer_conn.close()


async def _next_event(backend: ListenBackend, timeout: float = 10) -> tuple[str, str]:
    event = await asyncio.wait_for(backend.next_published(), timeout)
    return event.channel, event.message


async def test_a_stuck_listen_is_cut_off_and_the_connection_replaced(
    own_database: str, proxy: SilentProxy
) -> None:
    """Today: the LISTEN of a new room hangs for good under the lock the watchdog needs."""
    lost: list[float] = []

    async def on_silence() -> None:
        lost.append(time.monotonic())

    backend = ListenBackend(
        _via(proxy, to_asyncpg_dsn(own_database)),
        probe_interval=0.2,
        timeout=1.0,
        connect_timeout=2.0,
        on_silence=on_silence,
    )
    notifier = await asyncpg.connect(to_asyncpg_dsn(own_database))
    await backend.connect()
    try:
        await backend.subscribe("old")
        await notifier.execute("NOTIFY old, 'before'")
        assert await _next_event(backend) == ("old", "before")
        assert proxy.freeze() == 1

        started = time.monotonic()
        joining = asyncio.ensure_future(backend.subscribe("new"))
        down_seen = None
        while not joining.done():  # reported down well before the deadline runs out
            if not backend.connected and down_seen is None:
                down_seen = time.monotonic() - started
            await asyncio.sleep(0.02)
        await joining  # never raises: the channel is recorded, the reconnect LISTENs to it
        assert time.monotonic() - started < 3
        assert down_seen is not None and down_seen < 1.0
        assert len(lost) == 1

        resynced = {await _next_event(backend), await _next_event(backend)}
        assert resynced == {("old", RESYNC), ("new", RESYNC)}
        assert backend.connected and backend.reconnects == 1
        await notifier.execute("NOTIFY new, 'after'")
        await notifier.execute("NOTIFY old, 'after'")
        assert await _next_event(backend) == ("new", "after")
        assert await _next_event(backend) == ("old", "after")
    finally:
        await backend.disconnect()
        await notifier.close()


async def test_an_idle_silent_listen_connection_is_found_by_the_probe(
    own_database: str, proxy: SilentProxy
) -> None:
    backend = ListenBackend(
        _via(proxy, to_asyncpg_dsn(own_database)), probe_interval=0.2, timeout=1.0
    )
    await backend.connect()
    try:
        await backend.subscribe("idle")
        proxy.freeze()
        assert await _next_event(backend, timeout=5) == ("idle", RESYNC)
        assert backend.connected and backend.reconnects == 1
    finally:
        await backend.disconnect()


async def test_a_connection_the_server_ended_keeps_the_pool(own_database: str) -> None:
    """The server answered (a terminated backend): the path works, the pool is not retired."""
    silences: list[None] = []

    async def on_silence() -> None:
        silences.append(None)

    backend = ListenBackend(to_asyncpg_dsn(own_database), probe_interval=0.2, on_silence=on_silence)
    admin = await asyncpg.connect(to_asyncpg_dsn(own_database))
    await backend.connect()
    try:
        await backend.subscribe("ended")
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'chat-listen' AND datname = current_database()"
        )
        assert killed == 1
        assert await _next_event(backend, timeout=5) == ("ended", RESYNC)
        assert backend.reconnects == 1 and silences == []
    finally:
        await backend.disconnect()
        await admin.close()


async def test_publish_and_pool_reads_have_deadlines(own_database: str, proxy: SilentProxy) -> None:
    via_proxy = _via(proxy, own_database)
    backend = ListenBackend(to_asyncpg_dsn(via_proxy), timeout=1.0)
    pool = await create_pool(_settings(via_proxy, db_timeout=1.0))
    await backend.connect()
    try:
        await backend.publish("ch", "before")
        async with reading(pool) as conn:
            assert await conn.fetchval("SELECT 1") == 1
        proxy.freeze()

        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await backend.publish("ch", "frozen")
        with pytest.raises(Unavailable):
            async with reading(pool) as conn:
                await conn.fetchval("SELECT 1")
        assert time.monotonic() - started < 4

        # The dead connections were dropped, not reused: the next ones are new and answer.
        await backend.publish("ch", "after")
        async with reading(pool) as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await backend.disconnect()
        await pool.close()


# -- the acceptance test: two replicas, one of them behind the silent proxy -------------------


async def _until_seq(client: Client, last_seq: int, deadline: float) -> list[int]:
    seqs: list[int] = []
    while not seqs or seqs[-1] < last_seq:
        frame = await client.recv(max(deadline - time.monotonic(), 0.01))
        if frame["type"] == "message":
            seqs.append(frame["seq"])
    return seqs


class _Watch:
    """Polls a server's ``/readyz`` and ``chat_listen_up`` until stopped."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.readyz: list[int] = []
        self.listen_up: list[float] = []
        self._stop = asyncio.Event()
        self.recovered = asyncio.Event()
        """Set once both said "down" and then, three readings in a row, ready and listening."""

    def _check(self) -> None:
        said_down = 503 in self.readyz and 0.0 in self.listen_up
        if said_down and self.readyz[-3:] == [200] * 3 and self.listen_up[-3:] == [1.0] * 3:
            self.recovered.set()

    async def _poll_readyz(self, http: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            try:
                self.readyz.append((await http.get("/readyz")).status_code)
            except httpx.HTTPError:
                self.readyz.append(-1)
            self._check()
            await asyncio.sleep(0.05)

    async def _poll_metrics(self, http: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            try:
                text = (await http.get("/metrics")).text
            except httpx.HTTPError:
                text = ""
            for line in text.splitlines():
                if line.startswith("chat_listen_up "):
                    self.listen_up.append(float(line.split()[-1]))
            self._check()
            await asyncio.sleep(0.05)

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.server.http, timeout=10) as http:
            await asyncio.gather(self._poll_readyz(http), self._poll_metrics(http))

    def stop(self) -> None:
        self._stop.set()


@pytest.mark.slow
async def test_a_replica_cut_off_without_a_reset_recovers_within_30s(
    own_database: str, proxy: SilentProxy, tmp_path
) -> None:
    """A reaches PostgreSQL through the proxy (pool, LISTEN, writer, readiness), B directly.
    Measured before this change: A's clients got none of B's messages within 30 s, and a new
    room on A never got its ``ready``."""
    a = ServerProcess(_via(proxy, own_database), log_path=tmp_path / "a.log")
    b = ServerProcess(own_database, log_path=tmp_path / "b.log")
    clients: list[Client] = []
    try:
        await asyncio.to_thread(a.start)
        await asyncio.to_thread(b.start)
        room = f"p-{uuid.uuid4().hex[:8]}"
        reader_a = await Client.connect(a, room, make_token("reader-a"))
        sender_a = await Client.connect(a, room, make_token("sender-a"))
        writer_b = await Client.connect(b, room, make_token("writer-b"))
        clients += [reader_a, sender_a, writer_b]
        await writer_b.send("before", "before")
        assert (await writer_b.collect("ack", "message"))["ack"]["seq"] == 1
        for client in (reader_a, sender_a):
            assert (await client.recv_type("message"))["seq"] == 1

        assert proxy.freeze() >= 3  # the pool's, the LISTEN and the writer's connections
        frozen_at = time.monotonic()
        deadline = frozen_at + 30
        watch = _Watch(a)
        watching = asyncio.ensure_future(watch.run())

        async def join_fresh_room() -> Client:
            fresh = f"p-{uuid.uuid4().hex[:8]}"
            client = await asyncio.wait_for(
                Client.connect(a, fresh, make_token("newcomer")), deadline - time.monotonic()
            )
            clients.append(client)
            return client

        async def send_to_a() -> tuple[dict[str, object], float]:
            await sender_a.send("from A while cut off", "a-1")
            while True:
                frame = await sender_a.recv(deadline - time.monotonic())
                if frame["type"] in ("ack", "error"):
                    return frame, time.monotonic() - frame_sent
                assert frame["type"] == "message", frame

        joining = asyncio.ensure_future(join_fresh_room())
        frame_sent = time.monotonic()
        sending = asyncio.ensure_future(send_to_a())
        acked_by_b = []
        for i in range(5):
            await writer_b.send(f"while A is cut off {i}", f"b-{i}")
            acked_by_b.append((await writer_b.recv_type("ack"))["seq"])
        assert acked_by_b == [2, 3, 4, 5, 6]
        reading_b = asyncio.ensure_future(_until_seq(reader_a, acked_by_b[-1], deadline))

        fresh = await joining
        assert fresh.ready["type"] == "ready"

        # Acked or answered with an error within the send deadline (plus slack for the box).
        answer, took = await sending
        assert took < Settings.model_fields["send_deadline"].default + 2, took
        assert answer["type"] == "ack" or answer["code"] in ("unavailable", "outcome_unknown")
        own_seq = answer["seq"] if answer["type"] == "ack" else None

        # Every message B acked reaches A's reader exactly once, in order (and A's own, if
        # it was acked: it is in the same room).
        seqs = await reading_b
        if own_seq is not None and own_seq > seqs[-1]:
            seqs += await _until_seq(reader_a, own_seq, deadline)
        assert seqs == sorted(set(seqs)), seqs
        assert set(acked_by_b) <= set(seqs)
        assert set(seqs) <= set(acked_by_b) | {own_seq}
        await reader_a.assert_silent(0.5)
        assert time.monotonic() < deadline

        # After recovery: ready again, listening again, and it said so while it was deaf.
        await asyncio.wait_for(watch.recovered.wait(), max(deadline - time.monotonic(), 0.01))
        watch.stop()
        await asyncio.wait_for(watching, 15)
        assert 0.0 in watch.listen_up, watch.listen_up
        assert 503 in watch.readyz, watch.readyz
        assert watch.readyz[-1] == 200 and watch.listen_up[-1] == 1.0
        assert a.metric("chat_listen_reconnects_total") >= 1
        log = (tmp_path / "a.log").read_text()
        assert "LISTEN connection lost" in log and "LISTEN connection restored" in log
    finally:
        for client in clients:
            await client.close()
        a.stop()
        b.stop()
