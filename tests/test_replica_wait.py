"""``--wait-replicas``: a result's write and ``WAIT`` on a dedicated connection (ADR-005).

Against real redis-servers: a primary with one replica (``REPLICAOF``), the
shared 3-master cluster (one replica each), and a whole server process.
What is shown: the write is acknowledged by the replica before the call
returns; fewer replicas than asked is ``short`` (stored, answered, counted);
a blocked ``WAIT`` never stalls the shared connections; a cancelled call
closes its connection and the next one works; on a cluster the write goes
to the master of the session's slot, every master's included; and a server
with the option on waits for each of its results and exports the counters.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import redis as sync_redis
import trio
from prometheus_client.parser import text_string_to_metric_families
from redis.crc import key_slot

from trio_portfolio.metrics import REDIS_CLUSTER, ServerMetrics
from trio_portfolio.models import AnalysisResult, AppendStatus, Snapshot
from trio_portfolio.redis_cluster import ClusterClient
from trio_portfolio.redis_connect import open_redis
from trio_portfolio.redis_io import RedisClient, StoreUnavailable
from trio_portfolio.store import (
    INDEX_BUCKETS,
    ReplicaWait,
    SessionStore,
    open_replica_wait,
    open_store,
)
from trio_portfolio.testing import RedisCluster, RedisServerInfo
from trio_portfolio.testing.live_server import (
    http_request,
    open_client,
    open_live_server,
    test_settings,
)
from trio_portfolio.testing.redis_servers import run_redis_binary, unique_key_prefix

SERVER = Path("/usr/bin/redis-server")
T0 = "2026-11-21T10:00:00.000Z"
IO = 20.0

pytestmark = pytest.mark.skipif(not SERVER.exists(), reason="needs /usr/bin/redis-server")


@contextlib.contextmanager
def primary_and_replica() -> Iterator[tuple[RedisServerInfo, RedisServerInfo]]:
    """Two local redis-servers, the second a replica of the first (in sync on return)."""
    with run_redis_binary(SERVER) as primary, run_redis_binary(SERVER) as replica:
        host, port = primary.address
        with sync_redis.Redis.from_url(primary.url) as p:
            p.config_set("repl-diskless-sync-delay", 0)  # sync at once, not after 5 s
        with sync_redis.Redis.from_url(replica.url) as r:
            r.execute_command("REPLICAOF", host, port)
        with sync_redis.Redis.from_url(primary.url) as p:
            for _ in range(500):
                if p.execute_command("WAIT", 1, 10) == 1:
                    break
            else:
                raise AssertionError("the replica never caught up")
        yield primary, replica


def result(analysis_id: str, n: int) -> AnalysisResult:
    return AnalysisResult(analysis_id, "AAPL", f"m{n}", n / 7, T0, 1)


async def started(store: SessionStore, session_id: str) -> str:
    await store.create_if_missing(session_id, {"AAPL": 1.0}, {"AAPL": 10.0}, T0)
    snapshot = await store.start_analysis(session_id, f"a-{session_id}", "AAPL", T0)
    assert isinstance(snapshot, Snapshot), snapshot
    return f"a-{session_id}"


@asynccontextmanager
async def waiting_store(
    redis: RedisClient, **options: int
) -> AsyncIterator[tuple[SessionStore, ReplicaWait]]:
    settings = {"replicas": 1, "timeout_ms": 1000, "connections": 2} | options
    async with open_replica_wait(redis, **settings) as waiter:
        assert waiter is not None
        store = await open_store(
            redis, layout="hash", key_prefix=unique_key_prefix(), replica_wait=waiter
        )
        yield store, waiter


async def test_the_write_is_on_the_replica_when_the_append_returns() -> None:
    with primary_and_replica() as (primary, replica):
        async with (
            open_redis(primary.url) as redis,
            open_redis(replica.url) as on_replica,
            waiting_store(redis) as (store, waiter),
        ):
            with trio.fail_after(IO):
                analysis = await started(store, "s1")
                for n in range(5):
                    assert await store.append_result("s1", result(analysis, n)) is (
                        AppendStatus.STORED
                    )
                    # Read on the replica at once: WAIT said it has the write.
                    results = store.keys.results("s1")
                    assert await on_replica.execute("LLEN", results) == n + 1
                stats = waiter.statistics()
                assert (stats.waits, stats.acknowledged, stats.short) == (5, 5, 0)
                assert stats.connections_open == 1  # one caller at a time: one connection


async def test_fewer_replicas_in_time_is_short_and_the_result_is_still_stored() -> None:
    with primary_and_replica() as (primary, _):
        async with (
            open_redis(primary.url) as redis,
            waiting_store(redis, replicas=2, timeout_ms=200) as (store, waiter),
        ):
            with trio.fail_after(IO):
                analysis = await started(store, "s1")
                before = trio.current_time()
                status = await store.append_result("s1", result(analysis, 1))
                waited = trio.current_time() - before
                assert status is AppendStatus.STORED
                assert waited >= 0.19, "WAIT 2 with one replica waits its whole timeout"
                stats = waiter.statistics()
                assert (stats.waits, stats.acknowledged, stats.short) == (1, 0, 1)
                portfolio = await store.get("s1")
                assert portfolio is not None
                assert len(portfolio.analysis_results) == 1


async def test_a_blocked_wait_does_not_stall_the_shared_connections() -> None:
    with primary_and_replica() as (primary, _):
        async with (
            open_redis(primary.url) as redis,
            waiting_store(redis, replicas=2, timeout_ms=1500) as (store, waiter),
        ):
            with trio.fail_after(IO):
                analysis = await started(store, "s1")
                pings: list[float] = []

                async def ping_meanwhile() -> None:
                    await trio.sleep(0.2)
                    for _ in range(5):
                        before = trio.current_time()
                        await redis.ping()
                        pings.append(trio.current_time() - before)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ping_meanwhile)
                    await store.append_result("s1", result(analysis, 1))
                assert len(pings) == 5
                assert max(pings) < 0.5, pings
                assert waiter.statistics().short == 1


async def test_a_cancelled_wait_closes_its_connection_and_the_next_call_works() -> None:
    with primary_and_replica() as (primary, _):
        async with (
            open_redis(primary.url) as redis,
            waiting_store(redis, replicas=2, timeout_ms=5000, connections=1) as (store, waiter),
        ):
            with trio.fail_after(IO):
                analysis = await started(store, "s1")
                with trio.move_on_after(0.2) as scope:
                    first = attrs.evolve(result(analysis, 1), result_id="r1")
                    await store.append_result("s1", first)
                assert scope.cancelled_caught
                assert waiter.statistics().connections_open == 0
                waiter.replicas = 1
                again = attrs.evolve(result(analysis, 1), result_id="r1")
                status = await store.append_result("s1", again, retry=True)
                assert status in (AppendStatus.STORED, AppendStatus.ALREADY_STORED)
                assert waiter.statistics().connections_open == 1


async def test_a_lost_primary_is_store_unavailable_maybe_executed() -> None:
    with primary_and_replica() as (primary, _):
        async with (
            open_redis(primary.url, timeout=1.0) as redis,
            waiting_store(redis, replicas=2, timeout_ms=3000) as (store, _waiter),
        ):
            with trio.fail_after(IO):
                analysis = await started(store, "s1")

                async def kill_clients() -> None:
                    await trio.sleep(0.2)
                    await redis.execute("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kill_clients)
                    with pytest.raises(StoreUnavailable) as raised:
                        await store.append_result("s1", result(analysis, 1))
                assert raised.value.maybe_executed


async def test_on_a_cluster_each_write_waits_on_its_own_master(
    redis_cluster: RedisCluster,
) -> None:
    await trio.to_thread.run_sync(redis_cluster.wait_until_ok)
    async with open_redis(redis_cluster.url) as redis, waiting_store(redis) as (store, waiter):
        with trio.fail_after(60):
            ids: dict[int, str] = {}
            n = 0
            while len(ids) < INDEX_BUCKETS:  # every bucket: sessions on every master
                ids.setdefault(store.keys.bucket_of(f"w{n}"), f"w{n}")
                n += 1
            sessions = list(ids.values())[:12]
            for session_id in sessions:
                analysis = await started(store, session_id)
                assert await store.append_result(session_id, result(analysis, 1)) is (
                    AppendStatus.STORED
                )
            stats = waiter.statistics()
            assert (stats.waits, stats.acknowledged, stats.unconfirmed) == (12, 12, 0)
            assert stats.connections_open == 3, "one dedicated connection per master"
            # The router's counters reach /metrics (catalogue: redis_cluster_*).
            metrics = ServerMetrics()
            metrics.watch_redis(redis)
            await redis.refresh_slots()  # type: ignore[attr-defined]
            text = metrics.exposition().decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            assert "refreshes" in dict(REDIS_CLUSTER.known)
            series = families["trio_portfolio_redis_cluster_refreshes"]
            assert series.samples[0].value >= 1
            masters = families["trio_portfolio_redis_cluster_masters"]
            assert masters.samples[0].value == 3


async def test_a_server_with_wait_replicas_waits_for_every_result() -> None:
    with primary_and_replica() as (primary, _):
        settings = test_settings(primary.url, wait_replicas=1, wait_replicas_timeout_ms=1000)
        async with open_live_server(settings) as server, open_client(server, "waiter") as client:
            with trio.fail_after(IO):
                assert (await client.recv(IO))["type"] == "session"
                await client.send("analyze", ticker="AAPL")
                frames = await client.recv_until(lambda f: f["type"] == "analysis_complete", IO)
                assert sum(f["type"] == "analysis_result" for f in frames) == 5
                body = (await http_request(server, "GET", "/metrics")).body.decode()
                samples = {
                    s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples
                }
                assert samples["trio_portfolio_replica_wait_acknowledged_total"] >= 5
                assert samples["trio_portfolio_replica_wait_short_total"] == 0


async def test_noscript_on_the_dedicated_connection_loads_and_runs_once() -> None:
    with primary_and_replica() as (primary, _):
        async with open_redis(primary.url) as redis, waiting_store(redis) as (store, waiter):
            with trio.fail_after(IO):
                analysis = await started(store, "s1")
                await redis.execute("SCRIPT", "FLUSH")  # as on a freshly promoted replica
                assert await store.append_result("s1", result(analysis, 1)) is (AppendStatus.STORED)
                portfolio = await store.get("s1")
                assert portfolio is not None
                assert len(portfolio.analysis_results) == 1
                assert waiter.statistics().acknowledged == 1


async def test_a_stale_slot_map_falls_back_to_the_router_unconfirmed(
    redis_cluster: RedisCluster,
) -> None:
    await trio.to_thread.run_sync(redis_cluster.wait_until_ok)
    async with open_redis(redis_cluster.url) as redis, waiting_store(redis) as (store, waiter):
        assert isinstance(redis, ClusterClient)
        with trio.fail_after(30):
            analysis = await started(store, "stale")
            slot = key_slot(store.keys.session("stale").encode())
            owner = redis.node_for_slot(slot)
            other = next(m for m in redis.masters if m != owner)
            # As after a resharding the router has not heard of yet (private poke:
            # the real thing is a MOVED the next call meets, which this provokes).
            redis._owner[slot] = other
            assert await store.append_result("stale", result(analysis, 1)) is (AppendStatus.STORED)
            stats = waiter.statistics()
            assert (stats.unconfirmed, stats.waits) == (1, 0)
            assert redis.node_for_slot(slot) == owner, "the router's MOVED fixed the map"
            assert await store.append_result("stale", result(analysis, 2)) is (AppendStatus.STORED)
            assert waiter.statistics().acknowledged == 1
