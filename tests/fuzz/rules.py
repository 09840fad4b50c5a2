"""The rules the fuzz tests check answers against, written from docs/protocol.md and the README
(not from the service's code), and a JSON reader that has no depth limit."""

from __future__ import annotations

import json
import re
import sys
import threading
from typing import Any

MAX_BODY_CHARS = 4000  # CHAT_MAX_MESSAGE_CHARS: the test servers run with the default
MAX_CLIENT_MSG_ID_CHARS = 128
MAX_SEQ = 2**62  # the highest cursor the API takes
ROOM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class _NotJson:
    def __repr__(self) -> str:
        return "NOT_JSON"


NOT_JSON: Any = _NotJson()
"""What :func:`parse` returns for a text that is not JSON."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str, *, strict: bool) -> Any:
    try:
        if strict:
            return json.loads(text, parse_constant=_refuse_constant)
        return json.loads(text)
    except ValueError:  # includes integers past sys.get_int_max_str_digits()
        return NOT_JSON


def parse(text: str, *, strict: bool = True) -> Any:
    """The JSON value of ``text``, NOT_JSON if it has none. ``strict``: RFC 8259 JSON;
    otherwise Python's dialect, which also reads NaN, Infinity and -Infinity.

    Any depth is read: a nesting too deep for this thread's recursion limit is read again in a
    thread with a stack big enough for it."""
    try:
        return _loads(text, strict=strict)
    except RecursionError:
        pass
    box: dict[str, Any] = {}

    def run() -> None:
        box["value"] = _loads(text, strict=strict)

    limit = sys.getrecursionlimit()
    stack = threading.stack_size(512 * 1024 * 1024)
    sys.setrecursionlimit(max(limit, 8 * len(text) + 1000))
    try:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    finally:
        threading.stack_size(stack)
        sys.setrecursionlimit(limit)
    return box["value"]


def nesting(text: str) -> int:
    """How deep arrays and objects nest in ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


ASSIGNED_ID = re.compile(r"~[A-Za-z0-9_-]{12}\.[1-9][0-9]{0,18}")
"""Ids starting with ``~`` are the server's: a client may only send one back (a resend)."""


def valid_client_msg_id(value: object) -> bool:
    """1 to 128 printable characters, not starting with ``~`` unless it is a server's id."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= MAX_CLIENT_MSG_ID_CHARS
        and value.isprintable()
        and (not value.startswith("~") or ASSIGNED_ID.fullmatch(value) is not None)
    )


def message_problems(body: object, client_msg_id: object) -> set[str]:
    """The error codes a message breaks (empty when it is to be stored). When it breaks several
    rules, the protocol does not say which one is reported: any of them will do."""
    problems: set[str] = set()
    if not isinstance(body, str):
        problems.add("invalid_frame")
    else:
        if not body.strip():
            problems.add("empty_body")
        if len(body) > MAX_BODY_CHARS:
            problems.add("body_too_long")
        # json.loads pairs escaped surrogates; a surrogate left in a str is unpaired.
        if "\x00" in body or any("\ud800" <= ch <= "\udfff" for ch in body):
            problems.add("invalid_body")
    if client_msg_id is not None and not valid_client_msg_id(client_msg_id):
        problems.add("invalid_client_msg_id")
    return problems


def valid_room(name: str) -> bool:
    """Room and dev-login user names: ``ROOM_NAME``, but not only dots (``.``, ``..``)."""
    return ROOM_NAME.fullmatch(name) is not None and name.strip(".") != ""
