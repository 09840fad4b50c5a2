"""The webhook deliverers' HTTP/1.1 client: one POST, its status code, kept-alive connections.

The deliverers share the event loop with the chat's fanout, and every item is a POST: httpx
spent about 1.4 ms of the loop on each (its layers: httpcore, anyio, h11), enough to show in
the fanout's p99 with a receiver that answers in 2 s (docs/benchmarks.md, round 12). This
client writes the request in one piece and reads the status line and headers: about 25 µs.
What it leaves out is what a receiver's answer does not need:

* **The answer's body is never kept**: one with a ``Content-Length`` of at most
  ``MAX_DRAINED`` bytes is read and dropped so the connection can carry the next POST; any
  other (chunked, unsized, larger) closes the connection instead. Headers past
  ``MAX_HEAD`` bytes are an error: a receiver cannot make this process buffer anything.
* **No redirects** (a 3xx is an answer, not a new receiver), no cookies, no HTTP/2.
* **TLS** verifies the receiver's certificate and name against ``SSL_CERT_FILE`` /
  ``SSL_CERT_DIR`` when set, else certifi's bundle (httpx's defaults).
* **A proxy** (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` naming one for the receiver,
  ``NO_PROXY`` respected) is left to httpx, which speaks CONNECT: ``Poster.via_proxy``.
* A user and password in the URL are sent as HTTP basic authentication.

A kept-alive connection that the receiver closed while it sat idle fails on its next request
before any answer: that request is sent once more on a fresh connection (nothing of it can
have been processed). Any other failure drops the connection: the caller counts an attempt.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import certifi

MAX_HEAD = 64 * 1024
"""Bytes of status line and headers read at most."""
MAX_DRAINED = 64 * 1024
"""An answer's body up to this size is read (and dropped) to keep its connection."""


class AnswerError(Exception):
    """The receiver's answer was not HTTP/1.x, or too large to read."""


@dataclass(frozen=True, slots=True)
class _Target:
    origin: tuple[str, str, int]
    """(scheme, host, port): the connections that can carry it."""
    head: bytes
    """The request line and the headers every POST to it has."""


@dataclass(eq=False, slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.transport.abort()  # no TLS close_notify wait: nobody reads it


class Poster:
    """POSTs to webhook receivers over kept-alive connections (``max_idle`` per origin)."""

    def __init__(self, *, user_agent: str, max_idle: int) -> None:
        self._user_agent = user_agent
        self._max_idle = max_idle
        self._targets: dict[str, _Target] = {}
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._proxies = urllib.request.getproxies()  # the environment's, read once

    def via_proxy(self, url: str) -> bool:
        """Whether the environment names a proxy for ``url`` (then httpx sends it)."""
        if not self._proxies:
            return False
        parts = urlsplit(url)
        if not (self._proxies.get(parts.scheme) or self._proxies.get("all")):
            return False
        return not urllib.request.proxy_bypass(parts.hostname or "")

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """The status code of the receiver's final answer. The caller bounds the time: a POST
        cut off by it leaves no connection behind."""
        target = self._target(url)
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = b"".join(
            (target.head, extra.encode("latin-1"), b"content-length: %d\r\n\r\n" % len(body), body)
        )
        idle = self._idle.get(target.origin)
        while idle:  # a kept-alive one; the receiver may have closed it meanwhile
            conn = idle.pop()
            try:
                answer = await self._exchange(conn, request, reused=True)
            except _Stale:
                conn.close()
                continue
            return self._settle(target, conn, answer)
        conn = await self._open(target.origin)
        answer = await self._exchange(conn, request, reused=False)
        return self._settle(target, conn, answer)

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _settle(self, target: _Target, conn: _Connection, answer: tuple[int, bool]) -> int:
        status, keep = answer
        idle = self._idle.setdefault(target.origin, [])
        if keep and len(idle) < self._max_idle:
            idle.append(conn)
        else:
            conn.close()
        return status

    async def _exchange(
        self, conn: _Connection, request: bytes, *, reused: bool
    ) -> tuple[int, bool]:
        """(status, whether the connection can carry another request)."""
        try:
            conn.writer.write(request)
            await conn.writer.drain()
            while True:
                try:
                    head = await conn.reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if reused and not exc.partial:
                        raise _Stale from exc
                    raise AnswerError("the receiver closed the connection mid-answer") from exc
                except asyncio.LimitOverrunError as exc:
                    raise AnswerError(f"answer headers over {MAX_HEAD} bytes") from exc
                status, keep, length = _parse_head(head)
                if 100 <= status < 200:  # informational (100 Continue...): the answer follows
                    continue
                break
            if status in (204, 304):
                return status, keep
            if keep and length is not None and length <= MAX_DRAINED:
                await conn.reader.readexactly(length)
                return status, True
            return status, False
        except ConnectionError as exc:  # reset, broken pipe
            if reused:
                raise _Stale from exc
            conn.close()
            raise
        except BaseException:
            conn.close()
            raise

    async def _open(self, origin: tuple[str, str, int]) -> _Connection:
        scheme, host, port = origin
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = _tls_context()
            tls = self._tls
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=host if tls else None, limit=MAX_HEAD
        )
        return _Connection(reader, writer)

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 10_000:  # per-room receivers come and go
                self._targets.clear()
            target = self._targets[url] = self._make_target(url)
        return target

    def _make_target(self, url: str) -> _Target:
        parts = urlsplit(url)
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError("not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        connect_host = host.encode("idna").decode("ascii") if not host.isascii() else host
        shown = f"[{connect_host}]" if ":" in connect_host else connect_host
        if parts.port is not None:
            shown += f":{parts.port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [
            f"POST {path} HTTP/1.1",
            f"host: {shown}",
            f"user-agent: {self._user_agent}",
            "accept: */*",
        ]
        if parts.username is not None:
            user_password = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            basic = base64.b64encode(user_password.encode()).decode()
            lines.append(f"authorization: Basic {basic}")
        head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        return _Target((parts.scheme, connect_host, port), head)


class _Stale(Exception):
    """A kept-alive connection the receiver had closed: nothing of the request was answered."""


def _parse_head(head: bytes) -> tuple[int, bool, int | None]:
    """(status, keep-alive, Content-Length or None) of a status line and its headers."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise AnswerError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    keep = version == b"HTTP/1.1"
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            if not value.isdigit() or (length is not None and length != int(value)):
                raise AnswerError("a bad Content-Length in the answer")
            length = int(value)
        elif name == b"transfer-encoding":
            keep = False  # chunked: not read, so the connection cannot go on
        elif name == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            if b"close" in tokens:
                keep = False
            elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                keep = True
    return int(code), keep, length


def _tls_context() -> ssl.SSLContext:
    cafile = os.environ.get("SSL_CERT_FILE")
    capath = os.environ.get("SSL_CERT_DIR")
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    return ssl.create_default_context(cafile=certifi.where())
