"""Small helpers for tests that talk to a whole server, shared by every suite.

The suites that run a server (in-process with :func:`live`, or as a process)
and talk to it over real WebSockets all need the same few things: a fresh
session id, a bounded wait, "the next frame of this type", the greeting
every v2 connection starts with, and a look at the running server's store.
They live here once, so that every suite waits, greets and reads the store
the same way and a change to one of them changes them all.

The field sets and metric names are written out here, from the wire
contract (``docs/protocol.md``), not imported from the code under test: a
test that compared the server's frames with the server's own constants
could not catch a field that went missing from both.

Nothing here imports pytest.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final, TypeVar

import trio

from trio_portfolio.connection import Services
from trio_portfolio.store import SessionStore
from trio_portfolio.testing.live_server import (
    Client,
    Frame,
    LiveServer,
    open_live_server,
    test_settings,
)
from trio_portfolio.testing.redis_servers import RedisServerInfo

__all__ = [
    "FAST_METRICS",
    "IO",
    "ISO_Z",
    "METRIC_NAMES",
    "PORTFOLIO_FIELDS",
    "V1_RESULT_FIELDS",
    "V2_RESULT_FIELDS",
    "assert_iso_z",
    "greet",
    "in_thread",
    "is_type",
    "live",
    "new_session_id",
    "next_frame",
    "read_forever",
    "services_of",
    "start_analysis",
    "store_of",
]

T = TypeVar("T")

IO: Final = 10.0
"""Seconds any single network wait of a test may take before it fails."""

FAST_METRICS: Final = (0.01, 0.05)
"""Metric delays (min, max seconds) for tests that only need analyses to finish quickly."""

METRIC_NAMES: Final = frozenset(
    {"portfolio_risk", "concentration", "correlation", "momentum", "allocation_score"}
)
"""The five metrics every analysis produces."""

V1_RESULT_FIELDS: Final = frozenset({"type", "ticker", "metric", "value", "timestamp"})
"""The fields of a v1 ``analysis_result`` frame: exactly these."""

V2_RESULT_FIELDS: Final = V1_RESULT_FIELDS | {"analysis_id", "portfolio_version", "as_of"}
"""The fields of a v2 ``analysis_result`` frame without ``as_of``."""

PORTFOLIO_FIELDS: Final = frozenset(
    {
        "type",
        "session_id",
        "holdings",
        "prices",
        "total_value",
        "portfolio_version",
        "current_analysis",
        "analysis_results",
        "last_activity",
    }
)
"""The fields of a ``portfolio`` frame: exactly these."""

ISO_Z: Final = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
"""A UTC timestamp as the wire carries it: ISO 8601 with a ``Z``."""


def assert_iso_z(text: object) -> None:
    """Assert ``text`` is an :data:`ISO_Z` timestamp that also parses as a datetime."""
    assert isinstance(text, str)
    assert ISO_Z.match(text), text
    datetime.fromisoformat(text.replace("Z", "+00:00"))


def new_session_id(prefix: str = "t") -> str:
    """A session id no other test uses (``<prefix>-`` and 12 hex digits, a valid path id)."""
    return f"{prefix}-{secrets.token_hex(6)}"


@asynccontextmanager
async def live(redis: RedisServerInfo, **overrides: Any) -> AsyncIterator[LiveServer]:
    """A server in-process against ``redis``, for the block: :func:`test_settings` plus
    ``overrides``, with :data:`FAST_METRICS` unless ``metric_delay_seconds`` is given.

    Raises what :func:`~trio_portfolio.testing.live_server.open_live_server`
    raises (a bad setting: :class:`ValueError`; a store that cannot be opened:
    the server's own error).
    """
    overrides.setdefault("metric_delay_seconds", FAST_METRICS)
    async with open_live_server(test_settings(redis.url, **overrides)) as server:
        yield server


def is_type(kind: str) -> Callable[[Frame], bool]:
    """A predicate for :meth:`Client.recv_until`: the frame's ``type`` is ``kind``."""
    return lambda frame: frame["type"] == kind


async def next_frame(client: Client, kind: str, timeout: float = IO) -> Frame:
    """The next frame, asserted to be of type ``kind`` (nothing else may come first).

    Raises ``trio.TooSlowError`` if none arrives within ``timeout``.
    """
    frame = await client.recv(timeout)
    assert frame["type"] == kind, frame
    return frame


async def greet(client: Client, timeout: float = IO) -> Frame:
    """The ``session`` frame every v2 connection starts with (asserted to be one).

    Raises ``trio.TooSlowError`` if none arrives within ``timeout``.
    """
    return await next_frame(client, "session", timeout)


async def start_analysis(client: Client, ticker: str, timeout: float = IO) -> Frame:
    """Send ``analyze`` for ``ticker`` and return its ``analysis_started`` frame (v2).

    Frames before it (the ``analysis_cancelled`` of an analysis it switched
    away from, say) are read and kept in ``client.frames`` like every other.
    Raises ``trio.TooSlowError`` if it has not started within ``timeout``.
    """
    await client.send("analyze", ticker=ticker)
    return (await client.recv_until(is_type("analysis_started"), timeout=timeout))[-1]


async def read_forever(client: Client, timeout: float = 60.0) -> None:
    """Read (and record in ``client.frames``) every frame until cancelled.

    For a background task while the test sends; each wait is bounded, so a
    server that goes quiet for ``timeout`` seconds fails the test with
    ``trio.TooSlowError`` instead of hanging it.
    """
    while True:
        await client.recv(timeout)


def services_of(server: LiveServer) -> Services:
    """The running server's shared services (asserted to be up: the store is open)."""
    services = server.info.server.services
    assert services is not None, "the server has not opened its store"
    return services


def store_of(server: LiveServer) -> SessionStore:
    """The running server's session store, for checks that read what it stored.

    Reading through it (``get``) is not client activity: it does not touch a
    session's TTL.
    """
    return services_of(server).store


async def in_thread(fn: Callable[[], T], timeout: float = 10.0) -> T:
    """Run blocking ``fn`` (a redis-py call, a process wait) in a worker thread.

    Raises what ``fn`` raises, or ``trio.TooSlowError`` if it took longer
    than ``timeout`` seconds.  The overrun is reported when ``fn`` returns,
    not at the deadline: a blocking call in a thread cannot be interrupted,
    so give ``fn`` its own timeouts (redis-py's socket timeouts) as well.
    """
    with trio.fail_after(timeout):
        return await trio.to_thread.run_sync(fn)


def record_market_ticks(server: LiveServer) -> list[tuple[float, float]]:
    """``(when, seconds)`` of every market tick ``server`` reports from now on.

    Wraps the server's :meth:`~trio_portfolio.metrics.ServerMetrics.market_tick`
    (what the updater calls after each tick it takes), so tests and benchmarks
    see tick durations without parsing ``/metrics``.
    """
    metrics = server.info.server.metrics
    ticks: list[tuple[float, float]] = []
    report = metrics.market_tick

    def spy(*, seconds: float, **figures: Any) -> None:
        ticks.append((trio.current_time(), seconds))
        report(seconds=seconds, **figures)

    metrics.market_tick = spy  # type: ignore[method-assign]
    return ticks


def record_market_passes(server: LiveServer) -> list[tuple[float, float]]:
    """``(when, seconds)`` of every revaluation pass ``server`` completes from now on.

    As :func:`record_market_ticks`, for
    :meth:`~trio_portfolio.metrics.ServerMetrics.market_pass` calls that
    report a completed pass (the process that finished its last bucket).
    """
    metrics = server.info.server.metrics
    passes: list[tuple[float, float]] = []
    report = metrics.market_pass

    def spy(**figures: Any) -> None:
        if figures.get("completed"):
            passes.append((trio.current_time(), float(figures.get("seconds", 0.0))))
        report(**figures)

    metrics.market_pass = spy  # type: ignore[method-assign]
    return passes
