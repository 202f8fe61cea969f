"""Every series ``/metrics`` exports, declared once, on ``prometheus_client``.

Theory of operation
===================

The *catalogue* below is the only place a metric is named: each
:class:`MetricSpec` gives its name (without the ``trio_portfolio_`` prefix),
kind, help text and label with every value the label can take.  Nothing
else in the code spells a metric name; callers go through the typed methods
of :class:`ServerMetrics` (``metrics.analysis_cancelled(CancelReason.SWITCHED)``),
so a typo is a type error, not a silently new series.

A :class:`ServerMetrics` belongs to one server and builds its metrics on its
own private :class:`prometheus_client.CollectorRegistry`: two servers in one
process (as in the tests) never share a number, and nothing is registered
globally.  Two kinds of series live there:

*Pushed* series are ``prometheus_client`` counters, gauges and histograms
bumped where the event happens (an analysis starts, a result is committed,
an error frame is sent).  Every labelled counter has each of its label
values created at start-up, so every series reads 0 before its first event
instead of appearing from nowhere.

*Pulled* series are read from their owners when ``/metrics`` is scraped:
the Redis adapter's :meth:`~trio_portfolio.redis_io.RedisClient.statistics`
(and, on a cluster, the router's ``cluster_statistics()``: redirects, retries,
slot-map refreshes, script reloads), the write-and-WAIT counters of
:class:`~trio_portfolio.store.replication.ReplicaWait`, the pub/sub
connection's counters, the session-events hub's drops and the number of open
connections.  Each owner is a :class:`StatisticsGroup`: the
keys it is known to report are declared in the catalogue (help text,
counter or gauge); a key the owner reports that the catalogue does not know
yet is still exported, as a gauge named ``<group prefix><key>``, so counters
added to the adapter reach ``/metrics`` without a change here (declare them
to give them a help text and the right kind).

Rendering is :func:`prometheus_client.generate_latest`: the Prometheus text
format 0.0.4 (:data:`CONTENT_TYPE`), which ``prometheus_client``'s own
parser reads back.  Counters carry the ``_created`` timestamps
``prometheus_client`` adds by default; switching them off is process-global
(``disable_created_metrics``), which a library must not do.

Cost: a pushed update is a lock and an add (cheap enough for every frame);
a scrape reads a few attributes of each owner and never awaits.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trio_portfolio.models import AppendStatus
from trio_portfolio.protocol import CancelReason, ErrorCode

__all__ = [
    "CATALOGUE",
    "CONTENT_TYPE",
    "PREFIX",
    "STATISTICS_GROUPS",
    "Kind",
    "MetricSpec",
    "Refusal",
    "ServerMetrics",
    "StatisticsGroup",
]

PREFIX = "trio_portfolio"
"""Namespace of every series (``trio_portfolio_<name>``)."""

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The content type of what :meth:`ServerMetrics.exposition` returns."""

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""Latency buckets (seconds): half a millisecond (a pipelined Redis call) to seconds."""


class Kind(enum.Enum):
    """The Prometheus type of a series."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class Refusal(enum.StrEnum):
    """Refusals counted under ``errors`` that are not ``error`` frames (``ErrorCode``)."""

    TOO_MANY_CONNECTIONS = "too_many_connections"  # handshake answered 503
    TOO_MANY_CONNECTIONS_PER_ADDRESS = "too_many_connections_per_address"  # 429
    SESSION_RATE_LIMITED = "session_rate_limited"  # POST /session or a creating connect: 429
    TOO_MANY_SESSIONS = "too_many_sessions"  # the global cap on live sessions: 503
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"  # handshake or POST /session: 403
    CREDENTIAL_MISSING = "credential_missing"  # authentication on, none presented: 401
    CREDENTIAL_INVALID = "credential_invalid"  # wrong, or another session's: 403
    NOT_READY = "not_ready"  # a handshake before the store is open: 503
    FLOOD = "flood"  # closed with 1008 for flooding past the rate limit
    MESSAGE_TOO_BIG = "message_too_big"  # closed with 1009 by trio-websocket
    INVALID_UTF8 = "invalid_utf8"  # closed with 1007: a text frame that is not UTF-8
    SLOW_CLIENT = "slow_client"  # closed with 1008: outbox over its byte budget, or a send stuck
    PING_TIMEOUT = "ping_timeout"  # closed with 1011: no pong within --ping-timeout-seconds
    IDLE_TIMEOUT = "idle_timeout"  # closed with 1000: no client frame for --idle-timeout-seconds


