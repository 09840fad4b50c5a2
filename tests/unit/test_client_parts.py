"""The client's pure parts: frames to typed events, URLs, token timing. What a server sends is
covered against real servers in tests/integration/test_client.py; here, the edges of parsing."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import service.client
from service.client import ProtocolError, room_url
from service.client.connection import http_base, ws_base
from service.client.events import (
    Ack,
    AuthOk,
    Error,
    MemberChange,
    Presence,
    Ready,
    Receipt,
    TextMessage,
    UnknownItem,
    parse,
)
from service.client.session import refresh_lead, token_claims
from tests.support import make_token

HEAD = {"type": "message", "room": "r", "seq": 7, "id": 70, "created_at": "t", "author": "a"}


def test_base_urls_map_http_to_ws_and_keep_a_path_prefix():
    assert ws_base("https://chat.example.com/api/") == "wss://chat.example.com/api"
    assert http_base("ws://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert room_url("http://h:1", "a b", since=3, history=None) == "ws://h:1/ws/rooms/a%20b?since=3"
    with pytest.raises(ValueError, match="not an http"):
        ws_base("ftp://h")


def test_each_kind_has_its_type_and_an_unknown_kind_keeps_its_seq():
    text = parse({**HEAD, "kind": "text", "body": "hi", "client_msg_id": "c", "reply_to": None})
    assert isinstance(text, TextMessage) and (text.seq, text.body) == (7, "hi")
    member = parse({**HEAD, "kind": "member", "user": "b", "action": "left", "role": None})
    assert isinstance(member, MemberChange) and member.action == "left"
    poll = parse({**HEAD, "kind": "poll", "question": "?"})
    assert isinstance(poll, UnknownItem) and poll.seq == 7 and poll.raw["question"] == "?"


def test_answers_and_signals():
    assert parse({"type": "ack", "client_msg_id": "c", "seq": 1, "id": 2, "created_at": "t"}) == (
        Ack("c", 1, 2, "t")
    )
    error = parse({"type": "error", "code": "rate_limited", "detail": "d", "retry_after": 0.5})
    assert error == Error("rate_limited", "d", None, 0.5)
    assert parse({"type": "auth_ok", "exp": 5}) == AuthOk(5)
    assert parse({"type": "presence", "room": "r", "online": ["a"], "offline": []}) == Presence(
        "r", ("a",), ()
    )
    assert parse({"type": "receipt", "room": "r", "user": "b", "seq": 3}) == Receipt("r", "b", 3)
    ready = parse({"type": "ready", "room": "r", "last_seq": 4, "recovered": False})
    assert isinstance(ready, Ready) and ready.present == () and ready.present_count == 0


def test_a_new_frame_type_is_skipped_and_a_broken_one_is_a_protocol_error():
    assert parse({"type": "something_new"}) is None
    with pytest.raises(ProtocolError):
        parse({"type": "message", "kind": "text"})


def test_token_timing_renews_ahead_of_exp():
    claims = token_claims(make_token("alice", ttl=600))
    assert claims["sub"] == "alice" and claims["exp"] > time.time()
    assert token_claims("not a jwt") == {}
    assert refresh_lead(600) == 120  # a fifth of the life
    assert refresh_lead(150) == 60  # at least a minute when it lives two or more
    assert refresh_lead(4) == pytest.approx(0.8)


def test_the_guide_example_compiles_and_imports_what_exists():
    guide = (Path(__file__).parents[2] / "docs" / "client.md").read_text()
    example = re.findall(r"```python\n(.*?)```", guide, re.S)[0]
    compile(example, "docs/client.md", "exec")
    imported = re.search(r"from service\.client import (.+)", example)
    assert imported is not None
    assert all(hasattr(service.client, name.strip()) for name in imported[1].split(","))
