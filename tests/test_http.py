"""The front door (``trio_portfolio.http``): routes, limits, timeouts, the upgrade hand-off.

Rules of this suite: :func:`serve_front_door` is driven directly, over
``trio.testing.memory_stream_pair`` (the server end is half-closeable, like
a socket) with a fake :class:`HttpApp`; the two tests that need real
sockets (a real WebSocket through the replay wrapper) listen on localhost,
port 0.  Timeout tests run on ``autojump_clock``; every client read is under
``fail_after``.  The client side speaks HTTP through its own h11 connection,
so the server is checked by a parser as strict as it is.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import h11
import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url, wrap_server_stream

from trio_portfolio.http import (
    DEFAULT_LIMITS,
    HttpLimits,
    PrefixedStream,
    ServiceUnavailable,
    serve_front_door,
)
from trio_portfolio.testing.live_server import HttpResponse as Reply

IO_TIMEOUT = 30.0
HANDSHAKE = (
    b"GET /ws/abc HTTP/1.1\r\n"
    b"Host: localhost\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: portfolio.v2\r\n"
    b"\r\n"
)


# -- fakes and a strict client -------------------------------------------------------------


@attrs.define
class FakeApp:
    """An :class:`HttpApp` whose answers each test sets."""

    ready_answer: tuple[bool, str] = (True, "ok")
    ready_hangs: bool = False
    session_error: Exception | None = None
    session_hangs: bool = False
    sessions: int = 0

    async def ready(self) -> tuple[bool, str]:
        if self.ready_hangs:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        return self.ready_answer

    def metrics_text(self) -> str:
        return "# TYPE trio_portfolio_errors counter\ntrio_portfolio_errors_total 3\n"

    async def new_session(self, request: object) -> dict[str, object]:
        if self.session_hangs:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        if self.session_error is not None:
            raise self.session_error
        self.sessions += 1
        return {"session_id": f"s{self.sessions}", "portfolio": {"holdings": {"AAPL": 100.0}}}


class Client:
    """One client connection speaking HTTP/1.1 through h11."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.informational: list[int] = []

    async def send(
        self,
        method: str,
        target: str,
        headers: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
    ) -> None:
        all_headers = [("host", "test"), *headers]
        if body or method == "POST":
            all_headers.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers)) or b""
        if body:
            data += self.conn.send(h11.Data(data=body)) or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if isinstance(event, h11.Event):
                return event
            assert event is h11.NEED_DATA, event
            self.conn.receive_data(bytes(await self.stream.receive_some()))

    async def response(self) -> Reply:
        with trio.fail_after(IO_TIMEOUT):
            event = await self.next_event()
            while isinstance(event, h11.InformationalResponse):
                self.informational.append(event.status_code)
                event = await self.next_event()
            assert isinstance(event, h11.Response), event
            body = b""
            while not isinstance(part := await self.next_event(), h11.EndOfMessage):
                assert isinstance(part, h11.Data), part
                body += part.data
        headers = {k.decode(): v.decode() for k, v in event.headers}
        return Reply(event.status_code, headers, body)

    async def request(
        self,
        method: str,
        target: str,
        headers: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
    ) -> Reply:
        if self.conn.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
            self.conn.start_next_cycle()
        await self.send(method, target, headers, body)
        return await self.response()


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    data = b""
    with trio.fail_after(IO_TIMEOUT):
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def refuse_websocket(stream: trio.abc.Stream) -> None:
    raise AssertionError("no WebSocket expected in this test")


@asynccontextmanager
async def front_door(
    app: FakeApp | None = None,
    *,
    on_websocket: Callable[[trio.abc.Stream], Awaitable[None]] = refuse_websocket,
    limits: HttpLimits = DEFAULT_LIMITS,
    shutting_down: trio.Event | None = None,
) -> AsyncIterator[tuple[trio.abc.HalfCloseableStream, trio.Event]]:
    """A front door on one end of a memory stream pair; yields the client end and "done"."""
    client, server = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        try:
            await serve_front_door(
                server,
                on_websocket=on_websocket,
                app=app or FakeApp(),
                limits=limits,
                shutting_down=shutting_down,
            )
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield client, done
        with trio.fail_after(IO_TIMEOUT):
            await client.aclose()
            await done.wait()


# -- routes ---------------------------------------------------------------------------------


