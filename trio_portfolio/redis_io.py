"""The Trio Redis adapter: every byte between the server and Redis goes through here.

Theory of operation
===================

redis-py has no Trio support, and parking a thread per command would cap
concurrency at the thread pool.  This module speaks RESP2 natively on Trio
streams: commands are encoded by a few lines that write exactly what
redis-py's serializer would (``redis_wire.encode_command``), replies parsed by
the parser redis-py itself uses when available (``hiredis.Reader``).

A :class:`RedisClient` owns a small, fixed number of *multiplexed*
connections.  Many tasks share one connection at once:

* A caller encodes its command(s) into a :class:`Request` and puts it on the
  connection's bounded request channel.
* The connection's **writer** task takes every request waiting (that batching
  is automatic pipelining), appends them to the ``in_flight`` deque *in the
  order it writes them*, and writes their bytes with one ``send_all``.
* The connection's **reader** task feeds bytes to hiredis and hands each
  reply to the oldest request in ``in_flight``.
* The connection's **watchdog** task judges the connection dead when Redis
  has sent no byte at all for ``stall_timeout`` seconds while requests are
  outstanding.

Replies are matched to requests by position in that deque, never by "whoever
reads next".  That is what makes every call cancel-safe: a caller cancelled
while its request waits in the channel marks it abandoned and the writer never
sends it; a caller cancelled after the write marks it abandoned and the
reader consumes its reply and drops it.  No cancellation can leave a reply on
a connection for the next caller, and a cancellation never costs a
connection.

A caller's *timeout* is handled exactly like a cancellation: it abandons
that caller's request only (its reply, when it comes, is read and dropped)
and raises :class:`StoreUnavailable` with reason ``timeout``.  On the fast
path (a connection ready, room in its channel: nearly every call) the
deadline costs no cancel scope: it goes on the connection's deadline heap,
which the watchdog sleeps on next to its stall check, and the caller waits
on a bare Trio trap that the reader, a break or the watchdog reschedules.
A call that must connect or wait for room takes the slow path, under a
cancel scope with the same deadline.  No caller's
deadline can break another caller's call: a connection is closed only when
the connection itself is judged dead (a read or write error, Redis closing
it, bytes that are not RESP, or the watchdog's stall timeout), and then
every request on it fails with :class:`StoreUnavailable`.  After a failed
connect, calls fail fast for ``reconnect_backoff`` seconds instead of each
waiting out its own timeout, so an outage is reported at once.

Health checks must not share the multiplexed connections' fate either way,
so :meth:`RedisClient.probe_write` runs on a connection of its own.

Errors: the adapter's vocabulary
================================

Nothing redis-py defines crosses this module's boundary (nor
:mod:`trio_portfolio.redis_pubsub`'s).  Every error is a
:class:`RedisAdapterError`:

:class:`StoreUnavailable`
    "The store cannot serve this now; try later."  Its ``reason`` (an
    :class:`Unavailable`) says which: ``connect_failed`` (refused,
    unreachable, TLS), ``auth_failed`` (AUTH or SELECT refused, NOAUTH,
    WRONGPASS), ``connection_lost``, ``timeout`` (this call's deadline),
    ``stalled`` (the connection was judged dead), ``protocol_error``, and
    one per "not now" error reply: READONLY, LOADING, MASTERDOWN,
    CLUSTERDOWN, TRYAGAIN, BUSY, OOM, NOREPLICAS, MISCONF and ``ERR max
    number of clients``, also when a Lua script met them inside
    ``redis.call`` (Redis 6 wraps those in ``ERR Error running script``).
    ``maybe_executed`` tells a lost reply (the command may have run) from a
    refusal; ``explanation`` is a short reason text safe to show anyone.
:class:`CommandError` (alias :data:`ReplyError`, the old name)
    Redis refused the command itself and will again: WRONGTYPE, ``ERR``
    syntax or arguments, NOPERM, errors raised by scripts.  ``code`` is the
    reply's first word.  :class:`ReplyDecodeError` is the one for a reply
    that is not valid UTF-8 (bulk strings are decoded strictly): the reply
    is consumed whole, so it fails only the call it answered.

NOSCRIPT never reaches callers of :meth:`RedisClient.evalsha` or
:meth:`RedisClient.evalsha_many`: the script is loaded and run again.

Where errors appear: :meth:`~RedisClient.execute`, :meth:`~RedisClient.evalsha`,
:meth:`~RedisClient.load_scripts` and :meth:`~RedisClient.probe_write` raise
them.  :meth:`~RedisClient.pipeline` and :meth:`~RedisClient.evalsha_many`
raise :class:`StoreUnavailable` when the connection fails, and otherwise
return one entry per command: the reply, or *an instance* of
:class:`StoreUnavailable` or :class:`CommandError` for that command's error
reply (also nested inside an ``EXEC`` reply), so one bad command does not
hide the other replies.  Callers test entries with ``isinstance``.

A READONLY reply means the node was demoted (a failover): the client
*retires* all its connections (at most once per ``reconnect_backoff``), so
the next calls go to fresh connections (and, with Sentinel or Cluster later,
to a rediscovered master).  A retired connection takes no new request,
finishes those already written to it (bounded by the stall timeout), then
closes.

Resources: every connection's tasks run in the nursery that
:func:`open_redis` opens; leaving the ``async with`` closes them all.
Pub/sub needs its own connection (a subscribed RESP2 connection can issue no
other command); see :mod:`trio_portfolio.redis_pubsub`.

The adapter's modules: this one (the client), :mod:`~trio_portfolio.redis_errors`
(the vocabulary, pure), :mod:`~trio_portfolio.redis_wire` (URLs, transports,
handshake, RESP codec; the only one importing redis-py, whose private names are
pinned and checked by ``tests/test_redis_py_compat.py``),
:mod:`~trio_portfolio.redis_mux` (one multiplexed connection) and
:mod:`~trio_portfolio.redis_pubsub`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from trio_portfolio.redis_errors import (
    CommandError,
    NoScript,
    RedisAdapterError,
    ReplyDecodeError,
    StoreUnavailable,
    Unavailable,
)
from trio_portfolio.redis_mux import Connection, NotSent, RedisStatistics, Request
from trio_portfolio.redis_wire import (
    STREAM_ERRORS,
    CommandArg,
    ConnectionParams,
    ProtocolError,
    encode_command,
    new_reply_reader,
    next_reply,
    open_connection,
    receive_reply,
)
from trio_portfolio.services import open_service_nursery

__all__ = [
    "CommandArg",
    "CommandError",
    "ConnectionParams",
    "ProtocolError",
    "RedisAdapterError",
    "RedisClient",
    "RedisStatistics",
    "ReplyDecodeError",
    "ReplyError",
    "Script",
    "StoreUnavailable",
    "Unavailable",
    "encode_command",
    "new_reply_reader",
    "next_reply",
    "open_connection",
    "open_redis",
]

ReplyError = CommandError
"""The old name of :class:`CommandError`, kept while other modules move to the new one."""


class Script:
    """A Lua script known by its SHA1, run with EVALSHA and reloaded on NOSCRIPT."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Script(sha={self.sha[:12]}...)"


