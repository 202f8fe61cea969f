"""One multiplexed Redis connection: writer, reader and watchdog tasks, an in-flight deque.

Internal to the adapter; :mod:`trio_portfolio.redis_io`'s docstring explains
the design (positional reply matching, abandoned requests, the stall
watchdog, retirement after READONLY).  This module owns that state machine:
every transition of a :class:`Request` (queued, written, answered, failed,
abandoned) and of a :class:`Connection` (usable, retiring, broken) happens
here.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

import attrs
import trio

from trio_portfolio.redis_errors import ReplyDecodeError, StoreUnavailable, Unavailable
from trio_portfolio.redis_wire import (
    READ_SIZE,
    STREAM_ERRORS,
    ConnectionParams,
    ProtocolError,
    next_reply,
    open_connection,
)

__all__ = ["Connection", "NotSent", "RedisStatistics", "Request"]

_MAX_BATCH = 1024  # requests written by one send_all
_MIN_DEADLINES_LIMIT = 64  # the deadline heap is compacted when it outgrows this (or 2x live)


@attrs.define
class RedisStatistics:
    """Counters for introspection and ``/metrics`` (all since the client opened).

    ``connects`` counts every connection made (first ones included) and
    ``reconnects`` those that replaced a lost or retired one;
    ``connections_open`` and ``in_flight`` (requests queued or awaiting a
    reply) are gauges.  ``timeouts`` are calls that gave up on their own
    deadline; ``cancelled_in_flight`` calls cancelled by their caller after
    being queued; ``replies_discarded`` the replies of either kind read and
    dropped.  ``connections_stalled`` were closed by the watchdog,
    ``read_only_resets`` are READONLY retirements of every connection.
    """

    commands: int = 0
    command_errors: int = 0
    errors_unavailable: int = 0
    timeouts: int = 0
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    cancelled_in_flight: int = 0
    replies_discarded: int = 0
    replies_undecodable: int = 0
    connections_stalled: int = 0
    read_only_resets: int = 0
    probes: int = 0
    probe_failures: int = 0
    connections_open: int = 0
    in_flight: int = 0


class Request:
    """One call: its encoded bytes, how many replies it expects, and its outcome.

    The caller waits for it with :meth:`Connection.wait` (a bare Trio trap,
    no ``Event`` per call); whoever finishes it (the reader with its last
    reply, :meth:`Connection._break`, or the watchdog at its ``deadline``)
    reschedules that task.  A request is finished exactly once.
    """

    __slots__ = (
        "abandoned",
        "error",
        "expected",
        "finished",
        "payload",
        "received",
        "replies",
        "task",
        "timed_out",
        "written",
    )

    def __init__(self, payload: bytes, expected: int) -> None:
        self.payload = payload
        self.expected = expected
        self.replies: list[Any] = []
        self.received = 0
        self.error: StoreUnavailable | None = None
        self.abandoned = False
        self.written = False
        self.finished = False
        self.timed_out = False
        """The watchdog gave up on it at its caller's deadline (see :meth:`Connection.offer`)."""
        self.task: trio.lowlevel.Task | None = None
        """The caller, while it waits in :meth:`Connection.wait`."""

    def finish(self) -> None:
        """Mark it finished and wake its caller (idempotent)."""
        self.finished = True
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    def fail(self, error: StoreUnavailable) -> None:
        if not self.finished:
            self.error = error
            self.finish()

    def _abort(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        # The caller is cancelled while it waits: nobody will wake it, the
        # writer skips the request and the reader drops its replies.
        self.task = None
        self.abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED


class NotSent(Exception):
    """The connection takes no more requests (broken or retired): safe to retry elsewhere."""


class Connection:
    """One multiplexed connection: writer, reader and watchdog tasks, an in-flight deque.

    Callers' deadlines are kept here too (:meth:`offer`): a heap the
    watchdog task sleeps on, next to its stall check, so that a call on the
    fast path costs no cancel scope of its own.
    """

    def __init__(
        self,
        params: ConnectionParams,
        stats: RedisStatistics,
        stall_timeout: float,
        on_closed: Callable[[Connection], None],
    ) -> None:
        self._params = params
        self._stats = stats
        self._stall_timeout = stall_timeout
        self._on_closed = on_closed
        self._send, self._receive = trio.open_memory_channel[Request](_MAX_BATCH)
        self._queued = 0
        """Requests in the channel (the writer has not taken them yet)."""
        self._in_flight: collections.deque[Request] = collections.deque()
        self._cancel_scope = trio.CancelScope()
        self._last_progress = 0.0
        self._deadlines: list[tuple[float, int, Request]] = []
        """Callers' deadlines (a heap); finished requests are dropped lazily."""
        self._deadlines_limit = _MIN_DEADLINES_LIMIT
        self._sequence = itertools.count()
        self._wake_at = -math.inf
        """When the watchdog wakes next (``-inf``: it has not computed it yet)."""
        self._wake_scope = trio.CancelScope()
        self._writer_done = False
        self.retiring = False
        self.broken: StoreUnavailable | None = None

    @property
    def usable(self) -> bool:
        """Whether new requests may be given to this connection."""
        return self.broken is None and not self.retiring

    @property
    def load(self) -> int:
        """Requests queued or in flight: how busy this connection is."""
        return len(self._in_flight) + self._queued

    async def run(self, *, task_status: trio.TaskStatus[Connection]) -> None:
        """Connect, authenticate, then serve requests until the connection breaks.

        Failures before ``task_status.started`` raise :class:`StoreUnavailable`
        to the caller of ``nursery.start``; afterwards this never raises: a
        broken connection fails its requests and returns.
        """
        stream, parser = await open_connection(self._params)
        self._stats.connects += 1
        self._stats.connections_open += 1
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, stream, parser)
                    nursery.start_soon(self._writer, stream)
                    nursery.start_soon(self._watchdog)
                    task_status.started(self)
        finally:
            self._stats.connections_open -= 1
            self._break(
                StoreUnavailable(
                    f"connection to {self._params.describe()} closed",
                    reason=Unavailable.CONNECTION_LOST,
                )
            )
            self._on_closed(self)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    def offer(self, request: Request, deadline: float) -> bool:
        """Queue ``request`` without waiting, to be given up at ``deadline``.

        Returns ``False`` (nothing queued) when the channel is full or closed;
        the caller then takes the slow path (:meth:`submit` under its own
        cancel scope).  At ``deadline`` the watchdog marks an unfinished
        request ``timed_out`` and abandoned, and wakes its caller.
        """
        try:
            self._send.send_nowait(request)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._queued += 1
        heap = self._deadlines
        while heap and heap[0][2].finished:
            heapq.heappop(heap)
        heapq.heappush(heap, (deadline, next(self._sequence), request))
        if len(heap) > self._deadlines_limit:
            heap[:] = [entry for entry in heap if not entry[2].finished]
            heapq.heapify(heap)
            self._deadlines_limit = max(_MIN_DEADLINES_LIMIT, 2 * len(heap))
        self._wake_by(deadline)
        return True

    async def submit(self, request: Request) -> None:
        """Queue ``request`` and wait until it is answered or failed.

        Raises :class:`NotSent` if the connection takes no more requests.
        Cancelled, the request is marked abandoned (see the module docstring).
        """
        try:
            self._send.send_nowait(request)
        except trio.WouldBlock:
            try:
                await self._send.send(request)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise NotSent from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise NotSent from None
        self._queued += 1
        await self.wait(request)

    @staticmethod
    async def wait(request: Request) -> None:
        """Wait until ``request`` is finished; cancelled, it is marked abandoned."""
        if request.finished:
            await trio.lowlevel.checkpoint()
            return
        request.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(request._abort)

    def retire(self) -> None:
        """Take no new request; close once every request already taken is answered."""
        if self.broken is None and not self.retiring:
            self.retiring = True
            self._send.close()

    def _break(self, error: StoreUnavailable) -> None:
        """Mark the connection broken and fail every request on it.

        Idempotent, and called once more when ``run`` ends: the writer may
        have taken a batch from the channel just before the first call and
        put it in flight afterwards; the final call fails those too, so no
        caller is left waiting for its timeout.
        """
        if self.broken is None:
            self.broken = error
            self._cancel_scope.cancel()
            self._send.close()
        error = self.broken
        while self._in_flight:
            self._in_flight.popleft().fail(error)
        while True:
            try:
                self._receive.receive_nowait().fail(error)
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        self._queued = 0
        self._receive.close()

    def _finish_if_drained(self) -> None:
        if self.retiring and self._writer_done and not self._in_flight:
            self._cancel_scope.cancel()

    async def _writer(self, stream: trio.abc.Stream) -> None:
        try:
            async for first in self._receive:
                batch = [first]
                while len(batch) < _MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break
                self._queued -= len(batch)
                live = [request for request in batch if not request.abandoned]
                if not live:
                    continue
                if self.broken is not None:
                    for request in live:  # never written: the caller may retry elsewhere
                        request.fail(self.broken)
                    continue
                if not self._in_flight:
                    self._last_progress = now = trio.current_time()
                    self._wake_by(now + self._stall_timeout)
                for request in live:
                    # Marked before the write: a write cut half-way leaves the
                    # outcome unknown, which is what ``written`` reports.
                    request.written = True
                self._in_flight.extend(live)
                self._stats.commands += len(live)
                await stream.send_all(b"".join(request.payload for request in live))
            self._writer_done = True  # retired and drained
            self._finish_if_drained()
        except STREAM_ERRORS as exc:
            self._break(
                StoreUnavailable(
                    f"lost connection to Redis while writing: {exc}",
                    reason=Unavailable.CONNECTION_LOST,
                )
            )

    async def _reader(self, stream: trio.abc.Stream, parser: Any) -> None:
        try:
            while True:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    self._break(
                        StoreUnavailable(
                            "Redis closed the connection", reason=Unavailable.CONNECTION_LOST
                        )
                    )
                    return
                self._last_progress = trio.current_time()
                parser.feed(data)
                while (reply := next_reply(parser)) is not False:
                    if not self._in_flight:
                        raise ProtocolError("a reply nobody asked for")
                    self._deliver(self._in_flight[0], reply)
                self._finish_if_drained()
        except ProtocolError as exc:
            self._break(exc)
        except STREAM_ERRORS as exc:
            self._break(
                StoreUnavailable(
                    f"lost connection to Redis while reading: {exc}",
                    reason=Unavailable.CONNECTION_LOST,
                )
            )

    def _deliver(self, request: Request, reply: Any) -> None:
        if isinstance(reply, ReplyDecodeError):
            self._stats.replies_undecodable += 1
        request.received += 1
        if not request.abandoned:
            request.replies.append(reply)
        if request.received == request.expected:
            self._in_flight.popleft()
            if request.abandoned:
                self._stats.replies_discarded += 1
            request.finish()

    def _wake_by(self, when: float) -> None:
        """Make sure the watchdog wakes at ``when`` at the latest."""
        if when < self._wake_at:
            self._wake_at = when
            self._wake_scope.deadline = when

    def _expire(self, now: float) -> None:
        """Give up on the requests whose caller's deadline has passed (see :meth:`offer`)."""
        heap = self._deadlines
        while heap and (heap[0][2].finished or heap[0][0] <= now):
            request = heapq.heappop(heap)[2]
            if not request.finished:
                # Like a cancellation: never sent if still queued, its reply
                # read and dropped if written; nobody else's request is touched.
                request.abandoned = True
                request.timed_out = True
                request.finish()

    async def _watchdog(self) -> None:
        """Wake callers at their deadlines; drop the connection when Redis stalls.

        The connection is judged dead when Redis says nothing for
        ``stall_timeout`` with work pending.
        """
        while True:
            now = trio.current_time()
            self._expire(now)
            wake = self._deadlines[0][0] if self._deadlines else math.inf
            if self._in_flight:
                stall_at = self._last_progress + self._stall_timeout
                if now >= stall_at:
                    self._stats.connections_stalled += 1
                    self._break(
                        StoreUnavailable(
                            f"Redis at {self._params.describe()} sent nothing for "
                            f"{self._stall_timeout:g} s with requests outstanding",
                            reason=Unavailable.STALLED,
                            maybe_executed=True,
                        )
                    )
                    return
                wake = min(wake, stall_at)
            self._wake_at = wake
            self._wake_scope = trio.CancelScope(deadline=wake)
            with self._wake_scope:
                await trio.sleep_forever()
