"""The Trio Redis adapter: every byte between the server and Redis goes through here.

Theory of operation
===================

redis-py has no Trio support, and parking a thread per command would cap
concurrency at the thread pool.  This module speaks RESP2 natively on Trio
streams, reusing redis-py's command encoder (``PythonRespSerializer``) and the
parser redis-py itself uses when available (``hiredis.Reader``), so no RESP
code is written here.

A :class:`RedisClient` owns a small, fixed number of *multiplexed*
connections.  Many tasks share one connection at once:

* A caller encodes its command(s) into a :class:`_Request` and puts it on the
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
and raises :class:`StoreUnavailable` with reason ``timeout``.  No caller's
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

redis-py's private names used here (``redis._parsers.encoders.Encoder``) are
checked by ``tests/test_redis_py_compat.py``, which fails with a clear message
when a redis-py release moves them; ``pyproject.toml`` pins the range known
to work.
"""

from __future__ import annotations

import collections
import hashlib
import math
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import hiredis
import trio

try:
    from redis._parsers.encoders import Encoder
    from redis.connection import PythonRespSerializer, parse_url
    from redis.exceptions import DataError
except ImportError as exc:  # pragma: no cover - only with a redis-py outside the pin
    raise ImportError(
        "trio_portfolio.redis_io reuses redis-py's command encoder "
        "(redis._parsers.encoders.Encoder, redis.connection.PythonRespSerializer, parse_url), "
        f"which the installed redis-py does not have where expected: {exc}. "
        "Install a redis-py inside the range pyproject.toml pins, or adapt redis_io.py "
        "(tests/test_redis_py_compat.py lists what is borrowed)."
    ) from exc

from trio_portfolio.redis_errors import (
    CommandError,
    NoScript,
    RedisAdapterError,
    ReplyDecodeError,
    StoreUnavailable,
    Unavailable,
    classify_error_reply,
)
from trio_portfolio.services import open_service_nursery

__all__ = [
    "CommandArg",
    "CommandError",
    "RedisAdapterError",
    "RedisClient",
    "RedisStatistics",
    "ReplyDecodeError",
    "ReplyError",
    "Script",
    "StoreUnavailable",
    "Unavailable",
    "open_redis",
]

ReplyError = CommandError
"""The old name of :class:`CommandError`, kept while other modules move to the new one."""

CommandArg = str | bytes | int | float

_ENCODER = Encoder(encoding="utf-8", encoding_errors="strict", decode_responses=False)  # type: ignore[no-untyped-call]
_SERIALIZER = PythonRespSerializer(6000, _ENCODER.encode)
_MAX_BATCH = 1024  # requests written by one send_all
_READ_SIZE = 65536


class ProtocolError(StoreUnavailable):
    """Bytes from Redis that are not RESP: the connection must be dropped.

    hiredis raises this (it is the reader's ``protocolError`` class); for
    callers it is just a :class:`StoreUnavailable` with reason ``protocol_error``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"unparseable reply from Redis: {message}", reason=Unavailable.PROTOCOL)


def encode_command(args: Sequence[CommandArg]) -> bytes:
    """Encode one command in RESP2 with redis-py's serializer."""
    try:
        return b"".join(_SERIALIZER.pack(*args))  # type: ignore[no-untyped-call]
    except DataError as exc:
        raise TypeError(str(exc)) from None


def new_reply_reader() -> Any:
    """A hiredis reader that returns the adapter's own types.

    Bulk strings are decoded as strict UTF-8; error replies come back as
    values (not raised) of the adapter's classes, from
    :func:`~trio_portfolio.redis_errors.classify_error_reply`.  Read it with
    :func:`next_reply`, never ``gets()`` directly.
    """
    return hiredis.Reader(
        protocolError=ProtocolError,
        replyError=classify_error_reply,
        encoding="utf-8",
        errors="strict",
    )


