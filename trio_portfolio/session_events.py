"""Fan-out of session events from Redis pub/sub to this process's connections.

The store's scripts publish a small JSON event on a session's channel
whenever its portfolio version moves (market revaluation, new holdings) or
an analysis starts.  Every server process runs one :class:`SessionEvents`
hub over one pub/sub connection; a connection watching a session gets its
parsed events in a bounded channel (:meth:`SessionEvents.watch`), or
straight in one of its own (:meth:`SessionEvents.deliver_into`: a server
connection's control channel, so that watching costs it no task and no
channel).  The hub subscribes to a session's
channel when the first local connection watches it and unsubscribes when
the last one leaves, so a process hears only about sessions it serves.

Events are hints, never the record: a connection that misses one (the
buffer was full, or pub/sub was reconnecting) still cannot store or send a
stale result, because the fenced append checks the version in Redis.  So
when a watcher's buffer is full the event is dropped and counted, and the
reader is never blocked by a slow connection.

Anyone who can write to Redis can publish on a session's channel, so a
message that is not one of our events (not JSON, wrong fields, or bytes
that are not UTF-8, which :mod:`~trio_portfolio.redis_pubsub` already drops
and counts) is dropped and counted in ``malformed``, and logged at most once
per ``_LOG_EVERY`` seconds, so a flood cannot flood the log either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Protocol

import attrs
import orjson
import trio

from trio_portfolio.redis_io import StoreUnavailable
from trio_portfolio.redis_pubsub import PubSub

log = logging.getLogger(__name__)

_LOG_EVERY = 10.0  # seconds between two warnings about malformed events


@attrs.frozen
class PortfolioChanged:
    """The session's portfolio version moved (``cause``: ``market`` or ``holdings``)."""

    portfolio_version: int
    total_value: float
    prices: dict[str, float]
    as_of: str
    cause: str


@attrs.frozen
class AnalysisStarted:
    """Some connection (perhaps in another process) started an analysis on the session."""

    analysis_id: str


SessionEvent = PortfolioChanged | AnalysisStarted


@attrs.frozen
class SessionEventsStatistics:
    """Counters of a :class:`SessionEvents` hub, for metrics.

    ``dropped``: events a watcher's full buffer could not take; ``malformed``:
    messages on a session channel that were not an event; ``sessions_watched``
    is a gauge.
    """

    dropped: int
    malformed: int
    sessions_watched: int


def parse_event(data: str) -> SessionEvent | None:
    """Decode a published event; ``None`` for anything malformed or unknown."""
    try:
        raw = orjson.loads(data)
        if raw.get("kind") == "analysis_started":
            return AnalysisStarted(analysis_id=str(raw["analysis_id"]))
        if raw.get("kind") == "portfolio":
            prices = raw.get("prices") or {}
            return PortfolioChanged(
                portfolio_version=int(raw["portfolio_version"]),
                total_value=float(raw["total_value"]),
                prices={str(t): float(p) for t, p in prices.items()},
                as_of=str(raw.get("as_of") or ""),
                cause=str(raw.get("cause") or ""),
            )
    except (
        orjson.JSONDecodeError,
        AttributeError,
        KeyError,
        TypeError,
        ValueError,
        OverflowError,
    ):
        pass
    return None


class EventSink(Protocol):
    """Where :meth:`SessionEvents.deliver_into` puts events: a memory channel's
    send side, or a connection's control queue.

    ``send_nowait`` raises :class:`trio.WouldBlock` when full (the event is
    dropped and counted) and :class:`trio.BrokenResourceError` or
    :class:`trio.ClosedResourceError` when nobody listens any more.
    """

    def send_nowait(self, event: SessionEvent, /) -> None: ...


