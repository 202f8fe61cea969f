"""Callers' deadlines on the adapter's fast path (kept by the connection's watchdog).

A call that finds a ready connection gets no cancel scope of its own: its
deadline goes on the connection's heap and the watchdog wakes it.  These
tests hold a connection busy with a ``BLPOP`` that blocks it server-side
(replies are positional, so every request behind it waits), and check that
deadlines fire in deadline order, not submission order; that the late
replies are read and dropped while everybody else gets theirs; and that the
heap stays bounded by the live requests.  Every wait is under ``fail_after``.
"""

from __future__ import annotations

import pytest
import trio

from trio_portfolio.redis_io import StoreUnavailable, Unavailable, open_redis
from trio_portfolio.testing import RedisServerInfo


async def test_a_shorter_deadline_behind_a_longer_one_fires_first(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    async with open_redis(real_redis.url, timeout=10, connections=1) as redis:
        await redis.ping()
        outcomes: dict[str, object] = {}
        short_done = trio.Event()

        async def call(name: str, timeout: float, *args: str | int) -> None:
            try:
                outcomes[name] = await redis.execute(*args, timeout=timeout)
            except StoreUnavailable as exc:
                outcomes[name] = exc
            if name == "short":
                short_done.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "blocker", 10, "BLPOP", f"{key_prefix}:nothing", 1)
                await trio.sleep(0.05)
                nursery.start_soon(call, "long", 5, "PING")
                await trio.sleep(0.05)
                nursery.start_soon(call, "short", 0.2, "PING")
                await short_done.wait()
                # The short call gave up alone, before the BLPOP let go (its
                # deadline came first although it was queued last).
                assert "blocker" not in outcomes
                assert "long" not in outcomes
        short = outcomes["short"]
        assert isinstance(short, StoreUnavailable)
        assert short.reason is Unavailable.TIMEOUT
        assert short.maybe_executed  # it was written: its reply came later and was dropped
        assert outcomes["blocker"] is None  # BLPOP timed out server-side
        assert outcomes["long"] == "PONG"
        stats = redis.statistics()
        assert stats.timeouts == 1
        assert stats.replies_discarded == 1
        assert await redis.execute("ECHO", "next", timeout=1) == "next"  # the connection is fine


async def test_the_deadline_heap_stays_bounded(real_redis: RedisServerInfo) -> None:
    async with open_redis(real_redis.url, timeout=30, connections=1) as redis:
        await redis.ping()
        with trio.fail_after(30):
            for _ in range(2_000):
                await redis.execute("PING")
            async with trio.open_nursery() as nursery:
                for _ in range(500):
                    nursery.start_soon(redis.execute, "PING")
        (connection,) = redis._slots
        assert connection is not None
        # Finished requests are dropped from the heap as it is used (or compacted),
        # so it holds a bounded number of entries, not one per call ever made.
        assert len(connection._deadlines) <= 2 * 500


@pytest.mark.parametrize("timeout", [0.0, 0.05])
async def test_a_deadline_already_due_times_out_without_sending(
    real_redis: RedisServerInfo, key_prefix: str, timeout: float
) -> None:
    async with open_redis(real_redis.url, timeout=10, connections=1) as redis:
        await redis.ping()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def blocker() -> None:
                    await redis.execute("BLPOP", f"{key_prefix}:nothing", 1)

                nursery.start_soon(blocker)
                await trio.sleep(0.05)
                with pytest.raises(StoreUnavailable) as caught:
                    await redis.execute("INCR", f"{key_prefix}:n", timeout=timeout)
                assert caught.value.reason is Unavailable.TIMEOUT
        # Written or not, a timed-out call never breaks the connection; the INCR ran
        # at most once.
        assert int(await redis.execute("GET", f"{key_prefix}:n") or 0) <= 1
