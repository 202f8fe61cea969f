"""The server: the root nursery, its services, the listener, signals and shutdown.

The whole task tree lives here; read this file to see who owns what::

    serve()                                root nursery
    ├── embedded redis-server              (only without --redis-url; outlives the rest)
    └── run_service()                      service nursery
        ├── signal watcher                 SIGINT/SIGTERM -> Server.stop
        ├── listener (trio.serve_tcp)      own cancel scope: shutdown stops accepting first
        ├── SessionEvents.run              pub/sub -> this process's connections
        ├── run_market_updater             leader-elected; ticks, revalues sessions
        └── connections nursery            one handle_tcp per TCP connection
            └── serve_front_door           HTTP routes, or hand-off of a WebSocket upgrade
                └── Connection.run         see connection.py for the subtree:
                    ├── reader / writer / events / control loop
                    └── AnalysisRunner     own cancel scope
                        └── five metric tasks

Start-up: the listener comes up first, so ``/health`` answers and ``/ready``
says why it is not ready while Redis is still unreachable; WebSocket
handshakes are refused with 503 until the store is open.  Then the store is
opened (retrying with capped backoff), and the events hub and market updater
start.

Shutdown (a signal, or :meth:`Server.stop`): stop accepting, ask every
connection to stop its analysis, flush and close with 1001, wait for them
up to ``shutdown_timeout_seconds``, then cancel what is left.  The embedded
Redis sits in the outermost nursery so it is stopped last, after every
connection has unfenced its analysis.
"""

from __future__ import annotations

import logging
import random
import secrets
import signal
from urllib.parse import unquote, urlsplit

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, wrap_server_stream

from trio_portfolio.config import ConfigError, Settings
from trio_portfolio.connection import Connection, Services
from trio_portfolio.embedded import run_embedded_redis
from trio_portfolio.http import ServiceUnavailable, serve_front_door
from trio_portfolio.market import MarketData, TickReport, load_symbols, run_market_updater
from trio_portfolio.observability import Metrics
from trio_portfolio.protocol import Dialect, choose_dialect, render_portfolio, validate_session_id
from trio_portfolio.redis_io import RedisClient, StoreUnavailable, open_redis
from trio_portfolio.redis_pubsub import PubSub, open_pubsub
from trio_portfolio.session_events import SessionEvents
from trio_portfolio.simulation import GbmSimulator
from trio_portfolio.store import SessionStore, open_store

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
WS_PATH_PREFIX = "/ws/"


_METRIC_HELP = {
    "sessions": "live sessions in the store, as counted by the last market tick",
    "analyses_started": "analysis attempts started (a snapshot was taken)",
    "analyses_completed": "analyses that delivered all five results",
    "analyses_cancelled": "analyses stopped early, by reason",
    "results_committed": "results stored by the fenced append (and then sent)",
    "fenced_writes_rejected": "results refused by the fence, by status (stale, superseded)",
    "market_ticks": "market ticks taken by this process as leader",
    "market_tick_seconds": "duration of a market tick, revaluation included",
    "sessions_revalued": "session revaluations by market ticks",
    "market_ticks_skipped": "tick slots skipped because a tick overran its interval",
    "market_tickers": "tickers the market prices, as of the last tick this process took",
    "market_tickers_pruned": "tickers dropped from the market because no live session held them",
    "redis_call_seconds": "latency of one Redis call (command, pipeline or script)",
    "errors": "error frames and refusals, by code",
    "events_dropped": "session events dropped because a connection lagged",
}


@attrs.frozen
class ServerInfo:
    """Reported by :func:`serve` through ``task_status`` once the store is open."""

    host: str
    port: int
    redis_url: str
    layout: str
    server: Server


