"""The Trio Redis adapter: every byte between the server and Redis goes through here.

Theory of operation
===================

redis-py has no Trio support, and parking a thread per command would cap
concurrency at the thread pool.  This module speaks RESP2 natively on Trio
streams, reusing redis-py's command encoder (``PythonRespSerializer``) and the
parser redis-py itself uses when available (``hiredis.Reader``, with
redis-py's error-reply classes), so no RESP code is written here.

A :class:`RedisClient` owns a small, fixed number of *multiplexed*
connections.  Many tasks share one connection at once:

* A caller encodes its command(s) into a :class:`_Request` and puts it on the
  connection's bounded request channel.
* The connection's **writer** task takes every request waiting (that batching
  is automatic pipelining), appends them to the ``in_flight`` deque *in the
  order it writes them*, and writes their bytes with one ``send_all``.
* The connection's **reader** task feeds bytes to hiredis and hands each
  reply to the oldest request in ``in_flight``.

Replies are matched to requests by position in that deque, never by "whoever
reads next".  That is what makes every call cancel-safe: a caller cancelled
while its request waits in the channel marks it abandoned and the writer never
sends it; a caller cancelled after the write marks it abandoned and the
reader consumes its reply and drops it.  No cancellation can leave a reply on
a connection for the next caller, and a cancellation never costs a
connection.

A *timeout* is different: a reply that has not come in time means Redis (or
the path to it) is stuck, so the connection is closed, every request on it
fails with :class:`StoreUnavailable`, and the next call reconnects.  After a
failed connect, calls fail fast for ``reconnect_backoff`` seconds instead of
each waiting out its own connect timeout, so an outage is reported at once.

Resources: every connection's tasks run in the nursery that
:func:`open_redis` opens; leaving the ``async with`` closes them all.
Pub/sub needs its own connection (a subscribed RESP2 connection can issue no
other command); see :mod:`trio_portfolio.redis_pubsub`.
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
from redis._parsers.base import BaseParser
from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, InvalidResponse, NoScriptError, ResponseError

from trio_portfolio.services import open_service_nursery

__all__ = [
    "CommandArg",
    "RedisClient",
    "RedisStatistics",
    "ReplyError",
    "Script",
    "StoreUnavailable",
    "open_redis",
]

ReplyError = ResponseError
"""An error reply from Redis (``ERR``, ``NOSCRIPT``, ``WRONGTYPE``...)."""

CommandArg = str | bytes | int | float


class StoreUnavailable(Exception):
    """Redis cannot be reached, did not answer in time, or the connection broke.

    This is the one exception callers need for "the store is down": it is
    raised for refused and failed connections, TLS and authentication
    failures, timeouts, and connections lost with the request in flight (in
    which case the command may or may not have run: every mutation in this
    project is one idempotent-or-fenced Lua script, so that is safe).
    """


_ENCODER = Encoder(encoding="utf-8", encoding_errors="strict", decode_responses=False)  # type: ignore[no-untyped-call]
_SERIALIZER = PythonRespSerializer(6000, _ENCODER.encode)
_MAX_BATCH = 1024  # requests written by one send_all


def encode_command(args: Sequence[CommandArg]) -> bytes:
    """Encode one command in RESP2: ``str``, ``bytes`` and ``int`` directly, else redis-py's way.

    The direct path produces exactly what redis-py's serializer does for
    those types (UTF-8, strict) at a fraction of its cost, which matters for
    the market's pipelines of tens of thousands of scripts; anything else
    (floats, memoryviews, and the types redis-py refuses) goes through the
    serializer.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bool) or not isinstance(arg, str | bytes | int):
            try:
                return b"".join(_SERIALIZER.pack(*args))  # type: ignore[no-untyped-call]
            except DataError as exc:
                raise TypeError(str(exc)) from None
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        else:
            data = b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def new_reply_reader() -> Any:
    """A hiredis reader configured exactly as redis-py configures its own.

    Bulk strings are decoded as UTF-8; error replies come back as values of
    redis-py's exception classes (``NoScriptError``, ``ResponseError``...).
    """
    return hiredis.Reader(
        protocolError=InvalidResponse,
        replyError=BaseParser.parse_error,
        encoding="utf-8",
        errors="strict",
    )


