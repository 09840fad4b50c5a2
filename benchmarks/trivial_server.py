"""A trivial in-memory chat server: the benchmark's *generator ceiling*.

It speaks the same wire shapes as chat-service, with nothing behind them: no database, no
LISTEN/NOTIFY, no framework. ``benchmarks.bench`` runs it beside the real service and drives
both with the same load generator, so a figure of the service can be read as a ratio to what
the generator (on the same machine) can do at all.

* websocket ``/ws/rooms/{room}?token=&history=&since=`` (plain ``websockets`` server): checks
  the HS256 token, replays from memory, sends ``ready``; a ``send`` frame gets the next seq of
  the room, a ``message`` frame is broadcast to the room's connections (sender included) and
  the sender gets an ``ack``; ``ping`` gets ``pong``; ``react`` is a ``reaction`` item with
  the next seq, broadcast and acked like a send (no checks); ``read`` is ignored (no cursors,
  no receipts); any other type gets an ``unknown_type`` error frame.
* HTTP/1.1 with keep-alive on ``--http-port`` (a bare asyncio protocol):
  ``GET /rooms/{room}/messages?limit=&before=&after=`` (a page, same JSON shape as the
  service), ``POST /rooms/{room}/messages`` (store in memory, broadcast, 201), ``GET /healthz``
  and ``POST /_seed/{room}?n=N`` (pretend the room holds messages 1..N, synthesized on demand).

Run: ``python -m benchmarks.trivial_server --port P --http-port Q`` with ``CHAT_JWT_SECRET``
in the environment. It only listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

MAX_RESUME_GAP = 1000
DEFAULT_HISTORY = 50
SEED_CREATED_AT = "2026-01-01T00:00:00.000000Z"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Room:
    __slots__ = ("name", "clients", "seeded", "messages", "frames")

    def __init__(self, name: str) -> None:
        self.name = name
        self.clients: set[ServerConnection] = set()
        self.seeded = 0  # messages 1..seeded are synthesized
        self.messages: list[dict[str, Any]] = []  # seeded+1...
        self.frames: list[str] = []  # the message frames of ``messages``

    @property
    def last_seq(self) -> int:
        return self.seeded + len(self.messages)

    def message(self, seq: int) -> dict[str, Any]:
        if seq <= self.seeded:
            return {
                "room": self.name,
                "seq": seq,
                "id": seq,
                "author": f"u{seq % 10}",
                "body": f"message body {seq}",
                "client_msg_id": None,
                "created_at": SEED_CREATED_AT,
            }
        return self.messages[seq - self.seeded - 1]

    def frame(self, seq: int) -> str:
        if seq <= self.seeded:
            return dumps({"type": "message", **self.message(seq)})
        return self.frames[seq - self.seeded - 1]

    def post(
        self, author: str, body: str | None, client_msg_id: str | None, **item: Any
    ) -> dict[str, Any]:
        """A text message, or with ``item`` (``kind`` and its fields) another kind of item."""
        seq = self.last_seq + 1
        message = {
            "room": self.name,
            "seq": seq,
            "id": seq,
            **({"kind": item.pop("kind")} if item else {}),
            "author": author,
            "body": body,
            "client_msg_id": client_msg_id,
            "created_at": now_iso(),
            **item,
        }
        frame = dumps({"type": "message", **message})
        self.messages.append(message)
        self.frames.append(frame)
        broadcast(self.clients, frame)
        return message


class TrivialServer:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.rooms: dict[str, Room] = {}

    def room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
        return room

    def user(self, token: str | None) -> str | None:
        if not token:
            return None
        try:
            claims = jwt.decode(token, self.secret, algorithms=["HS256"])
        except jwt.PyJWTError:
            return None
        return str(claims["sub"])

    # -- websocket ---------------------------------------------------------------------------

    def check(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse before the upgrade, like the service (a bare 403)."""
        parts = urlsplit(request.path)
        query = parse_qs(parts.query)
        user = self.user(query.get("token", [None])[0])
        prefix = "/ws/rooms/"
        if user is None or not parts.path.startswith(prefix):
            return connection.respond(403, "forbidden\n")
        connection.chat = (  # type: ignore[attr-defined]
            user,
            unquote(parts.path[len(prefix) :]),
            int(query.get("history", [DEFAULT_HISTORY])[0]),
            int(query["since"][0]) if "since" in query else None,
        )
        return None

    async def handler(self, ws: ServerConnection) -> None:
        user, name, history, since = ws.chat  # type: ignore[attr-defined]
        room = self.room(name)
        last = room.last_seq
        if since is not None and 0 <= last - since <= MAX_RESUME_GAP:
            first, recovered = since + 1, True
        else:
            first, recovered = max(1, last - history + 1), False
        for seq in range(first, last + 1):
            await ws.send(room.frame(seq))
        ready = {"type": "ready", "room": name, "last_seq": last, "recovered": recovered}
        await ws.send(dumps(ready))
        sent = last
        while sent < room.last_seq:  # what was posted while the replay was being written
            sent += 1
            await ws.send(room.frame(sent))
        room.clients.add(ws)  # no await since the check above: nothing is missed
        try:
            async for raw in ws:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    await ws.send(dumps({"type": "error", "code": "invalid_json"}))
                    continue
                kind = frame.get("type") if isinstance(frame, dict) else None
                if kind == "read":
                    continue  # not answered by the service either
                if kind in ("send", "react"):
                    if kind == "send":
                        message = room.post(user, frame.get("body"), frame.get("client_msg_id"))
                    else:
                        message = room.post(
                            user,
                            None,
                            frame.get("client_msg_id"),
                            kind="reaction",
                            target_seq=frame.get("target_seq"),
                            emoji=frame.get("emoji"),
                            on=frame.get("on", True),
                        )
                    ack = {
                        "type": "ack",
                        "client_msg_id": message["client_msg_id"],
                        "seq": message["seq"],
                        "id": message["id"],
                        "created_at": message["created_at"],
                    }
                    await ws.send(dumps(ack))
                elif kind == "ping":
                    await ws.send('{"type":"pong"}')
                else:
                    await ws.send(dumps({"type": "error", "code": "unknown_type"}))
        finally:
            room.clients.discard(ws)

    # -- HTTP --------------------------------------------------------------------------------

    def http(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query)
        if path == "/healthz":
            return 200, b'{"status":"ok"}'
        auth = headers.get("authorization", "")
        if path.startswith("/_seed/") and method == "POST":
            room = self.room(unquote(path[len("/_seed/") :]))
            room.seeded = int(query["n"][0])
            room.messages.clear()
            room.frames.clear()
            return 200, dumps({"last_seq": room.last_seq}).encode()
        if not (path.startswith("/rooms/") and path.endswith("/messages")):
            return 404, b'{"detail":"not found"}'
        user = self.user(auth.removeprefix("Bearer ").strip())
        if user is None:
            return 401, b'{"detail":"missing token"}'
        room = self.room(unquote(path[len("/rooms/") : -len("/messages")]))
        if method == "POST":
            new = json.loads(body)
            message = room.post(user, new["body"], new.get("client_msg_id"))
            return 201, dumps(message).encode()
        return 200, dumps(self.page(room, query)).encode()

    def page(self, room: Room, query: dict[str, list[str]]) -> dict[str, Any]:
        limit = int(query.get("limit", ["50"])[0])
        before = int(query["before"][0]) if "before" in query else None
        after = int(query["after"][0]) if "after" in query else None
        last = room.last_seq
        upper = last if before is None else min(last, before - 1)
        if after is not None:
            seqs = range(after + 1, min(upper, after + limit) + 1)
        else:
            seqs = range(max(1, upper - limit + 1), upper + 1)
        messages = [room.message(s) for s in seqs]
        next_before = next_after = None
        if messages:
            first, final = seqs[0], seqs[-1]
            next_before = first if first > max(1, (after or 0) + 1) else None
            next_after = final if final < upper else None
        return {
            "room": room.name,
            "last_seq": last,
            "messages": messages,
            "next_before": next_before,
            "next_after": next_after,
        }