class Server:
    """Accepts connections, owns the shared services, tracks connections for shutdown."""

    def __init__(self, settings: Settings, redis: RedisClient, pubsub: PubSub) -> None:
        self.settings = settings
        self.redis = redis
        self.pubsub = pubsub
        self.metrics = Metrics()
        self.services: Services | None = None
        """Set once the store is open; until then WebSockets are refused with 503."""
        self.startup_problem = "the store has not been opened yet"
        self.connections: set[Connection] = set()
        self.listen_scope = trio.CancelScope()
        self.startup_scope = trio.CancelScope()
        self.stop_requested = trio.Event()
        self.shutting_down = trio.Event()
        self.all_closed = trio.Event()
        self.all_closed.set()
        self.http_app = ServerHttpApp(self)
        metrics = self.metrics
        metrics.gauge_function(
            "connections_open", lambda: len(self.connections), "open WebSocket connections"
        )
        for name, text in _METRIC_HELP.items():
            metrics.help[name] = text
        redis.on_latency = lambda seconds: self.metrics.observe("redis_call_seconds", seconds)

    def stop(self) -> None:
        """Ask for a graceful shutdown (what SIGINT/SIGTERM do)."""
        self.stop_requested.set()
        self.startup_scope.cancel()

    async def open_services(self, nursery: trio.Nursery) -> Services:
        """Open the store (waiting for Redis), then start the events hub and market updater."""
        settings = self.settings
        store = await self._open_store_when_ready()
        symbols = None
        if settings.symbols is not None:
            try:
                symbols = await trio.to_thread.run_sync(load_symbols, settings.symbols)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"symbols: {exc}") from None
            off_list = sorted(set(settings.default_holdings) - symbols)
            if off_list:
                raise ConfigError(
                    f"default_holdings: {', '.join(off_list)} not on the symbol list "
                    f"{settings.symbols}"
                )
        market = MarketData(
            self.redis,
            GbmSimulator(seed=settings.market_seed),
            key_prefix=settings.key_prefix,
            max_tickers=settings.max_tickers,
            symbols=symbols,
        )
        await market.load_scripts()
        events = SessionEvents(self.pubsub, store.events_channel)
        services = Services(
            settings=settings,
            store=store,
            market=market,
            events=events,
            metrics=self.metrics,
            rng=random.Random(),
        )
        self.metrics.gauge_function(
            "sessions_watched", lambda: events.sessions_watched, "sessions with local watchers"
        )
        nursery.start_soon(events.run)
        await nursery.start(self._run_market_updater, market, store)
        self.services = services
        return services

    async def _open_store_when_ready(self) -> SessionStore:
        delay = 0.1
        settings = self.settings
        while True:
            try:
                return await open_store(
                    self.redis,
                    layout=settings.redis_layout.value,
                    key_prefix=settings.key_prefix,
                    session_ttl_seconds=settings.session_ttl_seconds,
                    results_limit=settings.results_limit,
                )
            except StoreUnavailable as exc:
                self.startup_problem = f"waiting for Redis: {exc}"
                log.warning("waiting for Redis (retry in %.1fs): %s", delay, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _run_market_updater(
        self,
        market: MarketData,
        store: SessionStore,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        metrics = self.metrics

        def on_tick(report: TickReport) -> None:
            metrics.inc("market_ticks")
            metrics.inc("sessions_revalued", report.sessions_revalued)
            metrics.set("sessions", report.sessions_revalued)
            metrics.observe("market_tick_seconds", report.seconds)
            metrics.inc("market_ticks_skipped", report.ticks_skipped)
            metrics.inc("market_tickers_pruned", len(report.tickers_pruned))
            metrics.set("market_tickers", len(report.prices) - len(report.tickers_pruned))

        await run_market_updater(
            market,
            store,
            interval=self.settings.market_update_interval_seconds,
            on_tick=on_tick,
            pipelines=self.settings.market_pipelines,
            task_status=task_status,
        )

    async def listen(
        self,
        host: str,
        port: int,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[int],
    ) -> None:
        """Accept connections until shutdown; reports the bound port."""
        with self.listen_scope:
            listeners = await trio.open_tcp_listeners(port, host=host)
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(self.handle_tcp, listeners, handler_nursery=handler_nursery)

    async def handle_tcp(self, stream: trio.abc.Stream) -> None:
        """HTTP routes or a WebSocket (via the front door); one bad client never hurts others."""
        try:
            await serve_front_door(
                stream,
                on_websocket=self._handle_websocket,
                app=self.http_app,
                shutting_down=self.shutting_down,
            )
        except Exception:
            log.exception("connection handler failed")
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _handle_websocket(self, stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            try:
                await self._serve_websocket(nursery, stream)
            except ConnectionClosed:
                pass  # the client left during the handshake (accept or reject)
            finally:
                nursery.cancel_scope.cancel()

    async def _serve_websocket(self, nursery: trio.Nursery, stream: trio.abc.Stream) -> None:
        settings = self.settings
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            request = await wrap_server_stream(
                nursery, stream, max_message_size=settings.max_message_bytes
            )
        if request is None or self.shutting_down.is_set():
            return
        session_id = await self._route(request)
        if session_id is None:
            return
        services = self.services
        if services is None:
            await request.reject(503, body=f"not ready: {self.startup_problem}\n".encode())
            return
        if len(self.connections) >= settings.max_connections:
            self.metrics.inc("errors", code="too_many_connections")
            await request.reject(503, body=b"too many connections, try again later\n")
            return
        dialect = choose_dialect(request.proposed_subprotocols)
        ws = await request.accept(subprotocol=dialect.subprotocol)
        connection = Connection(services, ws, session_id, dialect)
        self.connections.add(connection)
        self.all_closed = trio.Event()
        ids = {"connection_id": connection.id, "session_id": session_id}
        log.info("connection opened (%s)", dialect.value, extra=ids)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            if not self.connections:
                self.all_closed.set()
            log.info("connection closed", extra=ids)

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


class ServerHttpApp:
    """The server as the front door sees it (:class:`trio_portfolio.http.HttpApp`)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def ready(self) -> tuple[bool, str]:
        """Ready when the store is open, Redis answers and every script is loaded."""
        server = self.server
        if server.shutting_down.is_set():
            return False, "shutting down"
        if server.services is None:
            return False, server.startup_problem
        store = server.services.store
        try:
            loaded = await server.redis.execute(
                "SCRIPT", "EXISTS", *(script.sha for script in store.scripts), timeout=1.0
            )
            if not all(loaded):
                await store.load_scripts()  # after SCRIPT FLUSH or a Redis restart
        except StoreUnavailable as exc:
            return False, f"redis unavailable: {exc}"
        return True, "ok"

    def metrics_text(self) -> str:
        return self.server.metrics.render_prometheus()

    async def new_session(self) -> dict[str, object]:
        """A session under a fresh unguessable id, with the default holdings."""
        services = self.server.services
        if services is None:
            raise ServiceUnavailable(self.server.startup_problem)
        session_id = secrets.token_urlsafe(24)
        try:
            portfolio = await services.create_session(session_id)
        except StoreUnavailable as exc:
            raise ServiceUnavailable(f"store unavailable: {exc}") from None
        rendered = render_portfolio(portfolio, Dialect.V2)
        assert rendered is not None
        return {"session_id": session_id, "portfolio": orjson.loads(rendered)}


async def serve(
    settings: Settings,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until shut down (a signal, :meth:`Server.stop`, or cancellation)."""
    async with trio.open_nursery() as root:
        redis_url = settings.redis_url
        if redis_url is None:
            redis_url = await root.start(run_embedded_redis, settings.data_dir)
            log.info("embedded Redis at %s (data in %s)", redis_url, settings.data_dir)
        await run_service(
            settings, redis_url, handle_signals=handle_signals, task_status=task_status
        )
        root.cancel_scope.cancel()


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
        trio.open_nursery() as service,
    ):
        server = Server(settings, redis, pubsub)
        if handle_signals:
            service.start_soon(_stop_on_signal, server)
        async with trio.open_nursery() as connections:
            port = await service.start(server.listen, settings.host, settings.port, connections)
            log.info("listening on %s:%d", settings.host, port)
            with server.startup_scope:
                services = await server.open_services(service)
                log.info(
                    "serving ws://%s:%d/ws/{session_id} (store layout %s)",
                    settings.host,
                    port,
                    services.store.layout,
                )
                task_status.started(
                    ServerInfo(
                        host=settings.host,
                        port=port,
                        redis_url=redis_url,
                        layout=services.store.layout,
                        server=server,
                    )
                )
            await server.stop_requested.wait()
            log.info("shutting down: closing %d connections", len(server.connections))
            await server.shutdown(settings.shutdown_timeout_seconds)
            connections.cancel_scope.cancel()
        service.cancel_scope.cancel()


async def _stop_on_signal(server: Server) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            server.stop()
            return