def _as_exception(reply: Exception) -> Exception:
    """The exception to raise for an error reply.

    redis-py files a few error replies (``LOADING``, ``WRONGPASS``...) under
    its *connection* errors: for us they mean the store is not usable, so
    they become :class:`StoreUnavailable`; the rest stay :data:`ReplyError`.
    """
    if isinstance(reply, RedisConnectionError):
        return StoreUnavailable(f"Redis cannot serve requests: {reply}")
    return reply


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


async def open_stream(params: ConnectionParams) -> trio.abc.Stream:
    """Open the transport (TCP, TLS over TCP, or a unix socket) to Redis."""
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
        raise StoreUnavailable(f"cannot connect to Redis at {params.describe()}: {exc}") from exc


async def open_connection(params: ConnectionParams) -> tuple[trio.abc.Stream, Any]:
    """Connect and run the handshake (AUTH, SELECT); return the stream and its parser.

    The handshake is a plain request/response exchange done before any task
    shares the stream.  On any failure the stream is closed and
    :class:`StoreUnavailable` raised.
    """
    stream = await open_stream(params)
    parser = new_reply_reader()
    try:
        commands = params.handshake()
        if commands:
            await stream.send_all(b"".join(encode_command(c) for c in commands))
            for command in commands:
                reply = parser.gets()
                while reply is False:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise StoreUnavailable("Redis closed the connection during the handshake")
                    parser.feed(data)
                    reply = parser.gets()
                if isinstance(reply, Exception):
                    raise StoreUnavailable(f"Redis refused {command[0]!s}: {reply}")
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        if isinstance(exc, (OSError, trio.BrokenResourceError, InvalidResponse)):
            raise StoreUnavailable(f"handshake with {params.describe()} failed: {exc}") from exc
        raise
    return stream, parser


@attrs.define
class RedisStatistics:
    """Counters for introspection and ``/metrics`` (all since the client opened)."""

    commands: int = 0
    errors_unavailable: int = 0
    timeouts: int = 0
    connects: int = 0
    connect_failures: int = 0
    cancelled_in_flight: int = 0
    connections_open: int = 0
    in_flight: int = 0


class _Request:
    """One call: its encoded bytes, how many replies it expects, and its outcome."""

    __slots__ = ("abandoned", "done", "error", "expected", "payload", "replies")

    def __init__(self, payload: bytes, expected: int) -> None:
        self.payload = payload
        self.expected = expected
        self.replies: list[Any] = []
        self.error: StoreUnavailable | None = None
        self.abandoned = False
        self.done = trio.Event()

    def fail(self, error: StoreUnavailable) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class _NotSent(Exception):
    """The connection closed before the request was written: safe to retry."""


