"""How a process merges the typing signals that queued up within one batch (``_merged``):
one payload per room and kind, each user once, with the user's last word."""

from __future__ import annotations

from service.chat.envelope import NOTIFY_PAYLOAD_LIMIT, TYPING_SIGNAL, TYPING_STOP
from service.chat.typing import _merged


def test_each_user_once_with_the_last_word_and_rooms_in_the_order_they_came() -> None:
    t, s = TYPING_SIGNAL, TYPING_STOP
    outgoing = [
        ("room.b", t + "bob"),
        ("room.a", t + "ann"),
        ("room.b", s + "bob"),  # bob sent a message...
        ("room.b", s + "bob"),  # ...and another: the same stop again
        ("room.a", t + "cid"),
        ("room.b", t + "bob"),  # and typed again: typing
        ("room.a", s + "ann"),
    ]
    assert _merged(outgoing) == [
        ("room.b", t + "bob"),
        ("room.a", t + "cid"),
        ("room.a", s + "ann"),
    ]


def test_a_crowd_is_split_into_payloads_that_fit_a_notify() -> None:
    users = [f"user-{n:05d}" for n in range(2000)]
    payloads = _merged([("room.a", TYPING_SIGNAL + u) for u in users])
    assert len(payloads) > 1
    assert all(len(p.encode()) <= NOTIFY_PAYLOAD_LIMIT for _, p in payloads)
    heard = [u for _, p in payloads for u in p[len(TYPING_SIGNAL) :].split("\n")]
    assert heard == users
