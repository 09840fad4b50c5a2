"""The webhook deliverers' HTTP client (``service.chat.webhook_http``) against real sockets: a
small server in the test answers each request as the test says, and counts connections."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from service.chat.webhook_http import MAX_HEAD, AnswerError, Poster

Answer = Callable[[bytes], bytes | None]
"""The raw request -> the raw answer (None: close the connection without one)."""

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class Server:
    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self.writers:
            w.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.answer(request)
                if answer is None:
                    writer.transport.abort()
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.transport.abort()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[Server]]]:
    servers: list[Server] = []

    async def make(answer: Answer = lambda _r: OK, tls: ssl.SSLContext | None = None) -> Server:
        server = Server(answer, tls)
        await server.start()
        servers.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in servers:
        await server.stop()


async def test_posts_share_a_kept_alive_connection_and_send_what_was_asked(serve) -> None:
    server = await serve()
    poster = Poster(user_agent="test/1", max_idle=2)
    url = f"http://127.0.0.1:{server.port}/hook/in?x=1"
    for n in range(3):
        assert await poster.post(url, b'{"n": %d}' % n, {"x-chat-attempt": "1"}) == 200
    assert server.connections == 1
    request = server.requests[2]
    assert request.startswith(b"POST /hook/in?x=1 HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{server.port}\r\n".encode() in request
    assert b"x-chat-attempt: 1\r\n" in request
    assert b"content-length: 8\r\n" in request
    assert request.endswith(b'\r\n\r\n{"n": 2}')
    poster.close()


async def test_a_connection_the_receiver_closed_while_idle_is_replaced_without_an_error(
    serve,
) -> None:
    server = await serve()
    poster = Poster(user_agent="test/1", max_idle=2)
    url = f"http://127.0.0.1:{server.port}/"
    assert await poster.post(url, b"{}", {}) == 200
    for writer in server.writers:  # the receiver's keep-alive timeout
        writer.transport.abort()
    await asyncio.sleep(0.05)
    assert await poster.post(url, b"{}", {}) == 200
    assert server.connections == 2
    assert len(server.requests) == 2  # the stale connection carried nothing
    poster.close()


async def test_answers_that_cannot_be_drained_close_the_connection(serve) -> None:
    answers = iter(
        [
            b"HTTP/1.1 500 Oops\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 100_000,
            b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n",
            b"HTTP/1.0 202 Accepted\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
            OK,
        ]
    )
    server = await serve(lambda _r: next(answers))
    poster = Poster(user_agent="test/1", max_idle=2)
    url = f"http://127.0.0.1:{server.port}/"
    statuses = [await poster.post(url, b"{}", {}) for _ in range(6)]
    assert statuses == [500, 200, 204, 202, 201, 200]
    # A new connection after each of the first four; the fifth's carried the sixth.
    assert server.connections == 5
    poster.close()


async def test_a_bad_or_oversized_answer_is_an_error_not_a_buffer(serve) -> None:
    answers = iter(
        [
            b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 12x\r\n\r\n",
            None,  # closed before answering
            OK,
        ]
    )
    server = await serve(lambda _r: next(answers))
    poster = Poster(user_agent="test/1", max_idle=2)
    url = f"http://127.0.0.1:{server.port}/"
    for expected in (AnswerError, AnswerError, AnswerError, AnswerError):
        with pytest.raises(expected):
            await poster.post(url, b"{}", {})
    assert await poster.post(url, b"{}", {}) == 200
    poster.close()


async def test_a_hung_receiver_is_cut_off_by_the_callers_deadline_and_leaves_nothing(
    serve,
) -> None:
    server = await serve(lambda _r: b"")  # reads the request, never answers
    poster = Poster(user_agent="test/1", max_idle=2)
    url = f"http://127.0.0.1:{server.port}/"
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await poster.post(url, b"{}", {})
    server.answer = lambda _r: OK
    assert await poster.post(url, b"{}", {}) == 200
    assert server.connections == 2  # the hung one was dropped, not reused
    poster.close()


async def test_user_and_password_in_the_url_are_basic_authentication(serve) -> None:
    server = await serve()
    poster = Poster(user_agent="test/1", max_idle=1)
    await poster.post(f"http://hook%40app:p%3Ass@127.0.0.1:{server.port}/", b"{}", {})
    expected = base64.b64encode(b"hook@app:p:ss").decode()
    assert f"authorization: Basic {expected}\r\n".encode() in server.requests[0]
    assert b"@127.0.0.1" not in server.requests[0]  # not in the host header
    poster.close()


def _certificate(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A self-signed certificate for 127.0.0.1: the server's context and the CA file."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test receiver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file = tmp_path / "cert.pem"
    key_file = tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


async def test_https_verifies_the_receivers_certificate(serve, tmp_path, monkeypatch) -> None:
    context, ca = _certificate(tmp_path)
    server = await serve(tls=context)
    url = f"https://127.0.0.1:{server.port}/"
    untrusting = Poster(user_agent="test/1", max_idle=1)  # certifi's bundle: not our CA
    with pytest.raises(ssl.SSLCertVerificationError):
        await untrusting.post(url, b"{}", {})
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    trusting = Poster(user_agent="test/1", max_idle=1)
    assert await trusting.post(url, b"{}", {}) == 200
    assert await trusting.post(url, b"{}", {}) == 200
    assert server.requests[-1].startswith(b"POST / HTTP/1.1\r\n")
    trusting.close()


def test_a_proxy_in_the_environment_is_used_unless_no_proxy_names_the_host(
    monkeypatch,
) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    assert not Poster(user_agent="t", max_idle=1).via_proxy("https://hooks.example.com/in")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    poster = Poster(user_agent="t", max_idle=1)
    assert poster.via_proxy("https://hooks.example.com/in")
    assert not poster.via_proxy("http://hooks.example.com/in")  # no proxy for http
    monkeypatch.setenv("NO_PROXY", "example.com")
    assert not poster.via_proxy("https://hooks.example.com/in")
