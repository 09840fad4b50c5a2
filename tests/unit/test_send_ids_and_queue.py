"""The id namespace the server assigns in, and the writer's bounded queue (no database needed:
a writer that is never started only queues)."""

from __future__ import annotations

import re

import pytest

from service.chat.messages import check_client_msg_id
from service.db.writer import ASSIGNED_ID_PATTERN, MessageWriter
from service.errors import InvalidMessage, Overloaded


def _writer(**kwargs: object) -> MessageWriter:
    return MessageWriter("postgresql://nowhere.invalid/db", notify=True, **kwargs)  # type: ignore[arg-type]


async def test_a_send_without_an_id_is_given_one_no_client_can_make_up() -> None:
    writers = [_writer(), _writer()]  # two processes
    ids = []
    for writer in writers:
        for _ in range(3):
            writer.submit(room="r", channel="c", author="a", body="b", client_msg_id=None)
        ids += [send.client_msg_id for send in writer._queue]
    assert len(set(ids)) == 6
    for assigned in ids:
        assert re.fullmatch(ASSIGNED_ID_PATTERN, assigned)
        assert check_client_msg_id(assigned) == assigned  # a client may resend with it
    writers[0].submit(room="r", channel="c", author="a", body="b", client_msg_id="mine")
    assert writers[0]._queue[-1].client_msg_id == "mine"


@pytest.mark.parametrize(
    "made_up", ["~", "~mine", "~AAAAAAAAAAAA.0", "~AAAAAAAAAAA.1", "~AAAAAAAAAAAA.1 ", "~~"]
)
def test_ids_in_the_servers_namespace_are_refused_unless_in_its_exact_shape(made_up: str) -> None:
    with pytest.raises(InvalidMessage) as refused:
        check_client_msg_id(made_up)
    assert refused.value.code == "invalid_client_msg_id"
    assert "reserved" in refused.value.detail
    assert check_client_msg_id("a~b") == "a~b"  # only the first character is reserved


async def test_past_the_queue_limit_a_send_is_refused_at_once_with_a_retry_hint() -> None:
    writer = _writer(queue_limit=3, deadline=2.0)
    queued = [
        writer.submit(room="r", channel="c", author="a", body="b", client_msg_id=f"m{i}")
        for i in range(3)
    ]
    with pytest.raises(Overloaded) as refused:
        writer.submit(room="r", channel="c", author="a", body="b", client_msg_id="m3")
    assert refused.value.code == "overloaded" and refused.value.http_status == 503
    assert 0 < refused.value.retry_after <= 2.0
    assert len(writer._queue) == 3 and not any(f.done() for f in queued)
