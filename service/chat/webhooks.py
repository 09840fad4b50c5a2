"""Outgoing webhooks: every stored stream item POSTed, signed, to the global receiver
(``CHAT_WEBHOOK_URL``) and to its room's own (``PUT /rooms/{room}/webhook``). docs/webhooks.md
is the receiver's side.

What is guaranteed:

* **Every item, at least once.** What there is to send is the room's stream itself: the
  ``message`` rows past the receiver's cursor in that room (migration 0011), committed with
  the item or not at all, so a committed item is due even if the process dies the next
  instant. The cursor moves past an item only once a receiver answered 2xx (or it became a
  dead letter after ``CHAT_WEBHOOK_MAX_ATTEMPTS``). A crash between the 2xx and the move
  repeats it, and so does a PostgreSQL crash for moves of its last moments (they commit
  without waiting for the WAL's flush): receivers deduplicate by ``(room, seq)``.
* **In seq order per room and receiver**: a room's next item is not sent before the previous
  one was delivered or dead-lettered (``service.db.webhooks`` leases a room's cursor, not an
  item, and only when nobody holds it).
* **Never twice at once, never skipped, across replicas**: a worker leases the item in the
  database (``service.db.webhooks``) for longer than its POST may take; a killed replica's
  lease runs out and the item is due again.
* **A slow or dead receiver never slows the chat**: delivery runs in its own tasks
  (``CHAT_WEBHOOK_CONCURRENCY`` workers), on its own connections (a small pool, used only to
  claim and settle, never held during a POST; apart from the service's pool and the writer's
  connection), with a deadline per POST. Nothing on the message path waits for it: storing an
  item writes nothing for delivery unless its room's cursor was idle (the trigger marks it).
* **Prompt**: the trigger NOTIFYs ``chat_webhook`` when it marked an idle cursor pending; a
  worker that settled an item claims again at once (the room's next, or another room's whose
  turn came); a failed attempt wakes its worker when its backoff is over; a poll every
  ``CHAT_WEBHOOK_POLL_INTERVAL`` catches the rest. The NOTIFY is heard on the bus's LISTEN
  connection when the bus is this database (``follow``), on one of its own otherwise: every
  LISTEN connection costs PostgreSQL a wake-up for every NOTIFY in the database, each message's
  included.

The payload is the item's ``message`` frame as the websocket sends it (``chat_message_json``,
read when it is sent): a text message edited or deleted before its delivery goes out in its
current state, as a resume replays it, so a delete redacts the queued copies of its text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import asyncpg
import httpx

from service.chat.webhook_http import Poster
from service.config import http_url_problem
from service.db import webhooks as db
from service.db.engine import DEFAULT_KEEPALIVE, Keepalive, connect, reading
from service.db.webhooks import Backlog, DeadLetter, Registration
from service.errors import NotFound

__all__ = [
    "Backlog",
    "DeadLetter",
    "Outcome",
    "Registration",
    "WebhookDeliverer",
    "backoff",
    "check_url",
    "signature",
]

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Chat-Signature"
APPLICATION_NAME = "chat-service-webhooks"
USER_AGENT = "chat-service-webhooks/1"

LEASE_MARGIN = 2.0
"""Seconds a lease outlasts the POST's deadline (``CHAT_WEBHOOK_TIMEOUT``): the time between
the claim's start in the database and the POST's start here, with room to spare. A killed
replica's item is taken over this long after the POST's deadline."""

EMPTY_CLAIM_INTERVAL = 0.2
"""Claims that may find nothing due: at most one per this many seconds per replica, however
many workers wait. While every room with items is being sent (a slow receiver), each new item's
NOTIFY wakes every idle worker, and each claim is a query the chat's database pays for
(docs/benchmarks.md, round 11). A worker that delivered claims again at once (its room's next
item), and a claim that found one lets the next idle worker look at once."""

Follow = Callable[[str, Callable[[], None]], Awaitable[None]]
"""``follow(channel, wake)``: call ``wake()`` on every notification of ``channel`` and after a
gap in them, until cancelled (``RoomHub.follow``: the bus's own LISTEN connection)."""

Outcome = Literal["delivered", "retried", "dead"]
"""What became of one attempt (a metric each)."""


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, Stripe's scheme: the
    timestamp is signed with the body, so a captured request cannot be replayed later."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def backoff(attempts: int, *, base: float, cap: float) -> float:
    """Seconds to wait after ``attempts`` failed attempts: doubling from ``base``, at most
    ``cap``, with jitter (half to all of it) so that retries of many rooms spread out."""
    delay = min(cap, base * 2 ** min(attempts - 1, 60))
    return float(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret


class WebhookDeliverer:
    """The replica's delivery tasks; ``start`` in the lifespan, ``close`` on the way out."""

    def __init__(
        self,
        dsn: str,
        *,
        url: str | None,
        secret: bytes,
        on_outcome: Callable[[Outcome], None],
        on_backlog: Callable[[Backlog], None],
        max_attempts: int,
        timeout: float,
        backoff_base: float,
        backoff_max: float,
        concurrency: int,
        poll_interval: float,
        follow: Follow | None = None,
        keepalive: Keepalive = DEFAULT_KEEPALIVE,
    ) -> None:
        """``follow``: how to hear the trigger's NOTIFYs when the bus is this database's
        LISTEN/NOTIFY (its connection, not one more); None: a LISTEN connection of its own."""
        self._dsn = dsn
        self._url = url
        self._secret = secret
        self._on_outcome = on_outcome
        self._on_backlog = on_backlog
        self._max_attempts = max_attempts
        self._timeout = timeout
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._concurrency = concurrency
        self._poll_interval = poll_interval
        self._keepalive = keepalive
        self._follow = follow
        self._hooks = [db.GLOBAL, db.ROOM] if url else [db.ROOM]
        self._wake = asyncio.Event()
        self._look_in_outbox_at = 0.0
        """Event loop time from which claims look in the outbox again (see ``_deliver_one``)."""
        self._claim_turn = asyncio.Lock()
        self._next_empty_claim = 0.0
        self._replica = secrets.token_hex(6)
        self._claims = itertools.count(1)
        self._leased: dict[str, db.Claimed] = {}
        """Items this replica holds a lease on, by lease owner: released on the way out."""
        self._tasks: list[asyncio.Task[None]] = []
        self._pool: asyncpg.Pool | None = None
        self._poster: Poster | None = None
        self._proxied: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Start the workers; connections are made as they are needed (none at start-up), so
        a database hiccup here never keeps the service from starting."""
        keepalive = self._keepalive

        async def init(conn: asyncpg.Connection) -> None:
            keepalive.apply(conn)

        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            # Workers hold a connection only to claim and to settle, never during a POST.
            max_size=min(self._concurrency, 4) + 1,
            command_timeout=30,
            server_settings={"application_name": APPLICATION_NAME},
            init=init,
        )
        self._poster = Poster(user_agent=USER_AGENT, max_idle=self._concurrency)
        for n in range(self._concurrency):
            self._tasks.append(asyncio.create_task(self._work(), name=f"webhook-worker-{n}"))
        wakeups = self._listen() if self._follow is None else self._follow_bus(self._follow)
        self._tasks.append(asyncio.create_task(wakeups, name="webhook-listen"))
        self._tasks.append(asyncio.create_task(self._watch(), name="webhook-backlog"))

    async def close(self) -> None:
        """Stop at once: a POST in flight is cut off and its item stays queued (repeated
        later, by this replica or another)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._leased and self._pool is not None:
            # The POSTs are cut off (their tasks have ended): another replica may send these
            # items now rather than once their leases run out.
            try:
                async with asyncio.timeout(2), self._pool.acquire() as conn:
                    for owner, item in self._leased.items():
                        await db.release(conn, item, owner=owner)
            except Exception as exc:
                log.info("webhook leases left to run out: %r", exc)
        if self._poster is not None:
            self._poster.close()
        if self._proxied is not None:
            await self._proxied.aclose()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except TimeoutError:
                self._pool.terminate()

    def wake(self) -> None:
        """Every worker looks for due items now (a NOTIFY, a backoff that is over)."""
        self._wake.set()
        self._wake = asyncio.Event()
        self._look_in_outbox_at = 0.0  # a dead letter retried NOTIFYs; a backoff is over

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            woken = self._wake
            try:
                found = await self._deliver_one()
            except Exception as exc:  # the database went away: the poll tries again
                log.warning("webhook delivery paused: %r", exc)
                found = False
            if not found:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), self._poll_interval)
                # Idle workers take turns: one claim that may find nothing per
                # EMPTY_CLAIM_INTERVAL for the whole replica, not one per worker per NOTIFY.
                async with self._claim_turn:
                    await asyncio.sleep(max(0.0, self._next_empty_claim - loop.time()))
                    self._next_empty_claim = loop.time() + EMPTY_CLAIM_INTERVAL

    async def _deliver_one(self) -> bool:
        """Lease, POST and settle one item; False when none was due. No transaction is open
        during the POST: the lease (committed by the claim) keeps the item and its room to
        this worker until the POST's deadline has passed, whatever happens to the database."""
        assert self._pool is not None  # noqa: S101 - started
        owner = f"{self._replica}.{next(self._claims)}"
        started = asyncio.get_running_loop().time()
        # The outbox (retried dead letters) is nearly always empty: a claim looks in it after
        # a wake-up and at least once per poll interval, not before every item of a backlog.
        # Set before the claim, so that a wake-up meanwhile still counts.
        outbox = started >= self._look_in_outbox_at
        if outbox:
            self._look_in_outbox_at = started + self._poll_interval
        async with self._pool.acquire() as conn:
            item = await db.claim(
                conn,
                hooks=self._hooks,
                lease=self._timeout + LEASE_MARGIN,
                owner=owner,
                outbox=outbox,
            )
        if item is None:
            return False
        self._next_empty_claim = 0.0  # there may be more: the next idle worker looks at once
        if item.queued:
            self._look_in_outbox_at = 0.0  # and the outbox may hold more
        self._leased[owner] = item
        try:
            delivered = await self._deliver(item, owner, started)
        except asyncio.CancelledError:
            raise  # shutting down: ``close`` releases the lease
        except Exception:
            self._leased.pop(owner, None)
            raise
        self._leased.pop(owner, None)
        return delivered

    async def _deliver(self, item: db.Claimed, owner: str, started: float) -> bool:
        assert self._pool is not None  # noqa: S101 - started
        url = self._url if item.hook == db.GLOBAL else item.url
        if item.frame is None or url is None:  # room deleted, or its registration
            async with self._pool.acquire() as conn:
                await db.delivered(conn, item, owner=owner)
            return True
        # The lease counts from the claim's start: so does the POST's deadline.
        error = await self._post(url, item, deadline=started + self._timeout)
        async with self._pool.acquire() as conn:
            if error is None:
                if await db.delivered(conn, item, owner=owner):
                    self._on_outcome("delivered")
                else:
                    log.warning(
                        "webhook item %s of room id %d was delivered after its lease ran out",
                        item.seq,
                        item.room_id,
                    )
                return True
            attempts = item.attempts + 1
            if attempts >= self._max_attempts:
                if await db.failed(conn, item, owner=owner, error=error, retry_in=None):
                    log.warning(
                        "webhook item %s of room id %d (%s) is a dead letter after %d attempts: %s",
                        item.seq,
                        item.room_id,
                        item.hook,
                        attempts,
                        error,
                    )
                    self._on_outcome("dead")
                return True
            retry_in = backoff(attempts, base=self._backoff_base, cap=self._backoff_max)
            if await db.failed(conn, item, owner=owner, error=error, retry_in=retry_in):
                self._on_outcome("retried")
        asyncio.get_running_loop().call_later(retry_in, self.wake)
        return True

    async def _post(self, url: str, item: db.Claimed, *, deadline: float) -> str | None:
        """None when the receiver answered 2xx before ``deadline`` (event loop time), else why
        not. The answer's body is never read: a receiver cannot make this process buffer
        anything."""
        assert self._poster is not None and item.frame is not None  # noqa: S101
        body = item.frame.encode()
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: signature(self._secret, int(time.time()), body),
            "x-chat-attempt": str(item.attempts + 1),
        }
        try:
            async with asyncio.timeout_at(deadline):
                if self._poster.via_proxy(url):
                    status = await self._post_via_proxy(url, body, headers)
                else:
                    status = await self._poster.post(url, body, headers)
        except TimeoutError:
            return f"no answer within {self._timeout:g} s"
        except Exception as exc:  # refused, reset, TLS, a bad answer: an attempt
            return f"{type(exc).__name__}: {exc}"[:300]
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"

    async def _post_via_proxy(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """httpx, which speaks to proxies (CONNECT for https); made on first use."""
        if self._proxied is None:
            # httpx logs every request's URL at INFO, and a receiver's URL may hold a token.
            logging.getLogger("httpx").setLevel(logging.WARNING)
            self._proxied = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout),
                follow_redirects=False,  # a redirect is an answer (non-2xx), not a new receiver
                limits=httpx.Limits(max_connections=self._concurrency),
                headers={"user-agent": USER_AGENT},
            )
        async with self._proxied.stream("POST", url, content=body, headers=headers) as answer:
            return answer.status_code

    async def _follow_bus(self, follow: Follow) -> None:
        """Wake the workers on each NOTIFY of the trigger, heard on the bus's connection."""
        while True:
            try:
                await follow(db.NOTIFY_CHANNEL, self.wake)
            except Exception as exc:  # the bus's subscriptions do not fail: a bug; poll meanwhile
                log.warning("webhook wake-ups lost: %r", exc)
                await asyncio.sleep(self._poll_interval)

    async def _listen(self) -> None:
        """Wake the workers on each NOTIFY of the trigger, on a LISTEN connection of its own;
        on a lost connection, connect again (the poll covers the gap)."""
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(
                    self._dsn, APPLICATION_NAME + "-listen", keepalive=self._keepalive
                )
                await conn.add_listener(db.NOTIFY_CHANNEL, lambda *_: self.wake())
                self.wake()  # what was queued while nobody listened
                while True:
                    await asyncio.sleep(self._poll_interval)
                    await asyncio.wait_for(conn.execute("SELECT 1"), 10)
            except Exception as exc:
                log.warning("webhook LISTEN connection lost: %r", exc)
                await asyncio.sleep(self._poll_interval)
            finally:
                if conn is not None:
                    conn.terminate()

    async def _watch(self) -> None:
        """Refresh the backlog gauges once per poll interval, at least a second apart (and give
        rooms registered by replicas of the release before 0011 their cursor)."""
        assert self._pool is not None  # noqa: S101
        while True:
            try:
                async with self._pool.acquire() as conn:
                    if await db.adopt_registrations(conn):
                        self.wake()
                    found = await db.backlog(conn, hooks=self._hooks)
                self._on_backlog(found)
            except Exception as exc:
                log.debug("webhook backlog not read: %r", exc)
            await asyncio.sleep(max(1.0, self._poll_interval))


