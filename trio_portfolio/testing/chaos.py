"""The chaos suite: real faults against a real server under real load, measured.

:func:`run_chaos` starts a real ``redis-server`` (append-only, ``DEBUG``
enabled) with a second one replicating it, a :class:`ChaosProxy` in front
of the first, and ``python -m trio_portfolio serve`` as a subprocess whose
Redis is the proxy.  Then, one fault at a time, it opens a fresh set of v2
sessions, each driven by a :class:`LoadClient` (a real WebSocket client
that analyses in a loop, now and then changes its holdings, reconnects when
dropped, and records every frame it receives with the time it arrived),
injects the fault ``injections`` times, lets the clients finish their last
analysis, and compares what they received with what Redis holds.  Before
each injection of an outage (:data:`OUTAGES`) a few clients are held at
their next ``analyze`` until the fault is in effect, so that somebody
always acts while it lasts.

One :class:`FaultRow` per fault says: connections dropped, error frames by
code, requests left unanswered, results stored-not-streamed and
streamed-not-stored (by ``analysis_id`` + ``metric``; duplicates apart),
corrupt sessions (:func:`check_session`: a stored invariant broken), the
longest time from the end of a fault to a client's next completed analysis,
and what became of the server process.  A fault ends when Redis answers
PING again (``kill -9``), ``DEBUG SLEEP`` returns, ``maxmemory`` is back to
0, the cut is made, the switch back is done, the payloads are published,
or the new server process is spawned (so recovery includes its start-up).
In the embedded case the killed server's redis-server must be gone within
10 s of the restart (it dies with its parent), and the last one after the
final SIGTERM.  :func:`acceptance` turns a row
into the acceptance line's violations; :func:`format_table` prints rows.

Faults (:data:`FAULTS`):

* ``redis_kill9`` - ``kill -9`` of Redis, restarted on the same port and AOF;
* ``debug_sleep`` - ``DEBUG SLEEP`` (2 s by default): Redis stalls;
* ``oom`` - ``CONFIG SET maxmemory 1`` (``noeviction``) for the outage;
* ``proxy_cut`` - the proxy holds Redis's replies (the scripts ran, their
  outcome is unknown to the server), then cuts every connection;
* ``replica_switch`` - Redis becomes a replica of the second server
  (writes answer ``READONLY``), then a primary again; the switch loses no
  write (writes are refused with ``NOREPLICAS`` until the replica caught up);
* ``bad_publish`` - ``PUBLISH`` of non-UTF-8 bytes on every watched session's
  events channel;
* ``server_sigterm`` - SIGTERM of the server under load, then a restart;
* ``server_sigkill_embedded`` - a server with its embedded Redis (no
  ``--redis-url``, a data dir) is SIGKILLed and started again on the same
  data dir;
* ``baseline`` - no fault: the same load, as a control row.

Everything runs on 127.0.0.1; every loop is bounded in count and time.  The
blocking redis-py calls (fault injection) run in worker threads.  Nothing
here imports pytest.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import orjson
import redis
import trio
from trio_websocket import ConnectionClosed, HandshakeError
from wsproto.utilities import LocalProtocolError

from trio_portfolio.embedded import PIDFILE_NAME
from trio_portfolio.models import METRICS, SESSION_ID_RE, TICKER_RE, Portfolio
from trio_portfolio.redis_io import open_redis
from trio_portfolio.services import open_service_nursery
from trio_portfolio.store import open_store
from trio_portfolio.store.base import SessionKeys
from trio_portfolio.testing.live_server import connect_client
from trio_portfolio.testing.redis_servers import free_port

__all__ = [
    "DELIBERATE_EXITS",
    "FAULTS",
    "REDIS_FAULTS",
    "ChaosConfig",
    "ChaosProxy",
    "FaultRow",
    "LoadClient",
    "acceptance",
    "check_session",
    "format_table",
    "run_chaos",
]

FAULTS: Final = (
    "baseline",
    "redis_kill9",
    "debug_sleep",
    "oom",
    "proxy_cut",
    "replica_switch",
    "bad_publish",
    "server_sigterm",
    "server_sigkill_embedded",
)
"""Every fault :func:`run_chaos` knows, in the order it runs them."""

REDIS_FAULTS: Final = frozenset(
    {"redis_kill9", "debug_sleep", "oom", "proxy_cut", "replica_switch", "bad_publish"}
)
"""Faults of the store: the server must keep every connection and answer ``store_unavailable``."""

OUTAGES: Final = frozenset({"redis_kill9", "debug_sleep", "oom", "replica_switch"})
"""Store faults with a window (``outage_seconds``) in which every new analysis is refused.

