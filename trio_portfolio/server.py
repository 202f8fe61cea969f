"""The server: the root nursery, its services, the listener, signals and shutdown.

The whole task tree lives here; read this file to see who owns what::

    serve()                                root nursery
    ├── embedded redis-server              (only without --redis-url; outlives the rest)
    └── run_service()                      service nursery
        ├── SessionEvents.run              pub/sub -> local connections
        ├── run_market_updater             leader-elected; ticks, revalues sessions
        ├── signal watcher                 SIGINT/SIGTERM -> graceful shutdown
        ├── listener (trio.serve_tcp)      in its own cancel scope: stop accepting
        └── connections nursery            one handle_tcp per client
            └── Connection.run             see connection.py for the subtree:
                ├── reader / writer / events
                └── AnalysisRunner         own cancel scope
                    └── five metric tasks

Shutdown (a signal, or :meth:`Server.shutdown`): stop accepting, ask every
connection to stop its analysis, flush and close with 1001, wait for them
up to ``shutdown_timeout_seconds``, then cancel what is left.  The embedded
Redis sits in the outermost nursery so it is stopped last, after every
connection has unfenced its analysis.
"""

from __future__ import annotations

import logging
import random
import signal
from urllib.parse import unquote, urlsplit

import attrs
import trio
from trio_websocket import WebSocketRequest, wrap_server_stream

from trio_portfolio.config import Settings
from trio_portfolio.connection import Connection, Services
from trio_portfolio.embedded import run_embedded_redis
from trio_portfolio.market import MarketData, TickReport, run_market_updater
from trio_portfolio.observability import Metrics
from trio_portfolio.protocol import choose_dialect, validate_session_id
from trio_portfolio.redis_io import RedisClient, StoreUnavailable, open_redis
from trio_portfolio.redis_pubsub import open_pubsub
from trio_portfolio.session_events import SessionEvents
from trio_portfolio.simulation import GbmSimulator
from trio_portfolio.store import SessionStore, open_store

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
WS_PATH_PREFIX = "/ws/"


@attrs.frozen
class ServerInfo:
    """Reported by :func:`serve` through ``task_status`` once it accepts connections."""

    host: str
    port: int
    redis_url: str
    layout: str
    server: Server


class Server:
    """Accepts WebSocket connections and tracks them for shutdown and metrics."""

    def __init__(self, services: Services, redis: RedisClient) -> None:
        self.services = services
        self.redis = redis
        self.connections: set[Connection] = set()
        self.listen_scope = trio.CancelScope()
        self.shutting_down = trio.Event()
        self.all_closed = trio.Event()
        self.all_closed.set()
        metrics = services.metrics
        metrics.gauge_function("connections_open", lambda: len(self.connections), "open sockets")
        metrics.gauge_function(
            "sessions_watched", lambda: services.events.sessions_watched, "sessions with watchers"
        )

    async def handle_tcp(self, stream: trio.abc.Stream) -> None:
        """Handshake, route ``/ws/{session_id}``, serve; one bad client never hurts others."""
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._handle(nursery, stream)
                finally:
                    nursery.cancel_scope.cancel()
        except Exception:
            log.exception("connection handler failed")
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _handle(self, nursery: trio.Nursery, stream: trio.abc.Stream) -> None:
        settings = self.services.settings
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            request = await wrap_server_stream(
                nursery, stream, max_message_size=settings.max_message_bytes
            )
        if request is None or self.shutting_down.is_set():
            return
        session_id = await self._route(request)
        if session_id is None:
            return
        if len(self.connections) >= settings.max_connections:
            self.services.metrics.inc("errors", code="too_many_connections")
            await request.reject(503, body=b"too many connections, try again later\n")
            return
        dialect = choose_dialect(request.proposed_subprotocols)
        ws = await request.accept(subprotocol=dialect.subprotocol)
        connection = Connection(self.services, ws, session_id, dialect)
        self.connections.add(connection)
        self.all_closed = trio.Event()
        log.info(
            "connection %s opened on session %s (%s)",
            connection.id,
            session_id,
            dialect.value,
            extra={"connection_id": connection.id, "session_id": session_id},
        )
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            if not self.connections:
                self.all_closed.set()
            log.info(
                "connection %s closed",
                connection.id,
                extra={"connection_id": connection.id, "session_id": session_id},
            )

    async def _route(self, request: WebSocketRequest) -> str | None:
        """The session id of a valid ``/ws/{session_id}`` path, else reject and ``None``."""
        path = unquote(urlsplit(request.path).path)
        if not path.startswith(WS_PATH_PREFIX):
            await request.reject(404, body=b"not found: WebSocket endpoint is /ws/{session_id}\n")
            return None
        session_id = path[len(WS_PATH_PREFIX) :]
        if not validate_session_id(session_id):
            await request.reject(400, body=b"bad session id: 1-64 characters of A-Z a-z 0-9 _ -\n")
            return None
        return session_id

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, close every connection with 1001, wait up to ``timeout``."""
        self.shutting_down.set()
        self.listen_scope.cancel()
        for connection in list(self.connections):
            connection.shutdown()
        with trio.move_on_after(timeout):
            await self.all_closed.wait()

    async def listen(
        self,
        host: str,
        port: int,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[int],
    ) -> None:
        """Accept connections until :meth:`shutdown`; reports the bound port."""
        with self.listen_scope:
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound = listeners[0].socket.getsockname()[1]
            task_status.started(bound)
            await trio.serve_listeners(self.handle_tcp, listeners, handler_nursery=handler_nursery)


async def serve(
    settings: Settings,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until shut down (a signal, or cancellation)."""
    async with trio.open_nursery() as root:
        redis_url = settings.redis_url
        if redis_url is None:
            redis_url = await root.start(run_embedded_redis, settings.data_dir)
            log.info("embedded Redis at %s (data in %s)", redis_url, settings.data_dir)
        await run_service(
            settings, redis_url, handle_signals=handle_signals, task_status=task_status
        )
        root.cancel_scope.cancel()