# The admin use cases (REST: ``service.api.webhooks``); the caller is a service admin.


def check_url(url: str) -> str | None:
    """Why ``url`` cannot be a receiver (a sentence for the 422), or None."""
    return http_url_problem(url)


async def register(pool: asyncpg.Pool, *, room: str, url: str) -> Registration:
    """Set ``room``'s receiver (replacing one); from the next stored item on, its items are
    queued for it. ``NotFound`` for a room that does not exist."""
    async with reading(pool) as conn:
        found = await db.put_registration(conn, room=room, url=url)
    if found is None:
        raise NotFound("no such room")
    return found


async def registration(pool: asyncpg.Pool, *, room: str) -> Registration:
    async with reading(pool) as conn:
        found = await db.get_registration(conn, room=room)
    if found is None:
        raise NotFound("this room has no webhook")
    return found


async def unregister(pool: asyncpg.Pool, *, room: str) -> None:
    """Remove ``room``'s receiver and drop what was still queued for it."""
    async with reading(pool) as conn:
        if not await db.delete_registration(conn, room=room):
            raise NotFound("this room has no webhook")


async def dead_letters(pool: asyncpg.Pool, *, room: str | None, limit: int) -> list[DeadLetter]:
    async with reading(pool) as conn:
        return await db.dead_letters(conn, room=room, after=None, limit=limit)


async def retry_dead_letters(pool: asyncpg.Pool, *, room: str | None) -> int:
    """Make dead letters due again (the receiver is fixed). They go out ahead of what their
    room queued since, which was delivered without them."""
    async with reading(pool) as conn:
        return await db.retry_dead(conn, room=room)