class SessionEvents:
    """The per-process hub; run :meth:`run` in a nursery, then :meth:`watch` sessions."""

    def __init__(
        self, pubsub: PubSub, channel_for: Callable[[str], str], *, buffer: int = 32
    ) -> None:
        self._pubsub = pubsub
        self._channel_for = channel_for
        self._buffer = buffer
        self._watchers: dict[str, dict[EventSink, Callable[[], None] | None]] = {}
        """Per channel, each watcher's send channel and what to tell when it drops one."""
        self.dropped = 0
        """Events not delivered because a watcher's buffer was full."""
        self.malformed = 0
        """Messages on a session channel that were not an event we know."""
        self._malformed_logged_at = -math.inf

    def statistics(self) -> SessionEventsStatistics:
        """A snapshot of the hub's counters."""
        return SessionEventsStatistics(self.dropped, self.malformed, self.sessions_watched)

    @property
    def sessions_watched(self) -> int:
        """How many sessions have at least one local watcher."""
        return len(self._watchers)

    @asynccontextmanager
    async def watch(
        self, session_id: str
    ) -> AsyncIterator[trio.MemoryReceiveChannel[SessionEvent]]:
        """Receive the session's events for the duration of the block.

        Waits (briefly) for the subscription to be confirmed so that no event
        published after this returns is missed; if Redis is down, it returns
        anyway and the subscription is made when Redis is back.  Events that
        do not fit the channel's ``buffer`` are dropped and counted.
        """
        send, receive = trio.open_memory_channel[SessionEvent](self._buffer)
        with send:
            async with self.deliver_into(session_id, send):
                yield receive

    def deliver_into(
        self,
        session_id: str,
        send: EventSink,
        *,
        on_drop: Callable[[], None] | None = None,
    ) -> _Delivery:
        """Put the session's events straight into ``send`` for the duration of an
        ``async with`` block.

        As :meth:`watch`, but into the caller's own channel (a connection's
        control queue), so that a watcher costs no channel and no
        forwarding task of its own.  Never blocks the hub: an event that
        ``send`` cannot take at once is dropped, counted in ``dropped`` and
        reported to ``on_drop``.  ``send`` is not closed here.  (A plain
        object rather than a generator-based context manager: a server holds
        one per connection for the connection's life.)
        """
        return _Delivery(self, session_id, send, on_drop)

    async def _subscribe(
        self, session_id: str, send: EventSink, on_drop: Callable[[], None] | None
    ) -> None:
        channel = self._channel_for(session_id)
        watchers = self._watchers.setdefault(channel, {})
        watchers[send] = on_drop
        try:
            if len(watchers) == 1 or not self._pubsub.connected:
                try:
                    await self._pubsub.subscribe(channel, timeout=2.0)
                except StoreUnavailable as exc:
                    log.warning("session events for %s delayed: %s", session_id, exc)
        except BaseException:
            self._unsubscribe(session_id, send)
            raise

    def _unsubscribe(self, session_id: str, send: EventSink) -> None:
        channel = self._channel_for(session_id)
        watchers = self._watchers.get(channel)
        if watchers is None:
            return
        watchers.pop(send, None)
        if not watchers:
            del self._watchers[channel]
            self._pubsub.unsubscribe(channel)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Route every message to the watchers of its channel, forever."""
        task_status.started()
        async for message in self._pubsub:
            event = parse_event(message.data)
            if event is None:
                self._count_malformed(message.channel, message.data)
                continue
            for send, on_drop in list(self._watchers.get(message.channel, {}).items()):
                try:
                    send.send_nowait(event)
                except trio.WouldBlock:
                    self.dropped += 1
                    if on_drop is not None:
                        on_drop()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    def _count_malformed(self, channel: str, data: str) -> None:
        self.malformed += 1
        now = trio.current_time()
        if now - self._malformed_logged_at >= _LOG_EVERY:
            self._malformed_logged_at = now
            log.warning(
                "ignoring malformed event on %s (%d so far): %.200r", channel, self.malformed, data
            )


class _Delivery:
    """The context manager :meth:`SessionEvents.deliver_into` returns."""

    __slots__ = ("_hub", "_on_drop", "_send", "_session_id")

    def __init__(
        self,
        hub: SessionEvents,
        session_id: str,
        send: EventSink,
        on_drop: Callable[[], None] | None,
    ) -> None:
        self._hub = hub
        self._session_id = session_id
        self._send = send
        self._on_drop = on_drop

    async def __aenter__(self) -> None:
        await self._hub._subscribe(self._session_id, self._send, self._on_drop)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._hub._unsubscribe(self._session_id, self._send)