async def test_health_ready_and_metrics() -> None:
    app = FakeApp()
    async with front_door(app) as (stream, _):
        client = Client(stream)
        health = await client.request("GET", "/health")
        assert (health.status, health.json()) == (200, {"status": "ok"})
        assert health.headers["content-type"] == "application/json"
        assert health.headers["cache-control"] == "no-store"

        ready = await client.request("GET", "/ready")
        assert (ready.status, ready.json()) == (200, {"status": "ready"})

        app.ready_answer = (False, "redis: connection refused")
        not_ready = await client.request("GET", "/ready")
        assert not_ready.status == 503
        assert not_ready.json() == {
            "status": "not_ready",
            "reason": "redis",  # what follows ": " is for the log only, under error_id
            "error_id": not_ready.json()["error_id"],
        }

        metrics = await client.request("GET", "/metrics")
        assert metrics.status == 200
        assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert b"trio_portfolio_errors_total 3" in metrics.body


async def test_ready_answers_in_time_when_the_app_hangs(autojump_clock: trio.abc.Clock) -> None:
    async with front_door(FakeApp(ready_hangs=True)) as (stream, _):
        start = trio.current_time()
        reply = await Client(stream).request("GET", "/ready")
        assert reply.status == 503
        assert reply.json() == {
            "status": "not_ready",
            "reason": "readiness check did not answer within 1.5 s",
        }
        assert trio.current_time() - start == pytest.approx(DEFAULT_LIMITS.ready_timeout)


async def test_new_session() -> None:
    app = FakeApp()
    async with front_door(app) as (stream, _):
        client = Client(stream)
        created = await client.request("POST", "/session")
        assert created.status == 201
        assert created.json() == {"session_id": "s1", "portfolio": {"holdings": {"AAPL": 100.0}}}
        assert created.headers["cache-control"] == "no-store"

        app.session_error = ServiceUnavailable("store unavailable: redis is down")
        down = await client.request("POST", "/session")
        assert down.status == 503
        assert down.json() == {
            "error": "service_unavailable",
            "detail": "store unavailable",  # the rest is logged under error_id
            "error_id": down.json()["error_id"],
        }


async def test_new_session_times_out(autojump_clock: trio.abc.Clock) -> None:
    async with front_door(FakeApp(session_hangs=True)) as (stream, _):
        reply = await Client(stream).request("POST", "/session")
        assert reply.status == 503
        assert "5 s" in str(reply.json())


async def test_expect_100_continue() -> None:
    async with front_door() as (stream, _):
        client = Client(stream)
        headers = [("host", "t"), ("expect", "100-continue"), ("content-length", "2")]
        await stream.send_all(
            client.conn.send(h11.Request(method="POST", target="/session", headers=headers)) or b""
        )
        with trio.fail_after(IO_TIMEOUT):
            go_ahead = await client.next_event()
        assert isinstance(go_ahead, h11.InformationalResponse)
        assert go_ahead.status_code == 100
        body = client.conn.send(h11.Data(data=b"{}")) or b""
        await stream.send_all(body + (client.conn.send(h11.EndOfMessage()) or b""))
        assert (await client.response()).status == 201


async def test_dashboard_and_static_files() -> None:
    async with front_door() as (stream, _):
        client = Client(stream)
        page = await client.request("GET", "/")
        assert page.status == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        assert b'<script type="module" src="/static/app.js">' in page.body

        for name, content_type in [
            ("app.js", "text/javascript; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
            ("favicon.svg", "image/svg+xml"),
        ]:
            asset = await client.request("GET", f"/static/{name}?v=1")
            assert (asset.status, asset.headers["content-type"]) == (200, content_type)
            assert asset.headers["x-content-type-options"] == "nosniff"
            assert asset.body

        head = await client.request("HEAD", "/")
        assert head.status == 200
        assert head.headers["content-length"] == str(len(page.body))
        assert head.body == b""


@pytest.mark.parametrize(
    "target",
    [
        "/static/../http.py",
        "/static/%2e%2e/http.py",
        "/static/..%2fhttp.py",
        "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/static/",
        "/static/nope.js",
        "/static//etc/passwd",
        "/static/\\..\\http.py",
        "/nowhere",
        "/static",
    ],
)
async def test_unknown_paths_and_traversal_are_404(target: str) -> None:
    async with front_door() as (stream, _):
        reply = await Client(stream).request("GET", target.replace("\\", "%5C"))
        assert reply.status == 404
        assert reply.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/ready", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("GET", "/session", "POST"),
        ("POST", "/static/app.js", "GET, HEAD"),
        ("POST", "/", "GET, HEAD"),
    ],
)
async def test_wrong_method_is_405_with_allow(method: str, target: str, allow: str) -> None:
    async with front_door() as (stream, _):
        client = Client(stream)
        reply = await client.request(method, target)
        assert reply.status == 405
        assert reply.headers["allow"] == allow
        # Not an error of the connection: it stays usable.
        assert "connection" not in reply.headers
        assert (await client.request("GET", "/health")).status == 200