def next_reply(parser: Any) -> Any:
    """The next complete reply from ``parser``, or ``False`` if more bytes are needed.

    A reply with bytes that are not UTF-8 is returned as a
    :class:`ReplyDecodeError` value: hiredis consumes such a reply whole
    before raising, so the stream of replies stays in step.  Raises
    :class:`ProtocolError` for bytes that are not RESP.
    """
    try:
        return parser.gets()
    except UnicodeDecodeError as exc:
        return ReplyDecodeError(
            f"Redis sent a reply that is not UTF-8 ({exc.reason} at byte {exc.start})"
        )


class Script:
    """A Lua script known by its SHA1, run with EVALSHA and reloaded on NOSCRIPT."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Script(sha={self.sha[:12]}...)"


@attrs.frozen
class ConnectionParams:
    """Where and how to connect, parsed from a ``redis://``, ``rediss://`` or ``unix://`` URL."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    tls: bool = False
    tls_verify: bool = True
    username: str | None = None
    password: str | None = None
    db: int = 0

    @classmethod
    def from_url(cls, url: str) -> ConnectionParams:
        """Parse ``url`` with redis-py's own URL parser; reject other schemes clearly."""
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"Redis URL must start with redis://, rediss:// or unix://: {url!r}")
        opts = parse_url(url)  # type: ignore[no-untyped-call]
        return cls(
            host=str(opts.get("host") or "localhost"),
            port=int(opts.get("port") or 6379),
            path=opts.get("path"),
            tls=url.startswith("rediss://"),
            tls_verify=opts.get("ssl_cert_reqs", "required") not in ("none", ssl.CERT_NONE),
            username=opts.get("username"),
            password=opts.get("password"),
            db=int(opts.get("db") or 0),
        )

    def describe(self) -> str:
        """Where this points, without credentials (safe to log)."""
        if self.path is not None:
            return f"unix://{self.path}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"

    def handshake(self) -> list[tuple[CommandArg, ...]]:
        """Commands that make a fresh connection usable: AUTH, then SELECT."""
        commands: list[tuple[CommandArg, ...]] = []
        if self.password is not None:
            if self.username:
                commands.append(("AUTH", self.username, self.password))
            else:
                commands.append(("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands


_STREAM_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


async def open_stream(params: ConnectionParams) -> trio.abc.Stream:
    """Open the transport (TCP, TLS over TCP, or a unix socket) to Redis.

    Raises :class:`StoreUnavailable` (``connect_failed``) if it cannot.
    """
    try:
        if params.path is not None:
            return await trio.open_unix_socket(params.path)
        if params.tls:
            context = ssl.create_default_context()
            if not params.tls_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            return await trio.open_ssl_over_tcp_stream(
                params.host, params.port, ssl_context=context
            )
        return await trio.open_tcp_stream(params.host, params.port)
    except (OSError, trio.BrokenResourceError) as exc:
        raise StoreUnavailable(
            f"cannot connect to Redis at {params.describe()}: {exc}",
            reason=Unavailable.CONNECT_FAILED,
        ) from exc


async def receive_reply(stream: trio.abc.Stream, parser: Any) -> Any:
    """Read until ``parser`` has one complete reply; return it (errors as values).

    For request/response use of a connection that no other task shares.
    Raises :class:`StoreUnavailable` if the connection closes or breaks.
    """
    while (reply := next_reply(parser)) is False:
        data = await stream.receive_some(_READ_SIZE)
        if not data:
            raise StoreUnavailable(
                "Redis closed the connection", reason=Unavailable.CONNECTION_LOST
            )
        parser.feed(data)
    return reply


async def open_connection(params: ConnectionParams) -> tuple[trio.abc.Stream, Any]:
    """Connect and run the handshake (AUTH, SELECT); return the stream and its parser.

    The handshake is a plain request/response exchange done before any task
    shares the stream.  On any failure the stream is closed and
    :class:`StoreUnavailable` raised (``connect_failed`` or ``auth_failed``).
    """
    stream = await open_stream(params)
    parser = new_reply_reader()
    try:
        commands = params.handshake()
        if commands:
            await stream.send_all(b"".join(encode_command(c) for c in commands))
            for command in commands:
                reply = await receive_reply(stream, parser)
                if isinstance(reply, Exception):
                    raise StoreUnavailable(
                        f"Redis refused {command[0]!s}: {reply}", reason=Unavailable.AUTH_FAILED
                    )
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        if isinstance(exc, StoreUnavailable):
            raise
        if isinstance(exc, _STREAM_ERRORS):
            raise StoreUnavailable(
                f"handshake with {params.describe()} failed: {exc}",
                reason=Unavailable.CONNECT_FAILED,
            ) from exc
        raise
    return stream, parser


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


class _Request:
    """One call: its encoded bytes, how many replies it expects, and its outcome."""

    __slots__ = (
        "abandoned",
        "done",
        "error",
        "expected",
        "payload",
        "received",
        "replies",
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
        self.done = trio.Event()

    def fail(self, error: StoreUnavailable) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class _NotSent(Exception):
    """The connection takes no more requests (broken or retired): safe to retry elsewhere."""


class _Connection:
    """One multiplexed connection: writer, reader and watchdog tasks, an in-flight deque."""

    def __init__(
        self,
        params: ConnectionParams,
        stats: RedisStatistics,
        stall_timeout: float,
        on_closed: Callable[[_Connection], None],
    ) -> None:
        self._params = params
        self._stats = stats
        self._stall_timeout = stall_timeout
        self._on_closed = on_closed
        self._send, self._receive = trio.open_memory_channel[_Request](_MAX_BATCH)
        self._in_flight: collections.deque[_Request] = collections.deque()
        self._cancel_scope = trio.CancelScope()
        self._last_progress = 0.0
        self._busy = trio.Event()
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
        return len(self._in_flight) + self._send.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[_Connection]) -> None:
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

    async def submit(self, request: _Request) -> None:
        """Queue ``request`` and wait until it is answered or failed.

        Raises :class:`_NotSent` if the connection takes no more requests.
        Cancelled, the request is marked abandoned (see the module docstring).
        """
        try:
            self._send.send_nowait(request)
        except trio.WouldBlock:
            try:
                await self._send.send(request)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _NotSent from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _NotSent from None
        try:
            await request.done.wait()
        except BaseException:
            if not request.done.is_set():
                request.abandoned = True
            raise

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
                live = [request for request in batch if not request.abandoned]
                if not live:
                    continue
                if self.broken is not None:
                    for request in live:  # never written: the caller may retry elsewhere
                        request.fail(self.broken)
                    continue
                if not self._in_flight:
                    self._last_progress = trio.current_time()
                    self._busy.set()
                for request in live:
                    # Marked before the write: a write cut half-way leaves the
                    # outcome unknown, which is what ``written`` reports.
                    request.written = True
                self._in_flight.extend(live)
                self._stats.commands += len(live)
                await stream.send_all(b"".join(request.payload for request in live))
            self._writer_done = True  # retired and drained
            self._finish_if_drained()
        except _STREAM_ERRORS as exc:
            self._break(
                StoreUnavailable(
                    f"lost connection to Redis while writing: {exc}",
                    reason=Unavailable.CONNECTION_LOST,
                )
            )

    async def _reader(self, stream: trio.abc.Stream, parser: Any) -> None:
        try:
            while True:
                data = await stream.receive_some(_READ_SIZE)
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
        except _STREAM_ERRORS as exc:
            self._break(
                StoreUnavailable(
                    f"lost connection to Redis while reading: {exc}",
                    reason=Unavailable.CONNECTION_LOST,
                )
            )

    def _deliver(self, request: _Request, reply: Any) -> None:
        if isinstance(reply, ReplyDecodeError):
            self._stats.replies_undecodable += 1
        request.received += 1
        if not request.abandoned:
            request.replies.append(reply)
        if request.received == request.expected:
            self._in_flight.popleft()
            if request.abandoned:
                self._stats.replies_discarded += 1
            request.done.set()

    async def _watchdog(self) -> None:
        """Drop the connection when Redis says nothing for ``stall_timeout`` with work pending."""
        while True:
            if not self._in_flight:
                self._busy = trio.Event()
                await self._busy.wait()
                continue
            deadline = self._last_progress + self._stall_timeout
            if trio.current_time() >= deadline:
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
            await trio.sleep_until(deadline)


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

    async def call(self, args: Sequence[CommandArg]) -> Any:
        """One command, its reply (errors as values); :class:`StoreUnavailable` if it breaks."""
        async with self._lock:
            try:
                if self._conn is None:
                    self._conn = await open_connection(self._params)
                stream, parser = self._conn
                await stream.send_all(encode_command(args))
                return await receive_reply(stream, parser)
            except BaseException as exc:
                await self.aclose()
                if isinstance(exc, _STREAM_ERRORS):
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
        self._slots: list[_Connection | None] = [None] * connections
        self._slot_locks = [trio.Lock() for _ in range(connections)]
        self._open: set[_Connection] = set()
        self._failed_until = -math.inf
        self._last_failure: StoreUnavailable | None = None
        self._read_only_reset_until = -math.inf
        self._probe = _Dedicated(params)
        self.stats = RedisStatistics()
        self.on_latency = on_latency
        """Called with the seconds each completed call took (for a latency histogram)."""

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
        request: _Request | None = None
        try:
            with trio.move_on_after(seconds):
                started = trio.current_time()
                for attempt in (1, 2):
                    connection = await self._connection()
                    request = _Request(payload, expected)
                    try:
                        await connection.submit(request)
                    except _NotSent:
                        if attempt == 2:
                            raise _copy(connection.broken, written=False) from None
                        continue
                    if request.error is not None:
                        if not request.written and attempt == 1:
                            continue  # failed before the write: the command never ran
                        raise _copy(request.error, written=request.written) from None
                    if self.on_latency is not None:
                        self.on_latency(trio.current_time() - started)
                    self._inspect(request.replies)
                    return request.replies
        except trio.Cancelled:
            if request is not None and request.abandoned:
                self.stats.cancelled_in_flight += 1
            raise
        except StoreUnavailable:
            self.stats.errors_unavailable += 1
            raise
        # The deadline passed: this caller's request (if any) is abandoned,
        # nobody else's is touched.
        self.stats.timeouts += 1
        self.stats.errors_unavailable += 1
        raise StoreUnavailable(
            f"Redis at {self.params.describe()} did not answer within {seconds:g} s",
            reason=Unavailable.TIMEOUT,
            maybe_executed=request is not None and request.written,
        )

    def _inspect(self, replies: list[Any]) -> None:
        """Count error replies; a READONLY among them retires the connections."""
        for reply in replies:
            if isinstance(reply, StoreUnavailable):
                self.stats.errors_unavailable += 1
                if reply.reason is Unavailable.READ_ONLY:
                    self._retire_after_read_only()
            elif isinstance(reply, CommandError):
                self.stats.command_errors += 1

    def _retire_after_read_only(self) -> None:
        """The node was demoted: move every caller to fresh connections (rate-limited)."""
        now = trio.current_time()
        if now < self._read_only_reset_until:
            return
        self._read_only_reset_until = now + self._reconnect_backoff
        self.stats.read_only_resets += 1
        for connection in self._open:
            connection.retire()

    def _closed(self, connection: _Connection) -> None:
        self._open.discard(connection)

    async def _connection(self) -> _Connection:
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
                connection: _Connection = await self._nursery.start(
                    _Connection(self.params, self.stats, self.stall_timeout, self._closed).run
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

    Connections are made lazily, so this succeeds even while Redis is down
    (the first call then raises :class:`StoreUnavailable`); call
    :meth:`RedisClient.ping` to insist on a live store.  ``timeout`` is the
    default per-call deadline; ``stall_timeout`` (default: ``timeout``) is how
    long Redis may send nothing at all, with requests outstanding, before a
    connection is judged dead (a call cannot outlive its connection, whatever
    its own timeout).  ``on_latency`` is called with each completed call's
    seconds.  Raises :class:`ValueError` for a bad URL or setting.
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
