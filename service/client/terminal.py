"""``chat-service chat ROOM``: a line-based terminal chat on ``ChatClient``.

It prints the room's recent history, then live items as they come, and sends each line typed;
``/help`` lists the commands. Everything the protocol asks of a client (resume, resend,
renewal, resets) is ``ChatClient``'s, so this file is only reading lines and printing events:
a reconnect shows as two lines and loses nothing. Without ``--token`` it asks the server for a
dev token (``POST /auth/dev-token``: the local embedded instance on a loopback listener
issues them), and asks again when that one is due for renewal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import sys
from collections.abc import Callable
from typing import TextIO

import httpx

from service.client.errors import ChatClientError, HTTPStatusError, SendError
from service.client.events import (
    Delete,
    Disconnected,
    Edit,
    Event,
    MemberChange,
    Presence,
    ReactionChange,
    Ready,
    Reset,
    TextMessage,
)
from service.client.rest import raise_for_status
from service.client.session import ChatClient, Room

READ_EVERY = 1.0
"""Seconds between read-cursor moves at most (the protocol asks for about one a second)."""
HELP = """\
commands:
  TEXT                  send TEXT
  /reply SEQ TEXT       answer message SEQ
  /edit SEQ TEXT        replace the text of your message SEQ
  /delete SEQ           delete message SEQ
  /react SEQ EMOJI      react to message SEQ (/unreact SEQ EMOJI takes it back)
  /who                  who is in the room now
  /rooms                your rooms and public ones, with unread counts
  /help                 this
  /quit                 leave (or end of input)"""


def run(args: argparse.Namespace) -> int:
    """The command's entry point: 0 on /quit or end of input, 1 when the room is lost."""
    return asyncio.run(Terminal(args, sys.stdin, sys.stdout).main())


def render(event: Event, me: str | None) -> str | None:
    """One line for an event worth showing (None: not worth a line)."""
    if isinstance(event, TextMessage):
        who = "you" if event.author == me else event.author
        re = f" (re {event.reply_to.seq})" if event.reply_to is not None else ""
        body = "(deleted)" if event.deleted else event.body
        edited = " (edited)" if event.edited_at else ""
        return f"[{event.seq}] {who}{re}: {body}{edited}"
    if isinstance(event, Edit):
        return f"[{event.seq}] {event.author} edited {event.target_seq}: {event.body}"
    if isinstance(event, Delete):
        return f"[{event.seq}] {event.author} deleted {event.target_seq}"
    if isinstance(event, ReactionChange):
        verb = "reacted" if event.on else "took back"
        return f"[{event.seq}] {event.author} {verb} {event.emoji} on {event.target_seq}"
    if isinstance(event, MemberChange):
        role = f" ({event.role})" if event.role else ""
        return f"[{event.seq}] {event.user} {event.action}{role}"
    if isinstance(event, Presence):
        parts = [f"{u} is here" for u in event.online if u != me]
        parts += [f"{u} left" for u in event.offline if u != me]
        return f"* {', '.join(parts)}" if parts else None
    if isinstance(event, Reset):
        return f"-- missed too much: messages before {event.last_seq + 1} may be missing here --"
    if isinstance(event, Disconnected):
        return f"-- connection lost ({event.code}); reconnecting --"
    return None  # typing, receipts, read sync, unknown kinds


