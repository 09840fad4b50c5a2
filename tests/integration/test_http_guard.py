"""Hostile HTTP clients against a real ``chat-service serve``: huge bodies, half-sent requests
(slowloris), oversized websocket handshakes, file descriptor exhaustion; and the security
headers on every answer. Raw sockets where an HTTP library would hide what the server does."""

from __future__ import annotations

import asyncio
import re
import resource
import socket
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support import Client, ServerProcess, make_token

STATIC = Path(__file__).resolve().parents[2] / "service" / "static"
BIG = 200 * 1024 * 1024  # what a hostile client claims or streams
CHUNK = b"x" * (1024 * 1024)
RSS_SLACK_KB = 8 * 1024  # the server may allocate a little (a task, a response): not the body
IO_TIMEOUT = 10.0


def raw_socket(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and whatever body arrived before the server closed (or sent it all)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed ``sock`` (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def send_until_refused(sock: socket.socket, total: int) -> int:
    """Stream up to ``total`` bytes of body; returns how many the kernel took before the
    server's close stopped us."""
    sent = 0
    sock.settimeout(IO_TIMEOUT)
    try:
        while sent < total:
            sent += sock.send(CHUNK)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# --- Bodies: the token first, then a capped read -------------------------------------------------


def post_head(room: str, *, token: str | None, length: int | None) -> bytes:
    lines = [
        f"POST /rooms/{room}/messages HTTP/1.1",
        "Host: test",
        "Content-Type: application/json",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("authenticated", [False, True], ids=["no-token", "token"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_200_mb_body_is_refused_without_the_server_reading_it(
    server, room, authenticated, framing
):
    token = make_token("big-sender") if authenticated else None
    before = server.rss_kb()
    with raw_socket(server) as sock:
        if framing == "content-length":
            sock.sendall(post_head(room, token=token, length=BIG) + CHUNK)
        else:
            sock.sendall(post_head(room, token=token, length=None) + chunk(CHUNK))
        status, headers, body = read_response(sock)
        # Whatever the client goes on sending is not read: the connection is closed.
        assert headers["connection"] == "close"
        sent = send_until_refused(sock, BIG)
    assert sent < BIG // 4, f"the server took {sent} bytes of a refused body"
    if authenticated or framing == "content-length":
        assert status == 413, body  # a declared length over the cap: refused before auth
        assert b"larger than" in body
    else:
        assert status == 401, body  # the token is checked before the body is read
    grown = server.rss_kb() - before
    assert grown < RSS_SLACK_KB, f"the server grew by {grown} kB"
    # The server is fine: a message of the largest allowed size still goes through.
    r = httpx.post(
        f"{server.http}/rooms/{room}/messages",
        json={"body": "\\" * 4000},
        headers={"Authorization": f"Bearer {make_token('big-sender')}"},
        timeout=IO_TIMEOUT,
    )
    assert r.status_code == 201, r.text


def test_a_body_just_over_the_cap_is_refused_and_one_at_the_cap_is_read(server, room):
    limit = 64 * 1024  # the default cap for CHAT_MAX_MESSAGE_CHARS=4000
    auth = {"Authorization": f"Bearer {make_token('capped')}"}
    padding = b" " * (limit - len(b'{"body": "hi"}'))
    at_cap = b'{"body": "hi"}' + padding
    assert len(at_cap) == limit
    r = httpx.post(f"{server.http}/rooms/{room}/messages", content=at_cap, headers=auth)
    assert r.status_code == 201, r.text

    def streamed(data: bytes) -> Iterator[bytes]:
        yield data  # no Content-Length: chunked, counted as it arrives

    r = httpx.post(
        f"{server.http}/rooms/{room}/messages", content=streamed(at_cap + b" "), headers=auth
    )
    assert r.status_code == 413
    assert r.json() == {"detail": f"request body larger than {limit} bytes", "code": "too_large"}


def test_a_bad_body_still_gets_fastapis_answers(server, room):
    """The route reads its body itself now: the answers a declared body gave are unchanged."""
    url = f"{server.http}/rooms/{room}/messages"
    auth = {"Authorization": f"Bearer {make_token('parser')}"}
    for content, status, loc in [
        (b"", 422, ["body"]),
        (b"{", 422, ["body", 1]),
        (b'{"client_msg_id": "x"}', 422, ["body", "body"]),
        (b'{"body": 5}', 422, ["body", "body"]),
        (b"[" * 30_000 + b"]" * 30_000, 400, None),  # deeper than Python's json reads
    ]:
        r = httpx.post(url, content=content, headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == status, (content[:20], r.text)
        if loc is not None:
            assert r.json()["detail"][0]["loc"] == loc
    r = httpx.post(url, content=b'{"body": "hi"}', headers={**auth, "Content-Type": "text/plain"})
    assert r.status_code == 422
    r = httpx.post(url, json={"body": "hi", "client_msg_id": "c1"}, headers=auth)
    assert r.status_code == 201 and r.json()["body"] == "hi"


# --- Security headers -------------------------------------------------------------------------


SECURITY = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def assert_secure(path: str, headers: httpx.Headers | dict[str, str]) -> None:
    for name, value in SECURITY.items():
        assert headers.get(name) == value, (path, name)
    policy = headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy
    if not path.startswith(("/docs", "/redoc")):
        assert "'unsafe-inline'" not in policy and "script-src 'self';" in policy


def test_every_http_answer_carries_the_security_headers(server, room):
    auth = {"Authorization": f"Bearer {make_token('headers')}"}
    with httpx.Client(base_url=server.http, timeout=IO_TIMEOUT) as client:
        answers = [
            (client.get("/"), 200),
            (client.get("/static/app.js"), 200),
            (client.get("/rooms", headers=auth), 200),
            (client.get(f"/rooms/{room}/messages", headers=auth), 404),
            (client.get(f"/rooms/{room}/messages"), 401),
            (client.get("/no/such/path"), 404),
            (client.get("/rooms/a%20b/messages", headers=auth), 422),
            (client.post(f"/rooms/{room}/messages", json={"body": "x" * 70_000}), 413),
            (client.get("/healthz"), 200),
        ]
        for response, status in answers:
            assert response.status_code == status, response.request.url
            assert_secure(response.request.url.path, response.headers)
        docs = client.get("/docs")
        if docs.status_code == 200:  # Swagger UI: CDN script started inline, its own policy
            assert_secure("/docs", docs.headers)
            assert "https://cdn.jsdelivr.net" in docs.headers["content-security-policy"]
    with raw_socket(server) as sock:  # refused on its Content-Length alone
        sock.sendall(post_head(room, token=None, length=BIG))
        status, headers, _body = read_response(sock)
    assert status == 413
    assert_secure("/rooms", headers)


class _InlineFinder(HTMLParser):
    """What a ``script-src 'self'; style-src 'self'`` policy would block in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.blocked.append("inline <script>")
        if tag == "style":
            self.blocked.append("<style> element")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.blocked.append(f"{name}= on <{tag}>")
            if value and value.strip().lower().startswith("javascript:"):
                self.blocked.append(f"javascript: URL on <{tag}>")
        url = dict(attrs).get("src") or dict(attrs).get("href") or ""
        if tag in ("script", "link") and url and (url[:1] != "/" or url[:2] == "//"):
            self.blocked.append(f"<{tag}> from another origin: {url}")


def test_the_demo_page_needs_nothing_its_policy_blocks():
    finder = _InlineFinder()
    finder.feed((STATIC / "index.html").read_text())
    assert finder.blocked == []
    script = (STATIC / "app.js").read_text()
    # Code that builds inline style or code from strings would be blocked too.
    for pattern in [
        r"\beval\(",
        r"new Function\(",
        r"setAttribute\(\s*['\"](style|on)",
        r"\.innerHTML\s*=",
    ]:
        assert not re.search(pattern, script), pattern


# --- Slowloris: the request head has a deadline --------------------------------------------------


@pytest.fixture
def guarded(database_url: str, tmp_path: Path) -> Iterator[object]:
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        server = ServerProcess(database_url, log_path=tmp_path / f"s{len(started)}.log", env=env)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


HALF_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: "
HALF_UPGRADE = (
    b"GET /ws/rooms/slow HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
)


async def test_half_sent_requests_are_closed_at_the_deadline_while_others_are_served(guarded, room):
    server = guarded(CHAT_HEADER_TIMEOUT="1")
    slow = []
    for i in range(60):
        sock = raw_socket(server)
        sock.sendall(HALF_UPGRADE if i % 3 == 0 else HALF_REQUEST if i % 3 == 1 else b"")
        slow.append(sock)
    kept_alive = raw_socket(server)
    kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    assert read_response(kept_alive)[0] == 200
    kept_alive.sendall(b"GET /healthz HTTP/1.1\r\n")  # then the next request stalls
    started = time.monotonic()
    # Meanwhile everyone else is served: REST and a websocket.
    token = make_token("patient")
    r = httpx.get(
        f"{server.http}/rooms", headers={"Authorization": f"Bearer {token}"}, timeout=IO_TIMEOUT
    )
    assert r.status_code == 200
    async with await Client.connect(server, room, token) as client:
        await client.send("still here", "c1")
        assert (await client.recv_type("ack"))["client_msg_id"] == "c1"
        for sock in [*slow, kept_alive]:
            remaining = started + 5 - time.monotonic()
            assert await asyncio.to_thread(closed_by_server, sock, max(remaining, 0.01))
            sock.close()
        # The websocket that completed its handshake is not subject to the deadline.
        await asyncio.sleep(1.2)
        await client.send("after the deadline", "c2")
        assert (await client.recv_type("ack"))["client_msg_id"] == "c2"
    assert server.metric('chat_http_connections_closed_total{reason="head_timeout"}') >= 61
    warnings = [
        line
        for line in server.log_path.read_text().splitlines()
        if "request head not complete" in line
    ]
    assert len(warnings) == 1, warnings  # rate-limited: one line for the burst


def test_an_endless_request_head_is_cut_off_at_64_kb(server):
    """The deadline bounds its time; the size is bounded too, or a fast client could send
    gigabytes of one header within it."""
    before = server.rss_kb()
    with raw_socket(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Endless: " + b"a" * 70_000)
        status, headers, _body = read_response(sock)
        assert (status, headers["connection"]) == (431, "close")
        assert send_until_refused(sock, BIG) < BIG // 4
    assert server.rss_kb() - before < RSS_SLACK_KB
    assert server.metric('chat_http_connections_closed_total{reason="head_too_large"}') >= 1


async def test_beyond_the_unfinished_cap_the_oldest_are_closed(guarded, room):
    server = guarded(CHAT_HEADER_TIMEOUT="60", CHAT_MAX_UNFINISHED_CONNECTIONS="10")
    slow = []
    for _ in range(30):
        sock = raw_socket(server)
        sock.sendall(HALF_REQUEST)
        slow.append(sock)
    # The oldest 20 go (an honest client that arrives now takes one more place).
    r = httpx.get(f"{server.http}/healthz", timeout=IO_TIMEOUT)
    assert r.status_code == 200
    closed = [await asyncio.to_thread(closed_by_server, sock, 0.2) for sock in slow]
    assert all(closed[:20]) and not any(closed[-9:]), closed
    assert server.metric('chat_http_connections_closed_total{reason="unfinished_limit"}') >= 20
    for sock in slow:
        sock.close()


# --- Oversized websocket handshakes are answered -------------------------------------------------


@pytest.mark.parametrize(
    ("where", "status"), [("request-line", 414), ("header", 431)], ids=["url", "header"]
)
def test_an_oversized_websocket_handshake_is_answered_and_closed(server, where, status):
    path = "/ws/rooms/lobby?token=" + ("a" * 9000 if where == "request-line" else "x")
    extra = f"X-Big: {'b' * 9000}\r\n" if where == "header" else ""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    )
    with raw_socket(server) as sock:
        sock.sendall(request.encode())
        got, _headers, _body = read_response(sock)
        assert got == status
        assert closed_by_server(sock, IO_TIMEOUT)


async def test_a_websocket_client_with_a_long_url_gets_an_answer(server):
    url = f"{server.ws}/ws/rooms/lobby?token={'a' * 9000}"
    with pytest.raises(InvalidStatus) as refused:
        await asyncio.wait_for(connect(url, open_timeout=IO_TIMEOUT), IO_TIMEOUT)
    assert refused.value.response.status_code == 414


# --- File descriptors ---------------------------------------------------------------------------


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def test_running_out_of_file_descriptors_is_survived(database_url, tmp_path, room):
    server = ServerProcess(
        database_url,
        log_path=tmp_path / "fd.log",
        env={"CHAT_HEADER_TIMEOUT": "60"},
        preexec_fn=_low_fd_limit,
    )
    with server:
        token = make_token("fd-user")
        async with await Client.connect(server, room, token) as client:
            flood = []
            try:
                for _ in range(400):
                    try:
                        sock = socket.create_connection(("127.0.0.1", server.port), timeout=2)
                    except OSError:
                        break
                    sock.sendall(HALF_REQUEST)
                    flood.append(sock)
                # Not a pause: wait until the server says it is at its limit (its log: a new
                # connection, even to /metrics, would be closed now).
                deadline = time.monotonic() + 10
                while "near the file descriptor limit" not in server.log_path.read_text():
                    assert time.monotonic() < deadline, "the flood never reached the fd limit"
                    await asyncio.sleep(0.05)
                # The connection it had keeps working.
                await client.send("through the flood", "fd-1")
                assert (await client.recv_type("ack"))["client_msg_id"] == "fd-1"
            finally:
                for sock in flood:
                    sock.close()
            # And once the flood is gone, new clients are served again.
            deadline = time.monotonic() + 10
            while True:
                try:
                    r = httpx.get(
                        f"{server.http}/rooms/{room}/messages",
                        headers={"Authorization": f"Bearer {token}"},
                        timeout=2,
                    )
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "not serving after the flood"
                    await asyncio.sleep(0.1)
            assert r.status_code == 200 and r.json()["messages"][-1]["body"] == "through the flood"
            assert server.metric('chat_http_connections_closed_total{reason="fd_limit"}') > 0
        log = server.log_path.read_text()
        assert "near the file descriptor limit" in log
        assert "Too many open files" not in log
