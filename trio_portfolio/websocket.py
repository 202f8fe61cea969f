"""The server side of one WebSocket: trio-websocket's connection, with four gaps filled.

Theory of operation
===================

The server speaks WebSocket through trio-websocket (handshake, framing,
close handshake) and adds, in :class:`ServerWebSocket`, what its 0.12
release lacks:

*A ping that does not wait.*  ``WebSocketConnection.ping`` sends a ping and
then blocks until its pong.  A connection has one writer task (see
:mod:`trio_portfolio.connection`), and a writer that waited for pongs would
hold every frame behind a round trip, or behind a dead peer's whole
timeout.  :meth:`ServerWebSocket.send_ping` sends a ping and returns;
:attr:`ServerWebSocket.ping_unanswered_since` says since when the latest
ping has gone unanswered (``None``: answered, or none sent).  So the writer
can keep a connection alive between frames at no extra task.  A pong
counts when it carries the payload of the latest ping (RFC 6455 §5.5.3: a
peer may answer only the most recent of several pings); an unsolicited pong
(a heartbeat, allowed by §5.5.3) is ignored.

*A close frame for a frame we cannot accept.*  wsproto reports a frame it
cannot parse (a text frame that is not UTF-8: code 1007; a protocol
violation: 1002) as a ``CloseConnection`` event *from the peer*, without
changing its state; trio-websocket then closes the TCP connection without
sending any close frame, so the peer sees 1006 (abnormal closure) instead
of the code RFC 6455 §7.1.7 and §8.1 ask for.  The override here sends the
close frame with wsproto's code first (bounded by :data:`CLOSE_SEND_TIMEOUT`,
since the peer may not be reading), then lets trio-websocket finish as
before.  The reader then sees ``ConnectionClosed`` with that code.

*No pong after our close.*  A ping that crosses our close frame would be
answered by trio-websocket in the ``LOCAL_CLOSING`` state, which wsproto
refuses with ``LocalProtocolError``, ending the reader task with an error
(trio-websocket issue #184, fix proposed in PR #198).  We answer pings only
while the connection is open.  (trio-websocket *clients* still have that
bug: a client that closes while our ping is in flight can fail the same
way on its side; the default ping interval makes that rare.)

*One write for many frames.*  :meth:`ServerWebSocket.send_messages`
encodes a batch of text frames and writes them with one ``send_all`` (the
connection's writer sends whatever is queued at once).  And once the
handshake is accepted, wsproto's finished handshake object (an h11 machine
with its buffers, about 3 KiB, never used again) is replaced by an empty
stand-in, since a server holds thousands of idle connections.

All of these rely on trio-websocket internals (``_handle_pong_event``,
``_handle_ping_event``, ``_handle_close_connection_event``, ``_send``, ``_wsproto``,
``_stream``, ``_stream_lock``, ``_abort_web_socket``, ``_accept``, ``_reader_task``,
``_get_request``; wsproto's ``WSConnection.handshake``), which is why the dependency is pinned
to the 0.12 series and why ``tests/test_keepalive.py`` checks both
behaviours over real sockets: an upgrade that changes them fails there.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Sequence
from typing import cast

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Event, Ping, Pong, Request, TextMessage
from wsproto.handshake import H11Handshake

__all__ = ["CLOSE_SEND_TIMEOUT", "ServerWebSocket", "wrap_server_stream"]

CLOSE_SEND_TIMEOUT = 1.0
"""Seconds the close frame for an unacceptable frame may take to leave."""


class _FinishedHandshake:
    """Stands in for wsproto's ``H11Handshake`` once the connection is open.

    ``WSConnection.events`` still asks its handshake for events; this
    answers none, and keeps no h11 state (about 3 KiB per connection).
    """

    __slots__ = ()

    def events(self) -> Iterator[Event]:
        return iter(())


_FINISHED_HANDSHAKE = _FinishedHandshake()


class ServerWebSocket(WebSocketConnection):
    """A server-side WebSocket with :meth:`send_ping` and RFC close codes (module docstring)."""

    def __init__(self, stream: trio.abc.Stream, *, max_message_size: int) -> None:
        super().__init__(
            stream, WSConnection(ConnectionType.SERVER), max_message_size=max_message_size
        )
        self._ping_payload: bytes | None = None
        self._ping_sent_at: float | None = None

    @property
    def ping_unanswered_since(self) -> float | None:
        """``trio.current_time()`` of the latest ping if no pong answered it yet."""
        return self._ping_sent_at

    async def send_ping(self) -> None:
        """Send a ping with a fresh payload and return without waiting for its pong.

        Replaces any unanswered ping (its pong no longer counts); the clock
        of :attr:`ping_unanswered_since` starts when the first unanswered
        ping was sent.  Raises ``ConnectionClosed`` if the connection is
        closed.  Cancelling it mid-send leaves the stream in an unknown
        state, as for any send.
        """
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        self._ping_payload = secrets.token_bytes(8)
        if self._ping_sent_at is None:
            self._ping_sent_at = trio.current_time()
        await self._send(Ping(payload=self._ping_payload))

    async def send_messages(self, messages: Sequence[str]) -> None:
        """Send text ``messages`` in order with one write (the writer's batch).

        Equivalent to ``send_message`` for each in turn, without a lock round
        and a ``send_all`` per frame.  Raises ``ConnectionClosed`` if the
        connection is closed or breaks during the write (the stream is then
        aborted, as trio-websocket's own ``_send`` does).
        """
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        encode = self._wsproto.send
        data = b"".join([encode(TextMessage(data=message)) for message in messages])
        async with self._stream_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._abort_web_socket()
                raise ConnectionClosed(self._close_reason) from None

    async def _accept(
        self, request: Request, subprotocol: str | None, extra_headers: list[tuple[bytes, bytes]]
    ) -> None:
        await super()._accept(request, subprotocol, extra_headers)
        if self._wsproto.connection is not None:
            # The handshake is over: wsproto only asks the finished handshake
            # for events (none are left); its h11 machine is never used again.
            self._wsproto.handshake = cast(H11Handshake, _FINISHED_HANDSHAKE)

    async def _handle_pong_event(self, event: Pong) -> None:
        if self._ping_payload is not None and bytes(event.payload) == self._ping_payload:
            self._ping_payload = None
            self._ping_sent_at = None
        await super()._handle_pong_event(event)

    async def _handle_ping_event(self, event: Ping) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            await super()._handle_ping_event(event)
        # else: our close frame is out (a pong may not follow it, and wsproto would
        # raise LocalProtocolError in this reader task: trio-websocket issue #184).

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            # Not a close frame from the peer (that would have moved the state to
            # REMOTE_CLOSING): wsproto could not accept a frame and tells us the
            # code to close with.  Send it; trio-websocket would not.
            with trio.move_on_after(CLOSE_SEND_TIMEOUT), contextlib.suppress(ConnectionClosed):
                await self._send(CloseConnection(code=event.code, reason=event.reason))
        await super()._handle_close_connection_event(event)


async def wrap_server_stream(
    nursery: trio.Nursery, stream: trio.abc.Stream, *, max_message_size: int
) -> WebSocketRequest:
    """Like ``trio_websocket.wrap_server_stream``, with a :class:`ServerWebSocket`.

    Runs the connection's reader task in ``nursery`` and returns the client's
    handshake request once it has arrived; ``request.accept()`` then returns
    the :class:`ServerWebSocket`.
    """
    connection = ServerWebSocket(stream, max_message_size=max_message_size)
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()
