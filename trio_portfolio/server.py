"""The server: the root nursery, its services, the listener, signals and shutdown.

The whole task tree lives here; read this file to see who owns what::

    serve()                                root nursery
    ├── embedded redis-server              (only without --redis-url; supervised; outlives the rest)
    └── run_service()                      service nursery
        ├── signal watcher                 SIGINT/SIGTERM -> Server.stop
        ├── listener (listener.py)         own cancel scope: shutdown stops accepting first;
        │                                  EMFILE backs off, never crashes
        ├── WorkerGroup.run                only under serve --workers N: heartbeat, snapshot
        ├── SessionEvents.run              pub/sub -> this process's connections
        ├── run_market_updater             leader-elected; ticks, revalues sessions
        └── connections nursery            one handle_tcp per TCP connection (max_connections)
            └── serve_front_door           HTTP routes, or hand-off of a WebSocket upgrade
                └── _serve_websocket       handshake checks: Origin, per-address count,
                    │                      credential, then (creating only) rate and cap
                    └── Connection.run     see connection.py for the subtree:
                        ├── reader / writer / control loop
                        └── AnalysisRunner own cancel scope
                            └── five metric tasks

Start-up: the listener comes up first, so ``/health`` answers and ``/ready``
says why it is not ready while Redis is still unreachable; WebSocket
handshakes are refused with 503 until the store is open.  Then the store is
opened (retrying with capped backoff), and the events hub and market updater
start.

Shutdown (a signal, or :meth:`Server.stop`): stop accepting, ask every
connection to stop its analysis, flush and close with 1001, wait for them
up to ``shutdown_timeout_seconds``; then abandon what is left (analyses cut
short, shields included, writers cancelled: :meth:`Connection.abandon`),
give the closing handshakes :data:`~trio_portfolio.connection.CLOSE_TIMEOUT`,
and cancel everything.  No await on the way is unbounded, so the service
ends within ``shutdown_timeout_seconds + CLOSE_TIMEOUT`` (plus
:data:`SHUTDOWN_MARGIN` of scheduling slack) of the signal, whatever clients
and Redis do.  The embedded Redis sits in the outermost nursery so it is
stopped last, after every connection has unfenced its analysis (it gets up
to ``embedded.STOP_TIMEOUT`` more).

As a worker of ``serve --workers N`` (:mod:`trio_portfolio.supervisor`),
:func:`serve` gets the listening sockets the supervisor bound (it accepts on
them instead of binding its own) and a :class:`~trio_portfolio.group.GroupSpec`;
it then runs a :class:`~trio_portfolio.group.WorkerGroup`, so ``/metrics``
shows every worker and ``/ready`` waits for all of them.  The embedded Redis
is the supervisor's then, never a worker's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import secrets
import signal
import socket
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed

from trio_portfolio.admission import (
    ConnectionCounts,
    Refusal,
    SessionRateLimiter,
    address_key,
    client_address,
    connection_cap_refusal,
    parse_networks,
    session_cap_refusal,
)
from trio_portfolio.analytics import HistoryCache
from trio_portfolio.auth import check_credential, choose_subprotocol, mint_credential
from trio_portfolio.config import ConfigError, Settings
from trio_portfolio.connection import CLOSE_TIMEOUT, Connection, Services
from trio_portfolio.embedded import run_embedded_redis
from trio_portfolio.group import GroupSpec, WorkerGroup
from trio_portfolio.http import (
    HttpError,
    HttpLimits,
    PrefixedStream,
    RequestInfo,
    ServiceUnavailable,
    peer_address,
    public_reason,
    serve_front_door,
)
from trio_portfolio.listener import (
    FDS_PER_CONNECTION_HEADROOM,
    raise_open_file_limit,
    serve_listener,
)
from trio_portfolio.market import (
    MarketData,
    PassReport,
    TickReport,
    load_symbols,
    run_market_updater,
)
from trio_portfolio.metrics import Refusal as RefusalCode
from trio_portfolio.metrics import ServerMetrics
from trio_portfolio.models import METRICS
from trio_portfolio.origins import HostPolicy, OriginPolicy
from trio_portfolio.protocol import Dialect, choose_dialect, render_portfolio, validate_session_id
from trio_portfolio.redis_connect import open_pubsub, open_redis
from trio_portfolio.redis_io import CommandError, RedisClient, StoreUnavailable
from trio_portfolio.redis_pubsub import PubSub
from trio_portfolio.replay import market_source_for
from trio_portfolio.session_events import SessionEvents
from trio_portfolio.store import (
    ReplicaWait,
    SessionCensus,
    SessionStore,
    open_replica_wait,
    open_store,
)
from trio_portfolio.websocket import ServerHandshake, read_handshake

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
SHUTDOWN_MARGIN = 0.5
"""Seconds, after the closing handshakes' bound, for the last tasks to notice their cancellation."""
WS_PATH_PREFIX = "/ws/"
REFUSAL_SLOTS = 64
"""Connections beyond ``max_connections`` answered 503 at once; more are closed unanswered."""
REFUSAL_LIMITS = HttpLimits(head_timeout=2.0, drain_timeout=0.5, send_timeout=2.0)
"""Deadlines of such an answer: it must cost little and end fast."""
ADMISSION_TIMEOUT = 2.0
"""Seconds the handshake's session check (exists? how many live?) may take in Redis."""
WORKER_HEADER = "x-trio-portfolio-worker"
"""Under ``serve --workers N``: the pid of the worker that accepted a WebSocket."""


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

    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        pubsub: PubSub,
        metrics: ServerMetrics,
        *,
        listen_sockets: Sequence[socket.socket] | None = None,
        group: GroupSpec | None = None,
    ) -> None:
        """``metrics`` is this server's own; ``redis`` should report latency to it.

        ``listen_sockets`` (bound and listening, e.g. by the supervisor) are
        accepted on instead of binding ``settings.host:port``; ``group`` makes
        this server one worker of a group (see :mod:`trio_portfolio.group`).
        """
        self.settings = settings
        self.redis = redis
        self.replica_wait: ReplicaWait | None = None
        """Where results are written and ``WAIT``-ed for (``--wait-replicas``; set before
        the store opens)."""
        self.pubsub = pubsub
        self.metrics = metrics
        self.services: Services | None = None
        """Set once the store is open; until then WebSockets are refused with 503."""
        self.startup_problem = "the store has not been opened yet"
        self.connections: set[Connection] = set()
        self.listen_scope = trio.CancelScope()
        self.startup_scope = trio.CancelScope()
        self.stop_requested = trio.Event()
        self.shutting_down = trio.Event()
        self.abandoning = False
        """The shutdown's grace period is over: connections still open are cut short."""
        self.all_closed = trio.Event()
        self.all_closed.set()
        self.listen_sockets = listen_sockets
        self.group: WorkerGroup | None = None
        self.handshake_headers: list[tuple[bytes, bytes]] | None = None
        if group is not None:
            self.group = WorkerGroup(
                group, redis, settings.key_prefix, metrics.registry, self._ready_hint
            )
            self.handshake_headers = [(WORKER_HEADER.encode(), str(os.getpid()).encode())]
        self.http_app = ServerHttpApp(self)
        self.auth_key = settings.auth_key()
        """The credential key; ``None`` when authentication is off (see ``auth.py``)."""
        self.origins = OriginPolicy.from_settings(settings.allowed_origins)
        self.hosts = HostPolicy.from_settings(settings.allowed_hosts)
        self.trusted_proxies = parse_networks(settings.trusted_proxies)
        self.session_rate = SessionRateLimiter(
            settings.sessions_per_second, settings.session_burst, settings.max_tracked_addresses
        )
        self.address_connections = ConnectionCounts(settings.max_connections_per_address)
        self.tcp_connections = 0
        """Open TCP connections, upgraded or not: what ``max_connections`` bounds."""
        self._refusing = 0
        metrics.watch_connections(lambda: len(self.connections))
        metrics.watch_redis(redis)
        metrics.watch_pubsub(pubsub)

    def _ready_hint(self) -> tuple[bool, str]:
        """Readiness without a Redis round trip (what a worker's heartbeat reports)."""
        if self.shutting_down.is_set():
            return False, "shutting down"
        if self.services is None:
            return False, self.startup_problem
        return True, "ok"

    def stop(self) -> None:
        """Ask for a graceful shutdown (what SIGINT/SIGTERM do)."""
        self.stop_requested.set()
        self.startup_scope.cancel()

    async def open_services(self, nursery: trio.Nursery) -> Services:
        """Open the store (waiting for Redis), then start the events hub and market updater."""
        settings = self.settings
        source = await trio.to_thread.run_sync(market_source_for, settings)  # reads a replay file
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
            source,
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
            history_cache=HistoryCache(),
        )
        self.metrics.watch_session_events(events)
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
                    replica_wait=self.replica_wait,
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
            metrics.market_tick(
                seconds=report.seconds,
                ticks_skipped=report.ticks_skipped,
                tickers=len(report.prices),
            )

        def on_pass(report: PassReport) -> None:
            metrics.market_pass(
                sessions_revalued=report.sessions_revalued,
                sessions=report.sessions_counted,
                completed=report.completed,
                seconds=report.pass_seconds,
                lag=report.lag,
                tickers_pruned=len(report.tickers_pruned),
            )

        await run_market_updater(
            market,
            store,
            interval=self.settings.market_update_interval_seconds,
            on_tick=on_tick,
            on_pass=on_pass,
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
        """Accept connections until shutdown; reports the bound port.

        The soft open-file limit is raised first; running out of descriptors
        pauses accepting (see ``listener.py``), it never ends the server.
        """
        raise_open_file_limit(self.settings.max_connections + FDS_PER_CONNECTION_HEADROOM)
        with self.listen_scope:
            listeners = await self._open_listeners(host, port)
            task_status.started(listeners[0].socket.getsockname()[1])
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(serve_listener, listener, self.handle_tcp, handler_nursery)

    async def _open_listeners(self, host: str, port: int) -> list[trio.SocketListener]:
        """Bind ``host:port``, or wrap the pre-bound ``listen_sockets`` (a worker's)."""
        if self.listen_sockets is None:
            return await trio.open_tcp_listeners(port, host=host)
        await trio.lowlevel.checkpoint()
        return [
            trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            for sock in self.listen_sockets
        ]

    async def handle_tcp(self, stream: trio.abc.Stream) -> None:
        """HTTP routes or a WebSocket (via the front door); one bad client never hurts others.

        Every TCP connection counts against ``max_connections`` from accept
        on.  One beyond it gets a quick 503 (at most ``REFUSAL_SLOTS`` such
        answers at a time; past those it is closed unanswered).
        """
        self.tcp_connections += 1
        refusing = False
        try:
            refuse = None
            limits = None
            if self.tcp_connections > self.settings.max_connections:
                self.metrics.error(RefusalCode.TOO_MANY_CONNECTIONS)
                if self._refusing >= REFUSAL_SLOTS:
                    return
                refusing = True
                self._refusing += 1
                refusal = connection_cap_refusal()
                refuse = (refusal.status, refusal.detail, tuple(refusal.headers()))
                limits = REFUSAL_LIMITS
            await serve_front_door(
                stream,
                on_websocket=self._handle_websocket,
                app=self.http_app,
                shutting_down=self.shutting_down,
                host_allowed=self.hosts.allows if self.hosts.enabled else None,
                refuse=refuse,
                **({"limits": limits} if limits is not None else {}),
            )
        except Exception:
            log.exception("connection handler failed")
        finally:
            self.tcp_connections -= 1
            if refusing:
                self._refusing -= 1
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _handle_websocket(self, stream: trio.abc.Stream) -> None:
        # ConnectionClosed: the client left during the handshake (accept or reject).
        with contextlib.suppress(ConnectionClosed):
            await self._serve_websocket(stream)

    async def _reject(self, request: ServerHandshake, refusal: Refusal) -> None:
        """Refuse the handshake with ``refusal`` (counted in ``errors`` by its code)."""
        self.metrics.error(refusal.code)
        headers = [(name.encode(), value.encode()) for name, value in refusal.headers()]
        if refusal.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="trio-portfolio"'))
        body = orjson.dumps({"error": refusal.code, "detail": refusal.detail}) + b"\n"
        headers.append((b"content-type", b"application/json"))
        await request.reject(refusal.status, extra_headers=headers, body=body)

    async def _serve_websocket(self, stream: trio.abc.Stream) -> None:
        """The handshake's checks, in order, then the connection.

        Path and id (404/400), readiness (503), ``Origin`` (403), capacity
        (503) and connections per client address (429), the credential
        (401/403) - all before any session state is read - then, only for
        a connect that would create its session, the new-session rate
        (429) and the global session cap (503).
        """
        settings = self.settings
        request = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            request = await read_handshake(stream, max_message_size=settings.max_message_bytes)
        if request is None or self.shutting_down.is_set():
            return
        target = await self._route(request)
        if target is None:
            return
        session_id, query = target
        services = self.services
        if services is None:
            public, _ = public_reason(self.startup_problem)
            await self._reject(request, Refusal(503, RefusalCode.NOT_READY, f"not ready: {public}"))
            return
        info = stream.request if isinstance(stream, PrefixedStream) else None
        info = info or RequestInfo(peer_address(stream))
        if not self.origins.allows(info.header(b"origin"), info.header(b"host")):
            await self._reject(request, _origin_refusal())
            return
        if len(self.connections) >= settings.max_connections:
            await self._reject(request, connection_cap_refusal())
            return
        address = client_address(
            info.peer, info.header_values(b"x-forwarded-for"), self.trusted_proxies
        )
        key = address_key(address)
        refusal = self.address_connections.open(key)
        if refusal is not None:
            await self._reject(request, refusal)
            return
        try:
            refusal = check_credential(
                self.auth_key,
                session_id,
                query,
                request.proposed_subprotocols,
                (info.header(b"authorization") or "").encode("latin-1") or None,
            )
            if refusal is None:
                refusal = await self._admit_connect(services, session_id, key)
            if refusal is not None:
                await self._reject(request, refusal)
                return
            del info  # the handshake's headers: not kept for the connection's life
            await self._run_connection(services, request, session_id)
        finally:
            self.address_connections.close(key)

    async def _run_connection(
        self,
        services: Services,
        request: ServerHandshake,
        session_id: str,
    ) -> None:
        dialect = choose_dialect(request.proposed_subprotocols)
        ws = await request.accept(
            subprotocol=choose_subprotocol(request.proposed_subprotocols),
            extra_headers=self.handshake_headers,
        )
        connection = Connection(services, ws, session_id, dialect)
        self.connections.add(connection)
        self.all_closed = trio.Event()
        if self.shutting_down.is_set():  # accepted while shutdown() went through the set
            connection.shutdown()
            if self.abandoning:
                connection.abandon()
        ids = {"connection_id": connection.id, "session_id": session_id}
        log.info("connection opened (%s)", dialect.value, extra=ids)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            if not self.connections:
                self.all_closed.set()
            log.info("connection closed", extra=ids)

    async def _admit_connect(self, services: Services, session_id: str, key: str) -> Refusal | None:
        """Rate and cap for a connect that would create its session; ``None`` to go ahead.

        One round trip (:meth:`~trio_portfolio.store.SessionStore.session_census`):
        does the session exist, and how many live sessions does the store's
        index hold (it may briefly count expired sessions until the market
        updater prunes them).  Without an answer from Redis the connect is
        charged as a creation but not capped: the connection reports the
        outage itself.
        """
        census: SessionCensus | None
        try:
            census = await services.store.session_census(session_id, timeout=ADMISSION_TIMEOUT)
        except (StoreUnavailable, CommandError):
            census = None
        if census is not None and census.exists:
            return None
        refusal = self.session_rate.take(key, trio.current_time())
        if refusal is None and census is not None:
            refusal = session_cap_refusal(census.live, self.settings.max_sessions)
        return refusal

    async def _route(self, request: ServerHandshake) -> tuple[str, str] | None:
        """``(session_id, query)`` of a ``/ws/{session_id}`` target, else reject and ``None``."""
        target = urlsplit(request.path)
        path = unquote(target.path)
        if not path.startswith(WS_PATH_PREFIX):
            await request.reject(404, body=b"not found: WebSocket endpoint is /ws/{session_id}\n")
            return None
        session_id = path[len(WS_PATH_PREFIX) :]
        if not validate_session_id(session_id):
            await request.reject(400, body=b"bad session id: 1-64 characters of A-Z a-z 0-9 _ -\n")
            return None
        return session_id, target.query

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, close every connection with 1001, in bounded time.

        Waits up to ``timeout`` for the connections to stop their analyses,
        flush and close; then abandons those still open and waits at most
        ``CLOSE_TIMEOUT + SHUTDOWN_MARGIN`` more.  The caller cancels whatever
        is left after that (every shielded await on the way has a deadline).
        """
        self.shutting_down.set()
        self.listen_scope.cancel()
        for connection in list(self.connections):
            connection.shutdown()
        with trio.move_on_after(timeout):
            await self.all_closed.wait()
        self.abandoning = True
        if self.connections:
            log.warning("abandoning %d connections after %gs", len(self.connections), timeout)
        for connection in list(self.connections):
            connection.abandon()
        with trio.move_on_after(CLOSE_TIMEOUT + SHUTDOWN_MARGIN):
            await self.all_closed.wait()


class ServerHttpApp:
    """The server as the front door sees it (:class:`trio_portfolio.http.HttpApp`)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def ready(self) -> tuple[bool, str]:
        """Ready when the store is open, accepts a write, and every script is loaded.

        The write is a ``SET`` with a short expiry on a key of its own, made on
        the client's dedicated probe connection, so a read-only replica, OOM
        or a stall reads as not ready and the probe's deadline cannot disturb
        other requests.  The reason names the condition only (no address, no
        OS error text).
        """
        server = self.server
        if server.shutting_down.is_set():
            return False, "shutting down"
        if server.services is None:
            return False, server.startup_problem
        store = server.services.store
        try:
            await server.redis.probe_write(f"{server.settings.key_prefix}:ready-probe", timeout=1.0)
            loaded = await server.redis.execute(
                "SCRIPT", "EXISTS", *(script.sha for script in store.scripts), timeout=1.0
            )
            if not all(loaded):
                await store.load_scripts()  # after SCRIPT FLUSH or a Redis restart
        except StoreUnavailable as exc:
            return False, f"redis unavailable ({exc.explanation}): {exc}"
        except CommandError as exc:
            return False, f"redis refused the readiness check ({exc.code or 'error'})"
        if server.group is not None:  # a worker: ready when all workers are
            try:
                return await server.group.check_ready()
            except StoreUnavailable as exc:
                return False, f"redis unavailable ({exc.explanation}): {exc}"
        return True, "ok"

    def metrics_text(self) -> str:
        """Every series of this server (of every worker, under ``--workers N``)."""
        if self.server.group is not None:
            return self.server.group.exposition()
        return self.server.metrics.exposition().decode()

    async def new_session(self, request: RequestInfo) -> dict[str, object]:
        """A session under a fresh unguessable id, with the default holdings.

        Refused like a creating WebSocket connect: a disallowed ``Origin``
        (403), the client address's new-session rate (429, ``Retry-After``),
        the global session cap (503).  The answer carries ``config`` (what
        the original service's page reads, see :func:`session_config`) and,
        with authentication on, the session's ``credential``.
        """
        server = self.server
        services = server.services
        if services is None:
            raise ServiceUnavailable(server.startup_problem)
        if not server.origins.allows(request.header(b"origin"), request.header(b"host")):
            raise _http_error(server, _origin_refusal())
        address = client_address(
            request.peer, request.header_values(b"x-forwarded-for"), server.trusted_proxies
        )
        refusal = server.session_rate.take(address_key(address), trio.current_time())
        if refusal is not None:
            raise _http_error(server, refusal)
        session_id = secrets.token_urlsafe(24)
        try:
            census = await services.store.session_census()
            refusal = session_cap_refusal(census.live, server.settings.max_sessions)
            if refusal is not None:
                raise _http_error(server, refusal)
            portfolio = await services.create_session(session_id)
        except StoreUnavailable as exc:
            raise ServiceUnavailable(f"store unavailable: {exc}") from None
        rendered = render_portfolio(portfolio, Dialect.V2)
        assert rendered is not None
        answer: dict[str, object] = {
            "session_id": session_id,
            "portfolio": orjson.loads(rendered),
            "config": session_config(server.settings),
        }
        if server.auth_key is not None:
            answer["credential"] = mint_credential(server.auth_key, session_id)
        return answer


def session_config(settings: Settings) -> dict[str, object]:
    """``config`` of ``POST /session``: what the original service's browser page reads.

    ``features["client-connectivity"].settings`` (``idle-timeout-seconds``,
    ``auto-reconnect``), ``features["client-ui"].settings["default-holdings"]``
    and ``features.analysis.settings.metrics`` (the five names), from settings.
    """
    return {
        "features": {
            "client-connectivity": {
                "enabled": True,
                "settings": {
                    "idle-timeout-seconds": settings.client_idle_timeout_seconds,
                    "auto-reconnect": settings.client_auto_reconnect,
                },
            },
            "client-ui": {
                "enabled": True,
                "settings": {"default-holdings": dict(settings.default_holdings)},
            },
            "analysis": {"enabled": True, "settings": {"metrics": list(METRICS)}},
        }
    }


def _origin_refusal() -> Refusal:
    return Refusal(
        403, RefusalCode.ORIGIN_NOT_ALLOWED, "this page's origin may not use this server"
    )


def _http_error(server: Server, refusal: Refusal) -> HttpError:
    server.metrics.error(refusal.code)
    return HttpError(
        refusal.detail, status=refusal.status, code=refusal.code, headers=tuple(refusal.headers())
    )


async def serve(
    settings: Settings,
    *,
    handle_signals: bool = True,
    listen_sockets: Sequence[socket.socket] | None = None,
    group: GroupSpec | None = None,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until shut down (a signal, :meth:`Server.stop`, or cancellation).

    Without ``redis_url`` it first starts the embedded Redis, which is
    restarted if it dies (the store answers ``store_unavailable`` meanwhile).
    ``listen_sockets`` and ``group``: see :class:`Server` (a worker's).  A
    Redis that is down or refusing at start-up is not an error: the server
    listens, answers ``/ready`` with 503 and retries with backoff until the
    store opens; ``task_status.started`` is called only then.  A graceful
    stop returns normally; cancellation propagates as ``trio.Cancelled``.

    Raises:
      ExceptionGroup: what ends the server early, from its nurseries:
        :class:`~trio_portfolio.embedded.EmbeddedRedisError` when the
        embedded Redis cannot start or crash-loops (no ``redis_url`` only),
        and everything :func:`run_service` raises.
    """
    async with trio.open_nursery() as root:
        redis_url = settings.redis_url
        if redis_url is None:
            embedded = functools.partial(
                run_embedded_redis,
                settings.data_dir,
                maxmemory=settings.embedded_maxmemory,
                maxmemory_policy=settings.embedded_maxmemory_policy.value,
            )
            redis_url = await root.start(embedded)
            log.info("embedded Redis at %s (data in %s)", redis_url, settings.data_dir)
        await run_service(
            settings,
            redis_url,
            handle_signals=handle_signals,
            listen_sockets=listen_sockets,
            group=group,
            task_status=task_status,
        )
        root.cancel_scope.cancel()


async def run_service(
    settings: Settings,
    redis_url: str,
    *,
    handle_signals: bool = True,
    listen_sockets: Sequence[socket.socket] | None = None,
    group: GroupSpec | None = None,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Everything but the embedded Redis: store, market, events, listener, connections.

    Runs until :meth:`Server.stop` (or a signal, with ``handle_signals``)
    and a graceful shutdown; :func:`serve` with a Redis of one's own.

    Raises:
      ExceptionGroup: from its nurseries, holding one of:
        ``OSError`` when ``host:port`` cannot be bound (in use, no
        permission), before ``task_status.started``;
        :class:`ValueError` for a ``redis_url`` the adapter cannot parse;
        :class:`~trio_portfolio.config.ConfigError` when the ``symbols``
        file cannot be read or ``default_holdings`` are off it (including
        :class:`~trio_portfolio.replay.ReplayFileError`, an unusable market
        replay file); :class:`~trio_portfolio.store.StoreLayoutUnavailable`
        for ``redis_layout = json`` on a server without RedisJSON;
        :class:`~trio_portfolio.redis_io.CommandError` when Redis refuses the
        store's scripts.  ``StoreUnavailable`` never ends it: start-up waits
        for the store, and a running server answers ``store_unavailable``.
    """
    metrics = ServerMetrics()
    async with (
        open_redis(
            redis_url, timeout=settings.redis_timeout_seconds, on_latency=metrics.redis_call
        ) as redis,
        open_pubsub(redis_url) as pubsub,
        open_replica_wait(
            redis,
            replicas=settings.wait_replicas,
            timeout_ms=settings.wait_replicas_timeout_ms,
            connections=settings.wait_replicas_connections,
        ) as replica_wait,
        trio.open_nursery() as service,
    ):
        server = Server(
            settings, redis, pubsub, metrics, listen_sockets=listen_sockets, group=group
        )
        server.replica_wait = replica_wait
        if replica_wait is not None:
            metrics.watch_replica_wait(replica_wait)
        if handle_signals:
            service.start_soon(_stop_on_signal, server)
        async with trio.open_nursery() as connections:
            port = await service.start(server.listen, settings.host, settings.port, connections)
            log.info("listening on %s:%d", settings.host, port)
            if server.group is not None:
                await service.start(server.group.run)
            with server.startup_scope:
                services = await server.open_services(service)
                if server.group is not None:
                    server.group.nudge()  # tell the other workers at once
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
            if server.group is not None:
                server.group.nudge()  # shutdown() sets shutting_down before it first awaits
            await server.shutdown(settings.shutdown_timeout_seconds)
            connections.cancel_scope.cancel()
        service.cancel_scope.cancel()


async def _stop_on_signal(server: Server) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            server.stop()
            return
