from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from service.chat.envelope import (
    NOTIFY_PAYLOAD_LIMIT,
    PRESENCE_SIGNAL,
    SIGNAL_PREFIX,
    channel_for,
    decode_notification,
    decode_signal,
    dumps,
    encode_notification,
    encode_presence,
    encode_signal,
    message_object,
    stored_frame,
)
from service.db.queries import MessageRecord, StoredMessage


def _record(body: str) -> MessageRecord:
    return MessageRecord(7, "lobby", 42, "alice", body, None, datetime(2026, 1, 1, tzinfo=UTC))


def _frame(record: MessageRecord) -> str:
    """A frame as the database writes it (``chat_message_json``; its bytes are held together
    with every other path by tests/integration/test_message_frame.py)."""
    return dumps(
        {
            "type": "message",
            "room": record.room,
            "seq": record.seq,
            "id": record.id,
            "author": record.author,
            "body": record.body,
            "client_msg_id": record.client_msg_id,
            "created_at": "2026-01-01T00:00:00.000000Z",
        }
    )


def test_channel_names_fit_postgres_identifiers_and_differ_per_room():
    long_room = "x" * 64
    assert len(channel_for(long_room).encode()) <= 63
    assert channel_for("a") != channel_for("A") != channel_for("a.")
    assert channel_for("lobby") == channel_for("lobby")
    assert channel_for("lobby").islower()


def test_small_messages_travel_inline():
    record = _record("hello")
    frame = _frame(record)
    seq, sent_at, decoded = decode_notification(encode_notification(record.seq, frame))
    assert (seq, decoded) == (42, frame)
    assert abs(time.time() - sent_at) < 60


def test_large_messages_travel_as_a_reference():
    record = _record("\U0001f600" * 2000)  # 8000 bytes of body alone
    payload = encode_notification(record.seq, _frame(record))
    assert len(payload.encode()) <= NOTIFY_PAYLOAD_LIMIT
    seq, _sent_at, frame = decode_notification(payload)
    assert (seq, frame) == (42, None)


def test_a_frame_and_its_object_convert_both_ways():
    frame = _frame(_record('\U0001f600 "quoted"'))
    item = message_object(frame)
    assert json.loads(item) == {k: v for k, v in json.loads(frame).items() if k != "type"}
    assert stored_frame(StoredMessage(42, item)) == frame


def test_timestamps_are_utc_with_microseconds_whatever_the_zone():
    from datetime import timedelta, timezone

    from service.chat.envelope import iso

    plus_two = timezone(timedelta(hours=2))
    assert iso(datetime(2026, 1, 1, 2, 0, tzinfo=plus_two)) == "2026-01-01T00:00:00.000000Z"
    assert iso(datetime(2026, 1, 1, 0, 0, 0, 5, tzinfo=UTC)) == "2026-01-01T00:00:00.000005Z"


def test_a_list_of_json_texts_joins_an_object_as_valid_json():
    import json

    from service.chat.envelope import dumps_with_items

    items = ['{"a":1}', '"é"']
    assert json.loads(dumps_with_items({"x": None}, "items", items)) == {
        "x": None,
        "items": [{"a": 1}, "é"],
    }
    assert json.loads(dumps_with_items({}, "items", [])) == {"items": []}


def test_acks_are_the_json_of_their_fields_byte_for_byte():
    import json

    from service.chat.envelope import ack_frame, iso

    for cmid in (None, "m-1", 'quote " and \\ back', "é\U0001f600", "tab\there", "\u2028"):
        record = MessageRecord(7, "lobby", 42, "alice", "x", cmid, datetime(2026, 1, 1, tzinfo=UTC))
        fields = {"type": "ack", "client_msg_id": cmid, "seq": 42, "id": 7}
        fields["created_at"] = iso(record.created_at)
        assert ack_frame(record) == json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def test_a_signal_names_whose_sockets_it_is_for():
    frame = '{"type":"read","room":"r","seq":3}'
    assert decode_signal(encode_signal(frame)) == (None, False, frame)
    assert decode_signal(encode_signal(frame, to="bob")) == ("bob", True, frame)
    assert decode_signal(encode_signal(frame, but="b:o b")) == ("b:o b", False, frame)
    assert encode_signal(frame).startswith(SIGNAL_PREFIX)
    assert not encode_notification(3, frame).startswith(SIGNAL_PREFIX)


def test_presence_changes_are_split_to_fit_a_notify_and_lose_no_one():
    """Two thousand users arriving (names of every script) and some leaving: payloads under
    PostgreSQL's limit, which together name everyone once, in order."""
    online = [(f"user-{i:05d}", f"Näme {i} \u4e2d\U0001f600") for i in range(2000)]
    offline = [f"gone-{i}" for i in range(300)]
    payloads = encode_presence(online, offline)
    assert len(payloads) > 1
    came: list[list[str]] = []
    went: list[str] = []
    for payload in payloads:
        assert payload.startswith(PRESENCE_SIGNAL)
        assert len(payload.encode()) <= NOTIFY_PAYLOAD_LIMIT
        change = json.loads(payload[len(PRESENCE_SIGNAL) :])
        came += change["on"]
        went += change["off"]
    assert [tuple(c) for c in came] == online and went == offline
    assert encode_presence([], []) == []


def test_typing_signals_queued_together_are_merged_per_room_and_fit_a_notify():
    from service.chat.typing import _merged  # noqa: PLC0415 - the one private helper tested

    queued = [("room-a", f"?tuser-{i:04d}-" + "x" * 100) for i in range(200)]
    queued += [("room-b", "?tbob"), ("room-a", "?scarol")]
    merged = _merged(queued)
    assert all(len(p.encode()) <= NOTIFY_PAYLOAD_LIMIT for _, p in merged)
    typing_a = [p[2:].split("\n") for c, p in merged if c == "room-a" and p.startswith("?t")]
    assert sum(typing_a, []) == [q[2:] for c, q in queued if c == "room-a" and q[1] == "t"]
    assert len(typing_a) > 1
    assert ("room-b", "?tbob") in merged and ("room-a", "?scarol") in merged