class _Dedicated:
    """A connection one caller at a time uses request/response (for health probes).

    Any failure or cancellation mid-call closes it (its reply may still be
    on the way); the next call opens a new one.  Nobody else's request is
    ever on it, so closing it costs nobody anything.
    """

    def __init__(self, params: ConnectionParams) -> None:
        self._params = params
        self._lock = trio.Lock()
        self._conn: tuple[trio.abc.Stream, Any] | None = None
        self._retargeted = False

    def retarget(self, params: ConnectionParams) -> None:
        """Use ``params`` from the next call on (Sentinel found another master)."""
        self._params = params
        self._retargeted = True

    async def call(self, args: Sequence[CommandArg]) -> Any:
        """One command, its reply (errors as values); :class:`StoreUnavailable` if it breaks."""
        async with self._lock:
            try:
                if self._retargeted:
                    self._retargeted = False
                    await self.aclose()
                if self._conn is None:
                    self._conn = await open_connection(self._params)
                stream, parser = self._conn
                await stream.send_all(encode_command(args))
                return await receive_reply(stream, parser)
            except BaseException as exc:
                await self.aclose()
                if isinstance(exc, STREAM_ERRORS):
                    raise StoreUnavailable(
                        f"lost the probe connection to Redis: {exc}",
                        reason=Unavailable.CONNECTION_LOST,
                        maybe_executed=True,
                    ) from exc
                raise

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(conn[0])