Clients busy in an analysis when one starts may not notice it (the commit
asks again until the store is back), so before each injection a few clients
are held at their next ``analyze`` (:meth:`LoadClient.hold`) and let go
only once the fault is in effect: someone always acts while it lasts.
"""
HELD_CLIENTS: Final = 3
"""How many clients are held for each injection of an :data:`OUTAGES` fault."""

DELIBERATE_EXITS: Final = frozenset({"server_sigterm", "server_sigkill_embedded"})
"""Faults that end the server on purpose: it must come back cleanly instead."""

KEY_PREFIX: Final = "portfolio"
TICKERS: Final = ("AAPL", "GOOGL", "MSFT")
IO: Final = 10.0
"""Seconds a client waits for any answer before it counts the request unanswered."""


@attrs.frozen
class ChaosConfig:
    """What :func:`run_chaos` runs; the defaults are the bench's (``bench/chaos.py``)."""

    sessions: int = 50
    injections: int = 3
    faults: tuple[str, ...] = FAULTS
    outage_seconds: float = 2.0  # kill -9 down time, DEBUG SLEEP, OOM and replica windows
    recovery_limit_seconds: float = 5.0  # the acceptance bound; settling waits a bit longer
    warmup_seconds: float = 20.0  # at most, for every client's first analysis
    between_seconds: float = 1.0  # load between one injection's recovery and the next
    metric_delay_seconds: tuple[float, float] = (0.05, 0.3)
    market_update_interval_seconds: float = 1.0
    redis_timeout_seconds: float = 1.0
    shutdown_timeout_seconds: float = 2.0
    think_seconds: float = 0.1  # a client's pause between analyses
    results_limit: int = 20000  # large: the comparison needs every result still stored
    redis_binary: str = "/usr/bin/redis-server"
    workdir: Path | None = None  # kept (logs, AOF) if given; a temporary one otherwise
    log: Callable[[str], None] = attrs.field(default=lambda line: None, eq=False, repr=False)


# -- the fault proxy ---------------------------------------------------------------------