class _Connection:
    """One multiplexed connection: a writer task, a reader task, an in-flight deque."""

    def __init__(self, params: ConnectionParams, stats: RedisStatistics) -> None:
        self._params = params
        self._stats = stats
        self._send, self._receive = trio.open_memory_channel[_Request](_MAX_BATCH)
        self._in_flight: collections.deque[_Request] = collections.deque()
        self._cancel_scope = trio.CancelScope()
        self.broken: StoreUnavailable | None = None

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
                    task_status.started(self)
        finally:
            self._stats.connections_open -= 1
            self._break(StoreUnavailable(f"connection to {self._params.describe()} closed"))
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def submit(self, payload: bytes, expected: int) -> list[Any]:
        """Queue a request and wait for its replies (see the module docstring)."""
        request = _Request(payload, expected)
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
                self._stats.cancelled_in_flight += 1
            raise
        if request.error is not None:
            raise request.error
        return request.replies

    def close_after_timeout(self, seconds: float) -> None:
        """A call timed out: Redis is stuck or the path is gone, so drop this connection."""
        self._break(StoreUnavailable(f"Redis did not answer within {seconds:g} s"))

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
                # Whatever was taken goes in flight, even if the connection broke
                # meanwhile: the final _break in run() fails everything in flight,
                # so no request held here can be forgotten.
                self._in_flight.extend(live)
                if not live or self.broken is not None:
                    continue
                self._stats.commands += len(live)
                await stream.send_all(b"".join(request.payload for request in live))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._break(StoreUnavailable(f"lost connection to Redis while writing: {exc}"))

    async def _reader(self, stream: trio.abc.Stream, parser: Any) -> None:
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    self._break(StoreUnavailable("Redis closed the connection"))
                    return
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    if not self._in_flight:
                        self._break(StoreUnavailable("Redis sent a reply nobody asked for"))
                        return
                    request = self._in_flight[0]
                    request.replies.append(reply)
                    if len(request.replies) == request.expected:
                        self._in_flight.popleft()
                        request.done.set()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._break(StoreUnavailable(f"lost connection to Redis while reading: {exc}"))
        except InvalidResponse as exc:
            self._break(StoreUnavailable(f"unparseable reply from Redis: {exc}"))