class RedisClient:
    """Commands, pipelines and scripts over a few shared connections.

    Create with :func:`open_redis`.  Every method may be cancelled at any
    await without harm (see the module docstring) and takes an optional
    ``timeout`` overriding the client default; a timeout fails that call
    only.  Raises :class:`StoreUnavailable` when the store cannot serve now
    and :class:`CommandError` for a command Redis refuses (see "Errors" in
    the module docstring for which method raises and which returns them).
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        params: ConnectionParams,
        *,
        timeout: float,
        connections: int,
        reconnect_backoff: float,
        stall_timeout: float | None = None,
        on_latency: Callable[[float], None] | None = None,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError("timeout must be a positive number of seconds")
        stall = timeout if stall_timeout is None else stall_timeout
        if not (stall > 0 and math.isfinite(stall)):
            raise ValueError("stall_timeout must be a positive number of seconds")
        self._nursery = nursery
        self.params = params
        self.timeout = timeout
        self.stall_timeout = stall
        self._reconnect_backoff = reconnect_backoff
        self._slots: list[Connection | None] = [None] * connections
        self._slot_locks = [trio.Lock() for _ in range(connections)]
        self._open: set[Connection] = set()
        self._failed_until = -math.inf
        self._last_failure: StoreUnavailable | None = None
        self._read_only_reset_until = -math.inf
        self._probe = _Dedicated(params)
        self.stats = RedisStatistics()
        self.on_latency = on_latency
        """Called with the seconds each completed call took (for a latency histogram)."""
        self.sharded_pubsub = False
        """Whether session events must use SPUBLISH/SSUBSCRIBE (a cluster on Redis >= 7)."""

    def statistics(self) -> RedisStatistics:
        """A snapshot of the client's counters."""
        self.stats.in_flight = sum(c.load for c in self._open if c.broken is None)
        return attrs.evolve(self.stats)

    async def execute(self, *args: CommandArg, timeout: float | None = None) -> Any:
        """Run one command and return its reply.

        Raises :class:`StoreUnavailable` or :class:`CommandError` (including
        :class:`ReplyDecodeError` for a reply that is not UTF-8).
        """
        (reply,) = await self._call(encode_command(args), 1, timeout)
        if isinstance(reply, RedisAdapterError):
            raise reply
        return reply

    async def ping(self, *, timeout: float | None = None) -> None:
        """Round-trip to Redis; raises :class:`StoreUnavailable` if it does not answer."""
        await self.execute("PING", timeout=timeout)

    async def probe_write(self, key: str, *, timeout: float | None = None) -> None:
        """Check that the store accepts a write: ``SET key 1 PX 5000`` on a connection of its own.

        For health checks: the probe never shares a connection with other
        callers, so neither its deadline nor a failure of it can disturb
        their requests (nor can their backlog delay it).  Raises
        :class:`StoreUnavailable` (e.g. reason ``read_only``, ``out_of_memory``,
        ``timeout``) or :class:`CommandError`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        seconds = self.timeout if timeout is None else timeout
        self.stats.probes += 1
        reply: Any = None
        with trio.move_on_after(seconds) as scope:
            try:
                reply = await self._probe.call(("SET", key, "1", "PX", 5000))
            except StoreUnavailable:
                self.stats.probe_failures += 1
                raise
        if scope.cancelled_caught:
            self.stats.probe_failures += 1
            raise StoreUnavailable(
                f"Redis at {self.params.describe()} did not answer the probe within {seconds:g} s",
                reason=Unavailable.TIMEOUT,
                maybe_executed=True,
            )
        if isinstance(reply, RedisAdapterError):
            self.stats.probe_failures += 1
            if isinstance(reply, StoreUnavailable) and reply.reason is Unavailable.READ_ONLY:
                await self._probe.aclose()
                self._retire_after_read_only()
            raise reply
        if reply != "OK":
            self.stats.probe_failures += 1
            raise CommandError(f"unexpected reply to the probe SET: {reply!r:.100}", code="")

    async def pipeline(
        self, commands: Sequence[Sequence[CommandArg]], *, timeout: float | None = None
    ) -> list[Any]:
        """Send ``commands`` back to back on one connection; replies (or errors) in order.

        An entry is the command's reply, or a :class:`StoreUnavailable` or
        :class:`CommandError` *instance* for its error reply.  Raises
        :class:`StoreUnavailable` if the call as a whole fails.  The commands
        are written contiguously, so ``MULTI`` ... ``EXEC`` inside a pipeline
        is a transaction.
        """
        if not commands:
            return []
        payload = b"".join(encode_command(command) for command in commands)
        return await self._call(payload, len(commands), timeout)

    async def load_scripts(
        self, scripts: Sequence[Script], *, timeout: float | None = None
    ) -> None:
        """``SCRIPT LOAD`` each script so EVALSHA finds it (done again on NOSCRIPT).

        Raises :class:`StoreUnavailable` or :class:`CommandError` (a script
        that does not compile, or a server that hashes it differently).
        """
        replies = await self.pipeline(
            [("SCRIPT", "LOAD", s.source) for s in scripts], timeout=timeout
        )
        for script, reply in zip(scripts, replies, strict=True):
            if isinstance(reply, RedisAdapterError):
                raise reply
            if reply != script.sha:
                raise CommandError(f"Redis hashed {script!r} as {reply}", code="")

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[CommandArg] = (),
        args: Sequence[CommandArg] = (),
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run ``script``; on NOSCRIPT (a restarted or flushed Redis) run it with EVAL.

        Raises :class:`StoreUnavailable` or :class:`CommandError` (an error
        the script raised or met).
        """
        try:
            return await self.execute(
                "EVALSHA", script.sha, len(keys), *keys, *args, timeout=timeout
            )
        except NoScript:
            return await self.execute(
                "EVAL", script.source, len(keys), *keys, *args, timeout=timeout
            )

    async def evalsha_many(
        self,
        script: Script,
        calls: Sequence[tuple[Sequence[CommandArg], Sequence[CommandArg]]],
        *,
        timeout: float | None = None,
    ) -> list[Any]:
        """Run ``script`` once per ``(keys, args)`` in one pipeline; replies (or errors) in order.

        Entries are as for :meth:`pipeline`.  Calls answered NOSCRIPT did not
        run; the script is loaded and just those calls are sent again.
        """
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
        replies = await self.pipeline(commands, timeout=timeout)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScript)]
        if missing:
            await self.load_scripts([script], timeout=timeout)
            retried = await self.pipeline([commands[i] for i in missing], timeout=timeout)
            for i, reply in zip(missing, retried, strict=True):
                replies[i] = reply
        return replies

    async def _call(self, payload: bytes, expected: int, timeout: float | None) -> list[Any]:
        # A call whose scope is already cancelled must not even be queued:
        # the writer could otherwise send it before the caller is woken.
        await trio.lowlevel.checkpoint_if_cancelled()
        seconds = self.timeout if timeout is None else timeout
        started = trio.current_time()
        deadline = started + seconds
        # The fast path: a connection that needs no connect, a channel with
        # room.  The deadline is then kept by the connection's watchdog (no
        # cancel scope per call); it acts exactly like the slow path's scope.
        connection = self._ready_connection(started)
        if connection is not None:
            request = Request(payload, expected)
            if connection.offer(request, deadline):
                try:
                    await connection.wait(request)
                except trio.Cancelled:
                    if request.abandoned:
                        self.stats.cancelled_in_flight += 1
                    raise
                if request.timed_out:
                    raise self._timed_out(seconds, written=request.written)
                if request.error is None:
                    return self._answered(request, started)
                if request.written:
                    self.stats.errors_unavailable += 1
                    raise _copy(request.error, written=True) from None
                # Failed before the write: the command never ran; one more try.
                return await self._call_slow(payload, expected, seconds, deadline, started, (2,))
        return await self._call_slow(payload, expected, seconds, deadline, started, (1, 2))

    async def _call_slow(
        self,
        payload: bytes,
        expected: int,
        seconds: float,
        deadline: float,
        started: float,
        attempts: tuple[int, ...],
    ) -> list[Any]:
        """A call that may have to connect, or wait for room, under its own cancel scope."""
        request: Request | None = None
        try:
            with trio.move_on_at(deadline):
                for attempt in attempts:
                    connection = await self._connection()
                    request = Request(payload, expected)
                    try:
                        await connection.submit(request)
                    except NotSent:
                        if attempt == 2:
                            raise _copy(connection.broken, written=False) from None
                        continue
                    if request.error is not None:
                        if not request.written and attempt == 1:
                            continue  # failed before the write: the command never ran
                        raise _copy(request.error, written=request.written) from None
                    return self._answered(request, started)
        except trio.Cancelled:
            if request is not None and request.abandoned:
                self.stats.cancelled_in_flight += 1
            raise
        except StoreUnavailable:
            self.stats.errors_unavailable += 1
            raise
        # The deadline passed: this caller's request (if any) is abandoned,
        # nobody else's is touched.
        raise self._timed_out(seconds, written=request is not None and request.written)

    def _answered(self, request: Request, started: float) -> list[Any]:
        if self.on_latency is not None:
            self.on_latency(trio.current_time() - started)
        self._inspect(request.replies)
        return request.replies

    def _timed_out(self, seconds: float, *, written: bool) -> StoreUnavailable:
        self.stats.timeouts += 1
        self.stats.errors_unavailable += 1
        return StoreUnavailable(
            f"Redis at {self.params.describe()} did not answer within {seconds:g} s",
            reason=Unavailable.TIMEOUT,
            maybe_executed=written,
        )

    def _ready_connection(self, now: float) -> Connection | None:
        """The connection :meth:`_connection` would return without waiting, if any."""
        best: Connection | None = None
        usable = 0
        for slot in self._slots:
            if slot is not None and slot.broken is None and not slot.retiring:
                usable += 1
                if best is None or slot.load < best.load:
                    best = slot
        if best is not None and (
            best.load == 0 or usable == len(self._slots) or now < self._failed_until
        ):
            return best
        return None

    def _inspect(self, replies: list[Any]) -> None:
        """Count error replies; a READONLY among them retires the connections."""
        for reply in replies:
            if isinstance(reply, StoreUnavailable):
                self.stats.errors_unavailable += 1
                if reply.reason is Unavailable.READ_ONLY:
                    self._retire_after_read_only()
            elif isinstance(reply, CommandError):
                self.stats.command_errors += 1

    def retire(self) -> None:
        """Move every caller to fresh connections; those in use finish what was written, then close.

        For a router that stops using this client (a node left the cluster).
        """
        for connection in self._open:
            connection.retire()

    def _retire_after_read_only(self) -> None:
        """The node was demoted: move every caller to fresh connections (rate-limited)."""
        now = trio.current_time()
        if now < self._read_only_reset_until:
            return
        self._read_only_reset_until = now + self._reconnect_backoff
        self.stats.read_only_resets += 1
        self.retire()

    def _closed(self, connection: Connection) -> None:
        self._open.discard(connection)

    async def _connection(self) -> Connection:
        """A usable connection for the next request, connecting a free slot if worthwhile.

        An idle usable connection is used at once; a busy one is used only
        when every slot is usable or Redis recently refused a connect.
        Otherwise an empty (or broken, or retired) slot is connected, falling
        back to the busy usable connection if that fails.
        """
        usable = [s for s in self._slots if s is not None and s.usable]
        best = min(usable, key=lambda s: s.load, default=None)
        in_backoff = trio.current_time() < self._failed_until
        if best is not None and (best.load == 0 or len(usable) == len(self._slots) or in_backoff):
            return best
        index = next(i for i, s in enumerate(self._slots) if s is None or not s.usable)
        async with self._slot_locks[index]:
            slot = self._slots[index]
            if slot is not None and slot.usable:
                return slot
            if in_backoff and self._last_failure is not None:
                raise _copy(self._last_failure, written=False)
            try:
                connection: Connection = await self._nursery.start(
                    Connection(self.params, self.stats, self.stall_timeout, self._closed).run
                )
            except StoreUnavailable as exc:
                self.stats.connect_failures += 1
                self._last_failure = exc
                self._failed_until = trio.current_time() + self._reconnect_backoff
                if best is not None and best.usable:
                    return best
                raise
            if slot is not None:
                self.stats.reconnects += 1
            self._slots[index] = connection
            self._open.add(connection)
            return connection

    async def aclose(self) -> None:
        """Close the probe connection (the multiplexed ones close with the nursery)."""
        await self._probe.aclose()


