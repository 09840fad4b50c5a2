"""The start-up choice between the fast path and uvicorn's own protocols (service.fastpath)."""

from __future__ import annotations

import logging

import pytest
import uvicorn

from service import fastpath
from service.http_guard import GuardedProtocol, _refused_upgrade

METHODS = {"data_received": ("self", "data"), "send": ("self", "message")}


class Written:
    """What the fast path was written for, in miniature."""

    def __init__(self) -> None:
        self.queue = None
        self.writable = None

    def data_received(self, data: bytes) -> None: ...

    def send(self, message: object, extra: int = 0) -> None: ...


class MissingMethod:
    def __init__(self) -> None:
        self.queue = self.writable = None

    def data_received(self, data: bytes) -> None: ...


class OtherSignature(Written):
    def send(self, message: object, urgent: bool) -> None: ...  # type: ignore[override]


class MissingAttribute:
    def __init__(self) -> None:
        self.queue = None

    def data_received(self, data: bytes) -> None: ...

    def send(self, message: object) -> None: ...


def test_the_internals_it_was_written_for_pass():
    assert fastpath.differs(Written, METHODS, ("queue", "writable")) is None


@pytest.mark.parametrize(
    ("cls", "why"),
    [
        (MissingMethod, "MissingMethod.send is missing"),
        (OtherSignature, "OtherSignature.send('self', 'message', 'urgent') is not send"),
        (MissingAttribute, "MissingAttribute no longer sets writable"),
        (None, "missing"),
    ],
)
def test_internals_that_differ_are_refused_with_the_reason(cls, why):
    assert why in (fastpath.differs(cls, METHODS, ("queue", "writable")) or "")


def test_the_installed_uvicorn_is_judged_by_its_version():
    low, high = fastpath.FAST_UVICORN
    installed = tuple(int(p) for p in uvicorn.__version__.split(".")[:2])
    problem = fastpath.check()
    if low <= installed < high:
        assert problem is None  # CI's pinned run: the fast path's internals are all there
    else:
        assert problem is not None and "is not in the range" in problem


def test_a_uvicorn_outside_the_range_gets_the_public_path_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(fastpath, "FAST_UVICORN", ((0, 1), (0, 2)))
    with caplog.at_level(logging.INFO, logger="service.fastpath"):
        chosen = fastpath.choose("auto")
    assert not chosen.fast and chosen.http is GuardedProtocol
    assert chosen.ws == fastpath.public_ws()
    [line] = [r.getMessage() for r in caplog.records if r.name == "service.fastpath"]
    assert line.startswith("public ASGI path") and f"uvicorn {uvicorn.__version__}" in line


def test_a_changed_method_gets_the_public_path_and_says_which(monkeypatch, caplog):
    if fastpath.check() is not None:
        pytest.skip("this uvicorn already gets the public path")
    monkeypatch.setitem(fastpath._WS_METHODS, "send_nowait_gone", ("self",))
    with caplog.at_level(logging.INFO, logger="service.fastpath"):
        assert not fastpath.choose("auto").fast
    assert "WebSocketsSansIOProtocol.send_nowait_gone is missing" in caplog.text


def test_off_always_gets_the_public_path(caplog):
    with caplog.at_level(logging.INFO, logger="service.fastpath"):
        chosen = fastpath.choose("off")
    assert not chosen.fast and chosen.http is GuardedProtocol
    assert "CHAT_FAST_PATH=off" in caplog.text


def _upgrade(path: str, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}"
    ).encode()


def test_oversized_handshakes_get_the_fast_paths_answers_on_the_public_path():
    assert _refused_upgrade(_upgrade("/ws/rooms/a")) is None
    assert _refused_upgrade(_upgrade("/" + "a" * 9000)).startswith(b"HTTP/1.1 414 ")  # type: ignore[union-attr]
    big_header = _upgrade("/ws", f"X-Big: {'b' * 9000}\r\n")
    assert _refused_upgrade(big_header).startswith(b"HTTP/1.1 431 ")  # type: ignore[union-attr]
    plain = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n"
    assert _refused_upgrade(plain) is None  # plain HTTP: httptools' rules, as on the fast path