class Terminal:
    """One session: a room, the lines typed, the lines printed."""

    def __init__(self, args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> None:
        self.args, self.stdin, self.stdout = args, stdin, stdout
        self.user: str = args.user or os.environ.get("USER") or getpass.getuser()
        self.shown = 0  # the newest seq printed: what the read cursor follows
        self.seen = asyncio.Event()  # shown moved: the cursor should follow
        self.read_to = 0  # the cursor sent last

    def say(self, line: str) -> None:
        self.stdout.write(line + "\n")
        self.stdout.flush()

    async def dev_token(self) -> str:
        async with httpx.AsyncClient(base_url=self.args.url, timeout=10) as http:
            response = await http.post("/auth/dev-token", json={"user": self.user})
        if response.status_code == 404:
            raise ChatClientError("the server issues no dev tokens here: pass --token")
        raise_for_status(response)
        token: str = response.json()["token"]
        return token

    async def main(self) -> int:
        args = self.args
        try:
            provider = None if args.token else self.dev_token
            token = args.token or await self.dev_token()
            async with ChatClient(args.url, token=token, token_provider=provider) as chat:
                room = await chat.join(args.room, history=args.history)
                await self.unread_note(chat)
                return await self.session(chat, room)
        except (ChatClientError, httpx.HTTPError, OSError) as exc:
            self.say(f"! {exc}")
            return 1

    async def unread_note(self, chat: ChatClient) -> None:
        try:
            info = await chat.rest.room(self.args.room)
        except HTTPStatusError:
            return
        if info.get("unread"):
            self.say(f"-- {info['unread']} unread --")

    async def session(self, chat: ChatClient, room: Room) -> int:
        lines = await self.line_reader()
        printer = asyncio.create_task(self.print_events(chat, room))
        cursor = asyncio.create_task(self.follow_with_cursor(room))
        try:
            while True:
                read = asyncio.create_task(lines.readline())
                await asyncio.wait({read, printer}, return_when=asyncio.FIRST_COMPLETED)
                if printer.done():
                    read.cancel()
                    printer.result()  # raises what ended the room
                    return 1
                raw = read.result()
                if not raw:
                    return 0  # end of input
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line.strip() in ("/quit", "/exit"):
                    return 0
                if line.strip():
                    await self.command(chat, room, line)
        finally:
            printer.cancel()
            cursor.cancel()
            await asyncio.gather(printer, cursor, return_exceptions=True)
            with contextlib.suppress(OSError, ValueError):  # the shell gets its terminal back
                os.set_blocking(self.stdin.fileno(), True)
            if self.shown > self.read_to:  # what the last second showed counts as read too
                with contextlib.suppress(ChatClientError, httpx.HTTPError):
                    await chat.rest.mark_read(room.name, self.shown)

    async def line_reader(self) -> asyncio.StreamReader:
        """stdin as an asyncio stream: reading it never blocks the printing of messages."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self.stdin)
        return reader

    async def follow_with_cursor(self, room: Room) -> None:
        """Move the read cursor to what was printed: at most once a second, and always to the
        last position once the room goes quiet."""
        while True:
            await self.seen.wait()
            self.seen.clear()
            self.read_to = self.shown
            with contextlib.suppress(ChatClientError, httpx.HTTPError):
                await room.read(self.shown)  # a non-member has no cursor (REST: 403)
            await asyncio.sleep(READ_EVERY)

    async def print_events(self, chat: ChatClient, room: Room) -> None:
        first = True
        async for event in room:
            if isinstance(event, Ready):
                if first:
                    here = ", ".join(u.user for u in event.present)
                    self.say(f"-- {room.name} as {chat.user}: {event.present_count} here ({here})")
                    self.say("-- /help for commands --")
                    first = False
                else:
                    self.say("-- reconnected --")
                continue
            line = render(event, chat.user)
            if line is not None:
                self.say(line)
            if isinstance(event, TextMessage | Edit | Delete | ReactionChange | MemberChange):
                self.shown = max(self.shown, event.seq)
                self.seen.set()

    async def command(self, chat: ChatClient, room: Room, line: str) -> None:
        """One line typed: a command, or a message."""
        name, _, rest = line.partition(" ") if line.startswith("/") else ("", "", line)
        handlers: dict[str, Callable[[str], object]] = {
            "": lambda text: room.send(text),
            "/reply": lambda text: self.with_seq(text, lambda s, t: room.send(t, reply_to=s)),
            "/edit": lambda text: self.with_seq(text, lambda s, t: room.edit(s, t)),
            "/delete": lambda text: self.with_seq(text, lambda s, _t: room.delete(s), empty=True),
            "/react": lambda text: self.with_seq(text, lambda s, t: room.react(s, t)),
            "/unreact": lambda text: self.with_seq(text, lambda s, t: room.react(s, t, on=False)),
            "/who": lambda _text: self.who(chat, room),
            "/rooms": lambda _text: self.rooms(chat),
        }
        handler = handlers.get(name)
        if handler is None:
            self.say(HELP)
            return
        try:
            result = handler(rest.strip() if name else rest)
            if asyncio.iscoroutine(result):
                await result
        except SendError as exc:
            self.say(f"! refused: {exc.code}: {exc.detail}")
        except ChatClientError as exc:
            self.say(f"! {exc}")

    async def with_seq(
        self, text: str, act: Callable[[int, str], object], *, empty: bool = False
    ) -> None:
        seq, _, rest = text.partition(" ")
        if not seq.isdigit() or (not rest.strip() and not empty):
            self.say(HELP)
            return
        result = act(int(seq), rest.strip())
        if asyncio.iscoroutine(result):
            await result

    async def who(self, chat: ChatClient, room: Room) -> None:
        page = await chat.rest.presence(room.name, limit=100)
        names = [u["user"] for u in page["users"]]
        more = " and more" if page.get("next_after") else ""
        self.say(f"* here: {', '.join(names)}{more}")

    async def rooms(self, chat: ChatClient) -> None:
        page = await chat.rest.rooms(limit=100)
        for r in page["rooms"]:
            unread = f" ({r['unread']} unread)" if r.get("unread") else ""
            mentions = f" ({r['mentions']} mentioning you)" if r.get("mentions") else ""
            self.say(f"* {r['name']} [{r['kind']}]{unread}{mentions}")
