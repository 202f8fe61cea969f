"""Cancellation at every await of the Redis adapter leaves every connection consistent.

The property under test: a Trio cancellation in the middle of a call never
leaves an unread reply on a connection for the next caller.  Each test
forces one connection (``connections=1``) so that every call shares it, and
each call asks for a reply that names it (``ECHO token``), so a reply handed
to the wrong caller is caught at once.  Real redis-server, localhost.
"""

from __future__ import annotations

import random

import trio

from trio_portfolio.redis_io import RedisClient, Script, StoreUnavailable, open_redis
from trio_portfolio.testing import BUSY_SCRIPT, RedisServerInfo

SLOW = Script(BUSY_SCRIPT)
"""Busy for ARGV[1] ms, so a reply is reliably still outstanding when the caller is cancelled."""


async def assert_echoes_own_tokens(redis: RedisClient, count: int = 20) -> None:
    for i in range(count):
        token = f"check-{i}-{random.random()}"
        assert await redis.execute("ECHO", token) == token


async def test_cancel_after_write_drops_the_reply_and_keeps_the_connection(
    real_redis: RedisServerInfo,
) -> None:
    async with open_redis(real_redis.url, connections=1) as redis:
        await redis.load_scripts([SLOW])
        await redis.ping()
        with trio.move_on_after(0.05) as scope:
            await redis.evalsha(SLOW, [], [200, "slow-reply"])
        assert scope.cancelled_caught
        # The slow reply is still on its way; the next caller must not get it.
        with trio.fail_after(5):
            assert await redis.execute("ECHO", "mine") == "mine"
        stats = redis.statistics()
        assert stats.cancelled_in_flight == 1
        assert stats.connects == 1, "a cancellation must not cost the connection"


async def test_cancel_before_write_never_sends(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    key = f"{key_prefix}:never"
    async with open_redis(real_redis.url, connections=1) as redis:
        await redis.ping()
        with trio.CancelScope() as scope:
            scope.cancel()
            await redis.execute("SET", key, "should-not-exist")
        assert await redis.execute("EXISTS", key) == 0


async def test_cancelled_pipeline_drops_all_its_replies(real_redis: RedisServerInfo) -> None:
    async with open_redis(real_redis.url, connections=1) as redis:
        await redis.load_scripts([SLOW])
        with trio.move_on_after(0.05):
            await redis.pipeline(
                [("ECHO", "p1"), ("EVALSHA", SLOW.sha, 0, 150, "p2"), ("ECHO", "p3")]
            )
        with trio.fail_after(5):
            await assert_echoes_own_tokens(redis)


async def test_random_cancellation_storm_never_crosses_replies(
    real_redis: RedisServerInfo,
) -> None:
    """Hundreds of callers on one connection, a third cancelled at random points."""
    rng = random.Random(1234)
    outcomes = {"ok": 0, "cancelled": 0}
    async with open_redis(real_redis.url, connections=1) as redis:
        await redis.load_scripts([SLOW])

        async def caller(i: int) -> None:
            for j in range(30):
                token = f"{i}:{j}"
                deadline = rng.choice([None, None, 0, 0.0001, 0.001, 0.003])
                with trio.move_on_after(deadline if deadline is not None else 60) as scope:
                    if j % 7 == 0:
                        reply = await redis.evalsha(SLOW, [], [1, token])
                    else:
                        reply = await redis.execute("ECHO", token)
                    assert reply == token, f"caller {token} got {reply!r}"
                outcomes["cancelled" if scope.cancelled_caught else "ok"] += 1

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(caller, i)
            await assert_echoes_own_tokens(redis, 50)
        assert outcomes["ok"] > 500
        assert outcomes["cancelled"] > 100
        assert redis.statistics().connects == 1


async def test_cancelling_the_whole_client_mid_flight_is_clean(real_redis: RedisServerInfo) -> None:
    with trio.move_on_after(0.1):
        async with open_redis(real_redis.url) as redis:
            await redis.load_scripts([SLOW])
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(redis.evalsha, SLOW, [], [300, "x"])
    # A fresh client on the same server is unaffected.  Its first replies wait for the
    # ten scripts already sent (3 s of busy Redis; Redis 8 counts the busy loop in CPU
    # time, so longer on a loaded machine): the bound allows for that.
    async with open_redis(real_redis.url, connections=1) as redis:
        with trio.fail_after(20):
            await assert_echoes_own_tokens(redis)


async def test_connection_loss_under_load_fails_every_caller_promptly(
    real_redis: RedisServerInfo,
) -> None:
    """No request may be stranded when a connection dies (each would wait its 10 s timeout).

    Requests written before the loss fail with ``maybe_executed``; requests
    not yet written are sent again on the new connection, invisibly (so how
    many callers see an error depends on timing, and may be none).
    """
    outcomes = {"ok": 0, "unavailable": 0, "unsent_failed": 0}
    async with open_redis(real_redis.url, connections=1, timeout=10) as redis:
        client_id = await redis.execute("CLIENT", "ID")

        async def caller(i: int) -> None:
            for j in range(50):
                try:
                    token = f"{i}:{j}"
                    assert await redis.execute("ECHO", token) == token
                    outcomes["ok"] += 1
                except StoreUnavailable as exc:
                    outcomes["unavailable" if exc.maybe_executed else "unsent_failed"] += 1

        with trio.fail_after(3):
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(caller, i)
                await trio.sleep(0.01)
                async with open_redis(real_redis.url) as admin:
                    await admin.execute("CLIENT", "KILL", "ID", client_id)
        assert redis.statistics().connects == 2, "the kill must have hit the connection"
        assert outcomes["unsent_failed"] == 0, "an unsent request must be retried, not failed"
        assert outcomes["ok"] + outcomes["unavailable"] == 5000
