"""Send the close frame that trio-websocket leaves out when a client breaks the protocol.

The gap: when wsproto cannot parse what the client sent - a text frame that
is not UTF-8 (RFC 6455 asks for close code 1007), or a protocol violation
(1002) - its ``events()`` turns the ``ParseFailed`` into a
``CloseConnection(code, reason)`` event *as if the peer had closed*, without
changing its state.  trio-websocket 0.12's ``_handle_close_connection_event``
then sends a close frame only in state ``REMOTE_CLOSING`` (a real close from
the peer), records the code as the connection's close reason, and closes
the TCP stream.  The client sees the connection end with no close frame
(1006) and never learns why.

The fix, from outside the library: :class:`FailureClosingStream` sits
between the socket and trio-websocket and watches what is sent.  When the
stream is closed while no close frame has gone out and the WebSocket's
``closed`` reason carries a code that only a parse failure produces here
(1002, 1007), it first sends that close frame itself (best effort, a
bounded wait).  A close the client started, or one the server started
with ``aclose``, always sends its frame through this stream first, so it is
never doubled.  Frames are recognised by their first byte: trio-websocket
writes each wsproto event with one ``send_all`` and the server never
fragments, so a close frame is a ``send_all`` starting with ``0x88``.

Upstream fix (trio-websocket ``_handle_close_connection_event``): when the
state is still ``OPEN``, ``await self._send(CloseConnection(event.code,
event.reason))`` before closing the stream.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import trio
from wsproto.frame_protocol import FrameProtocol

PARSE_FAILURE_REASONS = {1002: "protocol error", 1007: "invalid UTF-8 in a text frame"}
"""Close codes wsproto reports for a client's protocol error and for invalid UTF-8.

The close frame carries these fixed reasons, not wsproto's exception text.
"""
CLOSE_SEND_TIMEOUT = 1.0
_CLOSE_OPCODE_BYTE = 0x88  # FIN + opcode 0x8 (close)


class _HasCloseReason(Protocol):
    @property
    def closed(self) -> object: ...


class FailureClosingStream(trio.abc.Stream):
    """``transport_stream`` plus the close frame after a parse failure (module docstring)."""

    def __init__(self, transport_stream: trio.abc.Stream) -> None:
        self.transport_stream = transport_stream
        self._ws: _HasCloseReason | None = None
        self._close_sent = False

    def watch(self, ws: _HasCloseReason) -> None:
        """Start watching ``ws`` (the accepted connection running over this stream)."""
        self._ws = ws

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) and data[0] == _CLOSE_OPCODE_BYTE and self._ws is not None:
            self._close_sent = True
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.transport_stream.receive_some(max_bytes)

    def _failure_code(self) -> int | None:
        if self._ws is None or self._close_sent:
            return None
        code = getattr(self._ws.closed, "code", None)
        return code if isinstance(code, int) and code in PARSE_FAILURE_REASONS else None

    async def aclose(self) -> None:
        code = self._failure_code()
        if code is not None:
            self._close_sent = True
            frame = FrameProtocol(client=False, extensions=[]).close(
                code, PARSE_FAILURE_REASONS[code]
            )
            with trio.move_on_after(CLOSE_SEND_TIMEOUT):
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError
                ):
                    await self.transport_stream.send_all(frame)
        await self.transport_stream.aclose()
