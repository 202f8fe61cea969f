"""A whole trio-portfolio server in-process, and a WebSocket test client.

:func:`open_live_server` runs :func:`trio_portfolio.server.serve` in a
nursery owned by the ``async with`` block, on a free port of 127.0.0.1,
against the Redis URL given (the harness's real server): everything the
tests talk to is real - sockets, WebSockets, Redis.  :func:`test_settings`
gives settings suited to tests: short metric delays, no market ticks unless
asked, and a unique key prefix so tests sharing a Redis never collide.

:class:`Client` wraps a real trio-websocket client connection and decodes
every frame, keeping them all in ``frames`` so a test can check ordering
properties over the whole exchange afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from trio_portfolio.config import Settings
from trio_portfolio.protocol import SUBPROTOCOL_V2
from trio_portfolio.server import ServerInfo, serve
from trio_portfolio.services import open_service_nursery
from trio_portfolio.testing.redis_servers import unique_key_prefix

__all__ = [
    "Client",
    "Frame",
    "HttpResponse",
    "LiveServer",
    "connect_client",
    "http_request",
    "open_client",
    "open_live_server",
    "test_settings",
]

Frame = dict[str, Any]
"""One decoded WebSocket frame: a JSON object."""


def test_settings(redis_url: str, **overrides: Any) -> Settings:
    """Settings for a test server: fast metrics, no market ticks, isolated keys."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "host": "127.0.0.1",
        "port": 0,
        "metric_delay_seconds": (0.05, 0.25),
        "market_update_interval_seconds": 3600.0,
        "key_prefix": unique_key_prefix(),
        "shutdown_timeout_seconds": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


@attrs.frozen
class LiveServer:
    """A running server: where to reach it, and its internals for white-box checks."""

    info: ServerInfo
    settings: Settings

    @property
    def port(self) -> int:
        return self.info.port

    def ws_url(self, session_id: str) -> str:
        return f"ws://127.0.0.1:{self.info.port}/ws/{session_id}"

    def http_url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.info.port}{path}"


@asynccontextmanager
async def open_live_server(settings: Settings) -> AsyncIterator[LiveServer]:
    """Run a server for the duration of the block; it is cancelled on exit."""
    async with open_service_nursery() as nursery:
        info: ServerInfo = await nursery.start(
            functools.partial(serve, settings, handle_signals=False)
        )
        yield LiveServer(info=info, settings=settings)


class Client:
    """A decoded view of one real WebSocket connection to the server."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.frames: list[Frame] = []

    async def send(self, action: str, **fields: Any) -> None:
        """Send ``{"action": action, **fields}``."""
        await self.ws.send_message(orjson.dumps({"action": action, **fields}).decode())

    async def send_raw(self, text: str | bytes) -> None:
        await self.ws.send_message(text)

    async def recv(self, timeout: float = 10.0) -> Frame:
        """The next frame, decoded; ``trio.TooSlowError`` after ``timeout``."""
        with trio.fail_after(timeout):
            frame: Frame = orjson.loads(await self.ws.get_message())
        self.frames.append(frame)
        return frame

    async def recv_until(self, done: Callable[[Frame], bool], timeout: float = 20.0) -> list[Frame]:
        """Frames up to and including the first for which ``done`` is true."""
        received: list[Frame] = []
        with trio.fail_after(timeout):
            while True:
                frame = await self.recv(timeout)
                received.append(frame)
                if done(frame):
                    return received

    async def recv_until_closed(self, timeout: float = 10.0) -> tuple[list[Frame], int]:
        """Every frame until the server closes the connection, and its close code."""
        frames: list[Frame] = []
        with trio.fail_after(timeout):
            while True:
                try:
                    frames.append(await self.recv(timeout))
                except ConnectionClosed as exc:
                    if exc.reason is None:
                        raise
                    return frames, exc.reason.code

    async def expect_quiet(self, seconds: float) -> None:
        """Assert that no frame arrives for ``seconds``."""
        with trio.move_on_after(seconds):
            frame = await self.recv(seconds + 1)
            raise AssertionError(f"expected no frame, got {frame}")


@asynccontextmanager
async def connect_client(
    port: int, session_id: str, *, v2: bool = True, timeout: float = 10.0
) -> AsyncIterator[Client]:
    """Connect to ``127.0.0.1:port/ws/{session_id}`` (dialect v2 unless ``v2=False``).

    The TCP socket is opened and always closed here: trio-websocket's own
    client leaves its socket open when the *server* closes first (a 1008,
    1009 or 1001 close), which warnings-as-errors reports, often in a later
    test.
    """
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        with trio.fail_after(timeout):
            ws = await wrap_client_stream(
                nursery,
                stream,
                f"127.0.0.1:{port}",
                f"/ws/{session_id}",
                subprotocols=[SUBPROTOCOL_V2] if v2 else None,
            )
        try:
            yield Client(ws)
        finally:
            with trio.move_on_after(timeout):
                await ws.aclose()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_client(
    server: LiveServer, session_id: str, *, v2: bool = True
) -> AsyncIterator[Client]:
    """:func:`connect_client` to a :class:`LiveServer`."""
    async with connect_client(server.port, session_id, v2=v2) as client:
        yield client


@attrs.frozen
class HttpResponse:
    """A decoded HTTP/1.1 response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def http_request(
    server: LiveServer, method: str, path: str, body: bytes = b"", timeout: float = 10.0
) -> HttpResponse:
    """One HTTP/1.1 request over a real socket, ``Connection: close``; read to EOF."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            await stream.send_all(head.encode() + body)
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    raw_head, _, payload = bytes(data).partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpResponse(status=int(lines[0].split()[1]), headers=headers, body=payload)
