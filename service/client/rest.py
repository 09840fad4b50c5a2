"""REST helpers: history pages, rooms, members, presence, posting; errors as exceptions.

Every call has a deadline (``timeout``, httpx's per-operation timeouts). An error status
raises ``HTTPStatusError`` (``Forbidden`` for 403) with the status and the body's ``code``, so a
caller branches on ``exc.code``, not on message text. ``post_message`` is the one call that
retries on its own: with one ``client_msg_id`` for every attempt, a retry after ``overloaded``,
``unavailable``, ``outcome_unknown`` or ``rate_limited`` can never store the message twice.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from service.client.connection import http_base
from service.client.errors import ConnectionLost, Forbidden, HTTPStatusError, ProtocolError
from service.client.events import Item, TextMessage, parse_item

TokenSource = Callable[[], Awaitable[str | None]]
RETRYABLE_STATUS = frozenset({429, 503})


def new_client_msg_id() -> str:
    """A client-made id: random, so no two sends of any client collide (never ``~``, the
    server's prefix)."""
    return secrets.token_urlsafe(16)


def _seconds(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def raise_for_status(response: httpx.Response) -> None:
    """``HTTPStatusError`` carrying the body's ``code`` for any 4xx or 5xx answer."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    code, detail, cmid = f"http_{response.status_code}", response.text, None
    if isinstance(body, dict):
        detail = body.get("detail", detail)
        cmid = body.get("client_msg_id")
        if isinstance(body.get("code"), str):
            code = body["code"]
        elif response.status_code == 422:
            code = "validation"
    error = Forbidden if response.status_code == 403 else HTTPStatusError
    raise error(
        response.status_code,
        code,
        detail,
        retry_after=_seconds(response.headers.get("Retry-After")),
        client_msg_id=cmid,
    )


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page, oldest first; pass ``next_before`` / ``next_after`` back to turn it."""

    room: str
    last_seq: int
    items: list[Item]
    next_before: int | None
    next_after: int | None


class RestClient:
    """The REST API of one base URL, authenticated with whatever token ``token`` gives now."""

    def __init__(
        self,
        base_url: str,
        *,
        token: TokenSource,
        renew: TokenSource | None = None,
        timeout: float = 10.0,
    ) -> None:
        """``renew`` is asked for a fresh token after a 401, once per call."""
        self._token, self._renew = token, renew
        self.timeout = timeout
        self.http = httpx.AsyncClient(base_url=http_base(base_url), timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call; a 401 is retried once with a renewed token; errors raise."""
        token = await self._token()
        for attempt in range(2):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = await self.http.request(method, path, headers=headers, **kwargs)
            if response.status_code == 401 and attempt == 0 and self._renew is not None:
                token = await self._renew()
                continue
            break
        raise_for_status(response)
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self.request(method, path, **kwargs)).json()

    async def history(
        self,
        room: str,
        *,
        limit: int = 50,
        before: int | None = None,
        after: int | None = None,
        every_kind: bool = False,
    ) -> HistoryPage:
        """Text messages in their current state, or every stream item with ``every_kind``
        (``?events=all``, what a view applies after a ``Reset``)."""
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        if after is not None:
            params["after"] = after
        if every_kind:
            params["events"] = "all"
        page = await self._json("GET", f"/rooms/{_seg(room)}/messages", params=params)
        return HistoryPage(
            page["room"],
            page["last_seq"],
            [parse_item(m) for m in page["messages"]],
            page.get("next_before"),
            page.get("next_after"),
        )

    async def post_message(
        self,
        room: str,
        body: str,
        *,
        reply_to: int | None = None,
        client_msg_id: str | None = None,
        deadline: float = 30.0,
    ) -> TextMessage:
        """Store a message (creating a never-used public room); retried with the same id on
        429 and 503 until ``deadline`` seconds have passed (then ``ConnectionLost``)."""
        cmid = client_msg_id or new_client_msg_id()
        payload: dict[str, Any] = {"body": body, "client_msg_id": cmid}
        if reply_to is not None:
            payload["reply_to"] = reply_to
        loop = asyncio.get_running_loop()
        end, delay = loop.time() + deadline, 0.1
        while True:
            try:
                message = await self._json("POST", f"/rooms/{_seg(room)}/messages", json=payload)
                item = parse_item(message)
                if not isinstance(item, TextMessage):
                    raise ProtocolError(f"a posted message that is not text: {message!r}")
                return item
            except HTTPStatusError as exc:
                if exc.status not in RETRYABLE_STATUS:
                    raise
                wait = exc.retry_after if exc.retry_after is not None else delay
            except httpx.TransportError:
                wait = delay
            if loop.time() + wait > end:
                raise ConnectionLost(f"message {cmid!r} not confirmed in {deadline}s")
            await asyncio.sleep(wait)
            delay = min(delay * 2, 5.0)

    async def rooms(
        self, *, mine: bool = False, limit: int = 100, after: str | None = None
    ) -> dict[str, Any]:
        """``{"rooms": [...], "next_after"}``: each with ``unread`` and ``mentions`` where the
        caller is a member."""
        params: dict[str, Any] = {"limit": limit, "mine": str(mine).lower()}
        if after is not None:
            params["after"] = after
        result: dict[str, Any] = await self._json("GET", "/rooms", params=params)
        return result

    async def room(self, room: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", f"/rooms/{_seg(room)}")
        return result

    async def create_room(
        self,
        name: str,
        *,
        kind: str = "public",
        title: str | None = None,
        members: list[str] | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"name": name, "kind": kind, "members": members or []}
        if title is not None:
            payload["title"] = title
        result: dict[str, Any] = await self._json("POST", "/rooms", json=payload)
        return result

    async def direct(self, user: str) -> dict[str, Any]:
        """The direct room with ``user`` (created once; its ``name`` is the server's)."""
        result: dict[str, Any] = await self._json("POST", "/rooms/direct", json={"user": user})
        return result

    async def members(
        self, room: str, *, limit: int = 100, after: str | None = None
    ) -> dict[str, Any]:
        return await self._page(f"/rooms/{_seg(room)}/members", limit=limit, after=after)

    async def set_member(self, room: str, user: str, role: str = "member") -> dict[str, Any]:
        result: dict[str, Any] = await self._json(
            "PUT", f"/rooms/{_seg(room)}/members/{_seg(user)}", json={"role": role}
        )
        return result

    async def remove_member(self, room: str, user: str) -> None:
        await self.request("DELETE", f"/rooms/{_seg(room)}/members/{_seg(user)}")

    async def presence(
        self, room: str, *, limit: int = 100, after: str | None = None
    ) -> dict[str, Any]:
        return await self._page(f"/rooms/{_seg(room)}/presence", limit=limit, after=after)

    async def _page(self, path: str, *, limit: int, after: str | None) -> dict[str, Any]:
        """One page of a list paged by ``after`` (members, presence): ``next_after`` goes on."""
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        result: dict[str, Any] = await self._json("GET", path, params=params)
        return result

    async def mark_read(self, room: str, seq: int) -> None:
        await self.request("PUT", f"/rooms/{_seg(room)}/read", json={"seq": seq})


def _seg(value: str) -> str:
    return quote(value, safe="")
