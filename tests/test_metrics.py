"""``/metrics``: one catalogue, a private registry per server, nothing hand-written.

The exposition is read back with ``prometheus_client``'s own text parser,
never by string matching, so a malformed line fails the parse.  Live tests
run a real server (real sockets, real WebSockets, the harness's real
redis-server); the README check reads README.md from this repository, so the
table there cannot drift from the catalogue in ``trio_portfolio/metrics.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_portfolio.config import Settings
from trio_portfolio.metrics import (
    ANALYSES_CANCELLED,
    ANALYSES_STARTED,
    CONTENT_TYPE,
    ERRORS,
    FENCED_WRITES_REJECTED,
    Kind,
    Refusal,
    ServerMetrics,
    all_specs,
)
from trio_portfolio.models import AppendStatus
from trio_portfolio.protocol import CancelReason, ErrorCode
from trio_portfolio.redis_io import RedisStatistics, open_redis
from trio_portfolio.testing import RedisServerInfo
from trio_portfolio.testing.live_server import (
    Client,
    LiveServer,
    http_request,
    open_client,
    open_live_server,
    test_settings,
)

README = Path(__file__).resolve().parent.parent / "README.md"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and every sample, via prometheus_client's parser."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in types, f"family {family.name} twice"
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"sample {key} twice"
            samples[key] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def readme_rows() -> list[tuple[str, str, tuple[str, ...]]]:
    """``(series, type, label values)`` of every row of README's metrics table."""
    rows = []
    for line in README.read_text().splitlines():
        match = re.match(r"\| `(trio_portfolio_\w+)` \| (\w+) \| ([^|]*) \|", line)
        if match:
            series, kind, labels = match.groups()
            rows.append((series, kind, tuple(re.findall(r"`([^`]+)`", labels)[1:])))
    return rows


def assert_all_declared_present(samples: Samples) -> None:
    """Every declared series is there, each labelled counter with every label value."""
    names = {name for name, _ in samples}
    for spec in all_specs():
        if spec.kind is Kind.HISTOGRAM:
            for suffix in ("_bucket", "_sum", "_count"):
                assert spec.full_name + suffix in names, spec.full_name + suffix
        elif spec.label is None:
            assert (spec.series, frozenset()) in samples, spec.series
        else:
            for label_value in spec.label_values:
                key = (spec.series, frozenset({(spec.label, label_value)}))
                assert samples[key] == 0, key


