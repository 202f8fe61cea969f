"""The market in Redis (``trio_portfolio/market.py``): a tick, leadership, a tick racing an edit.

Rules of this suite: real redis-servers from the harness - ``store_target``
(every server and session-store layout) for what a tick does to sessions,
``real_redis`` for leadership, whose lease is a real Redis TTL on the real
clock; keys under the per-test ``key_prefix``; every wait under
``fail_after``.  Market keys are read by the names the module's docstring
documents (``<prefix>:{market}:tick``, ``...:history:<ticker>``), so a change of
layout shows here.  Where an interleaving is the point, the test does not
hope for it: it holds the tick at a chosen step (an :class:`trio.Event`
around the real store's or market's own method) and does the edit there.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from trio_portfolio.market import (
    HISTORY_LENGTH,
    MarketData,
    TickReport,
    run_market_updater,
    tick_once,
)
from trio_portfolio.models import Portfolio, utc_now
from trio_portfolio.redis_io import RedisClient, open_redis
from trio_portfolio.simulation import GbmSimulator
from trio_portfolio.store import SessionStore, open_store
from trio_portfolio.testing import Layout, RedisServerInfo, StoreTarget, hold_before
from trio_portfolio.testing.redis_clients import stored_histories

SEED = 7
Parts = tuple[MarketData, SessionStore, RedisClient]
"""A market, a session store on the same key prefix, and their Redis client."""


@asynccontextmanager
async def market_on(
    url: str,
    key_prefix: str,
    *,
    layout: Layout = "hash",
    market_cls: type[MarketData] = MarketData,
) -> AsyncIterator[Parts]:
    """A market and a session store sharing ``key_prefix`` on the Redis at ``url``.

    Each call has a client of its own: two calls are two processes, as far
    as Redis can tell.
    """
    async with open_redis(url) as redis:
        with trio.fail_after(10):
            store = await open_store(redis, layout=layout, key_prefix=key_prefix)
            market = market_cls(redis, GbmSimulator(seed=SEED), key_prefix=key_prefix)
            await market.load_scripts()
        yield market, store, redis


@pytest.fixture
async def parts(store_target: StoreTarget, key_prefix: str) -> AsyncIterator[Parts]:
    """:func:`market_on` for every server and store layout."""
    async with market_on(store_target.server.url, key_prefix, layout=store_target.layout) as p:
        yield p


async def new_session(
    market: MarketData, store: SessionStore, session_id: str, holdings: dict[str, float]
) -> Portfolio:
    """A session holding ``holdings`` at the market's prices, as a connect makes it."""
    prices = await market.ensure_prices(list(holdings), holder="tests")
    return await store.create_if_missing(session_id, holdings, prices, utc_now())


async def histories(
    redis: RedisClient, key_prefix: str, tickers: list[str]
) -> dict[str, tuple[float, ...]]:
    """Each ticker's stored price history, decoded from the documented layout."""
    return await stored_histories(redis, key_prefix, tickers)


def assert_valued_at(portfolio: Portfolio, prices: dict[str, float]) -> None:
    """Held at exactly ``prices`` (for its tickers), and its total is quantity x price."""
    assert portfolio.prices == {t: prices[t] for t in portfolio.holdings}
    expected = sum(q * portfolio.prices[t] for t, q in portfolio.holdings.items())
    assert portfolio.total_value == pytest.approx(expected, rel=1e-12)


# -- a tick ----------------------------------------------------------------------------------


async def test_a_tick_moves_prices_grows_histories_and_revalues_every_session(
    parts: Parts, key_prefix: str
) -> None:
    market, store, redis = parts
    with trio.fail_after(30):
        before = {
            "one": await new_session(market, store, "one", {"AAPL": 10.0, "MSFT": 2.5}),
            "two": await new_session(market, store, "two", {"XOM": 4.0}),
            "three": await new_session(market, store, "three", {"AAPL": 1.0, "XOM": 1.0}),
        }
        await redis.execute("SADD", store.keys.index_bucket(store.keys.bucket_of("ghost")), "ghost")
        tickers = ["AAPL", "MSFT", "XOM"]
        old_prices = await market.prices()
        old_history = await histories(redis, key_prefix, tickers)
        assert all(len(h) == HISTORY_LENGTH for h in old_history.values())

        report = await tick_once(market, store, revalue_batch=2)  # two batches

        assert report.tick == 1
        assert set(report.prices) == set(tickers)
        assert all(report.prices[t] != old_prices[t] for t in tickers), "every price moves"
        assert await market.prices() == report.prices
        assert await redis.execute("GET", f"{key_prefix}:{{market}}:tick") == "1"
        new_history = await histories(redis, key_prefix, tickers)
        for t in tickers:
            assert new_history[t][-1] == report.prices[t], "the tick's price is appended"
            assert new_history[t][:-1] == old_history[t][1:], "the oldest is trimmed at the cap"
        assert (report.sessions_revalued, report.sessions_changed) == (3, 3)
        assert report.sessions_pruned == 1
        assert (await store.session_census()).live == 3
        for session_id, old in before.items():
            now = await store.get(session_id)
            assert now is not None
            assert now.holdings == old.holdings
            assert_valued_at(now, report.prices)
            assert now.portfolio_version == old.portfolio_version + 1
            assert now.last_activity == old.last_activity, "a revaluation is not activity"

        # A longer cap (say, a restart with a larger history_length) lets histories grow.
        longer = MarketData(
            redis,
            GbmSimulator(seed=SEED),
            key_prefix=key_prefix,
            history_length=HISTORY_LENGTH + 2,
        )
        second = await tick_once(longer, store)
        assert second.tick == 2
        grown = await histories(redis, key_prefix, tickers)
        for t in tickers:
            assert grown[t] == (*new_history[t], second.prices[t])
        assert second.sessions_revalued == 3


