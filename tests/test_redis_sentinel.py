"""The Sentinel client against a real local setup: a master, a replica, three sentinels.

The session's setup from the shared harness (``redis_sentinel`` fixture);
skipped without a ``redis-server`` >= 7.  The failover test prints how
long calls answered ``store_unavailable`` (or READONLY-then-retried) before
the promoted replica served them.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from trio_portfolio.models import AnalysisResult, AppendStatus, Snapshot
from trio_portfolio.redis_connect import open_redis
from trio_portfolio.redis_io import StoreUnavailable
from trio_portfolio.redis_sentinel import SentinelClient, parse_sentinel_url
from trio_portfolio.store import open_replica_wait, open_store
from trio_portfolio.testing import RedisSentinelSetup

SERVER = Path("/usr/bin/redis-server")
NAME = "portfolio"


@pytest.fixture
def sentinel(redis_sentinel: RedisSentinelSetup) -> RedisSentinelSetup:
    return redis_sentinel


def test_sentinel_url_parsing() -> None:
    sentinels, name, template = parse_sentinel_url(
        "redis+sentinel://u:pw@h1:26379,h2:26380/mymaster/2"
    )
    assert [(s.host, s.port, s.password) for s in sentinels] == [
        ("h1", 26379, None),
        ("h2", 26380, None),
    ]
    assert (name, template.db, template.username, template.password) == ("mymaster", 2, "u", "pw")
    with pytest.raises(ValueError, match="names the master"):
        parse_sentinel_url("redis+sentinel://h1:26379")


async def test_discovers_the_master_and_serves_the_store(sentinel: RedisSentinelSetup) -> None:
    async with open_redis(sentinel.url) as client:
        assert isinstance(client, SentinelClient)
        assert client.params.port == sentinel.master().port
        store = await open_store(client, layout="hash", key_prefix=f"t{random.getrandbits(32):x}")
        created = await store.create_if_missing(
            "s1", {"AAPL": 1.0}, {"AAPL": 2.0}, "2026-01-01T00:00:00Z"
        )
        assert created.portfolio_version == 1
        # --wait-replicas through Sentinel: the result's write is waited for on the master.
        async with open_replica_wait(client, replicas=1, timeout_ms=1000) as waiter:
            assert waiter is not None
            waited = await open_store(
                client, layout="hash", key_prefix=store.keys.prefix, replica_wait=waiter
            )
            snapshot = await waited.start_analysis("s1", "a-s1", "AAPL", "2026-01-01T00:00:00Z")
            assert isinstance(snapshot, Snapshot), snapshot
            stored = await waited.append_result(
                "s1", AnalysisResult("a-s1", "AAPL", "m", 1.0, "2026-01-01T00:00:00Z", 1)
            )
            assert stored is AppendStatus.STORED
            assert waiter.statistics().acknowledged == 1


async def test_failover_calls_continue_after_a_brief_unavailability(
    sentinel: RedisSentinelSetup,
) -> None:
    key = f"fo-{random.getrandbits(32):x}"
    async with open_redis(sentinel.url, timeout=2, reconnect_backoff=0.1) as client:
        assert isinstance(client, SentinelClient)
        old = client.params.port
        await client.execute("SET", key, "0")
        outcomes = {"ok": 0, "unavailable": 0}
        first_error: list[float] = []
        recovered: list[float] = []
        failover_done = trio.Event()

        async def writer() -> None:
            n = 0
            while not (failover_done.is_set() and recovered):
                n += 1
                try:
                    assert await client.execute("INCR", key) >= 1
                    outcomes["ok"] += 1
                    if first_error and not recovered and client.params.port != old:
                        recovered.append(trio.current_time())
                except StoreUnavailable:
                    outcomes["unavailable"] += 1
                    if not first_error:
                        first_error.append(trio.current_time())
                await trio.sleep(0.01)

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await trio.sleep(0.2)
                started = trio.current_time()
                with sentinel.sentinels[0].client() as c:
                    await trio.to_thread.run_sync(
                        lambda: c.execute_command("SENTINEL", "FAILOVER", sentinel.master_name)
                    )
                for _ in range(600):
                    if client.params.port != old:
                        break
                    await trio.sleep(0.05)
                switched = trio.current_time() - started
                failover_done.set()
                if not first_error:
                    recovered.append(trio.current_time())
        stats = client.sentinel_statistics()
        window = (recovered[0] - first_error[0]) if first_error else 0.0
        print(
            f"\nsentinel failover: client on the new master {switched:.2f} s after SENTINEL "
            f"FAILOVER; calls unavailable for {window:.2f} s ({outcomes['unavailable']} failed, "
            f"{outcomes['ok']} ok, {stats.read_only_retries} READONLY retries, "
            f"{stats.switch_messages} +switch-master heard)"
        )
        assert client.params.port != old
        assert stats.switches >= 2
        assert await client.execute("INCR", key) > 1
        assert outcomes["ok"] > 0
    await trio.to_thread.run_sync(sentinel.wait_until_ready)
