"""Price histories as rings: a tick writes one slot per ticker, readers see the history in order.

``trio_portfolio/market_data.py`` documents the layout
(``<prefix>:{market}:history:<ticker>``, tick ``t``'s price at slot
``t mod length``).  These tests check, over a real redis-server, that a
long run of ticks keeps exactly the last ``history_length`` prices in
order, that a history bootstrapped mid-run lines up with the others, and
that the one hash earlier versions kept is moved into rings on start-up.
"""

from __future__ import annotations

import pytest
import trio

from trio_portfolio.market import MarketData, pack_history, tick_once, unpack_history
from trio_portfolio.models import utc_now
from trio_portfolio.redis_io import open_redis
from trio_portfolio.simulation import GbmSimulator
from trio_portfolio.store import open_store
from trio_portfolio.testing import RedisServerInfo
from trio_portfolio.testing.redis_clients import stored_histories

LENGTH = 5


async def test_many_ticks_keep_the_last_prices_in_order(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    async with open_redis(real_redis.url) as redis:
        with trio.fail_after(60):
            store = await open_store(redis, layout="hash", key_prefix=key_prefix)
            market = MarketData(
                redis, GbmSimulator(seed=3), key_prefix=key_prefix, history_length=LENGTH
            )
            await market.load_scripts()
            prices = await market.ensure_prices(["AAPL", "MSFT"], holder="tests")
            await store.create_if_missing("s1", {"AAPL": 1.0, "MSFT": 2.0}, prices, utc_now())
            seen = {t: list(unpack_history((await market.raw_histories([t]))[t])) for t in prices}
            assert all(len(h) == LENGTH for h in seen.values())
            late: str | None = None
            for n in range(1, 3 * LENGTH + 2):
                report = await tick_once(market, store)
                for ticker, price in report.prices.items():
                    seen.setdefault(ticker, []).append(price)
                if n == LENGTH + 1:
                    # A ticker that enters mid-run: its bootstrapped past ends at this tick.
                    late = "ZZLATE"
                    holdings = {"AAPL": 1.0, "MSFT": 2.0, late: 3.0}
                    claimed = await market.ensure_prices(list(holdings), holder="tests")
                    await store.set_holdings("s1", holdings, claimed, utc_now())
                    seen[late] = list(unpack_history((await market.raw_histories([late]))[late]))
                    assert len(seen[late]) == LENGTH
                    assert seen[late][-1] == claimed[late]
                raw = await market.raw_histories(sorted(seen))
                outside = await stored_histories(redis, key_prefix, sorted(seen))
                for ticker, history in seen.items():
                    want = tuple(history[-LENGTH:])
                    assert unpack_history(raw[ticker]) == want, (n, ticker)
                    assert outside[ticker] == want, (n, ticker)
            assert late is not None


async def test_a_changed_length_grows_or_trims_rings_to_it(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    async with open_redis(real_redis.url) as redis:
        with trio.fail_after(60):
            store = await open_store(redis, layout="hash", key_prefix=key_prefix)
            short = MarketData(
                redis, GbmSimulator(seed=3), key_prefix=key_prefix, history_length=LENGTH
            )
            await short.load_scripts()
            prices = await short.ensure_prices(["AAPL"], holder="tests")
            await store.create_if_missing("s1", {"AAPL": 1.0}, prices, utc_now())
            history = list(unpack_history((await short.raw_histories(["AAPL"]))["AAPL"]))
            longer = MarketData(
                redis, GbmSimulator(seed=3), key_prefix=key_prefix, history_length=LENGTH + 2
            )
            for _ in range(4):
                history.append((await tick_once(longer, store)).prices["AAPL"])
                got = unpack_history((await longer.raw_histories(["AAPL"]))["AAPL"])
                assert got == tuple(history[-(LENGTH + 2) :])
            history.append((await tick_once(short, store)).prices["AAPL"])
            got = unpack_history((await short.raw_histories(["AAPL"]))["AAPL"])
            assert got == tuple(history[-LENGTH:])


@pytest.mark.parametrize("tick", [0, 3, 1000])
async def test_the_hash_of_earlier_versions_moves_into_rings_at_start(
    real_redis: RedisServerInfo, key_prefix: str, tick: int
) -> None:
    base = f"{key_prefix}:{{market}}"
    old = {"AAPL": [100.0 + i for i in range(8)], "MSFT": [300.0 + i for i in range(8)]}
    async with open_redis(real_redis.url) as redis:
        with trio.fail_after(30):
            await redis.execute("SET", f"{base}:tick", tick)
            for ticker, history in old.items():
                await redis.execute("HSET", f"{base}:history", ticker, pack_history(history))
                await redis.execute("HSET", f"{base}:prices", ticker, repr(history[-1]))
            market = MarketData(redis, GbmSimulator(seed=3), key_prefix=key_prefix)
            await market.load_scripts()
            assert await redis.execute("EXISTS", f"{base}:history") == 0
            raw = await market.raw_histories(["AAPL", "MSFT"])
            assert {t: list(unpack_history(p)) for t, p in raw.items()} == old
            assert await stored_histories(redis, key_prefix, ["AAPL", "MSFT"]) == {
                t: tuple(h) for t, h in old.items()
            }
            await market.load_scripts()  # a second start moves nothing
            assert await market.migrate_histories() == 0