async def test_websocket_path_without_upgrade_is_426() -> None:
    async with front_door() as (stream, _):
        reply = await Client(stream).request("GET", "/ws/abc")
        assert reply.status == 426
        assert reply.headers["upgrade"] == "websocket"


# -- connection handling ----------------------------------------------------------------------


async def test_keep_alive_serves_two_requests_on_one_connection() -> None:
    async with front_door() as (stream, done):
        client = Client(stream)
        assert (await client.request("GET", "/health")).status == 200
        assert (await client.request("GET", "/metrics")).status == 200
        assert not done.is_set()


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with front_door() as (stream, _):
        await stream.send_all(
            b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        data = await read_to_eof(stream)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", data) == [b"200", b"404", b"200"]


async def test_http_1_0_gets_one_response_then_close() -> None:
    async with front_door() as (stream, _):
        await stream.send_all(b"GET /health HTTP/1.0\r\n\r\n")
        data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.endswith(b'{"status":"ok"}\n')


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
    ],
)
async def test_malformed_request_is_400_and_closes(garbage: bytes) -> None:
    async with front_door() as (stream, _):
        await stream.send_all(garbage)
        data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close\r\n" in data
    assert b'"error":"bad_request"' in data


async def test_oversized_head_is_431() -> None:
    limits = HttpLimits(max_head_bytes=1024)
    async with front_door(limits=limits) as (stream, _):
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 4096)
        data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 431 ")
    assert b"connection: close\r\n" in data


async def test_oversized_body_is_413_before_it_is_read() -> None:
    async with front_door() as (stream, _):
        await stream.send_all(
            b"POST /session HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n"
        )
        data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close\r\n" in data


async def test_oversized_chunked_body_is_413() -> None:
    limits = HttpLimits(max_body_bytes=100)
    async with front_door(limits=limits) as (stream, _):
        chunk = b"x" * 80
        await stream.send_all(
            b"POST /session HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"50\r\n" + chunk + b"\r\n") * 2
        )
        data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 413 ")


async def test_slow_head_gets_408_then_close(autojump_clock: trio.abc.Clock) -> None:
    async with front_door() as (stream, done):
        start = trio.current_time()
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: t\r\n")  # never finished
        data = await read_to_eof(stream)
        with trio.fail_after(IO_TIMEOUT):
            await done.wait()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert trio.current_time() - start == pytest.approx(
        DEFAULT_LIMITS.head_timeout, abs=DEFAULT_LIMITS.drain_timeout
    )


async def test_silent_client_is_closed_without_a_response(autojump_clock: trio.abc.Clock) -> None:
    async with front_door() as (stream, done):
        assert await read_to_eof(stream) == b""
        with trio.fail_after(IO_TIMEOUT):
            await done.wait()


async def test_slow_body_gets_408(autojump_clock: trio.abc.Clock) -> None:
    async with front_door() as (stream, _):
        await stream.send_all(b"POST /session HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n12")
        data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 408 ")


async def test_idle_keep_alive_connection_is_closed(autojump_clock: trio.abc.Clock) -> None:
    async with front_door() as (stream, done):
        client = Client(stream)
        assert (await client.request("GET", "/health")).status == 200
        start = trio.current_time()
        assert await read_to_eof(stream) == b""
        assert trio.current_time() - start == pytest.approx(
            DEFAULT_LIMITS.keepalive_timeout, abs=DEFAULT_LIMITS.drain_timeout
        )
        with trio.fail_after(IO_TIMEOUT):
            await done.wait()


async def test_client_vanishing_mid_request_ends_quietly() -> None:
    async with front_door() as (stream, done):
        await stream.send_all(b"GET /hea")
        await stream.aclose()
        with trio.fail_after(IO_TIMEOUT):
            await done.wait()


async def test_handler_exception_is_500_logged_and_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FakeApp(session_error=RuntimeError("boom"))
    with caplog.at_level(logging.ERROR, logger="trio_portfolio.http"):
        async with front_door(app) as (stream, _):
            reply = await Client(stream).request("POST", "/session")
            assert reply.status == 500
            assert reply.headers["connection"] == "close"
            assert b"boom" not in reply.body
            assert await read_to_eof(stream) == b""
    assert any("boom" in (r.exc_text or "") for r in caplog.records)
    # The next connection is served as usual.
    app.session_error = None
    async with front_door(app) as (stream, _):
        assert (await Client(stream).request("POST", "/session")).status == 201