REASONS = {
    200: b"OK",
    201: b"Created",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
}


class HttpProtocol(asyncio.Protocol):
    """Just enough HTTP/1.1 for the generator's HttpClient and the harness's health check (httpx),
    with keep-alive: Content-Length bodies, no chunking."""

    def __init__(self, server: TrivialServer) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            try:
                method, target, _version = lines[0].split(" ", 2)
                status, payload = self.server.http(method, target, headers, body)
            except (ValueError, KeyError, TypeError):
                status, payload = 400, b'{"detail":"bad request"}'
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                % (status, REASONS.get(status, b"Error"), len(payload))
                + payload
            )


async def main(args: argparse.Namespace) -> None:
    secret = os.environ["CHAT_JWT_SECRET"]
    server = TrivialServer(secret)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    http = await loop.create_server(
        lambda: HttpProtocol(server), "127.0.0.1", args.http_port, backlog=4096
    )
    async with serve(
        server.handler,
        "127.0.0.1",
        args.port,
        process_request=server.check,
        # like uvicorn: permessage-deflate when the client offers it (the generator decides)
        ping_interval=20,
        ping_timeout=20,
        max_queue=None,
        backlog=4096,
        server_header=None,
    ):
        print(f"trivial server on ws://127.0.0.1:{args.port} http://127.0.0.1:{args.http_port}")
        await stop
    http.close()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop  # noqa: PLC0415 - optional, like uvicorn's loop="auto"

            uvloop.run(main(args))
            return
    asyncio.run(main(args))


if __name__ == "__main__":
    run()
