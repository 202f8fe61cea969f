"""The front door: HTTP routes and WebSocket upgrades on one TCP port.

Theory of operation
===================

:func:`serve_front_door` is the whole life of one TCP connection before it
becomes a WebSocket, and the whole life of one that never does.  It reads
the first request head with h11, always under a deadline, and then either:

* **hands off an upgrade** — a first request carrying ``Upgrade: websocket``
  goes to ``on_websocket`` as a :class:`PrefixedStream` that replays every
  byte read so far, so trio-websocket's handshake parser sees the connection
  exactly as the client sent it (path, subprotocols, any early frame bytes).
  h11 has only looked; wsproto decides whether the handshake is valid, and
  the server routes ``/ws/{session_id}``.  Only the first request of a
  connection may upgrade: what h11 buffered of a later one cannot be
  replayed byte for byte, so a late upgrade is answered 400 and closed
  (browsers always open a fresh connection for a WebSocket anyway); or

* **serves HTTP itself**, modelled on h11's ``examples/trio-server.py``: a
  keep-alive loop of request cycles.  Every read has a deadline: the first
  head ``head_timeout``, the idle gap before a later head
  ``keepalive_timeout``, a body ``body_timeout``; every response
  ``send_timeout``.  Heads over ``max_head_bytes`` are 431 (h11's
  ``max_incomplete_event_size``), bodies over ``max_body_bytes`` are 413
  (refused from ``Content-Length`` before reading it when possible).

Admission.  The front door itself only applies the ``Host`` allowlist
(``host_allowed``, answered 421) and, for a connection the server is over
capacity for, ``refuse`` (its status for the first request, then close);
every other policy is the app's, which gets the request as a
:class:`RequestInfo` (peer address and headers) and refuses by raising
:class:`HttpError` with a status, machine code and headers (``Retry-After``).
An upgrade's :class:`RequestInfo` travels with the hand-off on
:attr:`PrefixedStream.request`, since wsproto keeps ``Host`` to itself.

Hygiene.  A reason or detail from the app is split by :func:`public_reason`:
what precedes the first ``": "`` is sent, with an ``error_id`` when more was
cut; the whole text is logged under that id.  Request targets are logged
through :func:`loggable_target` (no query string, session ids shortened), so
credentials never reach a log.

Errors never escape.  A malformed request is 400, a half-sent one that
times out 408; both close the connection (``Connection: close``), as does
every 5xx, because after them the byte stream may be out of sync.  An
exception in a route handler becomes a 500 and one log line; a client that
vanishes, or does not read its response in time, ends the connection
quietly.  Error responses are sent only when h11's state allows it (we have
not started a response yet).  Unknown paths are 404, a known path with the
wrong method 405 with ``Allow``; these keep the connection alive.

Ending.  A connection that will not be reused ends with h11's *draining
shutdown*: send EOF, then read and discard until the client closes or
``drain_timeout`` passes, so the client sees the whole response rather than
a reset.  When ``shutting_down`` is set, an idle keep-alive connection is
closed at once, and a request in progress gets its response with
``Connection: close``.

Resources.  On the HTTP path the stream is closed here.  After a hand-off
the stream belongs to ``on_websocket`` (through the wrapper); whatever
``on_websocket`` raises propagates, since the caller owns that policy.
Cancellation propagates as usual; the caller's ``aclose_forcefully`` on the
raw stream is then still correct.
"""

from __future__ import annotations

import email.utils
import importlib.resources
import logging
import operator
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Protocol
from urllib.parse import unquote, urlsplit

import attrs
import h11
import orjson
import trio

from trio_portfolio.logs import new_error_id
from trio_portfolio.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = logging.getLogger(__name__)

RECEIVE_BYTES = 16 * 1024
"""Largest single read from the client."""

SERVER_HEADER = "trio-portfolio"

_GET = ("GET", "HEAD")
_POST = ("POST",)
_WS_PREFIX = "/ws/"
_STATIC_PREFIX = "/static/"

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}

