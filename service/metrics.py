"""Prometheus metrics, one registry per app (no global state): ``GET /metrics``.

Per process: with several replicas, scrape each one (they are separate targets). Under
``--workers N`` a scrape reaches one worker at a time; prefer one process per replica.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class WebhookBacklog(Protocol):
    """What is left to deliver, as the deliverer reads it (``service.db.webhooks.Backlog``)."""

    @property
    def pending(self) -> int: ...
    @property
    def oldest_age(self) -> float: ...
    @property
    def dead(self) -> int: ...


class _Live(Collector):
    """Values read from live objects at scrape time (pool usage, LISTEN reconnects)."""

    def __init__(
        self,
        pool_checked_out: Callable[[], int],
        pool_size: Callable[[], int],
        listen_reconnects: Callable[[], int],
        listen_up: Callable[[], bool],
    ) -> None:
        self._pool_checked_out = pool_checked_out
        self._pool_size = pool_size
        self._listen_reconnects = listen_reconnects
        self._listen_up = listen_up

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "chat_db_pool_checked_out", "Database connections in use", self._pool_checked_out()
        )
        yield GaugeMetricFamily(
            "chat_db_pool_size", "Database connections held by the pool", self._pool_size()
        )
        yield CounterMetricFamily(
            "chat_listen_reconnects",
            "Times the LISTEN connection was re-established",
            self._listen_reconnects(),
        )
        yield GaugeMetricFamily(
            "chat_listen_up", "1 when the LISTEN connection is up", int(self._listen_up())
        )


class Counts:
    """The counters bumped per message and per delivery: plain integers, read at scrape time.
    A ``prometheus_client.Counter`` takes a lock per ``inc``: ~5% of a server's time under
    fan-out. The event loop is the only writer."""

    __slots__ = ("acks", "delivered", "received", "stored_rest", "stored_websocket")

    def __init__(self) -> None:
        self.received = self.stored_websocket = self.stored_rest = 0
        self.delivered = self.acks = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "chat_messages_received", "Send frames received from clients", self.received
        )
        stored = CounterMetricFamily(
            "chat_messages_stored", "Messages stored (resends excluded)", labels=["via"]
        )
        stored.add_metric(["websocket"], self.stored_websocket)
        stored.add_metric(["rest"], self.stored_rest)
        yield stored
        yield CounterMetricFamily(
            "chat_messages_delivered", "Message frames sent to websocket clients", self.delivered
        )
        yield CounterMetricFamily("chat_acks", "Acks sent", self.acks)


class LoopHistogram(Collector):
    """A histogram observed from the event loop only (per message, per commit): plain integers
    exported at scrape time. ``prometheus_client.Histogram`` takes two locks per observation."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # bucket "le": value <= bound
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative = 0
        buckets = []
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.counts = Counts()
        r.register(self.counts)
        self.connections = Gauge("chat_connections", "Open websocket connections", registry=r)
        self.errors = Counter(
            "chat_errors", "Error frames and error responses by code", ["code"], registry=r
        )
        self.fanout_latency = LoopHistogram(
            "chat_fanout_latency_seconds",
            "From just before commit to this process forwarding the message to its clients",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.commit_batch = LoopHistogram(
            "chat_commit_batch_messages",
            "Messages stored per commit (group commit: the sends that arrived together)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.replay_size = LoopHistogram(
            "chat_history_replay_messages",
            "Messages replayed on connect",
            buckets=(0, 1, 10, 50, 100, 250, 500, 1000),
        )
        for histogram in (self.fanout_latency, self.commit_batch, self.replay_size):
            r.register(histogram)
        self.slow_consumers = Counter(
            "chat_slow_consumer_disconnects", "Connections closed for falling behind", registry=r
        )
        self.streams_lost = Counter(
            "chat_room_stream_lost_disconnects",
            "Connections closed (1011) because their room's live stream in this process failed",
            registry=r,
        )
        self.catch_up_reads = Counter(
            "chat_catchup_reads",
            "Shared catch-up reads from the database (after a LISTEN reconnect or a hole in the "
            "live stream): about one per room, however many connections it has",
            registry=r,
        )
        self.http_connections_closed = Counter(
            "chat_http_connections_closed",
            "Connections closed by the server's guards: head_timeout (request head or websocket "
            "handshake too slow), unfinished_limit (too many such at once), head_too_large (over "
            "64 kB: 431), fd_limit (file descriptor reserve reached)",
            ["reason"],
            registry=r,
        )

        # Outgoing webhooks (service.chat.webhooks): counted per attempt's outcome; the
        # backlog gauges are the whole service's, read by the deliverer every poll interval
        # (the same for every replica: alert on one).
        self.webhooks_delivered = Counter(
            "chat_webhooks_delivered", "Stream items POSTed and answered with a 2xx", registry=r
        )
        self.webhooks_retried = Counter(
            "chat_webhooks_retried",
            "Webhook attempts that failed (non-2xx, timeout, refused) and will be retried",
            registry=r,
        )
        self.webhooks_dead_lettered = Counter(
            "chat_webhooks_dead_lettered",
            "Stream items given up on after CHAT_WEBHOOK_MAX_ATTEMPTS attempts",
            registry=r,
        )
        self.webhook_backlog = Gauge(
            "chat_webhook_backlog",
            "Stream items queued for a webhook, not yet delivered",
            registry=r,
        )
        self.webhook_oldest_age = Gauge(
            "chat_webhook_oldest_age_seconds",
            "How long the oldest undelivered webhook item has been queued",
            registry=r,
        )
        self.webhook_dead_letters = Gauge(
            "chat_webhook_dead_letters", "Dead letters kept", registry=r
        )

    def webhook_outcome(self, outcome: str) -> None:
        """One webhook attempt's outcome (``service.chat.webhooks.Outcome``)."""
        counter = {
            "delivered": self.webhooks_delivered,
            "retried": self.webhooks_retried,
            "dead": self.webhooks_dead_lettered,
        }[outcome]
        counter.inc()

    def webhook_backlog_read(self, backlog: WebhookBacklog) -> None:
        self.webhook_backlog.set(backlog.pending)
        self.webhook_oldest_age.set(backlog.oldest_age)
        self.webhook_dead_letters.set(backlog.dead)

    def watch(
        self,
        *,
        pool_checked_out: Callable[[], int],
        pool_size: Callable[[], int],
        listen_reconnects: Callable[[], int],
        listen_up: Callable[[], bool],
    ) -> None:
        self.registry.register(_Live(pool_checked_out, pool_size, listen_reconnects, listen_up))