@attrs.frozen
class MetricSpec:
    """One series: name without prefix (and without ``_total``), kind, help, label."""

    name: str
    kind: Kind
    help: str
    label: str | None = None
    label_values: tuple[str, ...] = ()
    """Every value ``label`` can take; each series exists (at 0) from start-up."""

    @property
    def full_name(self) -> str:
        """The family name, e.g. ``trio_portfolio_errors``."""
        return f"{PREFIX}_{self.name}"

    @property
    def series(self) -> str:
        """The sample name a scrape shows (``_total`` for counters, e.g. in README)."""
        return self.full_name + ("_total" if self.kind is Kind.COUNTER else "")


def _values(enum_type: type[enum.Enum], *skip: enum.Enum) -> tuple[str, ...]:
    return tuple(str(member.value) for member in enum_type if member not in skip)


# -- the catalogue: pushed series ----------------------------------------------------------

ANALYSES_STARTED = MetricSpec(
    "analyses_started", Kind.COUNTER, "analysis attempts started (a snapshot was taken)"
)
ANALYSES_COMPLETED = MetricSpec(
    "analyses_completed", Kind.COUNTER, "analyses that delivered all five results"
)
ANALYSES_CANCELLED = MetricSpec(
    "analyses_cancelled",
    Kind.COUNTER,
    "analyses stopped early, by reason",
    label="reason",
    label_values=_values(CancelReason),
)
RESULTS_COMMITTED = MetricSpec(
    "results_committed", Kind.COUNTER, "results stored by the fenced append (and then sent)"
)
FENCED_WRITES_REJECTED = MetricSpec(
    "fenced_writes_rejected",
    Kind.COUNTER,
    "results refused by the fenced append, by status",
    label="status",
    label_values=_values(AppendStatus, AppendStatus.STORED),
)
ERRORS = MetricSpec(
    "errors",
    Kind.COUNTER,
    "error frames and refusals, by code",
    label="code",
    label_values=tuple(dict.fromkeys(_values(ErrorCode) + _values(Refusal))),
)
EVENTS_DROPPED = MetricSpec(
    "events_dropped",
    Kind.COUNTER,
    "session events dropped because a connection's control loop lagged",
)
MARKET_TICKS = MetricSpec(
    "market_ticks", Kind.COUNTER, "market ticks taken by this process (as leader)"
)
SESSIONS_REVALUED = MetricSpec(
    "sessions_revalued", Kind.COUNTER, "session revaluations by market revaluation passes"
)
SESSIONS = MetricSpec(
    "sessions",
    Kind.GAUGE,
    "live sessions in the store, as counted by the last pass this process walked alone",
)
MARKET_TICKS_SKIPPED = MetricSpec(
    "market_ticks_skipped",
    Kind.COUNTER,
    "tick slots skipped because an advance of prices overran its interval",
)
MARKET_TICKERS = MetricSpec(
    "market_tickers", Kind.GAUGE, "tickers the market prices, as of the last tick this process took"
)
MARKET_TICKERS_PRUNED = MetricSpec(
    "market_tickers_pruned",
    Kind.COUNTER,
    "tickers dropped from the market because no live session held them",
)
MARKET_TICKERS_LET_GO = MetricSpec(
    "market_tickers_let_go",
    Kind.COUNTER,
    "tickers dropped from the market at once when the last session holding them let them go",
)
MARKET_TICK_SECONDS = MetricSpec(
    "market_tick_seconds",
    Kind.HISTOGRAM,
    "duration of a market tick's advance of prices (the revaluation is a pass)",
)
MARKET_PASSES = MetricSpec(
    "market_passes",
    Kind.COUNTER,
    "revaluation passes of every session this process completed (finished the last bucket of)",
)
MARKET_PASS_SECONDS = MetricSpec(
    "market_pass_seconds",
    Kind.HISTOGRAM,
    "duration of a revaluation pass, open to last bucket done, of passes this process completed",
)
MARKET_PASS_LAG = MetricSpec(
    "market_pass_lag_ticks",
    Kind.GAUGE,
    "ticks the market was past the tick of the last pass this process completed (0: keeping up)",
)
REDIS_CALL_SECONDS = MetricSpec(
    "redis_call_seconds",
    Kind.HISTOGRAM,
    "latency of one Redis call (command, pipeline or script)",
)