def _copy(error: StoreUnavailable | None, *, written: bool) -> StoreUnavailable:
    """A fresh exception for one caller (a shared instance would tangle tracebacks)."""
    if error is None:
        return StoreUnavailable("connection closed", reason=Unavailable.CONNECTION_LOST)
    return StoreUnavailable(str(error), reason=error.reason, maybe_executed=written)


@asynccontextmanager
async def open_redis(
    url: str,
    *,
    timeout: float = 5.0,
    connections: int = 2,
    reconnect_backoff: float = 0.5,
    stall_timeout: float | None = None,
    on_latency: Callable[[float], None] | None = None,
) -> AsyncIterator[RedisClient]:
    """Open a :class:`RedisClient` whose connections live in a nursery owned by this block.

    One node only; :func:`trio_portfolio.redis_connect.open_redis` also
    opens clusters and Sentinel setups from their URLs.

    Connections are made lazily, so this succeeds even while Redis is down
    (the first call then raises :class:`StoreUnavailable`); call
    :meth:`RedisClient.ping` to insist on a live store.  ``timeout`` is the
    default per-call deadline; ``stall_timeout`` (default: ``timeout``) is how
    long Redis may send nothing at all, with requests outstanding, before a
    connection is judged dead (a call cannot outlive its connection, whatever
    its own timeout).  ``on_latency`` is called with each completed call's
    seconds.

    Raises:
      ValueError: for a bad URL or setting (at once, before any connection).
      StoreUnavailable: never from opening; from the first call that cannot
        be served (the module docstring lists the reasons).
    """
    params = ConnectionParams.from_url(url)
    async with open_service_nursery() as nursery:
        client = RedisClient(
            nursery,
            params,
            timeout=timeout,
            connections=connections,
            reconnect_backoff=reconnect_backoff,
            stall_timeout=stall_timeout,
            on_latency=on_latency,
        )
        try:
            yield client
        finally:
            await client.aclose()