_PAGE_HEADERS = (
    (
        "content-security-policy",
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("referrer-policy", "no-referrer"),
)
"""Sent with the dashboard: it loads nothing but its own assets and socket."""


@attrs.frozen
class RequestInfo:
    """What a route handler may know of a request besides its path.

    ``peer`` is the TCP peer's IP address (``None`` when the stream is not
    a socket); ``headers`` are h11's (lower-case names, raw values).
    """

    peer: str | None
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case) as text, else ``None``."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name``, in order (``X-Forwarded-For`` may repeat)."""
        return [value for key, value in self.headers if key == name]


class HttpApp(Protocol):
    """What the front door needs from the server; implemented in ``server.py``."""

    async def ready(self) -> tuple[bool, str]:
        """``(True, _)`` when Redis answers and the scripts are loaded, else ``(False, why)``.

        Called with a deadline (``ready_timeout``): a hung Redis reads as not ready.
        """
        ...

    def metrics_text(self) -> str:
        """The server's metrics, in the Prometheus text format 0.0.4 (rendered elsewhere)."""
        ...

    async def new_session(self, request: RequestInfo) -> dict[str, object]:
        """Create a session under a fresh unguessable id: ``{"session_id", "portfolio", ...}``.

        May raise :class:`HttpError` (answered with its status), e.g.
        :class:`ServiceUnavailable` (503) when the store is down.
        """
        ...


class HttpError(Exception):
    """Raised by an :class:`HttpApp` method: answer ``status`` with ``{"error", "detail"}``.

    ``detail`` follows the convention of :func:`public_reason`: the part
    before the first ``": "`` is sent, the rest only logged (with the
    ``error_id`` the client also gets).  ``code`` defaults to the status
    phrase in snake case; ``headers`` (e.g. ``Retry-After``) are added.
    """

    status = 500

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(detail)
        if status is not None:
            self.status = status
        self.detail = detail
        self.code = code
        self.headers = headers


class ServiceUnavailable(HttpError):
    """Raised by an :class:`HttpApp` method: answer 503 with ``str(exc)`` as the reason."""

    status = 503


def public_reason(reason: str) -> tuple[str, str | None]:
    """Split ``"what: private detail"`` into what a client may see and what only the log may.

    Reasons and details built by the server name the problem first and may
    append, after ``": "``, text from an exception (a Redis address, an OS
    error): that part never leaves the process.
    """
    public, sep, private = reason.partition(": ")
    return public, (private if sep else None)


def loggable_target(target: str) -> str:
    """A request target fit for a log: no query (credentials), session ids shortened."""
    path = target.partition("?")[0].partition("#")[0]
    if path.startswith(_WS_PREFIX) and len(path) > len(_WS_PREFIX) + 4:
        return path[: len(_WS_PREFIX) + 4] + "…"
    return path


@attrs.frozen
class HttpLimits:
    """Deadlines (seconds) and sizes (bytes) of the front door; see the module docstring."""

    head_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    body_timeout: float = 10.0
    send_timeout: float = 10.0
    drain_timeout: float = 2.0
    ready_timeout: float = 1.5
    session_timeout: float = 5.0
    max_head_bytes: int = 16 * 1024
    max_body_bytes: int = 16 * 1024


DEFAULT_LIMITS = HttpLimits()