async def _open_store_when_ready(redis: RedisClient, settings: Settings) -> SessionStore:
    """Open the store, waiting with capped backoff while Redis is unreachable."""
    delay = 0.1
    while True:
        try:
            return await open_store(
                redis,
                layout=settings.redis_layout.value,
                key_prefix=settings.key_prefix,
                session_ttl_seconds=settings.session_ttl_seconds,
                results_limit=settings.results_limit,
            )
        except StoreUnavailable as exc:
            log.warning("waiting for Redis (retry in %.1fs): %s", delay, exc)
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def run_service(
    settings: Settings,
    redis_url: str,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Everything but the embedded Redis: store, market, events, listener, connections."""
    async with (
        open_redis(redis_url, timeout=settings.redis_timeout_seconds) as redis,
        open_pubsub(redis_url) as pubsub,
    ):
        store = await _open_store_when_ready(redis, settings)
        market = MarketData(
            redis, GbmSimulator(seed=settings.market_seed), key_prefix=settings.key_prefix
        )
        await market.load_scripts()
        metrics = Metrics()
        events = SessionEvents(pubsub, store.events_channel)
        services = Services(
            settings=settings,
            store=store,
            market=market,
            events=events,
            metrics=metrics,
            rng=random.Random(),
        )
        server = Server(services, redis)

        def on_tick(report: TickReport) -> None:
            metrics.inc("market_ticks")
            metrics.inc("sessions_revalued", report.sessions_revalued)
            metrics.observe("market_tick_seconds", report.seconds)

        async with trio.open_nursery() as service:
            service.start_soon(events.run)
            await service.start(
                lambda task_status: run_market_updater(
                    market,
                    store,
                    interval=settings.market_update_interval_seconds,
                    on_tick=on_tick,
                    task_status=task_status,
                )
            )
            async with trio.open_nursery() as connections:
                port = await service.start(server.listen, settings.host, settings.port, connections)
                log.info(
                    "serving ws://%s:%d/ws/{session_id} (store layout %s)",
                    settings.host,
                    port,
                    store.layout,
                )
                task_status.started(
                    ServerInfo(
                        host=settings.host,
                        port=port,
                        redis_url=redis_url,
                        layout=store.layout,
                        server=server,
                    )
                )
                if handle_signals:
                    await _wait_for_signal()
                else:
                    await trio.sleep_forever()
                log.info("shutting down: closing %d connections", len(server.connections))
                await server.shutdown(settings.shutdown_timeout_seconds)
                connections.cancel_scope.cancel()
            service.cancel_scope.cancel()


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            return
