"""Letting go: a ticker a write of holdings leaves behind goes at once when nobody holds it.

Rules of this suite: real redis-servers (``store_target``: every server, both
layouts; the fakeredis JSON emulator where no real Redis has JSON), keys
under the per-test ``key_prefix``, ``fail_after`` around everything that
talks to Redis.  Writes go the way the connection makes them (claim for the
session, write with the claim, let go of what the write dropped), and what
the market keeps is read from Redis.  Each rule of ``market_let_go.lua``
has a test that a let-go ignoring it would fail: the held cutoff (nothing
before a pass), the held set (a session only the last walk knows of), other
sessions' claims (written, and in flight), the claim order of one session's
writes; and the holders sets stay bounded.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio

from trio_portfolio.connection import CLAIM_ATTEMPTS
from trio_portfolio.market import MarketData, tick_once
from trio_portfolio.models import utc_now
from trio_portfolio.redis_io import RedisClient
from trio_portfolio.store import (
    CLAIM_GRACE_MS,
    CLOCK_SKEW_MS,
    ClaimedPrices,
    ClaimExpired,
    SessionStore,
)
from trio_portfolio.testing import RedisServerInfo, StoreTarget, open_live_server, services_of
from trio_portfolio.testing.live_server import http_request, open_client
from trio_portfolio.testing.live_server import test_settings as server_settings
from trio_portfolio.testing.redis_clients import store_and_market

T0 = "2026-12-01T10:00:00.000Z"
GRACE = (CLAIM_GRACE_MS + CLOCK_SKEW_MS) / 1000 + 0.1
"""Seconds after which every claim made before is older than a new pass's cutoff."""

Parts = tuple[SessionStore, MarketData, RedisClient]


def parts_on(target: StoreTarget, key_prefix: str) -> AbstractAsyncContextManager[Parts]:
    return store_and_market(target, key_prefix, seed=5)


@pytest.fixture
async def parts(store_target: StoreTarget, key_prefix: str) -> AsyncIterator[Parts]:
    async with parts_on(store_target, key_prefix) as p:
        yield p


async def create(parts: Parts, session: str, *tickers: str) -> None:
    store, market, _ = parts
    prices = await market.ensure_prices(tickers, holder=session)
    await store.create_if_missing(session, dict.fromkeys(tickers, 1.0), prices, utc_now())


async def write(parts: Parts, session: str, *tickers: str) -> list[str]:
    """``set_holdings`` as the connection does it; the tickers the let-go dropped.

    A millisecond apart from the session's previous write: a let-go keeps a
    ticker claimed in the same millisecond as its own claim (it could be
    another write's).
    """
    store, market, _ = parts
    await trio.sleep(0.002)
    prices = await market.ensure_prices(tickers, holder=session)
    replaced = await store.set_holdings(session, dict.fromkeys(tickers, 1.0), prices, utc_now())
    assert replaced is not None
    return await market.let_go(session, prices.claimed_at_ms, replaced.let_go)


async def priced(market: MarketData) -> set[str]:
    return set(await market.prices())


async def market_keys(redis: RedisClient, market: MarketData, kind: str) -> set[str]:
    """The per-ticker keys of one kind (``history`` rings, ``holders`` sets) that exist."""
    pattern = market.prices_key.removesuffix("prices") + f"{kind}:*"
    keys: set[str] = set()
    cursor = "0"
    while True:
        cursor, batch = await redis.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
        keys.update(str(k).rsplit(":", 1)[1] for k in batch)
        if str(cursor) == "0":
            return keys


async def test_a_ticker_let_go_by_its_only_holder_leaves_at_once(parts: Parts) -> None:
    store, market, redis = parts
    with trio.fail_after(30):
        await create(parts, "s", "AAPL")
        await tick_once(market, store)  # a complete pass: it saw AAPL held
        assert await write(parts, "s", "NVDA") == []  # AAPL: the last walk saw it held
        assert await write(parts, "s", "XOM") == ["NVDA"]  # claimed since, let go: gone
        assert await priced(market) == {"AAPL", "XOM"}
        assert "NVDA" not in await market_keys(redis, market, "history")
        assert "NVDA" not in await market_keys(redis, market, "holders")
        await trio.sleep(GRACE)
        report = await tick_once(market, store)  # the prune takes what the walk saw before
        assert report.tickers_pruned == ("AAPL",)
        assert await priced(market) == {"XOM"}


async def test_nothing_is_let_go_before_a_pass_has_completed(parts: Parts) -> None:
    """Before the first pass, sessions written by an earlier process are not known."""
    _, market, _ = parts
    with trio.fail_after(30):
        await create(parts, "s", "AAPL")
        assert await write(parts, "s", "MSFT") == []
        assert await priced(market) == {"AAPL", "MSFT"}


