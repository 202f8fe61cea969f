"""Start-up of the market's universe keys, and a forget that cannot be cut short.

Rules of this suite: real redis-servers (``store_target``, both layouts;
the fakeredis JSON emulator where no real Redis has JSON), keys under the
per-test ``key_prefix``, ``fail_after`` around everything that talks to
Redis.  An older version's keys are written raw, as that version stored
them; interleavings are forced by wrapping the real store's methods.
"""

from __future__ import annotations

import functools
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from trio_portfolio.market import MarketData, tick_once
from trio_portfolio.market_data import LEGACY_HOLDER
from trio_portfolio.models import utc_now
from trio_portfolio.redis_io import RedisClient
from trio_portfolio.simulation import GbmSimulator
from trio_portfolio.store import SessionStore
from trio_portfolio.testing import StoreTarget
from trio_portfolio.testing.redis_clients import store_and_market

Parts = tuple[SessionStore, MarketData, RedisClient]


def parts_on(target: StoreTarget, key_prefix: str) -> AbstractAsyncContextManager[Parts]:
    return store_and_market(target, key_prefix, seed=7)


async def redis_ms(redis: RedisClient) -> int:
    seconds, micros = await redis.execute("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


async def test_an_older_versions_claims_become_holders_at_start(
    store_target: StoreTarget, key_prefix: str
) -> None:
    """A write an older process claimed just before the upgrade keeps its ticker."""
    async with parts_on(store_target, key_prefix) as (store, market, redis):
        with trio.fail_after(30):
            prices = await market.ensure_prices(["AAPL", "NVDA"], holder="tests")
            await store.create_if_missing("s", {"AAPL": 1.0}, dict(prices), utc_now())
            await redis.execute("DEL", market.holders_prefix + "NVDA")  # the old version's claim:
            now = await redis_ms(redis)
            await redis.execute("HSET", market.legacy_claims_key, "NVDA", now)  # its own hash
            restarted = MarketData(redis, GbmSimulator(seed=7), key_prefix=key_prefix)
            await restarted.load_scripts()
            assert await redis.execute("EXISTS", market.legacy_claims_key) == 0
            holders = await redis.execute("ZRANGE", market.holders_prefix + "NVDA", 0, -1)
            assert holders == [LEGACY_HOLDER]
            report = await tick_once(
                restarted, store
            )  # nobody seen holding NVDA: the claim keeps it
            assert "NVDA" not in report.tickers_pruned
            assert "NVDA" in await restarted.prices()


async def test_a_session_an_older_version_wrote_takes_claimed_writes(
    store_target: StoreTarget, key_prefix: str
) -> None:
    """No ``claimed_at`` stored yet (an older version, or a write without a claim)."""
    async with parts_on(store_target, key_prefix) as (store, market, _):
        with trio.fail_after(30):
            await store.create_if_missing("s", {"AAPL": 1.0}, {"AAPL": 3.0}, utc_now())
            claimed = await market.ensure_prices(["MSFT"], holder="s")
            written = await store.set_holdings("s", {"MSFT": 1.0}, claimed, utc_now())
            assert written is not None
            assert (written.portfolio.holdings, written.let_go) == ({"MSFT": 1.0}, ("AAPL",))


async def test_letting_go_waits_for_a_pass_of_the_version_that_started(
    store_target: StoreTarget, key_prefix: str
) -> None:
    """A held set left by an earlier run of this version is not trusted after a restart."""
    async with parts_on(store_target, key_prefix) as (store, market, redis):
        with trio.fail_after(30):
            prices = await market.ensure_prices(["AAPL"], holder="s")
            await store.create_if_missing("s", {"AAPL": 1.0}, prices, utc_now())
            await tick_once(market, store)
            assert await redis.execute("EXISTS", market.held_cutoff_key) == 1
            restarted = MarketData(redis, GbmSimulator(seed=7), key_prefix=key_prefix)
            await restarted.load_scripts()
            assert await redis.execute("EXISTS", market.held_key, market.held_cutoff_key) == 0
            await trio.sleep(0.002)
            claimed = await restarted.ensure_prices(["MSFT"], holder="s")
            await trio.sleep(0.002)
            again = await restarted.ensure_prices(["XOM"], holder="s")
            await store.set_holdings("s", {"MSFT": 1.0}, claimed, utc_now())
            written = await store.set_holdings("s", {"XOM": 1.0}, again, utc_now())
            assert written is not None
            assert written.let_go == ("MSFT",)
            assert await restarted.let_go("s", again.claimed_at_ms, written.let_go) == []
            assert "MSFT" in await restarted.prices()


async def test_a_cancelled_forget_never_unindexes_a_session_created_meanwhile(
    store_target: StoreTarget, key_prefix: str
) -> None:
    """Created between forget's check and its removal, cancelled at its re-check: indexed."""
    async with parts_on(store_target, key_prefix) as (store, market, redis):
        with trio.fail_after(30):
            prices = await market.ensure_prices(["AAPL"], holder="s")
            original = store._gone  # white box: the two existence checks of forget
            calls = 0

            with trio.CancelScope() as scope:

                @functools.wraps(original)
                async def interleaved(session_ids: Any) -> list[str]:
                    nonlocal calls
                    calls += 1
                    if calls == 1:
                        gone = await original(session_ids)  # "s" does not exist yet
                        await store.create_if_missing("s", {"AAPL": 1.0}, prices, utc_now())
                        return gone
                    scope.cancel()  # the updater is cancelled at the re-check
                    return await original(session_ids)

                store._gone = interleaved  # type: ignore[method-assign]
                await store.forget(["s"])
            store._gone = original  # type: ignore[method-assign]
            assert calls == 2
            bucket = store.keys.index_bucket(store.keys.bucket_of("s"))
            assert await redis.execute("SISMEMBER", bucket, "s") == 1
