"""The server side of one WebSocket, on wsproto, with no task of its own.

Theory of operation
===================

trio-websocket stays the project's client library (and the tests'), but
the server speaks WebSocket with wsproto directly, because a server holds
thousands of idle connections and trio-websocket's server connection costs
each of them a reader task, a message channel, four events, a lock and the
handshake objects (about 8 KiB, measured in ``bench/README.md``).  Here a
connection is one :class:`ServerWebSocket` object whose
:meth:`~ServerWebSocket.get_message` is called by the connection's own
reader (:mod:`trio_portfolio.connection`): it reads the socket, answers
pings, notes pongs and handles the close handshake in that caller's task,
and returns the next whole message.  Nothing reads the socket while no one
calls it, as before: trio-websocket's reader stopped too once its one-slot
channel was full.

*The handshake.*  :func:`read_handshake` reads the client's upgrade request
(wsproto's h11 handshake machine) and returns a :class:`ServerHandshake`
with its path and proposed subprotocols, which the server then accepts
(:meth:`ServerHandshake.accept`, a :class:`ServerWebSocket`) or rejects
with an HTTP answer (:meth:`ServerHandshake.reject`).  Once accepted, only
wsproto's frame-level ``Connection`` is kept: the h11 machine, the request
and its headers are dropped.

*A ping that does not wait.*  :meth:`ServerWebSocket.send_ping` sends a
ping and returns; :attr:`ServerWebSocket.ping_unanswered_since` says since
when the latest ping has gone unanswered (``None``: answered, or none
sent).  A pong counts when it carries the payload of the latest ping (RFC
6455 §5.5.3: a peer may answer only the most recent of several pings); an
unsolicited pong (a heartbeat, allowed by §5.5.3) is ignored.

*A close frame for a frame we cannot accept.*  wsproto reports a frame it
cannot parse (a text frame that is not UTF-8: code 1007; a protocol
violation: 1002) as a ``CloseConnection`` event while the connection is
still open.  We send the close frame with wsproto's code (bounded by
:data:`CLOSE_SEND_TIMEOUT`, since the peer may not be reading) and close
the TCP connection; the reader then sees :class:`ConnectionClosed` with
that code.  A message longer than ``max_message_size`` closes with 1009.

*No pong after our close.*  Pings are answered only while the connection
is open (wsproto refuses a pong after our close frame).

*One write for many frames.*  :meth:`ServerWebSocket.send_messages`
encodes a batch of text frames and writes them with one ``send_all``.
Every write (frames, pings, pongs, close frames) holds the connection's
send lock, so that the reader's pongs never interleave with the writer's
frames.

*Closing.*  :meth:`ServerWebSocket.aclose` sends our close frame and waits
for the peer's (read by the connection's reader if one is reading, else by
``aclose`` itself), then closes the TCP connection; the caller bounds it.
A peer's close frame is answered and the TCP connection closed at once
(RFC 6455 §7.1.1: the server closes first).

*Cheap on the hot path.*  A plain TCP socket is read directly once
readable and written directly while the send lock is free (what does not
fit in the kernel's buffer goes through ``send_all`` under the lock and the
deadline); whole text frames are encoded here (:func:`text_frame`, the
bytes wsproto makes).  Two wsproto private names are used: the handshake's
``_h11_connection.trailing_data`` (bytes sent right behind the request) and
the frame state's ``_events`` deque (replaced by an empty tuple); the
dependency is pinned below 1.4 and the tests cover both.

The exceptions are trio-websocket's (:class:`ConnectionClosed` with a
:class:`CloseReason`), so the code and the tests that speak to both sides
name one set.  ``tests/test_keepalive.py``, ``tests/test_websocket_server.py``
and the protocol suites check these behaviours over real sockets.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import struct
from collections.abc import Sequence

import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as FrameConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CLOSE_SEND_TIMEOUT",
    "RECEIVE_BYTES",
    "ServerHandshake",
    "ServerWebSocket",
    "read_handshake",
    "text_frame",
]

CLOSE_SEND_TIMEOUT = 1.0
"""Seconds the close frame for an unacceptable frame may take to leave."""

RECEIVE_BYTES = 4096
"""Bytes read from the socket at a time (trio-websocket's default)."""

_ABNORMAL = 1006


def text_frame(message: str) -> bytes:
    """One whole, unmasked text frame (RFC 6455 §5.2), as a server sends it.

    What wsproto's ``Connection.send(TextMessage(...))`` produces for a whole
    message without extensions (``tests/test_websocket_server.py`` compares
    the two), at a fraction of its cost: the writer encodes every frame
    the server sends.  A whole message leaves wsproto's frame state as it was
    (it only tracks the opcode of an unfinished message), so frames made
    here and frames made by wsproto can follow each other.
    """
    payload = message.encode()
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 1 << 16:
        return _HEAD_16.pack(0x81, 126, size) + payload
    return _HEAD_64.pack(0x81, 127, size) + payload


_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")


def _detach(stream: trio.abc.Stream) -> trio.abc.Stream:
    """The stream to keep for the connection's life (the front door's wrapper shed)."""
    detach = getattr(stream, "detach", None)
    if detach is None:
        return stream
    detached: trio.abc.Stream = detach()
    return detached


async def read_handshake(
    stream: trio.abc.Stream, *, max_message_size: int
) -> ServerHandshake | None:
    """Read the client's opening handshake from ``stream``.

    Returns ``None`` if the client leaves first or sends something that is
    not a WebSocket upgrade (a bad request is answered by wsproto's 400
    when it offers one).  The caller bounds the wait and owns ``stream``.
    """
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        for event in ws.events():
            if isinstance(event, Request):
                return ServerHandshake(stream, ws, event, max_message_size)
        try:
            data = await stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        try:
            ws.receive_data(bytes(data))
        except RemoteProtocolError as exc:
            if exc.event_hint is not None:
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError
                ):
                    await stream.send_all(ws.send(exc.event_hint))
            return None