async def scrape(server: LiveServer) -> Samples:
    response = await http_request(server, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    return parse(response.body.decode())[1]


async def analyse(client: Client, ticker: str) -> list[dict[str, Any]]:
    await client.send("analyze", ticker=ticker)
    return await client.recv_until(lambda f: f["type"] in {"analysis_complete", "error"})


# -- the catalogue and the registry, without a server -----------------------------------------


def test_a_fresh_registry_parses_and_shows_every_series_at_zero() -> None:
    types, samples = parse(ServerMetrics().exposition().decode())
    assert_all_declared_present(samples)
    for spec in all_specs():
        assert types[spec.full_name] == spec.kind.value, spec.name
        if spec.kind is not Kind.HISTOGRAM:
            assert all(v == 0 for (n, _), v in samples.items() if n == spec.series), spec.name


def test_label_values_cover_every_code_reason_and_fence_status() -> None:
    assert set(ERRORS.label_values) == {c.value for c in ErrorCode} | {r.value for r in Refusal}
    assert set(ANALYSES_CANCELLED.label_values) == {r.value for r in CancelReason}
    assert set(FENCED_WRITES_REJECTED.label_values) == {
        s.value for s in AppendStatus if s is not AppendStatus.STORED
    }
    names = [spec.full_name for spec in all_specs()]
    assert len(names) == len(set(names))


def test_typed_methods_move_only_their_series() -> None:
    metrics = ServerMetrics()
    metrics.analysis_cancelled(CancelReason.SWITCHED)
    metrics.analysis_cancelled(CancelReason.SWITCHED)
    metrics.error(Refusal.FLOOD)
    metrics.fenced_write_rejected(AppendStatus.STALE)
    metrics.market_tick(seconds=0.01, sessions_revalued=7)
    assert metrics.value(ANALYSES_CANCELLED, "switched") == 2
    assert metrics.value(ANALYSES_CANCELLED, "cancelled") == 0
    assert metrics.value(ERRORS, "flood") == 1
    assert metrics.value(ERRORS, "bad_json") == 0
    assert metrics.value(FENCED_WRITES_REJECTED, "stale") == 1
    _, samples = parse(metrics.exposition().decode())
    assert value(samples, "trio_portfolio_sessions") == 7
    assert value(samples, "trio_portfolio_sessions_revalued_total") == 7
    assert value(samples, "trio_portfolio_market_tick_seconds_count") == 1
    with pytest.raises(KeyError):
        metrics.value(ERRORS, "no_such_code")


def test_two_registries_are_independent() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.analysis_started()
    a.redis_call(0.002)
    assert a.value(ANALYSES_STARTED) == 1
    assert b.value(ANALYSES_STARTED) == 0
    _, samples = parse(b.exposition().decode())
    assert value(samples, "trio_portfolio_redis_call_seconds_count") == 0


@attrs.define
class GrownStatistics(RedisStatistics):
    """What the adapter may report tomorrow: a key the catalogue has never heard of."""

    reconnects_after_failover: int = 0


class Owner:
    """Stands in for an owner of statistics (the reading path, not the store)."""

    def __init__(self) -> None:
        self.connected = True
        self.reconnects = 2
        self.dropped = 5
        self.sessions_watched = 3
        self.stats = GrownStatistics(commands=11, in_flight=4, reconnects_after_failover=9)

    def statistics(self) -> GrownStatistics:
        return self.stats


def test_statistics_are_read_at_scrape_time_and_new_keys_flow_through() -> None:
    metrics, owner = ServerMetrics(), Owner()
    metrics.watch_redis(owner)
    metrics.watch_pubsub(owner)
    metrics.watch_session_events(owner)
    metrics.watch_connections(lambda: 6)
    types, samples = parse(metrics.exposition().decode())
    assert value(samples, "trio_portfolio_redis_commands_total") == 11
    assert value(samples, "trio_portfolio_redis_in_flight") == 4
    assert value(samples, "trio_portfolio_redis_reconnects_after_failover") == 9
    assert types["trio_portfolio_redis_reconnects_after_failover"] == "gauge"
    assert value(samples, "trio_portfolio_pubsub_connected") == 1
    assert value(samples, "trio_portfolio_pubsub_dropped_total") == 5
    assert value(samples, "trio_portfolio_session_events_dropped_total") == 5
    assert value(samples, "trio_portfolio_sessions_watched") == 3
    assert value(samples, "trio_portfolio_connections_open") == 6
    # Statistics keys reach the pub/sub and events groups too, once they have statistics().
    assert value(samples, "trio_portfolio_pubsub_commands") == 11
    owner.stats.commands = 12
    owner.connected = False
    _, samples = parse(metrics.exposition().decode())
    assert value(samples, "trio_portfolio_redis_commands_total") == 12
    assert value(samples, "trio_portfolio_pubsub_connected") == 0


def test_readme_lists_exactly_the_catalogue() -> None:
    rows = readme_rows()
    assert rows, "README has no metrics table"
    declared = [(s.series, s.kind.value, s.label_values) for s in all_specs()]
    assert sorted(rows) == sorted(declared)


async def test_latency_observer_is_given_at_construction(real_redis: RedisServerInfo) -> None:
    seen: list[float] = []
    async with open_redis(real_redis.url, on_latency=seen.append) as redis:
        await redis.ping()
        await redis.pipeline([("PING",), ("PING",)])
    assert len(seen) == 2
    assert all(0 < seconds < 5 for seconds in seen)


# -- a live server ---------------------------------------------------------------------------


async def test_every_readme_series_is_there_right_after_start_up(
    real_redis: RedisServerInfo,
) -> None:
    async with open_live_server(test_settings(real_redis.url)) as server:
        samples = await scrape(server)
    names = {name for name, _ in samples}
    for series, kind, _ in readme_rows():
        wanted = f"{series}_count" if kind == "histogram" else series
        assert wanted in names, series
    assert_all_declared_present(samples)
    for spec in all_specs():
        if spec.kind is Kind.COUNTER and not spec.name.startswith(("redis_", "pubsub_")):
            assert all(v == 0 for (n, _), v in samples.items() if n == spec.series), spec.name
    # Opening the store took Redis calls, on a connection that is open now.
    assert value(samples, "trio_portfolio_redis_commands_total") > 0
    assert value(samples, "trio_portfolio_redis_connects_total") >= 1
    assert value(samples, "trio_portfolio_redis_call_seconds_count") > 0
    assert value(samples, "trio_portfolio_pubsub_connects_total") >= 1


async def test_counters_move_after_an_analysis_in_their_own_server_only(
    real_redis: RedisServerInfo,
) -> None:
    def settings() -> Settings:
        return test_settings(real_redis.url, metric_delay_seconds=(0.3, 0.5))

    async with open_live_server(settings()) as busy, open_live_server(settings()) as idle:
        async with open_client(busy, "metrics-busy") as client:
            assert (await client.recv())["type"] == "session"
            await client.send("analyze", ticker="AAPL")
            await client.recv_until(lambda f: f["type"] == "analysis_started")
            frames = await analyse(client, "GOOGL")  # switches away from AAPL
            assert frames[-1]["type"] == "analysis_complete", frames[-1]
            await client.send_raw("{not json")
            assert (await client.recv())["code"] == "bad_json"
            during = await scrape(busy)
        with trio.fail_after(5):
            after = await scrape(busy)
            while value(after, "trio_portfolio_connections_open"):
                await trio.sleep(0.02)
                after = await scrape(busy)
        quiet = await scrape(idle)

    assert value(during, "trio_portfolio_connections_open") == 1
    assert value(during, "trio_portfolio_sessions_watched") == 1
    assert value(during, "trio_portfolio_pubsub_connected") == 1
    assert value(after, "trio_portfolio_sessions_watched") == 0
    assert value(after, "trio_portfolio_analyses_started_total") == 2
    assert value(after, "trio_portfolio_analyses_completed_total") == 1
    assert value(after, "trio_portfolio_analyses_cancelled_total", reason="switched") == 1
    assert value(after, "trio_portfolio_results_committed_total") == 5
    assert value(after, "trio_portfolio_errors_total", code="bad_json") == 1
    assert value(after, "trio_portfolio_errors_total", code="flood") == 0

    assert value(quiet, "trio_portfolio_analyses_started_total") == 0
    assert value(quiet, "trio_portfolio_results_committed_total") == 0
    assert value(quiet, "trio_portfolio_errors_total", code="bad_json") == 0
    busy_calls = value(after, "trio_portfolio_redis_call_seconds_count")
    assert value(quiet, "trio_portfolio_redis_call_seconds_count") < busy_calls


async def test_market_ticks_and_dropped_events_are_exported(real_redis: RedisServerInfo) -> None:
    settings = test_settings(real_redis.url, market_update_interval_seconds=0.1)
    async with open_live_server(settings) as server:
        async with open_client(server, "metrics-market") as client:
            assert (await client.recv())["type"] == "session"
            with trio.fail_after(10):
                ticks = "trio_portfolio_market_ticks_total"
                while not value(await scrape(server), ticks):  # noqa: ASYNC110 - polls
                    await trio.sleep(0.05)
        services = server.info.server.services
        assert services is not None
        services.events.dropped += 3  # what the hub counts when a watcher lags
        samples = await scrape(server)
    assert value(samples, "trio_portfolio_market_tick_seconds_count") >= 1
    assert value(samples, "trio_portfolio_sessions_revalued_total") >= 1
    assert value(samples, "trio_portfolio_session_events_dropped_total") == 3