class PrefixedStream(trio.abc.Stream):
    """A stream that first yields ``prefix``, then whatever ``transport_stream`` receives.

    Sending, closing and waiting go straight to ``transport_stream``.  The
    prefix is served in order, in chunks of at most ``max_bytes``, each
    receive a checkpoint; two concurrent receives raise
    :class:`trio.BusyResourceError` and a receive after :meth:`aclose`
    raises :class:`trio.ClosedResourceError`, as for any Trio stream.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        prefix: bytes,
        *,
        request: RequestInfo | None = None,
    ) -> None:
        self.transport_stream = transport_stream
        self.request = request
        """The handed-off request head as h11 parsed it (``Host`` included), when known."""
        self._prefix = bytes(prefix)
        self._receiving = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<PrefixedStream over {_peer(self.transport_stream)}>"

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if not self._prefix:
                return await self.transport_stream.receive_some(max_bytes)
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            size = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = self._prefix[:size], self._prefix[size:]
            return chunk
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        self._closed = True
        self._prefix = b""
        await self.transport_stream.aclose()

    def detach(self) -> trio.abc.Stream:
        """The stream to keep once the prefix is consumed: ``transport_stream``.

        Also drops :attr:`request` (the handshake's headers), since an open
        WebSocket may live for hours and needs neither.  While prefix bytes
        are left this wrapper is still needed and is returned itself.
        """
        self.request = None
        if self._prefix or self._closed:
            return self
        return self.transport_stream


@attrs.frozen
class _Asset:
    body: bytes
    content_type: str


class _StaticFiles:
    """The package's ``static/`` directory, read once (in a thread) and kept in memory.

    Module-level because it is immutable package data, the same for every
    server in the process.  Files are looked up by exact name among those
    present, never by building a path from the request, so no request can
    reach outside the directory; sub-directories and dot-files are not served.
    """

    def __init__(self, package: str, directory: str) -> None:
        self._package = package
        self._directory = directory
        self._assets: dict[str, _Asset] | None = None

    def _load(self) -> dict[str, _Asset]:
        root = importlib.resources.files(self._package) / self._directory
        assets: dict[str, _Asset] = {}
        if not root.is_dir():
            return assets
        for entry in root.iterdir():
            if entry.is_file() and not entry.name.startswith("."):
                suffix = "." + entry.name.rpartition(".")[2].lower() if "." in entry.name else ""
                content_type = _CONTENT_TYPES.get(suffix, "application/octet-stream")
                assets[entry.name] = _Asset(entry.read_bytes(), content_type)
        return assets

    async def get(self, name: str) -> _Asset | None:
        if self._assets is None:
            self._assets = await trio.to_thread.run_sync(self._load)
        return self._assets.get(name)


STATIC_FILES = _StaticFiles("trio_portfolio", "static")


@attrs.frozen
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


class _Refused(Exception):
    """A request answered with an error response after which the connection closes."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _ClientGone(Exception):
    """The client closed its side in the middle of a request."""


def _json(
    status: int,
    payload: object,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    close: bool = False,
) -> _Response:
    body = orjson.dumps(payload) + b"\n"
    return _Response(status, body, "application/json", headers, close)


def _error(
    status: int,
    detail: str,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    close: bool = False,
) -> _Response:
    """``{"error": "not_found", "detail": ...}``: the code is the status phrase in snake case."""
    code = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    return _json(status, {"error": code, "detail": detail}, headers=headers, close=close)


def _app_error(exc: HttpError) -> _Response:
    """The response to an :class:`HttpError`; its private detail goes to the log only."""
    status = exc.status
    code = exc.code or HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    public, private = public_reason(exc.detail)
    body: dict[str, object] = {"error": code, "detail": public}
    if private is not None:
        body["error_id"] = error_id = new_error_id()
        log.warning("http: %d %s (%s): %s", status, code, error_id, exc.detail)
    return _json(status, body, headers=exc.headers, close=status >= 500)


def _peer(stream: trio.abc.Stream) -> str:
    """``host:port`` of the client, for logs; the stream type when not a socket."""
    if isinstance(stream, trio.SocketStream):
        try:
            host, port, *_ = stream.socket.getpeername()
        except OSError:
            return "socket (disconnected)"
        return f"{host}:{port}"
    return type(stream).__name__


def peer_address(stream: trio.abc.Stream) -> str | None:
    """The IP address of the client of ``stream`` (through a :class:`PrefixedStream`)."""
    while isinstance(stream, PrefixedStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        try:
            address = stream.socket.getpeername()
        except OSError:
            return None
        if isinstance(address, tuple) and address:
            return str(address[0])
    return None


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _wants_websocket(request: h11.Request) -> bool:
    return any(
        name == b"upgrade" and b"websocket" in (t.strip().lower() for t in value.split(b","))
        for name, value in request.headers
    )


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has validated it
    return None


async def serve_front_door(
    stream: trio.abc.Stream,
    *,
    on_websocket: Callable[[trio.abc.Stream], Awaitable[None]],
    app: HttpApp,
    limits: HttpLimits = DEFAULT_LIMITS,
    shutting_down: trio.Event | None = None,
    host_allowed: Callable[[str | None], bool] | None = None,
    refuse: tuple[int, str, tuple[tuple[str, str], ...]] | None = None,
) -> None:
    """Serve one TCP connection: HTTP routes, or hand a WebSocket upgrade to ``on_websocket``.

    See the module docstring for timeouts, limits, errors and closing.
    ``host_allowed`` (the DNS-rebinding guard) sees every request's
    ``Host``, upgrades included; a refused one is answered 421 and closed.
    ``refuse`` (``status, detail, headers``) answers the connection's first
    request with that error, upgrades included, and closes: the server's
    answer to a connection beyond its capacity.  Returns when the
    connection is done; raises only what ``on_websocket`` raises (and
    ``Cancelled``).
    """
    door = _FrontDoor(stream, app, limits, shutting_down)
    door.host_allowed = host_allowed
    door.refuse = refuse
    replay = await door.run()
    if replay is None:
        return
    info = RequestInfo(peer_address(stream), tuple(door.upgrade_headers))
    handoff = PrefixedStream(stream, replay, request=info)
    # The WebSocket may live for hours: keep none of the HTTP state (the h11
    # machine and its buffer, the replay record) alive behind it.
    del door, replay, info
    await on_websocket(handoff)


class _FrontDoor:
    """One connection's HTTP state: the h11 machine, the replay record, the shutdown flag."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        app: HttpApp,
        limits: HttpLimits,
        shutting_down: trio.Event | None,
    ) -> None:
        self.stream = stream
        self.app = app
        self.limits = limits
        self.shutting_down = shutting_down
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        self.peer = _peer(stream)
        self._record: bytearray | None = bytearray()
        self._idle: trio.CancelScope | None = None
        self._got_bytes = False
        self.upgrade_headers: list[tuple[bytes, bytes]] = []
        self.host_allowed: Callable[[str | None], bool] | None = None
        self.refuse: tuple[int, str, tuple[tuple[str, str], ...]] | None = None

    # -- the connection ------------------------------------------------------

    async def run(self) -> bytes | None:
        """Serve HTTP until the connection ends (``None``), or return bytes to replay."""
        replay: bytes | None = None
        async with trio.open_nursery() as nursery:
            if self.shutting_down is not None:
                nursery.start_soon(self._close_when_idle, self.shutting_down)
            try:
                replay = await self._serve()
            except (trio.BrokenResourceError, trio.ClosedResourceError, _ClientGone):
                log.debug("http: client %s went away", self.peer, extra={"remote": self.peer})
            except trio.TooSlowError:
                log.info("http: client %s is not reading; closing", self.peer)
            except Exception:
                log.exception("http: connection from %s failed", self.peer)
            finally:
                nursery.cancel_scope.cancel()
        if replay is None:
            await self._close()
        return replay

    async def _close_when_idle(self, shutting_down: trio.Event) -> None:
        await shutting_down.wait()
        if self._idle is not None:
            self._idle.cancel()

    @property
    def _closing(self) -> bool:
        return self.shutting_down is not None and self.shutting_down.is_set()

    async def _serve(self) -> bytes | None:
        first = True
        while True:
            request = await self._read_head(first)
            if request is None:
                return None
            if self.refuse is not None:
                status, detail, headers = self.refuse
                await self._respond(request, _error(status, detail, headers=headers, close=True))
                return None
            if self.host_allowed is not None and not self.host_allowed(_header(request, b"host")):
                detail = "this server does not answer to that Host name"
                await self._respond(request, _error(421, detail, close=True))
                return None
            if _wants_websocket(request):
                if first and self._record is not None:
                    self.upgrade_headers = list(request.headers)
                    return bytes(self._record)
                await self._respond(
                    request,
                    _error(
                        400, "a WebSocket upgrade must be a connection's first request", close=True
                    ),
                )
                return None
            first, self._record = False, None
            await self._respond(request, await self._handle(request))
            if self._closing or self.conn.states != {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
                return None
            self.conn.start_next_cycle()

    async def _close(self) -> None:
        """h11's draining shutdown: EOF, discard input until the client closes, close."""
        stream = self.stream
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                with trio.move_on_after(self.limits.drain_timeout):
                    await stream.send_eof()
                    while await stream.receive_some(RECEIVE_BYTES):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    # -- reading -------------------------------------------------------------

    async def _receive(self) -> None:
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        data = await self.stream.receive_some(RECEIVE_BYTES)
        if data:
            self._got_bytes = True
            self._idle = None
            if self._record is not None:
                self._record += data
        self.conn.receive_data(bytes(data))

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                return h11.PAUSED
            await self._receive()  # h11.NEED_DATA

    async def _read_head(self, first: bool) -> h11.Request | None:
        """The next request, or ``None`` once the connection should close (answered if due)."""
        pending = bool(self.conn.trailing_data[0])
        self._got_bytes = pending
        if self._closing and not pending:
            return None
        timeout = self.limits.head_timeout if first else self.limits.keepalive_timeout
        event: h11.Event | type[h11.PAUSED] | None = None
        error: h11.RemoteProtocolError | None = None
        with trio.move_on_after(timeout) as deadline, trio.CancelScope() as idle:
            self._idle = None if pending else idle
            try:
                event = await self._next_event()
            except h11.RemoteProtocolError as exc:
                error = exc
            finally:
                self._idle = None
        if error is not None:
            await self._send_error_response(_error(error.error_status_hint, str(error), close=True))
        elif event is None:
            if deadline.cancelled_caught and self._got_bytes:
                detail = f"request head not received within {timeout:g} s"
                await self._send_error_response(_error(408, detail, close=True))
        elif isinstance(event, h11.Request):
            return event
        elif not isinstance(event, h11.ConnectionClosed):
            await self._send_error_response(_error(400, "unexpected input", close=True))
        return None

    async def _read_body(self, request: h11.Request) -> bytes:
        """The whole body, bounded in size and time; raises :class:`_Refused` past either."""
        limit = self.limits.max_body_bytes
        length = _content_length(request)
        if length is not None and length > limit:
            raise _Refused(413, f"request body of {length} bytes exceeds {limit}")
        body = bytearray()
        with trio.move_on_after(self.limits.body_timeout):
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limit:
                        raise _Refused(413, f"request body exceeds {limit} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise _ClientGone
                else:
                    raise _Refused(400, "unexpected input in the request body")
        raise _Refused(408, f"request body not received within {self.limits.body_timeout:g} s")

    # -- writing -------------------------------------------------------------

    async def _send(self, *events: h11.Event) -> None:
        data = b"".join(self.conn.send(event) or b"" for event in events)
        with trio.fail_after(self.limits.send_timeout):
            await self.stream.send_all(data)

    def _headers(self, response: _Response) -> list[tuple[str, str]]:
        headers = [
            ("date", email.utils.formatdate(usegmt=True)),
            ("server", SERVER_HEADER),
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("x-content-type-options", "nosniff"),
            *response.headers,
        ]
        if not any(name == "cache-control" for name, _ in response.headers):
            headers.append(("cache-control", "no-store"))
        if response.close or self._closing:
            headers.append(("connection", "close"))
        return headers

    async def _send_response(self, response: _Response, *, head: bool = False) -> None:
        events: list[h11.Event] = [
            h11.Response(
                status_code=response.status,
                headers=self._headers(response),
                reason=HTTPStatus(response.status).phrase,
            )
        ]
        if response.body and not head:
            events.append(h11.Data(data=response.body))
        events.append(h11.EndOfMessage())
        await self._send(*events)

    async def _send_error_response(self, response: _Response) -> None:
        """Send ``response`` if no response has begun; the connection closes after it."""
        if self.conn.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
            await self._send_response(response)

    async def _respond(self, request: h11.Request, response: _Response) -> None:
        method = request.method.decode("ascii", "replace")
        target = loggable_target(request.target.decode("ascii", "replace"))
        if response.status >= 500 or response.status in (400, 408, 413, 421, 429, 431):
            log.info("http: %s %s -> %d from %s", method, target, response.status, self.peer)
        else:
            log.debug("http: %s %s -> %d from %s", method, target, response.status, self.peer)
        try:
            await self._send_response(response, head=request.method == b"HEAD")
        except h11.LocalProtocolError:
            # A bug of ours; h11 is now in ERROR, so the connection closes.
            log.exception("http: cannot send the response to %s %s", method, target)

    # -- routing -------------------------------------------------------------

    async def _handle(self, request: h11.Request) -> _Response:
        """Read the body and route; any failure becomes an error response, never an exception."""
        method = request.method.decode("ascii", "replace")
        try:
            path = unquote(urlsplit(request.target.decode("ascii")).path)
        except (UnicodeDecodeError, ValueError):
            return _error(400, "malformed request target", close=True)
        try:
            await self._read_body(request)  # no route takes a body; read it to reuse the connection
            return await self._route(method, path, request)
        except _Refused as exc:
            return _error(exc.status, exc.detail, close=True)
        except h11.RemoteProtocolError as exc:
            return _error(exc.error_status_hint, str(exc), close=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _ClientGone, trio.TooSlowError):
            raise
        except Exception:
            error_id = new_error_id()
            log.exception(
                "http: %s %s failed (%s)",
                method,
                loggable_target(path),
                error_id,
                extra={"remote": self.peer},
            )
            body = {"error": "internal_server_error", "detail": "internal error"}
            return _json(500, {**body, "error_id": error_id}, close=True)

    async def _route(self, method: str, path: str, request: h11.Request) -> _Response:
        allowed: tuple[str, ...]
        handler: Callable[[], Awaitable[_Response]]
        if path == "/health":
            allowed, handler = _GET, self._health
        elif path == "/ready":
            allowed, handler = _GET, self._ready
        elif path == "/metrics":
            allowed, handler = _GET, self._metrics
        elif path == "/session":
            allowed, handler = _POST, lambda: self._new_session(request)
        elif path == "/":
            allowed, handler = _GET, lambda: self._static("index.html")
        elif path.startswith(_STATIC_PREFIX):
            name = path[len(_STATIC_PREFIX) :]
            allowed, handler = _GET, lambda: self._static(name)
        elif path.startswith(_WS_PREFIX):
            allowed, handler = _GET, self._upgrade_required
        else:
            return _error(404, f"no such resource: {loggable_target(path)}")
        if method not in allowed:
            return _error(
                405,
                f"{method} is not allowed on {loggable_target(path)}; use {', '.join(allowed)}",
                headers=(("allow", ", ".join(allowed)),),
            )
        return await handler()

    async def _health(self) -> _Response:
        await trio.lowlevel.checkpoint()
        return _json(200, {"status": "ok"})

    async def _ready(self) -> _Response:
        timeout = self.limits.ready_timeout
        reason = f"readiness check did not answer within {timeout:g} s"
        with trio.move_on_after(timeout):
            try:
                ok, reason = await self.app.ready()
            except HttpError as exc:
                ok, reason = False, exc.detail
            if ok:
                return _json(200, {"status": "ready"})
        public, private = public_reason(reason)
        body: dict[str, object] = {"status": "not_ready", "reason": public}
        if private is not None:
            body["error_id"] = error_id = new_error_id()
            log.info("http: not ready (%s): %s", error_id, reason)
        return _json(503, body)

    async def _metrics(self) -> _Response:
        await trio.lowlevel.checkpoint()
        text = self.app.metrics_text()
        return _Response(200, text.encode(), METRICS_CONTENT_TYPE)

    async def _new_session(self, request: h11.Request) -> _Response:
        timeout = self.limits.session_timeout
        info = RequestInfo(peer_address(self.stream), tuple(request.headers))
        failure: HttpError = ServiceUnavailable(
            f"creating the session did not finish within {timeout:g} s"
        )
        with trio.move_on_after(timeout):
            try:
                return _json(201, await self.app.new_session(info))
            except HttpError as exc:
                failure = exc
        return _app_error(failure)

    async def _static(self, name: str) -> _Response:
        asset = await STATIC_FILES.get(name)
        if asset is None:
            return _error(404, f"no such file: {_STATIC_PREFIX}{name}")
        headers: tuple[tuple[str, str], ...] = (("cache-control", "no-cache"),)
        if asset.content_type.startswith("text/html"):
            headers += _PAGE_HEADERS
        return _Response(200, asset.body, asset.content_type, headers)

    async def _upgrade_required(self) -> _Response:
        await trio.lowlevel.checkpoint()
        return _error(
            426,
            "this is a WebSocket endpoint: connect with Upgrade: websocket",
            headers=(("upgrade", "websocket"),),
        )