async def test_shutdown_closes_idle_connections_and_finishes_busy_ones() -> None:
    shutting_down = trio.Event()
    app = FakeApp()
    async with (
        front_door(app, shutting_down=shutting_down) as (idle, _),
        front_door(app, shutting_down=shutting_down) as (busy, _),
    ):
        client = Client(idle)
        assert (await client.request("GET", "/health")).status == 200
        await busy.send_all(b"GET /health HTTP/1.1\r\nHost: t\r\n")  # head half sent
        await trio.testing.wait_all_tasks_blocked()
        shutting_down.set()
        assert await read_to_eof(idle) == b""
        await busy.send_all(b"\r\n")
        data = await read_to_eof(busy)
        assert data.startswith(b"HTTP/1.1 200 ")
        assert b"connection: close\r\n" in data


# -- the WebSocket hand-off -----------------------------------------------------------------


async def test_upgrade_is_handed_off_with_every_byte_replayed() -> None:
    early = b"\x81\x85early"  # bytes a client sent right after its handshake
    seen: list[bytes] = []

    async def on_websocket(stream: trio.abc.Stream) -> None:
        assert isinstance(stream, PrefixedStream)
        data = b""
        with trio.fail_after(IO_TIMEOUT):
            while len(data) < len(HANDSHAKE + early + b"later"):
                data += await stream.receive_some()
        seen.append(data)
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")

    async with front_door(on_websocket=on_websocket) as (stream, done):
        await stream.send_all(HANDSHAKE[:30])
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(HANDSHAKE[30:] + early)
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(b"later")
        with trio.fail_after(IO_TIMEOUT):
            await done.wait()
        assert await stream.receive_some() == b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    assert seen == [HANDSHAKE + early + b"later"]


async def test_upgrade_after_a_first_request_is_refused() -> None:
    async with front_door() as (stream, _):
        client = Client(stream)
        assert (await client.request("GET", "/health")).status == 200
        await stream.send_all(HANDSHAKE)
        data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"first request" in data


async def test_a_real_websocket_and_http_share_the_port() -> None:
    accepted: list[tuple[str, list[str]]] = []

    async def on_websocket(stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(nursery, stream)
            accepted.append((request.path, list(request.proposed_subprotocols)))
            ws = await request.accept(subprotocol="portfolio.v2")
            message = await ws.get_message()
            assert isinstance(message, str)
            await ws.send_message(f"echo {message}")
            await ws.aclose()

    async def handle(stream: trio.SocketStream) -> None:
        await serve_front_door(stream, on_websocket=on_websocket, app=FakeApp())

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(IO_TIMEOUT):
            async with open_websocket_url(
                f"ws://127.0.0.1:{port}/ws/abc?x=1", subprotocols=["portfolio.v2"]
            ) as ws:
                assert ws.subprotocol == "portfolio.v2"
                await ws.send_message("hello")
                assert await ws.get_message() == "echo hello"
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                reply = await Client(stream).request("GET", "/health")
                assert reply.status == 200
        nursery.cancel_scope.cancel()
    assert accepted == [("/ws/abc?x=1", ["portfolio.v2"])]


# -- PrefixedStream -----------------------------------------------------------------------------


async def test_prefixed_stream_is_a_conforming_stream() -> None:
    async def with_empty_prefix() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        a, b = trio.testing.memory_stream_pair()
        return PrefixedStream(a, b""), b

    async def with_drained_prefix() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        a, b = trio.testing.memory_stream_pair()
        wrapped = PrefixedStream(a, b"xy")
        assert await wrapped.receive_some(1) == b"x"
        assert await wrapped.receive_some() == b"y"
        return b, wrapped

    async def clogged() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        a, b = trio.testing.lockstep_stream_pair()
        return PrefixedStream(a, b""), b

    await trio.testing.check_two_way_stream(with_empty_prefix, clogged)
    await trio.testing.check_two_way_stream(with_drained_prefix, None)


async def test_prefixed_stream_serves_the_prefix_first() -> None:
    a, b = trio.testing.memory_stream_pair()
    wrapped = PrefixedStream(a, b"hello")
    await b.send_all(b" world")
    with trio.testing.assert_checkpoints():
        assert await wrapped.receive_some(2) == b"he"
    assert await wrapped.receive_some() == b"llo"
    assert await wrapped.receive_some() == b" world"
    await wrapped.send_all(b"back")
    assert await b.receive_some() == b"back"
    with pytest.raises(ValueError, match="max_bytes"):
        await PrefixedStream(a, b"x").receive_some(0)

    busy = PrefixedStream(a, b"abc")
    with pytest.RaisesGroup(trio.BusyResourceError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy.receive_some, 1)
            nursery.start_soon(busy.receive_some, 1)

    closed = PrefixedStream(a, b"abc")
    await closed.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await closed.receive_some()
    assert "PrefixedStream over" in repr(closed)