@attrs.define(eq=False)
class ChaosProxy:
    """A TCP proxy to Redis that can hold replies and cut connections.

    Unlike :class:`~trio_portfolio.testing.faults.TcpProxy`, it can hold
    one direction only: with :meth:`hold_replies` set, requests still reach
    Redis (its scripts run) but no reply comes back, so a :meth:`cut` then
    leaves the server with writes whose outcome it cannot know - the
    ambiguous failure that idempotent appends must resolve.
    """

    target_host: str
    target_port: int
    port: int = 0
    cuts: int = 0
    _replies: trio.Event = attrs.field(factory=trio.Event)
    _scopes: set[trio.CancelScope] = attrs.field(factory=set)

    def __attrs_post_init__(self) -> None:
        self._replies.set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold_replies(self, on: bool = True) -> None:
        """Stop (``on``) or resume passing Redis's bytes back to the clients."""
        if on and self._replies.is_set():
            self._replies = trio.Event()
        elif not on:
            self._replies.set()

    def cut(self) -> int:
        """Close every current connection (held bytes are dropped); how many were cut."""
        scopes = list(self._scopes)
        for scope in scopes:
            scope.cancel()
        self.cuts += len(scopes)
        return len(scopes)

    async def run(
        self, *, task_status: trio.TaskStatus[ChaosProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on 127.0.0.1 and proxy until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listeners[0] as listener, trio.open_nursery() as nursery:
            self.port = int(listener.socket.getsockname()[1])
            task_status.started(self)
            while True:
                client = await listener.accept()
                nursery.start_soon(self._serve, client)

    async def _serve(self, client: trio.SocketStream) -> None:
        scope = trio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                async with client:
                    try:
                        upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
                    except OSError:
                        return  # Redis is down: the client sees EOF
                    async with upstream, trio.open_nursery() as pair:
                        pair.start_soon(self._pump, client, upstream, pair.cancel_scope, False)
                        pair.start_soon(self._pump, upstream, client, pair.cancel_scope, True)
        finally:
            self._scopes.discard(scope)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        pair: trio.CancelScope,
        replies: bool,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                while replies and not self._replies.is_set():
                    await self._replies.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        pair.cancel()


# -- processes ---------------------------------------------------------------------------


def _sync_client(url: str, timeout: float = 5.0) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def _wait_ping(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _sync_client(url, 1.0) as client:
                client.ping()
                return
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@attrs.define(eq=False)
class RedisNode:
    """One ``redis-server`` on a fixed port and directory, that can be killed and restarted."""

    binary: str
    directory: Path
    port: int = attrs.field(factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, on the same port and AOF) and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = (self.directory / f"redis-{self.starts}.log").open("wb")
        command = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", os.fspath(self.directory),
            "--appendonly", "yes",
            "--save", "",
            "--enable-debug-command", "yes",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
        ]  # fmt: skip
        with log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        _wait_ping(self.url, 30.0)

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def call(self, *args: Any, timeout: float = 5.0) -> Any:
        with _sync_client(self.url, timeout) as client:
            return client.execute_command(*args)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PORTFOLIO_")}


@attrs.define(eq=False)
class ServerProcess:
    """``python -m trio_portfolio serve`` on a fixed port; restartable with the same flags."""

    args: list[str]
    port: int
    directory: Path
    process: trio.Process | None = None
    starts: int = 0
    exits: list[tuple[str, int | None, float]] = attrs.field(factory=list)  # (how, code, seconds)
    orphans: list[int] = attrs.field(factory=list)  # embedded redis-servers that outlived us

    def log_path(self, n: int | None = None) -> Path:
        return self.directory / f"server-{self.starts if n is None else n}.log"

    async def start(self) -> None:
        """Spawn it; returns at once (readiness is what the clients measure)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        command = [
            sys.executable, "-m", "trio_portfolio", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-format", "text",
            *self.args,
        ]  # fmt: skip
        with self.log_path().open("wb") as log:
            self.process = await trio.lowlevel.open_process(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_clean_env(), cwd=os.fspath(self.directory),
            )  # fmt: skip

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def signal_and_wait(self, signum: signal.Signals, timeout: float = 30.0) -> None:
        """Send ``signum`` and wait for the exit (SIGKILL after ``timeout``); records it."""
        assert self.process is not None
        started = trio.current_time()
        self.process.send_signal(signum)
        with trio.move_on_after(timeout):
            await self.process.wait()
        if self.process.poll() is None:
            self.process.kill()
            await self.process.wait()
        self.exits.append((signum.name, self.process.returncode, trio.current_time() - started))

    async def stop(self) -> None:
        if self.alive():
            await self.signal_and_wait(signal.SIGTERM)

    def embedded_redis_pid(self) -> int | None:
        """The embedded redis-server's pid, from the data dir's pidfile."""
        with contextlib.suppress(OSError, ValueError, TypeError):
            pid = orjson.loads((self.directory / "data" / PIDFILE_NAME).read_bytes())["redis_pid"]
            return int(pid)
        return None

    async def check_gone(self, pid: int | None, within: float = 10.0) -> None:
        """Record ``pid`` in :attr:`orphans` if it still runs after ``within`` seconds."""
        if pid is None:
            return
        with trio.move_on_after(within):
            while _running(pid):  # noqa: ASYNC110  # another process: polling is all there is
                await trio.sleep(0.05)
        if _running(pid):
            self.orphans.append(pid)

    def embedded_url(self) -> str | None:
        """The embedded Redis's URL, from the latest log (``embedded Redis at URL``)."""
        found = re.findall(r"embedded Redis at (\S+)", self.log_path().read_text(errors="replace"))
        return found[-1] if found else None


# -- load --------------------------------------------------------------------------------

ReceivedFrame = tuple[float, int, dict[str, Any]]
"""(arrival time on the Trio clock, connection number, decoded frame)."""


@attrs.define(eq=False)
class LoadClient:
    """One session driven in a loop over real WebSockets, recording everything it receives.

    Loop: ``analyze`` a ticker, read until the analysis ends (complete,
    cancelled other than by ``portfolio_changed`` - which restarts it - or
    an ``error``), pause, repeat; every eighth round a ``set_holdings``
    first.  A dropped connection is counted and reconnected after 0.1 s.
    :meth:`stop` asks it to end after the analysis in flight, so that no
    result is lost to a client that left.
    """

    session_id: str
    port: Callable[[], int]
    think_seconds: float
    rng: random.Random
    frames: list[ReceivedFrame] = attrs.field(factory=list)
    drops: list[tuple[float, int | None]] = attrs.field(factory=list)  # (time, close code)
    unanswered: list[float] = attrs.field(factory=list)
    connections: int = 0
    notes: list[str] = attrs.field(factory=list)
    finished: trio.Event = attrs.field(factory=trio.Event)
    held: trio.Event = attrs.field(factory=trio.Event)
    """Set while the client waits at a gate from :meth:`hold`."""
    _stopping: bool = False
    _gate: trio.Event | None = None

    def stop(self) -> None:
        self._stopping = True
        if self._gate is not None:
            self._gate.set()

    def hold(self, gate: trio.Event) -> None:
        """Before the next ``analyze``, wait until ``gate`` is set (sets :attr:`held` then)."""
        self.held = trio.Event()
        self._gate = gate

    async def _pass_gate(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None and not self._stopping:
            self.held.set()
            await gate.wait()

    def completions(self) -> list[float]:
        return [t for t, _, f in self.frames if f.get("type") == "analysis_complete"]

    async def run(self) -> None:
        """Drive the session until :meth:`stop`; sets :attr:`finished` when it returns."""
        try:
            while not self._stopping:
                connected = leaving = False
                try:
                    async with connect_client(self.port(), self.session_id, timeout=IO) as client:
                        connected = True
                        self.connections += 1
                        await self._drive(client.ws, self.connections)
                        leaving = True
                        return
                except Exception as exc:
                    leaves = _leaves(exc)
                    if leaving and all(isinstance(e, LocalProtocolError) for e in leaves):
                        # trio-websocket issue #184 on our side: a ping of the
                        # server's crossed our close frame and the client library
                        # tried to answer it.  We were leaving anyway.
                        return
                    if not all(isinstance(e, (*_DROPS, LocalProtocolError)) for e in leaves):
                        raise
                    if connected:
                        codes = [
                            e.reason.code
                            for e in leaves
                            if isinstance(e, ConnectionClosed) and e.reason is not None
                        ]
                        self.drops.append((trio.current_time(), next(iter(codes), None)))
                await trio.sleep(0.1)
        finally:
            self.finished.set()

    async def _recv(self, ws: Any, conn: int) -> dict[str, Any]:
        with trio.fail_after(IO):
            frame: dict[str, Any] = orjson.loads(await ws.get_message())
        self.frames.append((trio.current_time(), conn, frame))
        return frame

    async def _request(
        self, ws: Any, conn: int, message: dict[str, Any], done: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any] | None:
        """Send ``message``, read until ``done``; None (counted) if nothing ends it within IO."""
        await ws.send_message(orjson.dumps(message).decode())
        sent = trio.current_time()
        try:
            with trio.fail_after(IO):
                while not done(frame := await self._recv(ws, conn)):
                    pass
                return frame
        except trio.TooSlowError:
            self.unanswered.append(trio.current_time())
            # What answered it so far (market updates apart: they flow all along).
            last = [
                f"+{t - sent:.2f}s {_brief(f)}"
                for t, c, f in self.frames
                if c == conn and t >= sent and f.get("type") != "market_update"
            ][-8:]
            self.notes.append(f"{message['action']} unanswered for {IO:g} s; last frames {last}")
            return None

    async def _drive(self, ws: Any, conn: int) -> None:
        await self._recv(ws, conn)  # the session frame
        rounds = 0
        while not self._stopping:
            rounds += 1
            if rounds % 8 == 0:
                holdings = {t: float(self.rng.randint(1, 200)) for t in TICKERS}
                await self._request(
                    ws, conn, {"action": "set_holdings", "holdings": holdings},
                    lambda f: f.get("type") in ("portfolio", "error"),
                )  # fmt: skip
            ticker = TICKERS[rounds % len(TICKERS)]
            await self._pass_gate()
            end = await self._request(
                ws, conn, {"action": "analyze", "ticker": ticker}, _AnalysisEnd()
            )
            if end is not None and end.get("type") == "error":
                await trio.sleep(0.2)
            else:
                await trio.sleep(self.think_seconds)


@attrs.define
class _AnalysisEnd:
    """Whether a frame ends the analysis an ``analyze`` asked for.

    Frames are read in order, so the request's own analysis is the one of
    the latest ``analysis_started`` (a ``portfolio_changed`` restart starts
    a new one); it ends with ``analysis_complete`` or a cancellation other
    than ``portfolio_changed``.  An ``error`` before any ``analysis_started``
    is the refusal of the request, and one after a ``portfolio_changed``
    cancellation (before the restart's ``analysis_started``) the refusal of
    the restart; errors while an attempt runs (a result not stored) do not
    end the analysis.
    """

    analysis_id: str | None = None
    restarting: bool = False
    """The latest analysis was cancelled ``portfolio_changed``: its restart is due."""

    def __call__(self, frame: dict[str, Any]) -> bool:
        kind = frame.get("type")
        if kind == "analysis_started":
            self.analysis_id = frame.get("analysis_id")
            self.restarting = False
            return False
        if kind == "error":
            # Before any start: the request was refused.  Between a
            # ``portfolio_changed`` cancellation and the restart's
            # ``analysis_started``: the restart was refused (the store could
            # not start it, or the ticker left the holdings), which ends it.
            return self.analysis_id is None or self.restarting
        if frame.get("analysis_id") != self.analysis_id or self.analysis_id is None:
            return False
        if kind == "analysis_cancelled":
            self.restarting = frame.get("reason") == "portfolio_changed"
            return not self.restarting
        return kind == "analysis_complete"


def _brief(frame: dict[str, Any]) -> str:
    """A frame in a few words, for notes."""
    words = [str(frame.get(k)) for k in ("type", "reason", "code", "metric") if k in frame]
    if "analysis_id" in frame:
        words.append(str(frame["analysis_id"])[-8:])
    return " ".join(words)


_DROPS: Final = (
    ConnectionClosed,
    OSError,
    trio.BrokenResourceError,
    trio.TooSlowError,
    HandshakeError,
)
"""What ends a client's connection without being a bug of the client."""


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups; ``[exc]`` for a plain one."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


# -- the store checker -------------------------------------------------------------------


def _finite_positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def check_session(
    portfolio: Portfolio | None, *, seen_version: int, results_limit: int, ttl_ms: int
) -> list[str]:
    """Every stored invariant ``portfolio`` breaks (empty: sound).

    ``seen_version`` is the highest ``portfolio_version`` any client was
    told of (the store must not be below it: versions never go back);
    ``ttl_ms`` is the session key's PTTL (it must expire).
    """
    if portfolio is None:
        return ["session missing"]
    problems: list[str] = []
    if not portfolio.holdings:
        problems.append("no holdings")
    for ticker, quantity in portfolio.holdings.items():
        if not TICKER_RE.match(ticker) or not _finite_positive(quantity):
            problems.append(f"bad holding {ticker}={quantity}")
        if not _finite_positive(portfolio.prices.get(ticker)):
            problems.append(f"no valid price for {ticker}")
    if not problems:
        total = sum(q * portfolio.prices[t] for t, q in portfolio.holdings.items())
        if not math.isclose(total, portfolio.total_value, rel_tol=1e-9, abs_tol=1e-9):
            problems.append(f"total_value {portfolio.total_value} != holdings x prices {total}")
    if portfolio.portfolio_version < max(1, seen_version):
        problems.append(f"version {portfolio.portfolio_version} below one seen ({seen_version})")
    current = portfolio.current_analysis
    if current is not None and (
        not current.analysis_id
        or not TICKER_RE.match(current.ticker)
        or not 1 <= current.portfolio_version <= portfolio.portfolio_version
        or not current.started_at.endswith("Z")
    ):
        problems.append(f"malformed current analysis {current}")
    keys: Counter[tuple[str, str]] = Counter()
    shape: dict[str, tuple[str, int]] = {}
    for result in portfolio.analysis_results:
        keys[(result.analysis_id, result.metric)] += 1
        if result.metric not in METRICS or not math.isfinite(result.value):
            problems.append(f"bad result {result}")
        if not 1 <= result.portfolio_version <= portfolio.portfolio_version:
            problems.append(f"result from the future {result}")
        if shape.setdefault(result.analysis_id, (result.ticker, result.portfolio_version)) != (
            result.ticker,
            result.portfolio_version,
        ):
            problems.append(f"analysis {result.analysis_id} mixes snapshots")
    duplicated = [key for key, n in keys.items() if n > 1]
    if duplicated:
        problems.append(f"{len(duplicated)} results stored twice")
    if len(portfolio.analysis_results) >= results_limit:
        problems.append("results limit reached: the comparison is incomplete")
    if ttl_ms < 0:
        problems.append(f"session key has no expiry (PTTL {ttl_ms})")
    if not SESSION_ID_RE.match(portfolio.session_id):
        problems.append("bad session id")
    return problems


# -- one fault, measured -----------------------------------------------------------------


@attrs.define
class FaultRow:
    """What one fault did, over all its injections."""

    fault: str
    sessions: int
    injections: int = 0
    dropped: int = 0
    errors: Counter[str] = attrs.field(factory=Counter)
    unanswered: int = 0
    analyses: int = 0
    streamed: int = 0
    stored_not_streamed: int = 0
    shown_on_reconnect: int = 0  # of those, in a later session frame's analysis_results
    streamed_not_stored: int = 0
    streamed_twice: int = 0
    corrupt: int = 0
    recovery_seconds: float | None = 0.0  # None: some client did not recover in time
    server: str = "survived"
    server_ok: bool = True
    notes: list[str] = attrs.field(factory=list)


def acceptance(row: FaultRow, recovery_limit: float = 5.0) -> list[str]:
    """The acceptance line's violations for ``row`` (empty: it passes).

    For every fault: nothing stored-not-streamed or streamed-not-stored (or
    twice), no corrupt session, the server up (or, for a deliberate
    SIGTERM/SIGKILL, back cleanly), every client's next analysis complete
    within ``recovery_limit`` of the fault's end.  One exception: results a
    SIGKILLed server had stored but not yet sent are excused if the
    reconnecting client's ``session`` frame showed every one of them
    (commit-then-send cannot outlive its sender).  For store faults also:
    no connection dropped, no request unanswered, and no error but
    ``store_unavailable``.
    """
    problems: list[str] = []
    for name in ("stored_not_streamed", "streamed_not_stored", "streamed_twice", "corrupt"):
        if getattr(row, name):
            problems.append(f"{name}={getattr(row, name)}")
    if row.fault == "server_sigkill_embedded" and row.stored_not_streamed == row.shown_on_reconnect:
        # A SIGKILL between a result's commit and its send cannot be streamed by anyone;
        # what can hold is that the reconnecting client is shown it.
        problems = [p for p in problems if not p.startswith("stored_not_streamed")]
    if not row.server_ok:
        problems.append(f"server: {row.server}")
    if row.recovery_seconds is None or row.recovery_seconds > recovery_limit:
        problems.append(f"recovery {row.recovery_seconds} s > {recovery_limit} s")
    if row.injections == 0 and row.fault != "baseline":
        problems.append("never injected")
    if row.fault in REDIS_FAULTS or row.fault == "baseline":
        if row.dropped:
            problems.append(f"{row.dropped} connections dropped")
        if row.unanswered:
            problems.append(f"{row.unanswered} requests unanswered")
        other = {code: n for code, n in row.errors.items() if code != "store_unavailable"}
        if other:
            problems.append(f"errors other than store_unavailable: {other}")
    return problems


def _fmt_errors(errors: Counter[str]) -> str:
    return ",".join(f"{code}:{n}" for code, n in sorted(errors.items())) or "-"


def _fmt_missing(row: FaultRow) -> str:
    if row.stored_not_streamed and row.shown_on_reconnect:
        return f"{row.stored_not_streamed} ({row.shown_on_reconnect} shown on reconnect)"
    return str(row.stored_not_streamed)


def format_table(rows: Sequence[FaultRow], recovery_limit: float = 5.0) -> str:
    """The chaos table, one line per fault, as a Markdown table."""
    header = (
        "fault", "inj", "sessions", "analyses", "streamed", "dropped", "errors by code",
        "unanswered", "stored-not-streamed", "streamed-not-stored", "twice", "corrupt",
        "recovery s", "server", "acceptance",
    )  # fmt: skip
    lines = [header]
    for row in rows:
        verdict = acceptance(row, recovery_limit)
        recovery = "never" if row.recovery_seconds is None else f"{row.recovery_seconds:.2f}"
        lines.append(
            (
                row.fault, str(row.injections), str(row.sessions), str(row.analyses),
                str(row.streamed), str(row.dropped), _fmt_errors(row.errors),
                str(row.unanswered), _fmt_missing(row), str(row.streamed_not_stored),
                str(row.streamed_twice), str(row.corrupt), recovery, row.server,
                "ok" if not verdict else "FAIL: " + "; ".join(verdict),
            )
        )  # fmt: skip
    out = ["| " + " | ".join(line) + " |" for line in lines]
    out.insert(1, "|" + "---|" * len(header))
    return "\n".join(out)


async def _thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


@attrs.define(eq=False)
class _Rig:
    """The running parts: Redis, its replica, the proxy, the server(s)."""

    config: ChaosConfig
    workdir: Path
    primary: RedisNode
    replica: RedisNode
    proxy: ChaosProxy
    server: ServerProcess
    nursery: trio.Nursery

    def server_args(self, redis_url: str | None) -> list[str]:
        low, high = self.config.metric_delay_seconds
        args = [
            "--metric-delay-seconds", f"{low},{high}",
            "--market-update-interval-seconds", str(self.config.market_update_interval_seconds),
            "--redis-timeout-seconds", str(self.config.redis_timeout_seconds),
            "--shutdown-timeout-seconds", str(self.config.shutdown_timeout_seconds),
            "--results-limit", str(self.config.results_limit),
            "--sessions-per-second", "1000", "--session-burst", "1000",
            "--log-level", "info",
        ]  # fmt: skip
        if redis_url is not None:
            args += ["--redis-url", redis_url]
        return args


async def _read_store(
    url: str, session_ids: Sequence[str]
) -> dict[str, tuple[Portfolio | None, int, str | None]]:
    """Each session as stored (or the error reading it), with its key's PTTL."""
    out: dict[str, tuple[Portfolio | None, int, str | None]] = {}
    keys = SessionKeys(KEY_PREFIX)
    async with open_redis(url, timeout=10.0) as client:
        store = await open_store(client, key_prefix=KEY_PREFIX, results_limit=10**9)
        for sid in session_ids:
            try:
                portfolio = await store.get(sid)
                ttl = int(await client.execute("PTTL", keys.session(sid)))
            except Exception as exc:  # a session the store cannot read is corrupt
                out[sid] = (None, -3, f"{type(exc).__name__}: {exc}")
            else:
                out[sid] = (portfolio, ttl, None)
    return out


async def _run_fault(rig: _Rig, fault: str, phase: int) -> FaultRow:
    config = rig.config
    row = FaultRow(fault, config.sessions)
    server = rig.server
    store_url = rig.primary.url
    if fault == "server_sigkill_embedded":
        args = [*rig.server_args(None), "--data-dir", "data"]
        server = ServerProcess(args, free_port(), rig.workdir / "embedded")
        await server.start()
    elif not server.alive():
        await server.start()
    rng = random.Random(phase)
    clients = [
        LoadClient(
            f"chaos{phase}-{fault[:12]}-{i:03d}", lambda: server.port, config.think_seconds, rng
        )
        for i in range(config.sessions)
    ]
    config.log(f"{fault}: {len(clients)} sessions")
    async with trio.open_nursery() as load:
        for client in clients:
            load.start_soon(client.run)
        with trio.move_on_after(config.warmup_seconds):
            while not all(c.completions() for c in clients):  # noqa: ASYNC110  # polling
                await trio.sleep(0.1)
        if not all(c.completions() for c in clients):
            row.notes.append("warm-up: not every client completed an analysis")
        for k in range(config.injections if fault != "baseline" else 1):
            config.log(f"{fault}: injection {k + 1}")
            gate = trio.Event()
            try:
                if fault in OUTAGES:
                    await _hold_some(clients, gate, rng, row)
                ended = await _inject(rig, fault, server, clients, in_effect=gate.set)
            finally:
                gate.set()
            row.injections += fault != "baseline"
            recovery = await _await_recovery(
                clients, ended, max(15.0, 3 * config.recovery_limit_seconds)
            )
            if recovery is None or row.recovery_seconds is None:
                row.recovery_seconds = None
            else:
                row.recovery_seconds = max(row.recovery_seconds, recovery)
            if fault in REDIS_FAULTS and not server.alive():
                break
            await trio.sleep(config.between_seconds)
        for client in clients:
            client.stop()
        with trio.move_on_after(IO + 5):
            for client in clients:
                await client.finished.wait()
        load.cancel_scope.cancel()
    if fault == "bad_publish" and server.alive():
        seen = await _metric_sum(server.port, ("undecodable", "malformed"))
        row.notes.append(f"bad payloads counted by the server: {seen:g}")
        if seen < row.injections * len(clients):
            row.server_ok = False
            row.server = f"survived, but counted {seen:g} bad payloads (the fault was not felt)"
    if fault == "server_sigkill_embedded":
        url = server.embedded_url()
        if url is None:
            row.notes.append("no embedded Redis URL in the log")
        else:
            store_url = url
    try:
        stored = await _read_store(store_url, [c.session_id for c in clients])
    except Exception as exc:
        row.notes.append(f"store unreadable: {exc}")
        stored = {}
    _compare(row, clients, stored, config.results_limit)
    if fault in DELIBERATE_EXITS:
        exits = server.exits[-row.injections :] if row.injections else []
        bad = [e for e in exits if e[0] == "SIGTERM" and e[1] != 0]
        slow = [
            e for e in exits if e[0] == "SIGTERM" and e[2] > config.shutdown_timeout_seconds + 2
        ]
        row.server = "restarted x{}: {}".format(
            len(exits),
            ", ".join(f"{how} exit {code} in {secs:.1f}s" for how, code, secs in exits[:1]),
        )
        row.server_ok = server.alive() and not bad and not slow
        if not server.alive():
            row.server += "; not running at the end"
    elif not server.alive():
        assert server.process is not None
        row.server = f"EXITED (code {server.process.returncode})"
        row.server_ok = False
        await server.start()  # so the next fault still has a server
    if fault == "server_sigkill_embedded":
        redis_pid = server.embedded_redis_pid()
        await server.stop()
        await server.check_gone(redis_pid)
        if server.orphans:
            row.server_ok = False
            row.server += f"; redis-server left running: {server.orphans}"
    return row


async def _metric_sum(port: int, words: Sequence[str]) -> float:
    """The sum of the server's ``/metrics`` samples whose name holds one of ``words``."""
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    data = bytearray()
    with trio.fail_after(IO):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request)
            while chunk := await stream.receive_some(65536):
                data += chunk
    total = 0.0
    for line in bytes(data).decode(errors="replace").splitlines():
        name, _, value = line.partition(" ")
        if not line.startswith("#") and any(w in name for w in words) and "_created" not in name:
            with contextlib.suppress(ValueError):
                total += float(value)
    return total


async def _await_recovery(
    clients: Sequence[LoadClient], ended: float, within: float
) -> float | None:
    """Seconds from ``ended`` until every client completed an analysis; None past ``within``."""
    with trio.move_on_after(within):
        while True:
            firsts = [next((t for t in c.completions() if t > ended), None) for c in clients]
            if all(t is not None for t in firsts):
                return max(t - ended for t in firsts if t is not None)
            await trio.sleep(0.05)
    return None


async def _hold_some(
    clients: Sequence[LoadClient], gate: trio.Event, rng: random.Random, row: FaultRow
) -> None:
    """Hold :data:`HELD_CLIENTS` clients at their next ``analyze`` until ``gate`` is set.

    Waits (at most :data:`IO`) until they are waiting there, so that once
    the fault is in effect they act inside it.
    """
    held = rng.sample(list(clients), min(HELD_CLIENTS, len(clients)))
    for client in held:
        client.hold(gate)
    with trio.move_on_after(IO):
        for client in held:
            await client.held.wait()
    if not all(client.held.is_set() for client in held):
        row.notes.append("held clients did not all reach their next analyze before the fault")


async def _inject(
    rig: _Rig,
    fault: str,
    server: ServerProcess,
    clients: Sequence[LoadClient],
    *,
    in_effect: Callable[[], None] = lambda: None,
) -> float:
    """Inject ``fault`` once; the Trio time at which it ended.

    ``in_effect`` is called once the fault is in effect (for an
    :data:`OUTAGES` fault: at the start of its window).
    """
    config = rig.config
    primary = rig.primary
    if fault == "baseline":
        pass
    elif fault == "redis_kill9":
        await _thread(primary.kill9)
        in_effect()
        await trio.sleep(config.outage_seconds)
        await _thread(primary.start)
        await _thread(lambda: rig.replica.call("REPLICAOF", "127.0.0.1", primary.port))
    elif fault == "debug_sleep":
        seconds = config.outage_seconds
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _thread, lambda: primary.call("DEBUG", "SLEEP", seconds, timeout=seconds + 5)
            )
            await trio.sleep(min(0.2, seconds / 4))  # Redis is inside the DEBUG SLEEP
            in_effect()
    elif fault == "oom":
        await _thread(lambda: primary.call("CONFIG", "SET", "maxmemory", "1"))
        in_effect()
        await trio.sleep(config.outage_seconds)
        await _thread(lambda: primary.call("CONFIG", "SET", "maxmemory", "0"))
    elif fault == "proxy_cut":
        rig.proxy.hold_replies(True)
        await trio.sleep(0.3)
        rig.proxy.cut()
        rig.proxy.hold_replies(False)
    elif fault == "replica_switch":
        await _thread(lambda: _switch_to_replica(primary, rig.replica))
        in_effect()
        await trio.sleep(config.outage_seconds)
        await _thread(lambda: _switch_back(primary, rig.replica))
    elif fault == "bad_publish":
        keys = SessionKeys(KEY_PREFIX)

        def publish() -> None:
            for client in clients:
                primary.call("PUBLISH", keys.events(client.session_id), b"\xff\xfe")
                primary.call("PUBLISH", keys.events(client.session_id), b'{"type":"\xc3"}')

        await _thread(publish)
    elif fault == "server_sigterm":
        await server.signal_and_wait(signal.SIGTERM)
        await server.start()
    elif fault == "server_sigkill_embedded":
        redis_pid = server.embedded_redis_pid()
        await server.signal_and_wait(signal.SIGKILL)
        await server.start()
        ended = trio.current_time()
        await server.check_gone(redis_pid)
        return ended
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    return trio.current_time()


def _offsets_equal(primary: RedisNode, replica: RedisNode) -> bool:
    ours = primary.call("INFO", "replication")
    theirs = replica.call("INFO", "replication")
    return bool(ours["master_repl_offset"] == theirs.get("slave_repl_offset", -1))


def _switch_to_replica(primary: RedisNode, replica: RedisNode) -> None:
    """Make ``primary`` a replica of ``replica`` without losing a write.

    Writes are first refused (``NOREPLICAS``) until the replica has caught
    up; then the replica is promoted and the old primary follows it, so its
    partial resync keeps every write.
    """
    primary.call("CONFIG", "SET", "min-replicas-to-write", "10")
    deadline = time.monotonic() + 5
    while not _offsets_equal(primary, replica) and time.monotonic() < deadline:
        time.sleep(0.01)
    replica.call("REPLICAOF", "NO", "ONE")
    primary.call("REPLICAOF", "127.0.0.1", str(replica.port))
    primary.call("CONFIG", "SET", "min-replicas-to-write", "0")


def _switch_back(primary: RedisNode, replica: RedisNode) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        info = primary.call("INFO", "replication")
        if info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == 0:
            break
        time.sleep(0.01)
    primary.call("REPLICAOF", "NO", "ONE")
    replica.call("REPLICAOF", "127.0.0.1", str(primary.port))


def _compare(
    row: FaultRow,
    clients: Sequence[LoadClient],
    stored: dict[str, tuple[Portfolio | None, int, str | None]],
    results_limit: int,
) -> None:
    for client in clients:
        row.notes.extend(f"{client.session_id}: {note}" for note in client.notes[:2])
        row.dropped += len(client.drops)
        row.unanswered += len(client.unanswered)
        received: Counter[tuple[str, str]] = Counter()
        seen_version = 0
        for _, _, frame in client.frames:
            kind = frame.get("type")
            if kind == "error":
                row.errors[str(frame.get("code"))] += 1
            elif kind == "analysis_result":
                received[(frame["analysis_id"], frame["metric"])] += 1
            elif kind == "analysis_complete":
                row.analyses += 1
            version = frame.get(
                "portfolio_version", frame.get("portfolio", {}).get("portfolio_version")
            )
            if isinstance(version, int):
                seen_version = max(seen_version, version)
        row.streamed += sum(received.values())
        row.streamed_twice += sum(n - 1 for n in received.values() if n > 1)
        portfolio, ttl, error = stored.get(client.session_id, (None, -3, "not read"))
        if error is not None:
            row.corrupt += 1
            row.notes.append(f"{client.session_id}: {error}")
            continue
        problems = check_session(
            portfolio, seen_version=seen_version, results_limit=results_limit, ttl_ms=ttl
        )
        if problems:
            row.corrupt += 1
            row.notes.append(f"{client.session_id}: {'; '.join(problems)}")
        if portfolio is None:
            continue
        kept = {(r.analysis_id, r.metric) for r in portfolio.analysis_results}
        missing = kept - received.keys()
        row.stored_not_streamed += len(missing)
        greeted = {
            (r["analysis_id"], r["metric"])
            for _, _, f in client.frames
            if f.get("type") == "session"
            for r in f.get("portfolio", {}).get("analysis_results", [])
        }
        row.shown_on_reconnect += len(missing & greeted)
        row.streamed_not_stored += len(received.keys() - kept)


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="chaos-") as name:
        yield Path(name)