CATALOGUE: tuple[MetricSpec, ...] = (
    ANALYSES_STARTED,
    ANALYSES_COMPLETED,
    ANALYSES_CANCELLED,
    RESULTS_COMMITTED,
    FENCED_WRITES_REJECTED,
    ERRORS,
    EVENTS_DROPPED,
    MARKET_TICKS,
    SESSIONS_REVALUED,
    SESSIONS,
    MARKET_TICKS_SKIPPED,
    MARKET_TICKERS,
    MARKET_TICKERS_PRUNED,
    MARKET_TICKERS_LET_GO,
    MARKET_TICK_SECONDS,
    MARKET_PASSES,
    MARKET_PASS_SECONDS,
    MARKET_PASS_LAG,
    REDIS_CALL_SECONDS,
)
"""The pushed series, bumped through :class:`ServerMetrics` methods."""


# -- the catalogue: pulled series --------------------------------------------------------


@attrs.frozen
class StatisticsGroup:
    """Series read at scrape time from one owner: its known keys and their specs.

    A key the owner reports beyond ``known`` is exported as a gauge named
    ``prefix + key`` (a gauge, because a counter must never go down and an
    unknown key may).
    """

    owner: str
    prefix: str
    known: tuple[tuple[str, MetricSpec], ...]

    def spec(self, key: str) -> MetricSpec:
        """The declared spec of ``key``, or an undeclared gauge for it."""
        for known_key, spec in self.known:
            if known_key == key:
                return spec
        return MetricSpec(self.prefix + key, Kind.GAUGE, f"{self.owner}: {key}")


def _group(owner: str, prefix: str, **known: tuple[Kind, str]) -> StatisticsGroup:
    return StatisticsGroup(
        owner,
        prefix,
        tuple(
            (key, MetricSpec(prefix + key, kind, help_text))
            for key, (kind, help_text) in known.items()
        ),
    )


CONNECTIONS = StatisticsGroup(
    "server",
    "",
    (
        (
            "connections_open",
            MetricSpec("connections_open", Kind.GAUGE, "open WebSocket connections"),
        ),
    ),
)
REDIS_CLIENT = _group(
    "RedisClient.statistics()",
    "redis_",
    commands=(Kind.COUNTER, "calls written to Redis (a pipeline or script counts once)"),
    errors_unavailable=(Kind.COUNTER, "calls failed with StoreUnavailable"),
    command_errors=(Kind.COUNTER, "calls answered with a genuine command error"),
    timeouts=(Kind.COUNTER, "calls whose reply did not come in time (only that call fails)"),
    connects=(Kind.COUNTER, "connections to Redis made (the first ones included)"),
    reconnects=(Kind.COUNTER, "connections made to replace a lost or retired one"),
    connect_failures=(Kind.COUNTER, "connection attempts to Redis that failed"),
    cancelled_in_flight=(
        Kind.COUNTER,
        "calls cancelled before their reply came (the reply is discarded)",
    ),
    replies_discarded=(Kind.COUNTER, "late replies of abandoned calls, read and dropped"),
    replies_undecodable=(Kind.COUNTER, "replies that were not UTF-8 (only that call failed)"),
    connections_stalled=(Kind.COUNTER, "connections closed by the stall watchdog"),
    read_only_resets=(Kind.COUNTER, "READONLY replies that retired every connection"),
    probes=(Kind.COUNTER, "write probes made by /ready on the dedicated connection"),
    probe_failures=(Kind.COUNTER, "write probes that failed"),
    connections_open=(Kind.GAUGE, "command connections to Redis open now"),
    in_flight=(Kind.GAUGE, "calls queued or written and not yet answered"),
)
PUBSUB = _group(
    "PubSub",
    "pubsub_",
    connects=(Kind.COUNTER, "pub/sub connections made (the first one included)"),
    reconnects=(Kind.COUNTER, "pub/sub connections made after the first"),
    messages_received=(Kind.COUNTER, "pub/sub messages received"),
    dropped=(Kind.COUNTER, "pub/sub messages dropped because the events hub lagged"),
    messages_dropped_undecodable=(
        Kind.COUNTER,
        "pub/sub messages dropped because they were not UTF-8",
    ),
    connected=(Kind.GAUGE, "1 while the pub/sub connection is up"),
    channels_wanted=(Kind.GAUGE, "channels this process wants subscribed"),
    channels_confirmed=(Kind.GAUGE, "channels Redis confirmed subscribed"),
)
REDIS_CLUSTER = _group(
    "ClusterClient.cluster_statistics()",
    "redis_cluster_",
    moved=(Kind.COUNTER, "MOVED redirects followed (the slot map updated, the call retried)"),
    ask=(Kind.COUNTER, "ASK redirects followed (ASKING and the call sent to the importing node)"),
    try_again=(Kind.COUNTER, "TRYAGAIN replies retried after a pause (a slot mid-resharding)"),
    refreshes=(Kind.COUNTER, "slot-map refreshes (CLUSTER SHARDS, or CLUSTER SLOTS)"),
    refresh_failures=(Kind.COUNTER, "slot-map refreshes that found no node answering"),
    scripts_reloaded=(Kind.COUNTER, "scripts loaded again on a node that answered NOSCRIPT"),
    cross_slot_refused=(Kind.COUNTER, "calls refused before sending: keys in several slots"),
    nodes=(Kind.GAUGE, "node clients the router holds (0 when not on a cluster)"),
    masters=(Kind.GAUGE, "masters in the slot map (0 when not on a cluster)"),
)
REPLICA_WAIT = _group(
    "ReplicaWait.statistics()",
    "replica_wait_",
    waits=(Kind.COUNTER, "result writes followed by WAIT (--wait-replicas on)"),
    acknowledged=(Kind.COUNTER, "waits that --wait-replicas replicas acknowledged in time"),
    short=(
        Kind.COUNTER,
        "waits fewer replicas acknowledged within --wait-replicas-timeout-ms (result sent anyway)",
    ),
    unconfirmed=(
        Kind.COUNTER,
        "writes redirected (MOVED/ASK) or whose WAIT was refused: stored, not waited for",
    ),
    connections_open=(Kind.GAUGE, "dedicated write-and-WAIT connections open now"),
)
SESSION_EVENTS = StatisticsGroup(
    "SessionEvents",
    "session_events_",
    (
        (
            "dropped",
            MetricSpec(
                "session_events_dropped",
                Kind.COUNTER,
                "session events dropped by the hub because a watcher's buffer was full",
            ),
        ),
        (
            "malformed",
            MetricSpec(
                "session_events_malformed",
                Kind.COUNTER,
                "session events dropped by the hub because they could not be parsed",
            ),
        ),
        (
            "sessions_watched",
            MetricSpec("sessions_watched", Kind.GAUGE, "sessions with local watchers"),
        ),
    ),
)