async def test_a_tick_with_no_tickers_writes_nothing(parts: Parts, key_prefix: str) -> None:
    market, store, redis = parts
    with trio.fail_after(10):
        report = await tick_once(market, store)
        assert (report.tick, report.prices, report.sessions_revalued) == (0, {}, 0)
        assert await redis.execute("GET", f"{key_prefix}:{{market}}:tick") is None


# -- leadership -------------------------------------------------------------------------------


class RecordingMarket(MarketData):
    """The real market, noting when each ``try_lead`` answered and what."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.leads: list[tuple[float, bool]] = []

    async def try_lead(self, holder: str, ttl_seconds: float) -> bool:
        led = await super().try_lead(holder, ttl_seconds)
        self.leads.append((trio.current_time(), led))
        return led


INTERVAL = 0.1
LEASE = 2 * INTERVAL  # run_market_updater holds leadership for two intervals
SLACK = 0.3  # scheduling on a loaded machine, on top of one polling interval


async def test_one_of_two_updaters_leads_and_the_other_takes_over_within_the_lease(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    ticks: list[list[tuple[float, TickReport]]] = [[], []]
    ticked = [trio.Event(), trio.Event()]  # set at each updater's first tick
    enough = trio.Event()  # set once the two together ticked eight times
    scopes = [trio.CancelScope(), trio.CancelScope()]

    def on_tick(i: int, report: TickReport) -> None:
        ticks[i].append((trio.current_time(), report))
        ticked[i].set()
        if len(ticks[0]) + len(ticks[1]) >= 8:
            enough.set()

    async with (
        market_on(real_redis.url, key_prefix, market_cls=RecordingMarket) as (first, one, _),
        market_on(real_redis.url, key_prefix, market_cls=RecordingMarket) as (second, two, _),
    ):
        assert isinstance(first, RecordingMarket)
        assert isinstance(second, RecordingMarket)
        markets, stores = [first, second], [one, two]
        with trio.fail_after(30):
            await new_session(first, one, "held", {"AAPL": 3.0})

            async def updater(i: int) -> None:
                with scopes[i]:
                    await run_market_updater(
                        markets[i],
                        stores[i],
                        interval=INTERVAL,
                        on_tick=functools.partial(on_tick, i),
                    )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(updater, 0)
                nursery.start_soon(updater, 1)
                await enough.wait()
                leader = 0 if ticks[0] else 1
                follower = 1 - leader
                assert ticks[follower] == [], "both updaters ticked: two leaders"
                tries = markets[follower].leads
                assert len(tries) >= 4, "the follower kept asking"
                assert not any(led for _, led in tries)

                scopes[leader].cancel()  # the leader stops renewing
                with trio.fail_after(5 * LEASE):  # (the gap is checked below, precisely)
                    await ticked[follower].wait()
                nursery.cancel_scope.cancel()

    renewals = [t for t, led in markets[leader].leads if led]
    takeover = min(t for t, led in markets[follower].leads if led)
    gap = takeover - max(renewals)
    print(f"\nleadership handover: {gap:.3f}s after the last renewal (lease {LEASE:.2f}s)")
    assert gap >= LEASE - 0.05, "the follower took over before the lease ran out"
    assert gap <= LEASE + INTERVAL + SLACK, "the follower did not take over within the lease"
    numbers = [r.tick for _, r in ticks[leader] + ticks[follower]]
    assert numbers == list(range(1, len(numbers) + 1)), "the tick sequence is unbroken"


# -- a tick racing an edit --------------------------------------------------------------------


@pytest.mark.parametrize(
    "step",
    [
        pytest.param("advance", id="edit-before-the-prices-move"),
        pytest.param("revalue_many", id="edit-between-prices-and-revaluation"),
    ],
)
async def test_a_tick_racing_set_holdings_loses_no_update(parts: Parts, step: str) -> None:
    """The edit lands while the tick is held before ``step``: the session ends with the
    new holdings, valued at the tick's prices, with a total consistent with both."""
    market, store, _ = parts
    with trio.fail_after(30):
        await new_session(market, store, "racer", {"AAPL": 10.0, "MSFT": 5.0})
        new = {"MSFT": 7.0, "NVDA": 3.0}
        # The prices the editing connection read before the tick: stale once it moves.
        seen = await market.ensure_prices(list(new), holder="tests")
        reached, release = trio.Event(), trio.Event()
        hold_before(market if step == "advance" else store, step, reached, release)
        reports: list[TickReport] = []

        async def tick() -> None:
            reports.append(await tick_once(market, store))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            await reached.wait()
            edited = await store.set_holdings("racer", new, seen, utc_now())
            assert edited is not None
            release.set()

        (report,) = reports
        assert report.sessions_revalued == 1
        final = await store.get("racer")
        assert final is not None
        assert final.holdings == new, "the edit was lost"
        assert_valued_at(final, report.prices)
        assert final.portfolio_version == edited.portfolio.portfolio_version + 1