async def test_a_ticker_stays_until_its_last_holder_lets_go(parts: Parts) -> None:
    store, market, _ = parts
    with trio.fail_after(30):
        await create(parts, "s", "AAPL")
        await create(parts, "t", "AAPL")
        await tick_once(market, store)
        assert await write(parts, "s", "NVDA") == []
        assert await write(parts, "t", "NVDA") == []
        assert await write(parts, "s", "XOM") == []  # t still holds NVDA
        assert "NVDA" in await priced(market)
        assert await write(parts, "t", "XOM") == ["NVDA"]


async def test_a_claim_in_flight_keeps_its_ticker(parts: Parts) -> None:
    store, market, _ = parts
    with trio.fail_after(30):
        await create(parts, "s", "AAPL")
        await create(parts, "t", "AAPL")
        await tick_once(market, store)
        await write(parts, "s", "NVDA")
        claimed = await market.ensure_prices(["NVDA"], holder="t")  # t's write is on its way
        assert await write(parts, "s", "XOM") == []
        assert "NVDA" in await priced(market)
        await store.set_holdings("t", {"NVDA": 1.0}, claimed, utc_now())
        portfolio = await store.get("t")
        assert portfolio is not None
        assert set(portfolio.holdings) <= await priced(market)


async def test_a_ticker_only_the_last_walk_saw_held_waits_for_the_prune(parts: Parts) -> None:
    """``s`` was written long before the pass: only the held set says it holds AAPL."""
    store, market, _ = parts
    with trio.fail_after(30):
        await create(parts, "s", "AAPL")
        await trio.sleep(GRACE)  # s's claim is older than the pass's cutoff
        await tick_once(market, store)
        await create(parts, "t", "MSFT")
        assert await write(parts, "t", "AAPL") == ["MSFT"]
        assert await write(parts, "t", "MSFT") == []  # AAPL kept: s holds it
        assert "AAPL" in await priced(market)
        await trio.sleep(GRACE)
        report = await tick_once(market, store)
        assert "AAPL" not in report.tickers_pruned
        assert "AAPL" in await priced(market)