STATISTICS_GROUPS: tuple[StatisticsGroup, ...] = (
    CONNECTIONS,
    REDIS_CLIENT,
    REDIS_CLUSTER,
    REPLICA_WAIT,
    PUBSUB,
    SESSION_EVENTS,
)
"""The pulled series, read from their owners (see :meth:`ServerMetrics.watch_redis` ...)."""


def all_specs() -> tuple[MetricSpec, ...]:
    """Every declared series, pushed and pulled (what README's table lists)."""
    return CATALOGUE + tuple(spec for group in STATISTICS_GROUPS for _, spec in group.known)


# -- reading owners -------------------------------------------------------------------------


class _PubSubLike(Protocol):
    connected: bool


class _EventsLike(Protocol):
    @property
    def sessions_watched(self) -> int: ...


class _StatisticsOwner(Protocol):
    def statistics(self) -> object: ...


Reading = Mapping[str, float]


def numeric_fields(value: object) -> dict[str, float]:
    """The numeric fields of a statistics value (attrs class, mapping or plain object)."""
    if attrs.has(type(value)):
        raw: Mapping[str, object] = attrs.asdict(value, recurse=False)  # type: ignore[arg-type]
    elif isinstance(value, Mapping):
        raw = value
    else:
        raw = getattr(value, "__dict__", {})
    return {
        str(key): float(field)
        for key, field in raw.items()
        if isinstance(field, int | float) and not str(key).startswith("_")
    }


def _read_owner(owner: object, attributes: tuple[str, ...]) -> dict[str, float]:
    """``attributes`` of ``owner`` that exist, then whatever its ``statistics()`` reports."""
    reading = {name: float(getattr(owner, name)) for name in attributes if hasattr(owner, name)}
    statistics = getattr(owner, "statistics", None)
    if callable(statistics):
        reading.update(numeric_fields(statistics()))
    return reading


