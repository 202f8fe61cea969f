"""Fenced market writes and the bounded universe, on every (server, layout) pair.

Rules of this suite: the harness's ``store_target`` (real redis-servers, the
fakeredis JSON emulator where no real Redis has JSON) for what scripts do to
sessions and to the market; keys under the per-test ``key_prefix``;
``fail_after`` around everything that talks to Redis.  A session's fields
are read back raw (``HMGET`` / ``JSON.GET``), as the layouts document them.
Interleavings that matter are forced, not hoped for: a wrapper around the
real store's method does the edit at the chosen step.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
import pytest
import trio

from trio_portfolio.market import (
    FixedRate,
    MarketData,
    TickerRefused,
    TickRace,
    run_market_updater,
    tick_once,
)
from trio_portfolio.market_data import load_symbols
from trio_portfolio.models import utc_now
from trio_portfolio.protocol import ErrorCode
from trio_portfolio.redis_io import RedisClient
from trio_portfolio.store import (
    ClaimedPrices,
    ClaimExpired,
    MarketPrices,
    RevalueTally,
    SessionStore,
)
from trio_portfolio.testing import StoreTarget, hold_before
from trio_portfolio.testing.redis_clients import store_and_market

HOLDINGS = {"AAPL": 10.0, "MSFT": 2.0}
PRICES = {"AAPL": 100.0, "MSFT": 200.0, "XOM": 50.0}
T0, T1, T2 = (f"2026-11-21T10:00:0{i}.000Z" for i in range(3))

Parts = tuple[SessionStore, MarketData, RedisClient]


def parts_on(
    target: StoreTarget, key_prefix: str, **market: Any
) -> AbstractAsyncContextManager[Parts]:
    return store_and_market(target, key_prefix, seed=3, **market)


@pytest.fixture
async def parts(store_target: StoreTarget, key_prefix: str) -> AsyncIterator[Parts]:
    async with parts_on(store_target, key_prefix) as p:
        yield p


async def fields(redis: RedisClient, store: SessionStore, session_id: str) -> dict[str, Any]:
    """``valued_tick``, ``as_of``, ``superseded_at`` as stored (None when absent)."""
    names = ("valued_tick", "as_of", "superseded_at")
    key = store.keys.session(session_id)
    if store.layout == "hash":
        values = await redis.execute("HMGET", key, *names)
        return {
            "valued_tick": None if values[0] is None else int(values[0]),
            "as_of": values[1],
            "superseded_at": None if not values[2] else int(values[2]),
        }
    raw = orjson.loads(await redis.execute("JSON.GET", key, *(f"$.{n}" for n in names)))
    return {n: (raw[f"$.{n}"] or [None])[0] for n in names}


async def clear_superseded(redis: RedisClient, store: SessionStore, session_id: str) -> None:
    """What an analysis start does to ``superseded_at`` (the other helper's scripts)."""
    key = store.keys.session(session_id)
    if store.layout == "hash":
        await redis.execute("HSET", key, "superseded_at", "")
    else:
        await redis.execute("JSON.SET", key, "$.superseded_at", "null")


# -- the fence ------------------------------------------------------------------------------


async def test_a_revaluation_never_goes_back_in_tick(parts: Parts) -> None:
    store, _, redis = parts
    with trio.fail_after(10):
        await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
        (first,) = await store.revalue_many(["s1"], {"AAPL": 101.0, "MSFT": 200.0}, T1, tick=5)
        assert first.changed
        assert first.portfolio_version == 2
        assert (await fields(redis, store, "s1"))["valued_tick"] == 5
        assert (await fields(redis, store, "s1"))["as_of"] == T1

        tally = RevalueTally()
        for tick in (4, 5):  # older, and the same tick again: both do nothing
            (late,) = await store.revalue_many(
                ["s1"], {"AAPL": 1.0, "MSFT": 1.0}, T2, tick=tick, tally=tally
            )
            assert not late.changed
            assert (late.portfolio_version, late.total_value) == (2, first.total_value)
        assert tally.fenced == 2
        portfolio = await store.get("s1")
        assert portfolio is not None
        assert portfolio.prices == {"AAPL": 101.0, "MSFT": 200.0}
        assert await fields(redis, store, "s1") == {
            "valued_tick": 5,
            "as_of": T1,
            "superseded_at": (await fields(redis, store, "s1"))["superseded_at"],
        }

        (newer,) = await store.revalue_many(["s1"], {"AAPL": 102.0, "MSFT": 200.0}, T2, tick=6)
        assert newer.changed
        assert newer.portfolio_version == 3
        # Unchanged prices at a newer tick: no new version, but valued at that tick.
        (same,) = await store.revalue_many(["s1"], {"AAPL": 102.0, "MSFT": 200.0}, T2, tick=7)
        assert not same.changed
        assert same.portfolio_version == 3
        assert (await fields(redis, store, "s1"))["valued_tick"] == 7


async def test_superseded_at_marks_the_first_change_until_cleared(parts: Parts) -> None:
    store, _, redis = parts
    with trio.fail_after(10):
        await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
        assert (await fields(redis, store, "s1"))["superseded_at"] is None
        await store.revalue_many(["s1"], {"AAPL": 100.0, "MSFT": 200.0}, T1, tick=1)
        assert (await fields(redis, store, "s1"))["superseded_at"] is None, "nothing moved"

        seconds, _ = await redis.execute("TIME")
        await store.revalue_many(["s1"], {"AAPL": 101.0}, T1, tick=2)
        marked = (await fields(redis, store, "s1"))["superseded_at"]
        assert marked is not None
        assert abs(marked - int(seconds) * 1000) < 5000  # Redis's clock, in ms
        await trio.sleep(0.01)
        await store.revalue_many(["s1"], {"AAPL": 102.0}, T2, tick=3)
        assert (await fields(redis, store, "s1"))["superseded_at"] == marked, "kept the first"

        await clear_superseded(redis, store, "s1")
        await store.revalue_many(["s1"], {"AAPL": 103.0}, T2, tick=4)
        assert (await fields(redis, store, "s1"))["superseded_at"] is not None


async def test_each_session_is_sent_only_its_own_prices(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, redis = parts
    market = {f"X{i:03d}": 1.0 + i for i in range(300)} | {"AAPL": 101.0, "MSFT": 201.0}
    with trio.fail_after(10):
        await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
        await store.create_if_missing("s2", {"XOM": 3.0}, PRICES, T0)
        sent: list[tuple[Any, ...]] = []
        original = redis.evalsha_many

        async def spy(script: Any, calls: Any, **kwargs: Any) -> list[Any]:
            sent.extend(calls)
            return await original(script, calls, **kwargs)

        monkeypatch.setattr(redis, "evalsha_many", spy)
        outcomes = await store.revalue_many(["s1", "s2"], MarketPrices(market), T1, tick=1)
    assert [o.changed for o in outcomes] == [True, False]  # XOM is not in the market: kept
    (_, (_, _, s1_prices)), (_, (_, _, s2_prices)) = sent
    assert sorted(s1_prices.split(";")) == ["AAPL=101.0", "MSFT=201.0"]
    assert s2_prices == "XOM=", "a ticker the market does not price keeps the stored price"
    portfolio = await store.get("s2")
    assert portfolio is not None
    assert portfolio.prices == {"XOM": 50.0}


async def test_holdings_that_move_between_the_two_reads_are_sent_again(parts: Parts) -> None:
    store, _, _ = parts
    with trio.fail_after(10):
        await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
        stale = store.held_tickers

        def before_the_edit(reply: Any) -> list[str]:
            return [t for t in stale(reply) if t != "MSFT"]  # read before MSFT was added

        store.held_tickers = before_the_edit  # type: ignore[method-assign]
        tally = RevalueTally()
        (outcome,) = await store.revalue_many(
            ["s1"], {"AAPL": 101.0, "MSFT": 202.0}, T1, tick=1, tally=tally
        )
    assert tally.resent == 1
    assert tally.held == {"AAPL", "MSFT"}
    assert outcome.changed
    portfolio = await store.get("s1")
    assert portfolio is not None
    assert portfolio.prices == {"AAPL": 101.0, "MSFT": 202.0}


async def test_a_write_later_than_its_claim_allows_changes_nothing(parts: Parts) -> None:
    store, _, redis = parts
    with trio.fail_after(10):
        seconds, micros = await redis.execute("TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        old = ClaimedPrices(PRICES, now_ms - 60_000)
        with pytest.raises(ClaimExpired):
            await store.create_if_missing("s1", HOLDINGS, old, T0)
        assert await store.get("s1") is None
        await store.create_if_missing("s1", HOLDINGS, ClaimedPrices(PRICES, now_ms), T0)
        # An existing session writes no holdings on connect: an old claim is fine.
        await store.create_if_missing("s1", HOLDINGS, old, T1)
        with pytest.raises(ClaimExpired):
            await store.set_holdings("s1", {"XOM": 1.0}, old, T1)
        portfolio = await store.get("s1")
        assert portfolio is not None
        assert (portfolio.holdings, portfolio.portfolio_version) == (HOLDINGS, 1)


# -- the universe ---------------------------------------------------------------------------


async def test_the_universe_is_capped_and_a_refusal_changes_nothing(
    store_target: StoreTarget, key_prefix: str
) -> None:
    async with parts_on(store_target, key_prefix, max_tickers=5) as (_, market, _):
        with trio.fail_after(10):
            first = await market.ensure_prices(["A", "B", "C", "D"], holder="tests")
            assert sorted(first) == ["A", "B", "C", "D"]
            assert first.claimed_at_ms > 0
            with pytest.raises(TickerRefused) as refused:
                await market.ensure_prices(["A", "E", "F"], holder="tests")
            assert refused.value.code is ErrorCode.TICKER_LIMIT
            assert await market.universe_size() == 4
            assert sorted(await market.ensure_prices(["A", "E"], holder="tests")) == [
                "A",
                "E",
            ]  # fits: 5
            with pytest.raises(TickerRefused):
                await market.ensure_prices([f"N{i}" for i in range(6)], holder="tests")
            assert await market.universe_size() == 5


async def test_a_symbol_list_refuses_other_tickers_before_anything_is_sent(
    store_target: StoreTarget, key_prefix: str
) -> None:
    symbols = frozenset({"AAPL", "MSFT"})
    async with parts_on(store_target, key_prefix, symbols=symbols) as (_, market, _):
        with trio.fail_after(10):
            with pytest.raises(TickerRefused) as refused:
                await market.ensure_prices(["AAPL", "ZZZZ"], holder="tests")
            assert refused.value.code is ErrorCode.UNKNOWN_TICKER
            assert "ZZZZ" in refused.value.detail
            assert await market.universe_size() == 0
            assert sorted(await market.ensure_prices(["MSFT"], holder="tests")) == ["MSFT"]


async def test_a_ticker_no_live_session_holds_is_dropped_within_a_tick(parts: Parts) -> None:
    store, market, redis = parts
    with trio.fail_after(30):
        prices = await market.ensure_prices(["AAPL", "MSFT", "XOM"], holder="tests")
        await store.create_if_missing("keeps", {"AAPL": 1.0}, prices, utc_now())
        await store.create_if_missing("drops", {"MSFT": 1.0, "XOM": 1.0}, prices, utc_now())
        await trio.sleep(1.1)  # the claims above age past the grace
        report = await tick_once(market, store)
        assert report.tickers_pruned == ()
        edited = await market.ensure_prices(["XOM"], holder="tests")
        await store.set_holdings("drops", {"XOM": 2.0}, edited, utc_now())  # lets MSFT go
        await redis.execute("DEL", *store.session_keys("keeps"))  # expires: AAPL unheld
        await trio.sleep(1.1)
        report = await tick_once(market, store)
        assert sorted(report.tickers_pruned) == ["AAPL", "MSFT"]
        assert sorted(await market.prices()) == ["XOM"]
        assert await market.raw_histories(["AAPL", "MSFT"]) == {"AAPL": "", "MSFT": ""}
        assert report.sessions_pruned == 1


async def test_a_ticker_claimed_during_the_walk_is_never_dropped(parts: Parts) -> None:
    """The edit lands after the walk passed its session: its claim keeps the ticker."""
    store, market, _ = parts
    with trio.fail_after(30):
        prices = await market.ensure_prices(["AAPL"], holder="tests")
        await store.create_if_missing("racer", {"AAPL": 1.0}, prices, utc_now())
        await trio.sleep(1.1)
        original = store.revalue_many

        @functools.wraps(original)
        async def edit_after(*args: Any, **kwargs: Any) -> Any:
            outcomes = await original(*args, **kwargs)  # the walk saw only AAPL
            new = await market.ensure_prices(["NVDA"], holder="tests")
            await store.set_holdings("racer", {"NVDA": 1.0}, new, utc_now())
            return outcomes

        store.revalue_many = edit_after  # type: ignore[method-assign]
        report = await tick_once(market, store)
        store.revalue_many = original  # type: ignore[method-assign]
        assert "NVDA" not in report.tickers_pruned
        assert "NVDA" in await market.prices()
        await trio.sleep(1.1)
        second = await tick_once(market, store)
        assert second.tickers_pruned == ("AAPL",)
        assert sorted(await market.prices()) == ["NVDA"]


# -- leadership and the schedule -----------------------------------------------------------


async def test_an_advance_is_fenced_on_the_leader(parts: Parts) -> None:
    _, market, _ = parts
    with trio.fail_after(10):
        await market.ensure_prices(["AAPL"], holder="tests")
        assert await market.try_lead("me", 5)
        tick, _, _ = await market.advance("me")
        assert tick == 1
        with pytest.raises(TickRace):
            await market.advance("someone-else")
        assert (await market.read()).tick == 1


async def test_a_leader_that_loses_its_lease_mid_tick_stops_writing(parts: Parts) -> None:
    store, market, redis = parts
    reports: list[Any] = []
    with trio.fail_after(30):
        prices = await market.ensure_prices(["AAPL"], holder="tests")
        await store.create_if_missing("s1", {"AAPL": 1.0}, prices, utc_now())
        reached, release = trio.Event(), trio.Event()
        # The tick is the advance (the walk is a pass of its own): held in its first read.
        hold_before(market, "read", reached, release)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    run_market_updater, market, store, interval=0.2, on_tick=reports.append
                )
            )
            await reached.wait()  # mid-tick, before any price or session is written
            await redis.execute("SET", market.leader_key, "usurper", "PX", 60_000)
            await trio.sleep(0.6)  # past a renewal (every 0.2 s): the tick is cancelled
            release.set()
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    assert reports == [], "the tick of a lost lease completed"
    assert (await fields(redis, store, "s1"))["valued_tick"] is None, "it kept writing"
    assert await redis.execute("GET", market.tick_key) is None, "it advanced the market"


def test_the_fixed_rate_schedule_skips_missed_slots_without_drift() -> None:
    schedule = FixedRate(0.1, 10.0)
    assert schedule.after_tick(10.05) == 0
    assert schedule.next_at == pytest.approx(10.1)
    assert schedule.after_tick(10.19) == 0  # on time: next slot 10.2
    assert schedule.after_tick(10.55) == 3  # ran 10.2..10.55: slots 10.3, 10.4, 10.5 skipped
    assert schedule.next_at == pytest.approx(10.6)
    assert schedule.after_tick(10.6) == 0  # the 10.6 tick, done at once: next 10.7
    assert schedule.after_tick(10.95) == 2  # the 10.7 tick took 0.25 s: 10.8, 10.9 skipped
    assert schedule.next_at == pytest.approx(11.0)  # on the grid: no drift


def test_a_symbol_file_is_read_strictly(tmp_path: Any) -> None:
    path = tmp_path / "symbols.txt"
    path.write_text("# US large caps\nAAPL\nmsft  # lower case is fine\n\nBRK.B\n")
    assert load_symbols(path) == frozenset({"AAPL", "MSFT", "BRK.B"})
    path.write_text("AAPL\nnot a ticker\n")
    with pytest.raises(ValueError, match=r"symbols.txt:2: not a ticker"):
        load_symbols(path)
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no tickers"):
        load_symbols(path)


async def test_sessions_indexed_by_an_older_version_are_bucketed_and_revalued(
    parts: Parts,
) -> None:
    store, market, redis = parts
    with trio.fail_after(10):
        prices = dict(await market.ensure_prices(["AAPL"], holder="tests"))
        await store.create_if_missing("old", {"AAPL": 1.0}, prices, utc_now())
        # As a version without buckets left it: in the whole index only.
        bucket = store.keys.index_bucket(store.keys.bucket_of("old"))
        await redis.execute("SREM", bucket, "old")
        await redis.execute("SADD", store.keys.legacy_index, "old")
        report = await tick_once(market, store)
        assert report.sessions_revalued == 1
        assert await redis.execute("SISMEMBER", bucket, "old") == 1
        assert await redis.execute("EXISTS", store.keys.legacy_index) == 0
        assert (await fields(redis, store, "old"))["valued_tick"] == report.tick


async def test_buckets_that_outlive_their_lease_are_taken_again_and_finished(
    parts: Parts,
) -> None:
    store, market, redis = parts
    with trio.fail_after(20):
        prices = dict(await market.ensure_prices(["AAPL"], holder="tests"))
        ids = [f"s{i}" for i in range(40)]
        for session_id in ids:
            await store.create_if_missing(session_id, {"AAPL": 1.0}, prices, utc_now())
        original = store.revalue_many
        stalls = [0]

        @functools.wraps(original)
        async def stall_once(*args: Any, **kwargs: Any) -> Any:
            if not stalls[0]:
                stalls[0] += 1
                await trio.sleep(0.5)  # past the lease below: this take is abandoned
            return await original(*args, **kwargs)

        store.revalue_many = stall_once  # type: ignore[method-assign]
        report = await tick_once(market, store, bucket_lease=0.3, pipelines=2)
    assert stalls == [1]
    for session_id in ids:
        assert (await fields(redis, store, session_id))["valued_tick"] == report.tick
    assert (await market.tick_progress())[1] == 64
