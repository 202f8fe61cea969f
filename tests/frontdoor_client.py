"""Raw clients for the front-door suites: handshakes and HTTP requests with chosen headers.

Spoken with wsproto / by hand over sockets the tests own (trio-websocket's
client leaks its socket when a handshake is rejected), optionally bound to
another loopback address (``127.0.0.2``) to be a different client.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from trio_portfolio.testing.live_server import HttpResponse as Reply

IO = 10.0
Headers = Sequence[tuple[str, str]]


def new_session_id() -> str:
    return "t-" + secrets.token_hex(6)


async def open_stream(port: int, source: str | None = None) -> trio.SocketStream:
    """A TCP connection to ``127.0.0.1:port``, from ``source`` (e.g. ``127.0.0.2``) if given."""
    if source is None:
        return await trio.open_tcp_stream("127.0.0.1", port)
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@attrs.frozen
class Handshake:
    status: int
    headers: dict[str, str]
    body: bytes
    subprotocol: str | None = None

    def json(self) -> Any:
        return orjson.loads(self.body)


def _decode(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode().lower(): v.decode() for k, v in headers}


async def handshake(
    port: int,
    path: str,
    *,
    subprotocols: Sequence[str] = (),
    headers: Headers = (),
    source: str | None = None,
    host: str | None = None,
) -> Handshake:
    """A WebSocket handshake; its status (101 if accepted), headers and body. Closed after."""
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(
        host=host or f"127.0.0.1:{port}",
        target=path,
        subprotocols=list(subprotocols),
        extra_headers=[(k.encode(), v.encode()) for k, v in headers],
    )
    with trio.fail_after(IO):
        async with await open_stream(port, source) as stream:
            await stream.send_all(ws.send(request))
            status, got, body = 0, {}, bytearray()
            while True:
                data = await stream.receive_some()
                if not data:
                    assert status, "the server closed the socket without a response"
                    return Handshake(status, got, bytes(body))
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        return Handshake(101, _decode(event.extra_headers), b"", event.subprotocol)
                    if isinstance(event, RejectConnection):
                        status, got = event.status_code, _decode(event.headers)
                        if not event.has_body:
                            return Handshake(status, got, b"")
                    if isinstance(event, RejectData):
                        body += event.data
                        if event.body_finished:
                            return Handshake(status, got, bytes(body))


class RawSocket:
    """An accepted WebSocket spoken frame by frame with wsproto (for broken frames)."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection, subprotocol: str | None):
        self.stream = stream
        self.ws = ws
        self.subprotocol = subprotocol
        self.pending: list[object] = []

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def next_event(self) -> object:
        with trio.fail_after(IO):
            while not self.pending:
                data = await self.stream.receive_some()
                if not data:
                    return None
                self.ws.receive_data(data)
                self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def recv_json(self) -> Any:
        event = await self.next_event()
        assert isinstance(event, TextMessage), event
        return orjson.loads(event.data)

    async def close_code(self) -> int | None:
        """Read until the server's close frame (its code) or EOF without one (``None``)."""
        while True:
            event = await self.next_event()
            if event is None:
                return None
            if isinstance(event, CloseConnection):
                return event.code


@asynccontextmanager
async def raw_websocket(
    port: int,
    path: str,
    *,
    subprotocols: Sequence[str] = (),
    headers: Headers = (),
    source: str | None = None,
) -> AsyncIterator[RawSocket]:
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(
        host=f"127.0.0.1:{port}",
        target=path,
        subprotocols=list(subprotocols),
        extra_headers=[(k.encode(), v.encode()) for k, v in headers],
    )
    async with await open_stream(port, source) as stream:
        await stream.send_all(ws.send(request))
        raw = RawSocket(stream, ws, None)
        event = await raw.next_event()
        assert isinstance(event, AcceptConnection), event
        raw.subprotocol = event.subprotocol
        yield raw


async def http(
    port: int,
    method: str,
    path: str,
    *,
    headers: Headers = (),
    source: str | None = None,
    host: str = "127.0.0.1",
) -> Reply:
    """One HTTP/1.1 request with ``Connection: close``, read to EOF."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        f"Content-Length: 0\r\n{extra}\r\n"
    )
    with trio.fail_after(IO):
        async with await open_stream(port, source) as stream:
            await stream.send_all(head.encode())
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    raw_head, _, payload = bytes(data).partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return Reply(int(lines[0].split()[1]), parsed, payload)


def forwarded(address: str) -> list[tuple[str, str]]:
    """Headers that make a request come from ``address`` through a trusted local proxy."""
    return [("X-Forwarded-For", address)]