class _Pulled(Collector):
    """The registry's collector for :data:`STATISTICS_GROUPS`, read at scrape time."""

    def __init__(self, reserved: frozenset[str]) -> None:
        self.readers: dict[StatisticsGroup, Callable[[], Reading]] = {}
        self._reserved = reserved

    def collect(self) -> Iterator[Metric]:
        for group in STATISTICS_GROUPS:
            read = self.readers.get(group)
            reading = dict(read()) if read is not None else {}
            for key, spec in group.known:
                yield _family(spec, reading.pop(key, 0.0))
            for key, value in sorted(reading.items()):
                spec = group.spec(key)
                if spec.full_name not in self._reserved:
                    yield _family(spec, value)


def _family(spec: MetricSpec, value: float) -> Metric:
    if spec.kind is Kind.COUNTER:
        return CounterMetricFamily(spec.full_name, spec.help, value=value)
    return GaugeMetricFamily(spec.full_name, spec.help, value=value)


# -- the per-server registry ----------------------------------------------------------------


class ServerMetrics:
    """One server's metrics on a private registry; see the module docstring.

    Every method is synchronous, never raises for a well-typed argument and
    is safe to call from any task (``prometheus_client`` locks each value).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        """Private to this server; pass it to ``generate_latest`` or ``get_sample_value``."""
        r = self.registry
        self._analyses_started = _counter(ANALYSES_STARTED, r)
        self._analyses_completed = _counter(ANALYSES_COMPLETED, r)
        self._analyses_cancelled = _counter(ANALYSES_CANCELLED, r)
        self._results_committed = _counter(RESULTS_COMMITTED, r)
        self._fenced_writes_rejected = _counter(FENCED_WRITES_REJECTED, r)
        self._errors = _counter(ERRORS, r)
        self._events_dropped = _counter(EVENTS_DROPPED, r)
        self._market_ticks = _counter(MARKET_TICKS, r)
        self._sessions_revalued = _counter(SESSIONS_REVALUED, r)
        self._sessions = Gauge(SESSIONS.name, SESSIONS.help, namespace=PREFIX, registry=r)
        self._market_ticks_skipped = _counter(MARKET_TICKS_SKIPPED, r)
        self._market_tickers = Gauge(
            MARKET_TICKERS.name, MARKET_TICKERS.help, namespace=PREFIX, registry=r
        )
        self._market_tickers_pruned = _counter(MARKET_TICKERS_PRUNED, r)
        self._market_tickers_let_go = _counter(MARKET_TICKERS_LET_GO, r)
        self._market_tick_seconds = _histogram(MARKET_TICK_SECONDS, r)
        self._market_passes = _counter(MARKET_PASSES, r)
        self._market_pass_seconds = _histogram(MARKET_PASS_SECONDS, r)
        self._market_pass_lag = Gauge(
            MARKET_PASS_LAG.name, MARKET_PASS_LAG.help, namespace=PREFIX, registry=r
        )
        self._redis_call_seconds = _histogram(REDIS_CALL_SECONDS, r)
        self._pulled = _Pulled(frozenset(spec.full_name for spec in CATALOGUE))
        r.register(self._pulled)

    # -- pushed ----------------------------------------------------------------------------

    def analysis_started(self) -> None:
        """An analysis attempt took its snapshot."""
        self._analyses_started.inc()

    def analysis_completed(self) -> None:
        """An analysis delivered all five results."""
        self._analyses_completed.inc()

    def analysis_cancelled(self, reason: CancelReason) -> None:
        """An analysis stopped early."""
        self._analyses_cancelled.labels(reason.value).inc()

    def result_committed(self) -> None:
        """The fenced append stored a result."""
        self._results_committed.inc()

    def fenced_write_rejected(self, status: AppendStatus) -> None:
        """The fenced append refused a result (``status`` is never ``STORED``)."""
        self._fenced_writes_rejected.labels(status.value).inc()

    def error(self, code: ErrorCode | Refusal) -> None:
        """An ``error`` frame was sent, or a client was refused."""
        self._errors.labels(code.value).inc()

    def event_dropped(self) -> None:
        """A connection's control loop was too busy to take a session event."""
        self._events_dropped.inc()

    def market_tick(
        self,
        *,
        seconds: float,
        sessions_revalued: int | None = None,
        ticks_skipped: int = 0,
        tickers: int | None = None,
        tickers_pruned: int = 0,
    ) -> None:
        """This process took a market tick (as leader), in ``seconds``.

        ``sessions_revalued``: sessions the tick revalued, for a tick that
        walks them itself (None for the updater's advance, whose walk is
        reported by :meth:`market_pass`); ``ticks_skipped``: schedule slots
        it overran; ``tickers``: the universe after the tick;
        ``tickers_pruned``: tickers it dropped.
        """
        self._market_ticks.inc()
        if sessions_revalued is not None:
            self._sessions_revalued.inc(sessions_revalued)
            self._sessions.set(sessions_revalued)
        self._market_ticks_skipped.inc(ticks_skipped)
        if tickers is not None:
            self._market_tickers.set(tickers)
        self._market_tickers_pruned.inc(tickers_pruned)
        self._market_tick_seconds.observe(seconds)

    def market_pass(
        self,
        *,
        sessions_revalued: int,
        sessions: int | None = None,
        completed: bool = False,
        seconds: float = 0.0,
        lag: int = 0,
        tickers_pruned: int = 0,
    ) -> None:
        """This process took part in a revaluation pass and revalued ``sessions_revalued``.

        ``sessions``: the live sessions counted, when this process walked the
        whole pass; ``completed``: it finished the pass's last bucket, then
        ``seconds`` is the pass's duration, ``lag`` the ticks the market was
        past the pass's tick, ``tickers_pruned`` the tickers dropped.
        """
        self._sessions_revalued.inc(sessions_revalued)
        if sessions is not None:
            self._sessions.set(sessions)
        if completed:
            self._market_passes.inc()
            self._market_pass_seconds.observe(seconds)
            self._market_pass_lag.set(lag)
            self._market_tickers_pruned.inc(tickers_pruned)

    def tickers_let_go(self, count: int) -> None:
        """A let-go dropped ``count`` tickers nobody held any more."""
        self._market_tickers_let_go.inc(count)

    def redis_call(self, seconds: float) -> None:
        """One Redis call took ``seconds``; pass as ``open_redis(on_latency=...)``."""
        self._redis_call_seconds.observe(seconds)

    # -- pulled ----------------------------------------------------------------------------

    def watch_connections(self, count: Callable[[], int]) -> None:
        """Read ``connections_open`` from ``count()`` at each scrape."""
        self._pulled.readers[CONNECTIONS] = lambda: {"connections_open": float(count())}

    def watch_redis(self, client: _StatisticsOwner) -> None:
        """Export every numeric field of ``client.statistics()`` at each scrape.

        A cluster client's router counters (``cluster_statistics()``) are
        exported too, as the ``redis_cluster_`` series (zeros elsewhere).
        """
        self._pulled.readers[REDIS_CLIENT] = lambda: numeric_fields(client.statistics())
        cluster = getattr(client, "cluster_statistics", None)
        if callable(cluster):
            self._pulled.readers[REDIS_CLUSTER] = lambda: numeric_fields(cluster())

    def watch_replica_wait(self, waiter: _StatisticsOwner) -> None:
        """Export the write-and-WAIT counters of ``waiter.statistics()`` at each scrape."""
        self._pulled.readers[REPLICA_WAIT] = lambda: numeric_fields(waiter.statistics())

    def watch_pubsub(self, pubsub: _PubSubLike) -> None:
        """Export the pub/sub connection's counters (and its ``statistics()``, if any)."""
        self._pulled.readers[PUBSUB] = lambda: _read_owner(
            pubsub, ("reconnects", "dropped", "connected")
        )

    def watch_session_events(self, events: _EventsLike) -> None:
        """Export the events hub's drops and watched sessions (and ``statistics()``, if any)."""
        self._pulled.readers[SESSION_EVENTS] = lambda: _read_owner(
            events, ("dropped", "sessions_watched")
        )

    # -- reading -----------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """Every series, rendered by ``prometheus_client`` (content type :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def value(self, spec: MetricSpec, label_value: str | None = None) -> float:
        """The current value of one counter or gauge series (for tests and logs).

        Raises :class:`KeyError` for a series the registry does not have.
        """
        labels = {} if spec.label is None or label_value is None else {spec.label: label_value}
        value = self.registry.get_sample_value(spec.series, labels)
        if value is None:
            raise KeyError(f"no series {spec.series} {labels}")
        return value


def _counter(spec: MetricSpec, registry: CollectorRegistry) -> Counter:
    labels = () if spec.label is None else (spec.label,)
    counter = Counter(spec.name, spec.help, labels, namespace=PREFIX, registry=registry)
    for value in spec.label_values:
        counter.labels(value)
    return counter


def _histogram(spec: MetricSpec, registry: CollectorRegistry) -> Histogram:
    return Histogram(
        spec.name, spec.help, namespace=PREFIX, registry=registry, buckets=DEFAULT_BUCKETS
    )