class RedisClient:
    """Commands, pipelines and scripts over a few shared connections.

    Create with :func:`open_redis`.  Every method may be cancelled at any
    await without harm (see the module docstring), takes an optional
    ``timeout`` overriding the client default, and raises
    :class:`StoreUnavailable` when Redis cannot be used.  Error replies are
    raised as :data:`ReplyError` by :meth:`execute` and :meth:`evalsha`, and
    returned in place by :meth:`pipeline` and :meth:`evalsha_many`.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        params: ConnectionParams,
        *,
        timeout: float,
        connections: int,
        reconnect_backoff: float,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError("timeout must be a positive number of seconds")
        self._nursery = nursery
        self.params = params
        self.timeout = timeout
        self._reconnect_backoff = reconnect_backoff
        self._slots: list[_Connection | None] = [None] * connections
        self._slot_locks = [trio.Lock() for _ in range(connections)]
        self._failed_until = -math.inf
        self._last_failure: StoreUnavailable | None = None
        self.stats = RedisStatistics()
        self.on_latency: Callable[[float], None] | None = None
        """Called with the seconds each completed call took (for a latency histogram)."""

    def statistics(self) -> RedisStatistics:
        """A snapshot of the client's counters."""
        self.stats.in_flight = sum(slot.load for slot in self._slots if slot and not slot.broken)
        return attrs.evolve(self.stats)

    async def execute(self, *args: CommandArg, timeout: float | None = None) -> Any:
        """Run one command and return its reply; raise an error reply as :data:`ReplyError`."""
        (reply,) = await self._call(encode_command(args), 1, timeout)
        if isinstance(reply, Exception):
            raise _as_exception(reply)
        return reply

    async def ping(self, *, timeout: float | None = None) -> None:
        """Round-trip to Redis; raises :class:`StoreUnavailable` if it does not answer."""
        await self.execute("PING", timeout=timeout)

    async def pipeline(
        self, commands: Sequence[Sequence[CommandArg]], *, timeout: float | None = None
    ) -> list[Any]:
        """Send ``commands`` back to back on one connection; replies (or errors) in order.

        The commands are written contiguously, so ``MULTI`` ... ``EXEC`` inside
        a pipeline is a transaction.
        """
        if not commands:
            return []
        payload = b"".join(encode_command(command) for command in commands)
        return await self._call(payload, len(commands), timeout)

    async def load_scripts(
        self, scripts: Sequence[Script], *, timeout: float | None = None
    ) -> None:
        """``SCRIPT LOAD`` each script so EVALSHA finds it (done again on NOSCRIPT)."""
        replies = await self.pipeline(
            [("SCRIPT", "LOAD", s.source) for s in scripts], timeout=timeout
        )
        for script, reply in zip(scripts, replies, strict=True):
            if isinstance(reply, ResponseError):
                raise reply
            if reply != script.sha:
                raise ResponseError(f"Redis hashed {script!r} as {reply}")

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[CommandArg] = (),
        args: Sequence[CommandArg] = (),
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run ``script``; on NOSCRIPT (a restarted or flushed Redis) run it with EVAL."""
        try:
            return await self.execute(
                "EVALSHA", script.sha, len(keys), *keys, *args, timeout=timeout
            )
        except NoScriptError:
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

        Calls answered NOSCRIPT did not run; the script is loaded and just
        those calls are sent again.
        """
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
        replies = await self.pipeline(commands, timeout=timeout)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
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
        connection: _Connection | None = None
        try:
            with trio.fail_after(seconds):
                for attempt in (1, 2):
                    connection = await self._connection()
                    try:
                        started = trio.current_time()
                        replies = await connection.submit(payload, expected)
                        if self.on_latency is not None:
                            self.on_latency(trio.current_time() - started)
                        return replies
                    except _NotSent:
                        # The connection broke before writing: the command never ran.
                        if attempt == 2:
                            raise connection.broken or StoreUnavailable("connection lost") from None
        except trio.TooSlowError:
            self.stats.timeouts += 1
            if connection is not None:
                connection.close_after_timeout(seconds)
            self.stats.errors_unavailable += 1
            raise StoreUnavailable(
                f"Redis at {self.params.describe()} did not answer within {seconds:g} s"
            ) from None
        except StoreUnavailable:
            self.stats.errors_unavailable += 1
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connection(self) -> _Connection:
        """A live connection for the next request, connecting a free slot if worthwhile.

        An idle live connection is used at once; a busy one is used only when
        every slot is live or Redis recently refused a connect.  Otherwise an
        empty (or broken) slot is connected, falling back to the busy live
        connection if that fails.
        """
        live = [s for s in self._slots if s is not None and s.broken is None]
        best = min(live, key=lambda s: s.load, default=None)
        in_backoff = trio.current_time() < self._failed_until
        if best is not None and (best.load == 0 or len(live) == len(self._slots) or in_backoff):
            return best
        index = next(i for i, s in enumerate(self._slots) if s is None or s.broken is not None)
        async with self._slot_locks[index]:
            slot = self._slots[index]
            if slot is not None and slot.broken is None:
                return slot
            if in_backoff and self._last_failure is not None:
                raise StoreUnavailable(str(self._last_failure))
            try:
                connection: _Connection = await self._nursery.start(
                    _Connection(self.params, self.stats).run
                )
            except StoreUnavailable as exc:
                self.stats.connect_failures += 1
                self._last_failure = exc
                self._failed_until = trio.current_time() + self._reconnect_backoff
                if best is not None and best.broken is None:
                    return best
                raise
            self._slots[index] = connection
            return connection


@asynccontextmanager
async def open_redis(
    url: str,
    *,
    timeout: float = 5.0,
    connections: int = 2,
    reconnect_backoff: float = 0.5,
) -> AsyncIterator[RedisClient]:
    """Open a :class:`RedisClient` whose connections live in a nursery owned by this block.

    Connections are made lazily, so this succeeds even while Redis is down
    (the first call then raises :class:`StoreUnavailable`); call
    :meth:`RedisClient.ping` to insist on a live store.
    """
    params = ConnectionParams.from_url(url)
    async with open_service_nursery() as nursery:
        yield RedisClient(
            nursery,
            params,
            timeout=timeout,
            connections=connections,
            reconnect_backoff=reconnect_backoff,
        )