async def test_a_write_claimed_before_the_sessions_last_write_is_refused(parts: Parts) -> None:
    """Writes of one session land in claim order, or a let-go could strand a ticker."""
    store, market, redis = parts
    with trio.fail_after(30):
        await create(parts, "s", "AAPL")
        earlier = await market.ensure_prices(["MSFT"], holder="s")
        await trio.sleep(0.005)
        later = await market.ensure_prices(["XOM"], holder="s")
        assert later.claimed_at_ms > earlier.claimed_at_ms
        await store.set_holdings("s", {"XOM": 1.0}, later, utc_now())
        with pytest.raises(ClaimExpired):
            await store.set_holdings("s", {"MSFT": 1.0}, earlier, utc_now())
        portfolio = await store.get("s")
        assert portfolio is not None
        assert portfolio.holdings == {"XOM": 1.0}
        # A claim more than the grace behind the stored one is a clock that stepped
        # back, not a write in flight: it is let through.
        seconds, micros = await redis.execute("TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        ahead = ClaimedPrices(dict(later), now_ms + 5 * CLAIM_GRACE_MS)
        await store.set_holdings("s", {"XOM": 2.0}, ahead, utc_now())
        await store.set_holdings("s", {"XOM": 3.0}, later, utc_now())
        portfolio = await store.get("s")
        assert portfolio is not None
        assert portfolio.holdings == {"XOM": 3.0}


async def test_holders_keep_only_recent_claims_and_leave_with_their_ticker(parts: Parts) -> None:
    store, market, redis = parts
    with trio.fail_after(60):
        sessions = [f"s{i}" for i in range(20)]
        for session in sessions:
            await create(parts, session, "AAPL", "MSFT")
            await write(parts, session, "AAPL", "XOM")
        holders = market.holders_prefix + "AAPL"
        assert await redis.execute("ZCARD", holders) == len(sessions)
        await trio.sleep(GRACE)
        await tick_once(market, store)  # every claim is older than its cutoff: trimmed
        assert await market_keys(redis, market, "holders") == set()
        assert await priced(market) == {"AAPL", "XOM"}  # held: the walk saw them
        for session in sessions:
            await redis.execute("DEL", *store.session_keys(session))  # expired
        await trio.sleep(GRACE)
        await tick_once(market, store)
        assert await priced(market) == set()
        assert await market_keys(redis, market, "history") == set()
        assert await market_keys(redis, market, "holders") == set()


@pytest.mark.parametrize("overtakes", [1, CLAIM_ATTEMPTS])
async def test_set_holdings_claims_again_when_another_write_overtook_it(
    store_target: StoreTarget, overtakes: int
) -> None:
    """The connection's write, overtaken by another write of the session ``overtakes`` times.

    Claimed again after each refusal; after :data:`CLAIM_ATTEMPTS` refusals
    the last one is raised and nothing of this write is stored.
    """
    if store_target.layout != "hash" or not store_target.server.name.startswith("redis-"):
        pytest.skip("one layout on plain redis-servers is enough for the connection's retry")
    async with open_live_server(server_settings(store_target.server.url)) as server:
        services = services_of(server)
        with trio.fail_after(30):
            await services.create_session("s")
            original = services.market.ensure_prices
            overtaken: list[int] = []

            async def overtake(tickers: Any, *, holder: str) -> ClaimedPrices:
                claimed = await original(tickers, holder=holder)
                if len(overtaken) < overtakes:  # another connection claims later, lands first
                    overtaken.append(claimed.claimed_at_ms)
                    await trio.sleep(0.005)
                    other = await original(["IBM"], holder=holder)
                    await services.store.set_holdings("s", {"IBM": 1.0}, other, utc_now())
                return claimed

            services.market.ensure_prices = overtake  # type: ignore[method-assign]
            holdings: Mapping[str, float] = {"NVDA": 2.0}
            try:
                if overtakes < CLAIM_ATTEMPTS:
                    portfolio = await services.replace_holdings("s", holdings)
                    assert portfolio is not None
                    assert portfolio.holdings == holdings
                else:
                    with pytest.raises(ClaimExpired):
                        await services.replace_holdings("s", holdings)
            finally:
                services.market.ensure_prices = original  # type: ignore[method-assign]
            assert len(overtaken) == overtakes
            stored = await services.store.get("s")
            assert stored is not None
            assert stored.holdings == (holdings if overtakes < CLAIM_ATTEMPTS else {"IBM": 1.0})


async def test_a_set_holdings_flood_keeps_at_most_three_sets_priced(
    real_redis: RedisServerInfo,
) -> None:
    """From outside: a v2 client replaces 100 fresh tickers five times a second.

    At any moment the market may price the defaults, the set held now, the
    set a write in flight claimed, and the set the last complete pass saw
    held (let go since, it waits for the next prune): never more.
    """
    settings = server_settings(real_redis.url, market_update_interval_seconds=0.3)
    async with open_live_server(settings) as server, open_client(server, "flooder") as flooder:
        market = services_of(server).market
        with trio.fail_after(60):
            await flooder.recv()  # its session frame
            before = await market.universe_size()
            await trio.sleep(0.7)  # a pass completes: let-go works from here
            fresh = (f"F{n:05d}" for n in itertools.count())
            samples: list[int] = []
            sets = 15
            for _ in range(sets):
                await flooder.send("set_holdings", holdings={next(fresh): 1.0 for _ in range(100)})
                for _ in range(4):
                    await trio.sleep(0.05)
                    samples.append(await market.universe_size())
            assert max(samples) <= before + 3 * 100, samples
            metrics = (await http_request(server, "GET", "/metrics")).body.decode()
            let_go = sum(
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("trio_portfolio_market_tickers_let_go_total")
            )
            assert let_go >= 100, "no set was let go at once"
            print(
                f"\nuniverse before {before}, peak {max(samples)} over {sets} sets of 100; "
                f"{let_go:.0f} tickers let go at once"
            )


async def test_a_held_ticker_that_is_not_priced_is_priced_again_by_the_next_pass(
    parts: Parts,
) -> None:
    """Repair: a session holding an unpriced ticker (a lost write, a tool) is found and fixed."""
    store, market, redis = parts
    with trio.fail_after(30):
        await create(parts, "s", "AAPL")
        # A tool writes a holding the market never priced (a plain mapping: no claim).
        await store.set_holdings("s", {"AAPL": 1.0, "ZZZ": 2.0}, {"AAPL": 1.0, "ZZZ": 5.0}, T0)
        assert "ZZZ" not in await priced(market)
        await tick_once(market, store)
        assert "ZZZ" in await priced(market)
        assert "ZZZ" in await market_keys(redis, market, "history")
        assert "ZZZ" not in await market_keys(redis, market, "holders")  # no claim made up
        await redis.execute("DEL", *store.session_keys("s"))  # nobody holds it after all
        await trio.sleep(GRACE)
        report = await tick_once(market, store)
        assert "ZZZ" in report.tickers_pruned
