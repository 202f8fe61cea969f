"""One WebSocket connection: reader, single writer, session events, the analysis scope.

Theory of operation
===================

Each accepted WebSocket gets a :class:`Connection` whose :meth:`~Connection.run`
owns a nursery with two helper tasks and runs the *control loop* itself;
the server's session events hub puts the session's pub/sub events straight
into the control queue (dropped and counted when it is full), so watching
costs no task::

    connection nursery
    ├── reader      ws.get_message() -> rate limit -> control queue; idle timeout
    ├── writer      outbox queue -> ws.send_messages()  (frames); pings
    └── analysis    AnalysisRunner in its own cancel scope (at most one)
                    └── metrics nursery: five metric tasks

*Small queues.*  The outbox and the control queue are ``_Queue`` objects (one
receiver, bounded, cancel-safe) rather than Trio memory channels: an idle
connection holds both for hours, and the two channels with their parked
receivers cost about 5 KiB of the 41 KiB an idle connection cost at
2607a4b (``bench/README.md``).  Without an idle timeout (the default) the
reader waits with no cancel scope either.

*One writer.*  Every frame leaves through one bounded outbox queue read by
one writer task (pongs and close frames from the reader share the
WebSocket's send lock, so nothing interleaves), so frames never interleave, and a client that stops
reading fills the outbox, which stalls the producers (backpressure) instead
of growing memory.  The writer takes every frame waiting and sends them with
one write (one syscall and one send deadline per batch, not per frame).  The
outbox is bounded twice: in frames (``outbox_size``: producers wait) and in
bytes (``outbox_max_bytes``, counting the frames queued and those being
sent): a frame that would take
it over the byte budget marks the client as too slow, and the connection is
closed with 1008, its queued frames dropped (a single frame larger than the
whole budget is still let through when nothing else is queued).  A send
that takes longer than :data:`SEND_TIMEOUT` closes the connection the same
way; that send was cut mid-frame, so no close frame can follow it and the
TCP connection is simply dropped.

*Keep-alive.*  Between frames the writer pings the client every
``ping_interval_seconds`` (at most one ping in flight,
:meth:`~trio_portfolio.websocket.ServerWebSocket.send_ping`, which does not
wait for the pong) and closes with 1011 a connection whose pong is more than
``ping_timeout_seconds`` late, so a half-open or stalled peer is found
without a task per connection.  The client's pings are answered (and its
pongs noted) by the reader itself, inside
:meth:`~trio_portfolio.websocket.ServerWebSocket.get_message`, which stops
reading while the control queue is full; so a client whose frames the
control loop has not taken for a whole ping timeout is taken for dead too.
With ``idle_timeout_seconds`` set, the reader closes (1000, reason
``idle timeout``) a connection whose client sent no frame for that long
(pongs do not count); off by default, so v1 clients that only wait for
results stay connected.

*One controller.*  Client frames and session events are handled one at a
time, in arrival order, by the control loop.  ``analyze`` cancels the
current analysis scope and **waits for the runner to finish** (its shielded
commits included) before queueing ``analysis_cancelled`` and taking the next
snapshot, so nothing of the old analysis can follow anything of the new
(guarantee 1).  A portfolio event whose version is newer than the running
snapshot restarts the analysis (guarantee 3) before ``market_update`` is
queued.  An ``analysis_started`` event from another connection on the same
session, heard after our own analysis's (events arrive in publish order),
means our analysis is no longer the session's current one: it is stopped and
reported as ``switched``.

*The analysis boundary.*  The connection and its
:class:`~trio_portfolio.analysis.AnalysisRunner` share only the types of
:mod:`trio_portfolio.analysis_outcome`: the runner mints and the connection
recognises analysis ids (:class:`~trio_portfolio.analysis_outcome.AnalysisId`); the
runner sends and counts through this connection's
:class:`~trio_portfolio.analysis_outcome.AnalysisObserver`; it ends with an
:data:`~trio_portfolio.analysis_outcome.AnalysisOutcome`.

*An expired session.*  Whoever finds the session gone (a touch, a read, a
write, or an analysis at its start or mid-way) goes through
:meth:`Connection._session_expired`: one ``session_expired`` error, then a
fresh session (``session``, v2), after stopping an analysis still running
on the vanished session (``analysis_cancelled`` / ``cancelled``).  An
analysis that ends with
:class:`~trio_portfolio.analysis_outcome.SessionGone` on its own hands that
outcome back to the control loop (through the control queue), so the
answer is given in order with the handling of every other input.  Each
answer starts a new *session epoch*; an outcome from an analysis of an
earlier epoch is answered already, so the client is told once.

*Activity.*  Every client frame is activity (it refreshes the session's
TTL); market updates are not (guarantee 5).

*Ending.*  The connection ends when the client goes, the writer fails, a
limit is hit, or the server shuts down (:meth:`Connection.shutdown`).  In
every case :meth:`Connection._close` runs shielded, in bounded time: within
``shutdown_timeout_seconds`` the running analysis is stopped and unfenced
and the queued frames are flushed; whatever is left then is cut short (the
runner is abandoned, the writer cancelled); then the closing handshake gets
at most :data:`CLOSE_TIMEOUT` more (1001 on shutdown), and the TCP
connection is closed.  So a connection ends at most
``shutdown_timeout_seconds + CLOSE_TIMEOUT`` after it was told to, whatever
the client and Redis do.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import secrets
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Generic, TypeVar

import attrs
import trio
from trio_websocket import ConnectionClosed

from trio_portfolio.admission import session_cap_refusal
from trio_portfolio.analysis import AnalysisContext, AnalysisRunner
from trio_portfolio.analysis_outcome import AnalysisId, AnalysisOutcome, SessionGone
from trio_portfolio.analytics import HistoryCache
from trio_portfolio.config import Settings
from trio_portfolio.logs import new_error_id
from trio_portfolio.market import MarketData, TickerRefused
from trio_portfolio.metrics import Refusal, ServerMetrics
from trio_portfolio.models import AnalysisResult, AppendStatus, Portfolio, utc_now
from trio_portfolio.protocol import (
    Analyze,
    Cancel,
    CancelReason,
    Dialect,
    ErrorCode,
    GetPortfolio,
    ProtocolError,
    SetHoldings,
    parse_client_message,
    render_error,
    render_market_update,
    render_portfolio,
    render_session,
)
from trio_portfolio.redis_io import CommandError, StoreUnavailable
from trio_portfolio.session_events import AnalysisStarted, PortfolioChanged, SessionEvents
from trio_portfolio.store import ClaimedPrices, ClaimExpired, HoldingsReplaced, SessionStore
from trio_portfolio.websocket import ServerWebSocket

log = logging.getLogger(__name__)

SEND_TIMEOUT = 10.0
"""Seconds a single frame may take to reach a client before we give up on it."""

CONTROL_QUEUE_SIZE = 16
"""Inputs (client frames, session events, analysis outcomes) waiting for the control loop."""

CLAIM_ATTEMPTS = 3
"""Claims one write of holdings makes before its :class:`ClaimExpired` reaches the client."""

CLOSE_TIMEOUT = 1.0
"""Seconds the closing handshake may take, after the grace period, before the TCP
connection is dropped."""


@attrs.frozen
class Services:
    """What every connection of one server shares (owned by the server, not global)."""

    settings: Settings
    store: SessionStore
    market: MarketData
    events: SessionEvents
    metrics: ServerMetrics
    rng: random.Random
    history_cache: HistoryCache = attrs.field(factory=HistoryCache)
    """The history arrays every analysis of this server shares (bounded LRU)."""

    async def create_session(self, session_id: str) -> Portfolio:
        """Create ``session_id`` with the default holdings at market prices (or resume it).

        Counts as client activity.  Used for WebSocket connects and ``POST /session``.
        It does not check the session cap: callers ask :meth:`at_session_cap`
        first.

        Raises:
          ValueError: for an invalid ``session_id`` (callers validate it first).
          TickerRefused: a default holding is off the symbol list, or adding
            it would take the universe past ``max_tickers``.
          ClaimExpired: the prices' claim aged past its grace between
            :meth:`MarketData.ensure_prices` and the write, :data:`CLAIM_ATTEMPTS`
            times (each is claimed again; nothing written).
          StoreUnavailable: Redis cannot serve this now.
          CommandError, StoreDataError: Redis refused a command, or the
            stored session cannot be decoded.
        """
        holdings = self.settings.default_holdings

        async def create(prices: ClaimedPrices) -> Portfolio:
            return await self.store.create_if_missing(session_id, holdings, prices, utc_now())

        portfolio, _ = await self._claimed_write(session_id, holdings, create)
        return portfolio

    async def replace_holdings(
        self, session_id: str, holdings: Mapping[str, float]
    ) -> Portfolio | None:
        """Replace ``session_id``'s holdings at market prices; ``None`` if the session is gone.

        Claims the tickers (:meth:`MarketData.ensure_prices`), writes, and
        lets the market drop at once the tickers the session let go that
        nobody else holds (:meth:`MarketData.let_go`; should that call fail,
        the next pass's prune drops them instead, so its failure is only
        logged).  A write refused because its claim aged (a stall) or was
        overtaken by another write of the session is claimed and tried again,
        up to :data:`CLAIM_ATTEMPTS` times.

        Raises:
          ValueError: for invalid holdings (callers validate them first).
          TickerRefused: a ticker off the symbol list, or the universe full.
          ClaimExpired: every attempt's claim was refused (nothing written).
          StoreUnavailable, CommandError, StoreDataError: as every store call.
        """

        async def replace(prices: ClaimedPrices) -> HoldingsReplaced | None:
            return await self.store.set_holdings(session_id, holdings, prices, utc_now())

        replaced, prices = await self._claimed_write(session_id, holdings, replace)
        if replaced is None:
            return None
        try:
            dropped = await self.market.let_go(session_id, prices.claimed_at_ms, replaced.let_go)
            self.metrics.tickers_let_go(len(dropped))
        except (StoreUnavailable, CommandError) as exc:
            log.debug("let-go of %d tickers left to the prune: %s", len(replaced.let_go), exc)
        return replaced.portfolio

    async def _claimed_write(
        self,
        session_id: str,
        holdings: Mapping[str, float],
        write: Callable[[ClaimedPrices], Awaitable[T]],
    ) -> tuple[T, ClaimedPrices]:
        """``write`` with the tickers of ``holdings`` claimed for ``session_id``; and the claim.

        A write refused with :class:`ClaimExpired` is claimed and tried again,
        :data:`CLAIM_ATTEMPTS` times in all; the last refusal is raised.
        """
        for attempt in range(1, CLAIM_ATTEMPTS + 1):
            prices = await self.market.ensure_prices(list(holdings), holder=session_id)
            try:
                return await write(prices), prices
            except ClaimExpired:
                if attempt == CLAIM_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def at_session_cap(self) -> bool:
        """Whether the store already holds ``max_sessions`` live sessions (the buckets' ``SCARD``).

        The handshake and ``POST /session`` check this before a creation; a
        connection checks it again before re-creating a session that expired
        under it.  Ids the updater has not pruned yet still count.

        Raises:
          StoreUnavailable: Redis cannot answer now.
          CommandError: an index key is not a set (clobbered).
        """
        census = await self.store.session_census()
        return session_cap_refusal(census.live, self.settings.max_sessions) is not None


@attrs.define(slots=True)
class TokenBucket:
    """Per-connection flood control: ``rate`` frames/s with bursts of ``burst``.

    A frame over the rate is *throttled* (answered with ``rate_limited`` and
    dropped); a client that keeps sending while throttled, running a second
    burst into debt, is a *flood* and is disconnected with 1008.
    """

    rate: float
    burst: float
    tokens: float = attrs.field(init=False)
    stamp: float = attrs.field(init=False, default=0.0)

    def __attrs_post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> str:
        """``"ok"``, ``"throttled"`` or ``"flood"`` for one frame arriving at ``now``."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        if self.tokens >= 0:
            return "ok"
        return "throttled" if self.tokens >= -self.burst else "flood"


T = TypeVar("T")


class _Queue(Generic[T]):
    """A bounded FIFO with one receiving task and any number of senders.

    What the connection's outbox and control queue need of a Trio memory
    channel, at about a tenth of its memory: a memory channel costs about
    1.7 KiB, and a task parked in its ``receive`` about 1 KiB more (three
    sets, two ordered dicts and the channel's statistics objects), held by
    every idle connection twice (``bench/README.md``).  Semantics follow the
    channel's: :meth:`send` waits while the queue is full and is a
    checkpoint, :meth:`send_nowait` raises :class:`trio.WouldBlock`, both
    raise :class:`trio.ClosedResourceError` after :meth:`close`;
    :meth:`receive` waits for an item and raises :class:`trio.EndOfChannel`
    once the queue is closed and empty.  Every wait is cancellable without
    losing an item (an item is taken only by a receive that returns it).
    Only one task may receive at a time.
    """

    __slots__ = ("_closed", "_items", "_max", "_receiver", "_senders")

    def __init__(self, max_size: int) -> None:
        self._items: list[T] = []
        self._max = max_size
        self._receiver: trio.lowlevel.Task | None = None
        self._senders: trio.lowlevel.ParkingLot | None = None
        """Senders waiting for room (made on the first wait)."""
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def send_nowait(self, item: T) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the queue is closed")
        if len(self._items) >= self._max:
            raise trio.WouldBlock
        self._items.append(item)
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            trio.lowlevel.reschedule(receiver)

    async def send(self, item: T) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                self.send_nowait(item)
            except trio.WouldBlock:
                if self._senders is None:
                    self._senders = trio.lowlevel.ParkingLot()
                await self._senders.park()
            else:
                break
        await trio.lowlevel.cancel_shielded_checkpoint()

    def receive_nowait(self) -> T:
        if not self._items:
            if self._closed:
                raise trio.EndOfChannel
            raise trio.WouldBlock
        item = self._items.pop(0)
        if self._senders:
            self._senders.unpark()
        return item

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._receiver = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def receive(self) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._items or self._closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            assert self._receiver is None, "one receiver at a time"
            self._receiver = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        return self.receive_nowait()

    def close(self) -> None:
        """Refuse further sends; wake the receiver and every waiting sender."""
        self._closed = True
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            trio.lowlevel.reschedule(receiver)
        if self._senders is not None:
            self._senders.unpark_all()


@attrs.frozen
class _Throttled:
    """Marker in the control queue: a client frame was dropped by the rate limit."""


@attrs.frozen
class _AnalysisEnded:
    """In the control queue: an analysis ended by itself with an outcome to answer.

    ``epoch`` is the session epoch the analysis was started in.
    """

    outcome: AnalysisOutcome
    epoch: int


_Input = str | bytes | _Throttled | PortfolioChanged | AnalysisStarted | _AnalysisEnded


class Connection:
    """A client on one session; see the module docstring."""

    # Slots: a server holds one of these per idle client for hours.
    __slots__ = (
        "_bucket",
        "_close_code",
        "_close_reason",
        "_control",
        "_control_scope",
        "_current",
        "_deadline",
        "_discarding",
        "_grace",
        "_heard_own_start",
        "_market",
        "_notify_on_close",
        "_nursery",
        "_outbox",
        "_sending",
        "_session_epoch",
        "_session_ready",
        "_starting",
        "_store",
        "_stream_broken",
        "_unresolved",
        "_writer_scope",
        "dialect",
        "id",
        "outbox_bytes",
        "outbox_bytes_peak",
        "services",
        "session_id",
        "ws",
    )

    def __init__(
        self, services: Services, ws: ServerWebSocket, session_id: str, dialect: Dialect
    ) -> None:
        self.services = services
        self.ws = ws
        self.session_id = session_id
        self.dialect = dialect
        self.id = secrets.token_hex(6)
        settings = services.settings
        self._outbox: _Queue[str] = _Queue(settings.outbox_size)
        self.outbox_bytes = 0
        """Bytes (characters) of the frames queued, waiting to queue, or being sent."""
        self.outbox_bytes_peak = 0
        """The most :attr:`outbox_bytes` ever was (never above the budget, but for
        a single frame larger than the whole budget)."""
        self._discarding = False
        """The client is too slow or gone: frames are dropped, not queued or sent."""
        self._stream_broken = False
        """A send was cut mid-frame: no close frame can follow, only a TCP close."""
        self._notify_on_close = False
        """Tell the client its running analysis was cancelled (it can still hear us)."""
        self._writer_scope = trio.CancelScope()
        self._sending = False
        """The writer is in a send: cancelling it now cuts a frame."""
        self._deadline: float | None = None
        """When the grace period of the ending connection is over (set by :meth:`_end`)."""
        self._grace: trio.CancelScope | None = None
        self._control: _Queue[_Input] = _Queue(CONTROL_QUEUE_SIZE)
        self._control_scope = trio.CancelScope()
        self._bucket = TokenBucket(settings.messages_per_second, settings.message_burst)
        self._current: AnalysisRunner | None = None
        self._starting: AnalysisRunner | None = None
        """A runner being started (not yet :attr:`_current`), for :meth:`_close`."""
        self._unresolved: list[AnalysisResult] = []
        """Results whose store outcome a stopped runner could not learn: the next runner
        resolves them before its snapshot (see trio_portfolio/analysis.py)."""
        self._close_code = 1000
        self._close_reason = "bye"
        self._session_ready = False
        self._session_epoch = 0
        """How many times the session was created or resumed (greeted) on this connection."""
        self._heard_own_start: AnalysisId | None = None
        """The id of our latest analysis whose ``analysis_started`` event we have heard."""
        self._store: SessionStore = services.store
        self._market: MarketData = services.market

    # -- lifecycle ---------------------------------------------------------

    def shutdown(self) -> None:
        """Server shutdown: stop the analysis, flush, close with 1001."""
        self._end(1001, "server shutting down", notify=True)

    def abandon(self) -> None:
        """The grace period is over (server shutdown): cut short whatever is left.

        The running (or starting) analysis is abandoned, shields included, and
        the writer cancelled; the closing handshake still gets its
        :data:`CLOSE_TIMEOUT`.  Idempotent.
        """
        self._deadline = -math.inf
        self._end(1001, "server shutting down", notify=True)
        if self._grace is not None:
            self._grace.cancel()
        self._cut_short()

    def _cut_short(self) -> None:
        for runner in (self._current, self._starting):
            if runner is not None:
                runner.abandon()  # its shielded commits and unfencing end now
        if self._sending:
            self._stream_broken = True
        self._writer_scope.cancel()

    def _end(self, code: int, reason: str, *, notify: bool = False) -> None:
        """End the connection (the first reason wins); ``notify``: the client can hear us."""
        if not self._control_scope.cancel_called:
            self._close_code, self._close_reason = code, reason
            self._notify_on_close = notify
            self._control_scope.cancel()
        if self._deadline is None:
            self._deadline = trio.current_time() + self.services.settings.shutdown_timeout_seconds

    def _too_slow(self, why: str) -> None:
        """The client does not read fast enough: drop what is queued, close with 1008."""
        if not self._discarding:
            self._discarding = True
            self.services.metrics.error(Refusal.SLOW_CLIENT)
            log.warning(
                "client too slow, closing: %s",
                why,
                extra=self._log_ids(),
            )
        self._end(1008, "client too slow")

    async def run(self) -> None:
        """Serve the client until it leaves or the server shuts down; never raises."""
        async with (
            self.services.events.deliver_into(
                self.session_id, self._control, on_drop=self.services.metrics.event_dropped
            ),
            trio.open_nursery() as nursery,
        ):
            self._nursery = nursery
            writer_done = trio.Event()
            nursery.start_soon(self._writer, writer_done)
            nursery.start_soon(self._reader)
            try:
                with self._control_scope:
                    await self._open_session()
                    await self._control_loop()
            finally:
                await self._close(writer_done)
                nursery.cancel_scope.cancel()

    async def _close(self, writer_done: trio.Event) -> None:
        """Stop the analysis, flush, close the socket: in bounded time, whatever happens.

        Shielded throughout (it runs while the connection is being cancelled),
        with one deadline, ``shutdown_timeout_seconds`` after the connection was
        told to end (:meth:`_end`), for stopping the analysis and flushing the
        outbox; then whatever is not done is cut short (the analysis abandoned,
        the writer cancelled), and the closing handshake gets at most
        :data:`CLOSE_TIMEOUT`.  After a send cut mid-frame no close frame is
        sent: the caller closes the TCP connection.
        """
        self._end(1000, "bye")  # sets the deadline if nobody ended us (an outside cancel)
        with self._grace_period():
            await self._stop_current(CancelReason.CANCELLED, notify=self._notify_on_close)
        if self._current is not None:
            self._current.abandon()  # its shielded commits and unfencing end now
        # Closing wakes any producer blocked on a full outbox; later sends are dropped.
        self._outbox.close()
        with self._grace_period():
            await writer_done.wait()
        if not writer_done.is_set():  # still sending to a client that does not read
            self._cut_short()
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await writer_done.wait()
            if not self._stream_broken:
                await self.ws.aclose(self._close_code, self._close_reason)

    @contextlib.contextmanager
    def _grace_period(self) -> Iterator[None]:
        """Shielded until the grace period is over, or :meth:`abandon` is called."""
        deadline = self._deadline
        assert deadline is not None
        self._grace = trio.CancelScope(shield=True, deadline=deadline)
        try:
            with self._grace:
                yield
        finally:
            self._grace = None

    async def _writer(self, done: trio.Event) -> None:
        """The only task that sends on the socket; drains the outbox until it closes.

        Between frames it pings the client (see the module docstring).  Once the
        connection is done for (gone, too slow, no pong), frames are dropped.
        """
        try:
            with self._writer_scope:
                await self._write_until_closed()
        finally:
            done.set()

    async def _write_until_closed(self) -> None:
        settings = self.services.settings
        interval = settings.ping_interval_seconds or math.inf
        next_ping = trio.current_time() + interval
        outbox = self._outbox
        while True:
            wake = next_ping
            unanswered = self.ws.ping_unanswered_since
            if unanswered is not None:
                wake = min(wake, unanswered + settings.ping_timeout_seconds)
            if self._discarding:
                wake = math.inf
            frame = None
            if trio.current_time() < wake:
                # Frames waiting: no cancel scope needed to take one.
                with contextlib.suppress(trio.WouldBlock):
                    try:
                        frame = outbox.receive_nowait()
                    except trio.EndOfChannel:
                        return
            if frame is None:
                with trio.move_on_at(wake):
                    try:
                        frame = await outbox.receive()
                    except trio.EndOfChannel:
                        return
            if frame is not None:
                # Everything queued behind it leaves with the same write.
                frames = [frame]
                size = len(frame)
                while True:
                    try:
                        frame = outbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    frames.append(frame)
                    size += len(frame)
                if not self._discarding:
                    await self._transmit(frames)
                self.outbox_bytes -= size
                continue
            # Woken for the keep-alive, with no frame to send.
            now = trio.current_time()
            unanswered = self.ws.ping_unanswered_since
            if unanswered is not None:
                if now >= unanswered + settings.ping_timeout_seconds:
                    self._discarding = True
                    self.services.metrics.error(Refusal.PING_TIMEOUT)
                    log.info(
                        "no pong for %gs, closing",
                        now - unanswered,
                        extra=self._log_ids(),
                    )
                    self._end(1011, "ping timeout")
            elif now >= next_ping:
                await self._transmit(None)
                next_ping = now + interval

    async def _transmit(self, frames: list[str] | None) -> None:
        """Send ``frames`` in one write (``None``: a ping) within :data:`SEND_TIMEOUT`,
        or end the connection.

        The deadline is the WebSocket's own (no cancel scope when the bytes fit
        in the socket's buffer at once, the common case).
        """
        self._sending = True
        try:
            if frames is None:
                await self.ws.send_ping(timeout=SEND_TIMEOUT)
            else:
                await self.ws.send_messages(frames, timeout=SEND_TIMEOUT)
        except ConnectionClosed:
            self._discarding = True
            self._end(1000, "client gone")
        except trio.TooSlowError:
            self._stream_broken = True
            self._too_slow(f"a frame was not taken for {SEND_TIMEOUT:g}s")
        finally:
            self._sending = False

    async def _reader(self) -> None:
        """Drain the socket into the control queue, applying the rate limit.

        Ends the connection after ``idle_timeout_seconds`` without a client frame.
        """
        idle = self.services.settings.idle_timeout_seconds
        try:
            while True:
                if not idle:  # off (the default): no cancel scope held while waiting
                    message = await self.ws.get_message()
                else:
                    with trio.move_on_after(idle) as waiting:
                        message = await self.ws.get_message()
                    if waiting.cancelled_caught:
                        self.services.metrics.error(Refusal.IDLE_TIMEOUT)
                        self._end(1000, "idle timeout", notify=True)
                        return
                verdict = self._bucket.take(trio.current_time())
                if verdict == "flood":
                    self.services.metrics.error(Refusal.FLOOD)
                    self._end(1008, "message rate limit exceeded")
                    return
                await self._control.send(message if verdict == "ok" else _Throttled())
        except ConnectionClosed:
            reason = self.ws.closed
            if reason is not None and reason.code == 1009:
                self.services.metrics.error(Refusal.MESSAGE_TOO_BIG)
            elif reason is not None and reason.code == 1007:
                self.services.metrics.error(Refusal.INVALID_UTF8)
            self._discarding = True
            self._end(1000, "client gone")

    async def send(self, frame: str | None) -> None:
        """Queue ``frame`` for the writer (``None``: not for this dialect).

        Waits while the outbox is full in frames.  A frame that would take the
        outbox over ``outbox_max_bytes`` is dropped and the client closed as
        too slow (1008); so is every frame after that, or after the end.
        """
        if frame is None or self._discarding:
            return
        size = len(frame)
        budget = self.services.settings.outbox_max_bytes
        if self.outbox_bytes and self.outbox_bytes + size > budget:
            self._too_slow(f"more than {budget} bytes queued")
            return
        self.outbox_bytes += size
        self.outbox_bytes_peak = max(self.outbox_bytes_peak, self.outbox_bytes)
        queued = False
        try:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                # Room in the outbox: queue without a schedule point (still a
                # cancellation point); the writer is woken by the frame.
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    self._outbox.send_nowait(frame)
                except trio.WouldBlock:
                    await self._outbox.send(frame)
                queued = True
        finally:
            if not queued:
                self.outbox_bytes -= size

    async def _send_error(self, code: ErrorCode, detail: str) -> None:
        self.services.metrics.error(code)
        await self.send(render_error(code, detail))

    def _log_ids(self) -> dict[str, str]:
        """The ``extra`` of this connection's log lines (the formatter hashes the session id)."""
        return {"connection_id": self.id, "session_id": self.session_id}

    async def _send_store_unavailable(self, what: str, exc: StoreUnavailable) -> None:
        """``store_unavailable`` with the condition only; the raw error goes to the log.

        The client gets an ``error_id`` that the log line carries too, never
        the store's address or an OS error text.
        """
        error_id = new_error_id()
        log.warning("%s (%s): %s", what, error_id, exc, extra=self._log_ids())
        await self._send_error(
            ErrorCode.STORE_UNAVAILABLE,
            f"{what} ({exc.explanation}); retry shortly (error_id {error_id})",
        )

    # -- session -----------------------------------------------------------

    async def _open_session(self) -> None:
        """Create or resume the session and greet the client (``session``, v2)."""
        try:
            await self._greet_session()
        except StoreUnavailable as exc:
            await self._send_store_unavailable("session not available yet", exc)
        except ProtocolError as exc:  # too_many_sessions
            await self._send_error(exc.code, exc.detail)

    async def _greet_session(self) -> None:
        """Create (or resume) the session and send it as a ``session`` frame (v2).

        Raises :class:`ProtocolError` ``too_many_sessions`` when the session is
        re-created (it expired under this connection) while the store is at
        ``max_sessions``; the first creation was admitted at the handshake.
        """
        if self._session_epoch > 0 and await self.services.at_session_cap():
            self._session_ready = False
            raise ProtocolError(
                ErrorCode.TOO_MANY_SESSIONS,
                "the server holds as many sessions as it may; try again later",
            )
        portfolio = await self.services.create_session(self.session_id)
        self._session_ready = True
        self._session_epoch += 1
        await self.send(render_session(portfolio, self.dialect))

    async def _ensure_session(self) -> None:
        """After a store outage at connect, create the session on first use."""
        if not self._session_ready:
            await self._greet_session()

    async def _session_expired(self, epoch: int | None = None) -> None:
        """The session vanished under us (TTL, deleted): say so and start a fresh one.

        The one path for an expired session.  ``epoch`` is the session epoch in
        which it was found gone (default: now); if a fresh session was started
        since, the client has been told already and nothing is sent.
        """
        if epoch is not None and epoch != self._session_epoch:
            return
        # An analysis still running belongs to the vanished session and can store
        # nothing more: stop it first, so that it ends as ``cancelled`` (not as
        # ``switched`` by a fence on the fresh session) and before the error.
        await self._stop_current(CancelReason.CANCELLED)
        await self._send_error(
            ErrorCode.SESSION_EXPIRED, "the session expired; a new one was started"
        )
        await self._greet_session()

    async def _activity(self) -> None:
        """Record client activity (TTL refresh) for frames that write nothing else."""
        if not await self._store.touch(self.session_id, utc_now()):
            await self._session_expired()

    # -- control loop ----------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            try:
                item = await self._control.receive()
            except trio.EndOfChannel:  # pragma: no cover - the control queue is never closed
                return
            try:
                if isinstance(item, str | bytes):
                    await self._on_client_frame(item)
                elif isinstance(item, _Throttled):
                    await self._send_error(
                        ErrorCode.RATE_LIMITED,
                        f"too many messages: at most {self._bucket.rate:g}/s "
                        f"(bursts of {self._bucket.burst:g}); this one was dropped",
                    )
                elif isinstance(item, PortfolioChanged):
                    await self._on_portfolio_changed(item)
                elif isinstance(item, AnalysisStarted):
                    await self._on_analysis_started(item)
                else:
                    await self._on_analysis_outcome(item.outcome, item.epoch)
            except StoreUnavailable as exc:
                await self._send_store_unavailable("the store is unavailable", exc)
            except ProtocolError as exc:  # too_many_sessions from a re-creation
                await self._send_error(exc.code, exc.detail)

    async def _on_client_frame(self, text: str | bytes) -> None:
        try:
            message = parse_client_message(text, dialect=self.dialect)
        except ProtocolError as exc:
            await self._send_error(exc.code, exc.detail)
            await self._activity()
            return
        await self._ensure_session()
        if isinstance(message, Analyze):
            await self._analyze(message.ticker)
        elif isinstance(message, Cancel):
            await self._stop_current(CancelReason.CANCELLED)
            await self._activity()
        elif isinstance(message, GetPortfolio):
            await self._activity()
            portfolio = await self._store.get(self.session_id)
            if portfolio is None:
                await self._session_expired()
            else:
                await self.send(render_portfolio(portfolio, self.dialect))
        elif isinstance(message, SetHoldings):
            await self._set_holdings(message.holdings)

    async def _analyze(self, ticker: str) -> None:
        await self._stop_current(CancelReason.SWITCHED)
        runner = AnalysisRunner(self._analysis_context(), ticker, self._unresolved)
        epoch = self._session_epoch
        self._starting = runner
        try:
            refused = await self._nursery.start(self._run_analysis, runner, epoch)
        finally:
            self._starting = None
        if refused is None:
            self._current = runner
        else:
            self._unresolved = runner.unresolved
            await self._on_analysis_outcome(refused, epoch)

    async def _run_analysis(
        self,
        runner: AnalysisRunner,
        epoch: int,
        *,
        task_status: trio.TaskStatus[AnalysisOutcome | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``runner`` (in the connection's nursery) and hand back what it ended with.

        Reports like :meth:`AnalysisRunner.run`.  An outcome the control loop
        must answer, reached after the start, is queued on the control
        channel (blocking while it is full: the runner has finished by then,
        so nothing waits on this task).
        """
        outcome = await runner.run(task_status=task_status)
        if runner.started and isinstance(outcome, SessionGone):
            await self._control.send(_AnalysisEnded(outcome, epoch))

    async def _on_analysis_outcome(self, outcome: AnalysisOutcome, epoch: int) -> None:
        """Answer what an analysis ended with, if the connection must (session gone)."""
        if isinstance(outcome, SessionGone):
            await self._session_expired(epoch)

    async def _set_holdings(self, holdings: Mapping[str, float]) -> None:
        try:
            portfolio = await self.services.replace_holdings(self.session_id, holdings)
        except TickerRefused as exc:  # unknown_ticker, ticker_limit: nothing was changed
            await self._send_error(exc.code, exc.detail)
            await self._activity()
            return
        if portfolio is None:
            await self._session_expired()
            return
        await self.send(render_portfolio(portfolio, self.dialect))
        if self._current is not None:
            await self._current.restart_if_older(portfolio.portfolio_version)

    async def _on_portfolio_changed(self, event: PortfolioChanged) -> None:
        if self._current is not None:
            await self._current.portfolio_changed(
                event.portfolio_version, holdings_changed=event.cause != "market"
            )
        if event.cause == "market":
            await self.send(
                render_market_update(
                    event.total_value,
                    event.prices,
                    event.portfolio_version,
                    event.as_of,
                    self.dialect,
                )
            )

    async def _on_analysis_started(self, event: AnalysisStarted) -> None:
        """Another analysis became the session's current one: stop ours (``switched``).

        Events arrive in the order Redis published them, so a foreign start heard
        *before* our live attempt's own is older than ours and is ignored (two
        connections starting at once must not both stop).  A missed event is
        harmless: the fenced append refuses our next result anyway.
        """
        analysis_id = AnalysisId.of(event.analysis_id)
        if analysis_id.belongs_to(self.id):
            self._heard_own_start = analysis_id
            return
        live = None if self._current is None else self._current.live_analysis_id
        if live is not None and live == self._heard_own_start:
            await self._stop_current(CancelReason.SWITCHED)

    async def _stop_current(self, reason: CancelReason, *, notify: bool = True) -> None:
        """Stop the running analysis: cancel, wait for it to end, report and unfence it."""
        runner = self._current
        if runner is None:
            return
        await runner.stop(reason, notify=notify)
        self._unresolved = runner.unresolved
        # Cleared only now: if the stop is itself cancelled, the connection's
        # final cleanup still finds the runner and finishes it (stop is idempotent).
        self._current = None

    def _analysis_context(self) -> AnalysisContext:
        settings = self.services.settings
        return AnalysisContext(
            session_id=self.session_id,
            dialect=self.dialect,
            store=self._store,
            market=self._market,
            observer=_AnalysisObserver(self, self.services.metrics),
            metric_delay=settings.metric_delay_seconds,
            rng=self.services.rng,
            connection_id=self.id,
            history_cache=self.services.history_cache,
            send_timeout=SEND_TIMEOUT,
            max_staleness=settings.max_staleness_seconds,
        )


@attrs.frozen
class _AnalysisObserver:
    """The connection's side of :class:`~trio_portfolio.analysis_outcome.AnalysisObserver`:
    frames go to its outbox, events to the server's counters."""

    connection: Connection
    metrics: ServerMetrics

    async def send(self, frame: str | None) -> None:
        await self.connection.send(frame)

    async def send_error(self, code: ErrorCode, detail: str) -> None:
        await self.connection._send_error(code, detail)

    def analysis_started(self, analysis_id: AnalysisId) -> None:
        self.metrics.analysis_started()

    def result_committed(self, result: AnalysisResult) -> None:
        self.metrics.result_committed()

    def write_fenced(self, status: AppendStatus) -> None:
        self.metrics.fenced_write_rejected(status)

    def analysis_completed(self, analysis_id: AnalysisId) -> None:
        self.metrics.analysis_completed()

    def analysis_cancelled(self, analysis_id: AnalysisId, reason: CancelReason) -> None:
        self.metrics.analysis_cancelled(reason)