@contextlib.asynccontextmanager
async def _open_rig(config: ChaosConfig, workdir: Path) -> AsyncIterator[_Rig]:
    primary = RedisNode(config.redis_binary, workdir / "primary")
    replica = RedisNode(config.redis_binary, workdir / "replica")
    try:
        await _thread(primary.start)
        await _thread(replica.start)
        await _thread(lambda: replica.call("REPLICAOF", "127.0.0.1", primary.port))
        async with open_service_nursery() as nursery:
            proxy: ChaosProxy = await nursery.start(ChaosProxy("127.0.0.1", primary.port).run)
            server = ServerProcess([], free_port(), workdir / "server")
            rig = _Rig(config, workdir, primary, replica, proxy, server, nursery)
            server.args = rig.server_args(proxy.url)
            try:
                yield rig
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(40):
                    await server.stop()
                nursery.cancel_scope.cancel()
    finally:
        await _thread(primary.stop)
        await _thread(replica.stop)


async def run_chaos(config: ChaosConfig) -> list[FaultRow]:
    """Run every fault of ``config`` in turn; one :class:`FaultRow` each.

    Raises :class:`ValueError` for an unknown fault (before anything
    starts) and whatever starting Redis raises.
    """
    unknown = set(config.faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    rows: list[FaultRow] = []
    with _workdir(config.workdir) as workdir:
        async with _open_rig(config, workdir) as rig:
            for phase, fault in enumerate(config.faults):
                rows.append(await _run_fault(rig, fault, phase))
                config.log(format_table(rows[-1:], config.recovery_limit_seconds).splitlines()[-1])
    return rows
