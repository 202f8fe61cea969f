"""The Redis adapter's wire: URLs, transports, the handshake, and RESP in and out.

Part of the adapter (see :mod:`trio_portfolio.redis_io` for the whole story).
Encoding is :func:`encode_command`, a few lines of RESP2 that write exactly
the bytes redis-py's ``PythonRespSerializer`` would (its ``Encoder``'s rules:
``str`` as UTF-8, ``int``/``float`` by ``repr``, ``bytes`` as given; ``bool``,
``None`` and anything else refused), about three times faster, which matters
on a path every command takes (``tests/test_redis_py_compat.py`` compares the
two byte for byte); decoding is ``hiredis.Reader`` with
strict UTF-8 and the adapter's own error factory, so replies come back as
values of the adapter's types.  :func:`next_reply` is the one way to read a
reply: it turns hiredis' ``UnicodeDecodeError`` (raised only after the whole
reply was consumed, so the stream stays in step) into a
:class:`~trio_portfolio.redis_errors.ReplyDecodeError` value.

redis-py's names used here (``parse_url``, and the serializer the
equivalence test compares with) are checked by
``tests/test_redis_py_compat.py``, which fails with a clear message
when a redis-py release moves them; ``pyproject.toml`` pins the range known
to work.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any, cast

import attrs
import hiredis
import trio

try:
    from redis.connection import parse_url
except ImportError as exc:  # pragma: no cover - only with a redis-py outside the pin
    raise ImportError(
        "trio_portfolio.redis_wire reuses redis-py's URL parser "
        "(redis.connection.parse_url), "
        f"which the installed redis-py does not have where expected: {exc}. "
        "Install a redis-py inside the range pyproject.toml pins, or adapt redis_wire.py "
        "(tests/test_redis_py_compat.py lists what is borrowed)."
    ) from exc

from trio_portfolio.redis_errors import (
    ReplyDecodeError,
    StoreUnavailable,
    Unavailable,
    classify_error_reply,
)

__all__ = [
    "STREAM_ERRORS",
    "CommandArg",
    "ConnectionParams",
    "ProtocolError",
    "encode_command",
    "new_reply_reader",
    "next_reply",
    "open_connection",
    "open_stream",
    "receive_reply",
]

CommandArg = str | bytes | int | float

READ_SIZE = 65536


class ProtocolError(StoreUnavailable):
    """Bytes from Redis that are not RESP: the connection must be dropped.

    hiredis raises this (it is the reader's ``protocolError`` class); for
    callers it is just a :class:`StoreUnavailable` with reason ``protocol_error``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"unparseable reply from Redis: {message}", reason=Unavailable.PROTOCOL)


def encode_command(args: Sequence[CommandArg]) -> bytes:
    """One command in RESP2, byte for byte what redis-py's serializer writes.

    The command name is one argument as given (redis-py would split a name
    such as ``"CONFIG GET"`` at its space; the adapter never sends one).

    Raises:
      TypeError: an argument that is not ``str``, ``bytes``, ``int`` or
        ``float`` (``bool`` and ``None`` included, as redis-py refuses them).
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)
        if kind is str:
            data = cast(str, arg).encode()
        elif kind is bytes:
            data = cast(bytes, arg)
        elif kind is int or kind is float:
            data = repr(arg).encode()
        else:
            data = _encode_other(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _encode_other(arg: object) -> bytes:
    """Subclasses and other types, by redis-py's ``Encoder`` rules (the slow path)."""
    if isinstance(arg, bytes | memoryview):
        return bytes(arg)
    if isinstance(arg, bool):
        raise TypeError(
            "Invalid input of type: 'bool'. Convert to a bytes, string, int or float first."
        )
    if isinstance(arg, int | float):
        return repr(arg).encode()
    if isinstance(arg, str):
        return arg.encode()
    raise TypeError(
        f"Invalid input of type: {type(arg).__name__!r}. "
        "Convert to a bytes, string, int or float first."
    )


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


STREAM_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


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
        data = await stream.receive_some(READ_SIZE)
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
        if isinstance(exc, STREAM_ERRORS):
            raise StoreUnavailable(
                f"handshake with {params.describe()} failed: {exc}",
                reason=Unavailable.CONNECT_FAILED,
            ) from exc
        raise
    return stream, parser