class ServerHandshake:
    """A client's upgrade request, to accept or reject (see the module docstring)."""

    __slots__ = ("_max_message_size", "_stream", "_ws", "path", "proposed_subprotocols")

    def __init__(
        self, stream: trio.abc.Stream, ws: WSConnection, event: Request, max_message_size: int
    ) -> None:
        self._stream = stream
        self._ws: WSConnection | None = ws
        """wsproto's handshake machine: dropped once accepted (the connection keeps none of it)."""
        self._max_message_size = max_message_size
        self.path: str = event.target
        """The request target (path and query)."""
        self.proposed_subprotocols: tuple[str, ...] = tuple(event.subprotocols)
        """The subprotocols the client offered, in its order."""

    def _machine(self) -> WSConnection:
        if self._ws is None:
            raise RuntimeError("the handshake was answered already")
        return self._ws

    async def accept(
        self,
        *,
        subprotocol: str | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> ServerWebSocket:
        """Answer 101 and return the open connection.

        Raises :class:`ConnectionClosed` (1006) if the client is gone.
        """
        ws = self._machine()
        self._ws = None
        data = ws.send(AcceptConnection(subprotocol=subprotocol, extra_headers=extra_headers or []))
        frames = ws.connection
        assert frames is not None  # the accept opened it
        # wsproto queues events of its own in a deque (about 0.7 KiB) only for
        # ``receive_data(None)``, which is never called here (a closed stream is
        # handled by us); an empty tuple answers ``events()`` the same, and any
        # other use would fail loudly (``tests/test_websocket_server.py``).
        frames._events = ()  # type: ignore[assignment]
        # Bytes the client sent right behind its request (h11 kept them).
        trailing, _ = ws.handshake._h11_connection.trailing_data
        if trailing:
            frames.receive_data(bytes(trailing))
        stream = self._stream
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(CloseReason(_ABNORMAL, "client gone")) from None
        return ServerWebSocket(_detach(stream), frames, max_message_size=self._max_message_size)

    async def reject(
        self,
        status_code: int,
        *,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
    ) -> None:
        """Answer the upgrade with an HTTP error; the caller closes the stream.

        Raises :class:`ConnectionClosed` (1006) if the client is gone.
        """
        headers = list(extra_headers or [])
        if body:
            headers.append((b"content-length", str(len(body)).encode("ascii")))
        ws = self._machine()
        self._ws = None
        data = ws.send(
            RejectConnection(status_code=status_code, headers=headers, has_body=bool(body))
        )
        if body:
            data += ws.send(RejectData(data=body))
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(CloseReason(_ABNORMAL, "client gone")) from None


class ServerWebSocket:
    """One open server-side WebSocket (see the module docstring).

    :meth:`get_message` may be called by one task at a time; any task may
    send.
    """

    # Slots: a server holds one of these per idle client for hours.
    __slots__ = (
        "_close_done",
        "_closed",
        "_frames",
        "_lock",
        "_max_message_size",
        "_parts",
        "_ping_payload",
        "_ping_sent_at",
        "_reading",
        "_size",
        "_stream",
    )

    def __init__(
        self, stream: trio.abc.Stream, frames: FrameConnection, *, max_message_size: int
    ) -> None:
        self._stream = stream
        self._frames = frames
        self._max_message_size = max_message_size
        self._closed: CloseReason | None = None
        self._lock = trio.StrictFIFOLock()
        self._parts: list[str | bytes | bytearray] = []
        self._size = 0
        self._ping_payload: bytes | None = None
        self._ping_sent_at: float | None = None
        self._reading = False
        self._close_done: trio.Event | None = None
        """Set when the close handshake is over (made by :meth:`aclose` only)."""

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection is closed or closing (``None``: open)."""
        return self._closed

    @property
    def ping_unanswered_since(self) -> float | None:
        """``trio.current_time()`` of the latest ping if no pong answered it yet."""
        return self._ping_sent_at

    # -- sending -------------------------------------------------------------

    async def _write(self, data: bytes, timeout: float = math.inf) -> None:
        """Write ``data`` under the send lock within ``timeout`` seconds.

        The common case costs no cancel scope and no schedule point of its
        own: with the lock free, the bytes go straight into the socket
        (``os.write``, which takes whatever fits in the kernel's buffer),
        and only what does not fit is sent with ``send_all`` under the lock
        and the deadline.  A contended lock is waited for in FIFO order
        (within the deadline too).  A checkpoint.

        Raises:
          ConnectionClosed: the stream is broken or closed (1006).
          trio.TooSlowError: ``timeout`` passed mid-write; part of ``data``
            may have left, so the connection is marked broken (1006) and
            nothing more can be sent on it.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        lock = self._lock
        held = False
        if not lock.locked():
            sent = self._write_now(data)
            if sent == len(data):
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            data = data[sent:]
            lock.acquire_nowait()
            held = True
        try:
            with trio.move_on_after(timeout) as scope:
                if not held:
                    await lock.acquire()
                    held = True
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._abort()
            assert self._closed is not None
            raise ConnectionClosed(self._closed) from None
        finally:
            if held:
                lock.release()
        if scope.cancelled_caught:
            self._abort()
            raise trio.TooSlowError

    def _write_now(self, data: bytes) -> int:
        """Write what fits now into a plain TCP socket; the bytes written (0: none).

        Raises :class:`ConnectionClosed` (1006) if the socket is closed or broken.
        """
        stream = self._stream
        if not isinstance(stream, trio.SocketStream):
            return 0
        fd = stream.socket.fileno()
        try:
            if fd < 0:
                raise BrokenPipeError
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # EPIPE, ECONNRESET, EBADF: the peer or the socket is gone
            self._abort()
            assert self._closed is not None
            raise ConnectionClosed(self._closed) from None

    def _abort(self) -> None:
        """The TCP connection is gone without a close handshake."""
        if self._closed is None:
            self._closed = CloseReason(_ABNORMAL, None)
        if self._close_done is not None:
            self._close_done.set()

    async def send_ping(self, *, timeout: float = math.inf) -> None:
        """Send a ping with a fresh payload and return without waiting for its pong.

        Replaces any unanswered ping (its pong no longer counts); the clock
        of :attr:`ping_unanswered_since` starts when the first unanswered
        ping was sent.  Raises ``ConnectionClosed`` if the connection is
        closed.  Cancelling it mid-send leaves the stream in an unknown
        state, as for any send.
        """
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        self._ping_payload = payload = secrets.token_bytes(8)
        if self._ping_sent_at is None:
            self._ping_sent_at = trio.current_time()
        await self._write(self._frames.send(Ping(payload=payload)), timeout)

    async def send_message(self, message: str) -> None:
        """Send one text message (:meth:`send_messages` with one)."""
        await self.send_messages((message,))

    async def send_messages(self, messages: Sequence[str], *, timeout: float = math.inf) -> None:
        """Send text ``messages`` in order with one write (the writer's batch).

        Raises ``ConnectionClosed`` if the connection is closed or breaks
        during the write, ``trio.TooSlowError`` if the write took longer
        than ``timeout`` (see :meth:`_write`).
        """
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        if self._frames.state is not ConnectionState.OPEN:  # pragma: no cover - closed is set
            raise ConnectionClosed(CloseReason(_ABNORMAL, "closing"))
        if len(messages) == 1:
            data = text_frame(messages[0])
        else:
            data = b"".join([text_frame(message) for message in messages])
        await self._write(data, timeout)

    async def _send_pong(self, data: bytes) -> None:
        """A pong, shielded (bounded): cancelling the reader must not cut a frame."""
        with trio.CancelScope(
            shield=True, deadline=trio.current_time() + CLOSE_SEND_TIMEOUT
        ) as scope:
            await self._write(data)
        if scope.cancelled_caught:  # cut mid-frame: nothing more can be sent
            self._abort()
            await self._close_stream()
            assert self._closed is not None
            raise ConnectionClosed(self._closed)

    async def _send_close(self, code: int, reason: str | None) -> None:
        """Our close frame (if wsproto still allows one), errors swallowed."""
        try:
            data = self._frames.send(CloseConnection(code=code, reason=reason))
        except LocalProtocolError:
            return
        with contextlib.suppress(ConnectionClosed):
            await self._write(data)

    async def _close_stream(self) -> None:
        """Close the TCP connection at once (never blocks, even when cancelled)."""
        if self._close_done is not None:
            self._close_done.set()
        await trio.aclose_forcefully(self._stream)

    # -- receiving -----------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next whole message from the client.

        Answers pings, notes pongs and completes a close handshake on the
        way.  Raises :class:`ConnectionClosed` once the connection is closed
        (by either side, or broken; ``closed`` says why).  Safe to cancel
        (nothing read is lost).
        """
        if self._closed is not None and self._frames.state is not ConnectionState.LOCAL_CLOSING:
            raise ConnectionClosed(self._closed)
        self._reading = True
        try:
            return await self._next_message()
        finally:
            self._reading = False

    async def _next_message(self) -> str | bytes:
        frames = self._frames
        while True:
            for event in frames.events():
                if isinstance(event, TextMessage | BytesMessage):
                    message = await self._on_data(event)
                    if message is not None and self._closed is None:
                        return message  # (after our close frame, messages are dropped)
                elif isinstance(event, Ping):
                    if frames.state is ConnectionState.OPEN:
                        await self._send_pong(frames.send(event.response()))
                elif isinstance(event, Pong):
                    if (
                        self._ping_payload is not None
                        and bytes(event.payload) == self._ping_payload
                    ):
                        self._ping_payload = None
                        self._ping_sent_at = None
                elif isinstance(event, CloseConnection):
                    await self._on_close(event)
                    assert self._closed is not None
                    raise ConnectionClosed(self._closed)
            data = await self._receive()
            if not data or frames.state is ConnectionState.CLOSED:
                self._abort()
                assert self._closed is not None
                raise ConnectionClosed(self._closed)
            frames.receive_data(bytes(data))

    async def _receive(self) -> bytes:
        """The next bytes from the client (``b""``: it closed, or the stream broke).

        On a plain TCP stream this reads the socket itself (``os.read`` once
        it is readable) rather than through ``SocketStream.receive_some``:
        an idle connection waits here for hours, and the five coroutine
        frames of Trio's receive path (about 1.5 KiB) are held by each.  It is
        a checkpoint either way; a closed socket reads as ``b""`` (its
        descriptor is -1 once closed, so a reused number is never read).
        """
        stream = self._stream
        if not isinstance(stream, trio.SocketStream):
            try:
                return bytes(await stream.receive_some(RECEIVE_BYTES))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        sock = stream.socket
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            fd = sock.fileno()
            if fd < 0:
                return b""
            try:
                data = os.read(fd, RECEIVE_BYTES)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except (trio.ClosedResourceError, trio.BusyResourceError):
                    return b""
                waited = True
                continue
            except OSError:
                return b""
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def _on_data(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        """Collect a message's fragments; the whole message, or ``None`` (more to come)."""
        self._size += len(event.data)
        self._parts.append(event.data)
        if self._size > self._max_message_size:
            self._parts, self._size = [], 0
            reason = f"Exceeded maximum message size: {self._max_message_size} bytes"
            self._closed = CloseReason(1009, reason)
            await self._send_close(1009, reason)
            await self._close_stream()
            raise ConnectionClosed(self._closed)
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, [], 0
        if isinstance(event, BytesMessage):
            return b"".join(part for part in parts if not isinstance(part, str))
        first = parts[0]
        if len(parts) == 1 and isinstance(first, str):
            return first
        return "".join(part for part in parts if isinstance(part, str))

    async def _on_close(self, event: CloseConnection) -> None:
        """A close frame from the peer, the reply to ours, or wsproto's parse failure."""
        state = self._frames.state
        if state is ConnectionState.REMOTE_CLOSING:  # the peer closes: answer, then TCP close
            if self._closed is None:
                self._closed = CloseReason(event.code, event.reason or None)
            await self._send_close(event.code, event.reason or None)
        elif state is ConnectionState.OPEN:
            # Not a close frame from the peer (that moves the state on): wsproto
            # could not accept a frame and names the code to close with.
            if self._closed is None:
                self._closed = CloseReason(event.code, event.reason or None)
            with trio.move_on_after(CLOSE_SEND_TIMEOUT):
                await self._send_close(event.code, event.reason or None)
        elif self._closed is None:  # the reply to our close frame
            self._closed = CloseReason(event.code, event.reason or None)
        await self._close_stream()

    # -- closing ---------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close: our close frame, the peer's reply, the TCP close (idempotent).

        Waits for the peer's close frame (unbounded: the caller bounds it)
        and closes the TCP connection in any case, cancelled or not.
        """
        if self._closed is not None:
            await self._close_stream()
            return
        try:
            if self._frames.state is ConnectionState.OPEN:
                self._closed = CloseReason(1000, None)
                self._close_done = trio.Event()
                await self._send_close(code, reason)
                if self._reading:  # the connection's reader will see the reply
                    await self._close_done.wait()
                else:
                    while True:
                        await self._next_message()  # messages after our close are dropped
        except ConnectionClosed:
            pass
        finally:
            await self._close_stream()
