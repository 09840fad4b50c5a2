"""``chat-service chat ROOM`` under a pseudo-terminal, as a person types into it: history first,
live messages from others, sending, ``/edit``, ``/delete``, ``/react``, ``/who``, ``/rooms``
with unread counts; checked on the screen and in what the server stored."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import uuid

import pexpect
import pytest

from service.client import ChatClient
from tests.proxy import SilentProxy
from tests.support import make_token

TIMEOUT = 20


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}


def _spawn(*args: str) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        ["-m", "service", "chat", *args],
        env=_env(),
        encoding="utf-8",
        timeout=TIMEOUT,
    )


async def _expect(child: pexpect.spawn, pattern: str) -> None:
    """Wait for ``pattern`` (a literal) without blocking the loop the test's own client uses."""
    await asyncio.to_thread(child.expect_exact, pattern)


async def test_chat_in_a_terminal(server):
    room = f"tty-{uuid.uuid4().hex[:10]}"
    async with ChatClient(server.http, token=make_token("bob")) as bob:
        await bob.rest.create_room(room, members=["alice"])  # alice: a member, with unread counts
        await bob.rest.post_message(room, "earlier")
        child = _spawn(room, "--url", server.http, "--user", "alice")
        try:
            await _expect(child, "-- 1 unread --")
            await _expect(child, "[3] bob: earlier")  # 1, 2: the two members joining
            await _expect(child, f"-- {room} as alice: 1 here (alice)")

            child.sendline("hello from the terminal")
            await _expect(child, "[4] you: hello from the terminal")

            bobs = await bob.join(room)
            await _expect(child, "* bob is here")
            await bobs.send("hi alice")
            await _expect(child, "[5] bob: hi alice")

            child.sendline("/edit 4 hello, edited")
            await _expect(child, "[6] alice edited 4: hello, edited")
            child.sendline("/react 5 \N{THUMBS UP SIGN}")
            await _expect(child, "[7] alice reacted \N{THUMBS UP SIGN} on 5")
            child.sendline("/delete 5")  # bob's: alice is a plain member
            await _expect(child, "! refused: forbidden")
            child.sendline("/reply 5 got it")
            await _expect(child, "[8] you (re 5): got it")
            child.sendline("/delete 8")
            await _expect(child, "[9] alice deleted 8")

            child.sendline("/who")
            await _expect(child, "* here: alice, bob")
            await bobs.send("while you look at the list")
            await _expect(child, "[10] bob: while you look at the list")
            child.sendline("/rooms")
            await _expect(child, f"* {room} [public]")

            child.sendline("/quit")
            await asyncio.to_thread(child.expect, pexpect.EOF)
        finally:
            child.close(force=True)
        assert child.exitstatus == 0

        page = await bob.rest.history(room)
        assert [(m.seq, m.author, getattr(m, "body", None)) for m in page.items] == [
            (3, "bob", "earlier"),
            (4, "alice", "hello, edited"),
            (5, "bob", "hi alice"),
            (8, "alice", None),
            (10, "bob", "while you look at the list"),
        ]
        reactions = page.items[2].raw["reactions"]
        assert [(r["emoji"], r["count"]) for r in reactions] == [("\N{THUMBS UP SIGN}", 1)]
        for _poll in range(100):  # the cursor follows the screen, at most once a second
            members = {m["user"]: m for m in (await bob.rest.members(room))["members"]}
            if members["alice"]["last_read_seq"] == 10:
                break
            await asyncio.sleep(0.1)
        assert members["alice"]["last_read_seq"] == 10  # read up to what was on her screen


def test_chat_without_a_server_says_so_and_exits_1():
    child = _spawn("lobby", "--url", "http://127.0.0.1:9", "--user", "alice")
    child.expect_exact("! ")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1


@pytest.mark.parametrize("line", ["/edit x y", "/nonsense"])
async def test_a_line_it_cannot_read_shows_the_help(server, line):
    room = f"tty-{uuid.uuid4().hex[:10]}"
    child = _spawn(room, "--url", server.http, "--user", "carol")
    try:
        await _expect(child, "-- /help for commands --")
        child.sendline(line)
        await _expect(child, "/react SEQ EMOJI")
        child.sendeof()
        await asyncio.to_thread(child.expect, pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


async def test_the_terminal_survives_a_replica_restart(database_url, spawn):
    """The terminal's replica stops (1012) while the load balancer (a proxy) already sends new
    connections to another: it says so, resumes there, and shows what was said meanwhile."""
    first, second = spawn(database_url), spawn(database_url)
    room = f"tty-{uuid.uuid4().hex[:10]}"
    with SilentProxy("127.0.0.1", first.port) as balancer:
        child = _spawn(room, "--url", f"http://127.0.0.1:{balancer.port}", "--user", "dave")
        child.logfile_read = screen = io.StringIO()
        try:
            await _expect(child, "-- /help for commands --")
            child.sendline("before")
            await _expect(child, "[1] you: before")
            balancer.retarget("127.0.0.1", second.port)
            await asyncio.to_thread(first.stop, signal.SIGTERM)
            await _expect(child, "-- connection lost (1012); reconnecting --")
            async with ChatClient(second.http, token=make_token("erin")) as erin:
                await erin.rest.post_message(room, "while you were away")
            lines = ["[2] erin: while you were away", "-- reconnected --"]
            seen = {await asyncio.to_thread(child.expect_exact, lines) for _ in lines}
            assert seen == {0, 1}  # in either order: the resume may come before or after it
            child.sendline("after")
            await _expect(child, "[3] you: after")
            child.sendeof()
            await asyncio.to_thread(child.expect, pexpect.EOF)
        finally:
            child.close(force=True)
    assert child.exitstatus == 0
    assert screen.getvalue().count("erin: while you were away") == 1
