"""Hypothesis strategies for hostile client input: JSON values, message-shaped objects and raw
text (broken JSON, deep nesting, huge numbers, NUL, escaped lone surrogates)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from tests.fuzz.rules import MAX_BODY_CHARS, MAX_CLIENT_MSG_ID_CHARS

MAX_TEXT_BYTES = 60_000  # within the websocket's 64 KiB frame size limit


def utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Draw from one of the strategies, each as often as its weight says."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats()  # NaN and Infinity included: json.dumps writes them in Python's dialect
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
whitespace = st.text(
    st.sampled_from(
        " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u3000"
        "\u200b\u2060\ufeff"  # zero-width characters: not whitespace
    ),
    max_size=6,
)
lone_surrogate = st.integers(0xD800, 0xDFFF).map(chr)
long_text = st.builds(
    lambda n, unit, tail: unit * n + tail,
    st.integers(MAX_BODY_CHARS - 3, MAX_BODY_CHARS + 3) | st.integers(1, MAX_BODY_CHARS + 100),
    st.sampled_from(["x", "é", "\U0001f600", "\u4e2d", " "]),
    st.sampled_from(["", "\x00", "\ud800", " "]),
)
bodies = weighted(
    (2, st.text()),  # any Unicode scalar value, NUL and other controls included
    (2, st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1)),
    (1, whitespace),
    (
        1,
        st.tuples(st.text(max_size=8), st.sampled_from(["\x00", "\ud800", "\udc00\ud800"])).map(
            "".join
        ),
    ),
    (1, st.tuples(st.text(max_size=8), lone_surrogate, st.text(max_size=8)).map("".join)),
    (2, long_text),
    (1, json_values),
)
client_msg_ids = st.one_of(
    st.none(),
    st.text(max_size=10),
    st.text(min_size=1, max_size=MAX_CLIENT_MSG_ID_CHARS).filter(str.isprintable),
    st.builds(
        lambda n: "i" * n,
        st.integers(MAX_CLIENT_MSG_ID_CHARS - 2, MAX_CLIENT_MSG_ID_CHARS + 2),
    ),
    st.text(st.characters(categories=["Cc", "Cf", "Zl", "Zp", "Zs"]), min_size=1, max_size=5),
    st.tuples(st.text(max_size=5), lone_surrogate).map("".join),
    st.sampled_from(["m-1", "m-2", "m-3"]),  # the same id again: a resend
    # "~" starts the ids the server assigns: only that exact shape may be sent back
    st.sampled_from(["~", "~mine", "~AAAAAAAAAAAA.1", "~AAAAAAAAAAAA.0", "~AAAAAAAAAAA.1"]),
    json_values,
)
types = st.one_of(
    st.just("send"),
    st.just("ping"),
    st.just("auth"),
    st.just("edit"),
    st.just("delete"),
    st.just("react"),
    st.sampled_from(["pong", "ack", "message", "error", "SEND", "Send", " send", "send ", ""]),
    json_values,
)
extra_keys = st.dictionaries(st.text(max_size=10), json_scalars, max_size=2)
send_frames = st.fixed_dictionaries(
    {"type": st.just("send"), "body": bodies}, optional={"client_msg_id": client_msg_ids}
)
any_frames = st.fixed_dictionaries(
    {}, optional={"type": types, "body": bodies, "client_msg_id": client_msg_ids}
)
frame_dicts = st.builds(
    lambda extra, frame: {**extra, **frame},
    extra_keys,
    weighted((3, send_frames), (1, any_frames)),
)
"""Websocket frames: mostly sends, of every kind of body and client_msg_id."""
message_dicts = st.builds(
    lambda extra, message: {**extra, **message},
    extra_keys,
    st.fixed_dictionaries({}, optional={"body": bodies, "client_msg_id": client_msg_ids}),
)
"""REST ``POST /rooms/{room}/messages`` bodies."""


@st.composite
def encoded(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> str:
    """A value as JSON text, ASCII-only or not, compact or indented."""
    value = draw(values)
    text = json.dumps(
        value,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, None, 1])),
    )
    if not utf8(text):  # an unpaired surrogate can only travel as a \u escape
        text = json.dumps(value)
    assume(len(text.encode()) <= MAX_TEXT_BYTES)
    return text


DEEP_SHAPES = [
    lambda n: "[" * n + "]" * n,
    lambda n: '{"a":' * n + "0" + "}" * n,
    lambda n: '{"type":"send","body":' + "[" * n + "]" * n + "}",
    lambda n: '{"type":"send","body":"deep","client_msg_id":' + "[" * n + "]" * n + "}",
    lambda n: '{"type":"ping","x":' + '{"a":' * n + "null" + "}" * n + "}",
    lambda n: '{"body":"deep","x":' + "[" * n + "]" * n + "}",
    lambda n: "[" * n,
    lambda n: "[" * n + "]" * (n - 1),
    lambda n: '{"type":"send","body":"unclosed",' + "[" * n,
]
deep_text = st.builds(
    lambda shape, n: shape(n),
    st.sampled_from(DEEP_SHAPES),
    st.integers(1, 1100) | st.integers(1, 9_900),
)
"""Nesting up to ~10,000 deep (past any recursion limit), within 60,000 bytes."""
NUMBER_SHAPES = [
    lambda d: d,
    lambda d: "-" + d,
    lambda d: "1e" + d,
    lambda d: "-1e-" + d,
    lambda d: "0." + d,
    lambda d: "[" + d + "]",
    lambda d: '{"type":"send","body":' + d + "}",
    lambda d: '{"type":"send","body":"number","client_msg_id":' + d + "}",
    lambda d: '{"type":' + d + "}",
    lambda d: '{"type":"ping","n":' + d + "}",
    lambda d: '{"body":"number","n":' + d + "}",
]
huge_numbers = st.builds(
    lambda shape, digits: shape(digits),
    st.sampled_from(NUMBER_SHAPES),
    st.builds(
        lambda n, unit: (unit * n)[:n],
        st.integers(1, 5_000) | st.integers(4_290, 4_310) | st.integers(1, 20_000),
        st.sampled_from(["9", "1", "12345678901234567890"]),
    ),
)
json_like_text = st.text(st.sampled_from(list('{}[]":,.-+eE0123456789 \t\n\\/utfnalrsbNIy\x00')))
mutated = st.builds(
    lambda text, at, insert, delete: text[:at] + insert + text[at + delete :],
    encoded(frame_dicts),
    st.integers(0, 400),
    st.sampled_from(["", "\x00", '"', "{", "}", "[", "\\", ",", ":", "\\u", "\\ud800", "\ufffd"]),
    st.integers(0, 2),
)
special_text = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "null",
        "true",
        "0",
        '""',
        "[]",
        "{}",
        "NaN",
        "-Infinity",
        '{"type":"send","body":"a\x00b"}',  # a raw control character inside a string
        '{"type":"send","body":"a\\u0000b"}',
        '{"type":"send","body":"\\ud800"}',
        '{"type":"send","body":"\\udc00\\ud800"}',
        '{"type":"send","body":"\\ud83d\\ude00"}',  # a pair: one valid character
        '{"type":"send","body":"ok","client_msg_id":"\\ud800"}',
        '{"type":"send","body":"ok","client_msg_id":NaN}',
        '{"type":"send","body":"ok","nan":NaN}',
        '{"type":"send","body":"dup","type":"ping"}',
        '{"type":"ping","type":"send","body":"dup"}',
        '{"type":"send","body":"x","client_msg_id":1e400}',
        '{"body":"x","client_msg_id":["\\ud800"]}',
        '\ufeff{"type":"ping"}',
        '{"type":"ping"} {"type":"ping"}',
        '{"type":"ping"}\x00',
    ]
)
text_frames = st.one_of(
    st.text(),
    json_like_text,
    special_text,
    deep_text,
    huge_numbers,
    mutated,
    encoded(st.text()),
)
"""Any text at all, most of it almost JSON."""
