"""Revaluation passes decoupled from the price tick: ticks on schedule, sessions trail by a pass.

Rules of this suite: real redis-servers (``real_redis`` for the updater runs,
``store_target`` for what the scripts do, every server and layout); the
production updater (:func:`run_market_updater`) or its parts; a walk slower
than the interval is made so by a real store whose ``revalue_many`` waits a
little before each page (so the Redis work is real and the slowness is
deterministic, whatever the machine's load); sessions are read back raw
(``HMGET``), as any reader would see them.  Every wait is under
``fail_after``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import pytest
import trio

from trio_portfolio.market import (
    MarketData,
    PassReport,
    PriceCache,
    TickReport,
    TickShare,
    revalue_pass,
    run_market_updater,
    tick_once,
)
from trio_portfolio.models import utc_now
from trio_portfolio.redis_io import RedisClient, open_redis
from trio_portfolio.simulation import GbmSimulator
from trio_portfolio.store import INDEX_BUCKETS, SessionStore, open_store
from trio_portfolio.testing import RedisServerInfo, StoreTarget

TICKERS = [f"T{i:02d}" for i in range(12)]

Parts = tuple[RedisClient, SessionStore, MarketData]


@asynccontextmanager
async def parts_on(
    url: str, prefix: str, layout: Literal["json", "hash"] = "hash"
) -> AsyncIterator[Parts]:
    async with open_redis(url, timeout=30) as redis:
        with trio.fail_after(10):
            store = await open_store(redis, layout=layout, key_prefix=prefix)
            market = MarketData(redis, GbmSimulator(seed=5), key_prefix=prefix)
            await market.load_scripts()
        yield redis, store, market


async def fill(store: SessionStore, market: MarketData, count: int) -> list[str]:
    """``count`` sessions holding three of :data:`TICKERS` each."""
    prices = dict(await market.ensure_prices(TICKERS, holder="tests"))
    ids = [f"s{i}" for i in range(count)]
    for i, session_id in enumerate(ids):
        holdings = {TICKERS[(i + 5 * k) % len(TICKERS)]: 1.0 + k for k in range(3)}
        await store.create_if_missing(session_id, holdings, prices, utc_now())
    return ids


def slow_pages(store: SessionStore, seconds: float) -> None:
    """Make each page of a walk wait ``seconds`` first (the store itself is untouched)."""
    original = store.revalue_many

    @functools.wraps(original)
    async def slow(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep(seconds)
        return await original(*args, **kwargs)

    store.revalue_many = slow  # type: ignore[method-assign]


async def valued(redis: RedisClient, store: SessionStore, ids: list[str]) -> list[Any]:
    """``[valued_tick, as_of, portfolio_version]`` of each session, raw."""
    return await redis.pipeline(
        [("HMGET", store.keys.session(s), "valued_tick", "as_of", "portfolio_version") for s in ids]
    )


def note_help(ticks: list[int], tick: int, _share: TickShare) -> None:
    """An ``on_help`` that notes the pass's tick."""
    ticks.append(tick)


@attrs.define
class Sampler:
    """Reads every session all along; notes any that went back in tick, time or version."""

    first: dict[str, int] = attrs.Factory(dict)
    last: dict[str, tuple[int, str, int]] = attrs.Factory(dict)
    violations: list[str] = attrs.Factory(list)
    reads: int = 0

    def check(self, ids: list[str], rows: list[Any]) -> None:
        self.reads += 1
        for session_id, (tick, as_of, version) in zip(ids, rows, strict=True):
            if tick is None:
                continue
            now = (int(tick), as_of, int(version))
            before = self.last.setdefault(session_id, now)
            self.first.setdefault(session_id, now[0])
            if now[0] < before[0] or now[1] < before[1] or now[2] < before[2]:
                self.violations.append(f"{session_id}: {before} -> {now}")
            self.last[session_id] = now

    async def run(self, redis: RedisClient, store: SessionStore, ids: list[str]) -> None:
        while True:
            self.check(ids, await valued(redis, store, ids))
            await trio.sleep(0.03)


async def test_ticks_keep_their_schedule_while_a_slow_walk_trails_them(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    """A walk of ~0.64 s (64 pages of 10 ms, one pipeline) against 0.1 s ticks: every
    slot is ticked, none skipped; passes complete one after another, each opened at
    the newest tick, lagging it; every session moves forward, never back."""
    interval, seconds = 0.1, 3.0
    ticks: list[tuple[float, TickReport]] = []
    passes: list[PassReport] = []
    sampler = Sampler()
    async with parts_on(real_redis.url, key_prefix) as (redis, store, market):
        with trio.fail_after(60):
            ids = await fill(store, market, 256)
            slow_pages(store, 0.01)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler.run, redis, store, ids)
                nursery.start_soon(
                    functools.partial(
                        run_market_updater,
                        market,
                        store,
                        interval=interval,
                        pipelines=1,
                        on_tick=lambda r: ticks.append((trio.current_time(), r)),
                        on_pass=passes.append,
                    )
                )
                await trio.sleep(seconds)
                nursery.cancel_scope.cancel()
            sampler.check(ids, await valued(redis, store, ids))
    numbers = [r.tick for _, r in ticks]
    completed = [p for p in passes if p.completed]
    lags = [p.lag for p in completed]
    print(
        f"\n{len(ticks)} ticks in {seconds}s at {interval}s, skipped "
        f"{sum(r.ticks_skipped for _, r in ticks)}; {len(completed)} passes, "
        f"{[round(p.pass_seconds, 2) for p in completed]} s, lag {lags} ticks"
    )
    assert numbers == list(range(1, len(numbers) + 1)), "the tick sequence is unbroken"
    assert sum(r.ticks_skipped for _, r in ticks) == 0, "a slow walk made the advance skip"
    assert len(ticks) >= 0.8 * seconds / interval, "ticks did not keep the interval"
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(ticks)]
    assert max(gaps) < 3 * interval, f"a tick waited for a walk: gaps up to {max(gaps):.3f}s"
    assert len(completed) >= 3, "passes did not complete one after another"
    assert all(p.pass_seconds > interval for p in completed), "the walk was not slower"
    assert max(lags) >= 3, "the passes did not trail the ticks"
    pass_ticks = [p.tick for p in completed]
    assert pass_ticks == sorted(set(pass_ticks)), "a pass completed twice or out of order"
    assert all(b - a >= 3 for a, b in itertools.pairwise(pass_ticks)), (
        "the next pass did not jump to the newest tick"
    )
    assert all(p.prices_tick >= p.tick for p in passes)
    assert sampler.violations == [], sampler.violations[:5]
    assert sampler.reads >= 10
    final = {s: t for s, (t, _, _) in sampler.last.items()}
    assert len(final) == len(ids), "a session was never revalued"
    assert all(final[s] > sampler.first[s] for s in ids), "a session's valued_tick stood still"
    assert min(final.values()) >= pass_ticks[-1], "a completed pass left a session behind"


async def test_two_updaters_share_the_passes(real_redis: RedisServerInfo, key_prefix: str) -> None:
    """Two updaters (two clients) in one process: one leads, both walk; each pass's
    buckets are split between them and it completes once, in one of them."""
    interval, seconds = 0.1, 3.0
    ticks: list[list[TickReport]] = [[], []]
    passes: list[list[PassReport]] = [[], []]
    helped: list[list[int]] = [[], []]
    async with (
        parts_on(real_redis.url, key_prefix) as (redis, one, first),
        parts_on(real_redis.url, key_prefix) as (_, two, second),
    ):
        with trio.fail_after(60):
            ids = await fill(one, first, 256)
            stores, markets = [one, two], [first, second]
            for store in stores:
                slow_pages(store, 0.02)
            sampler = Sampler()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sampler.run, redis, one, ids)
                for i in range(2):
                    nursery.start_soon(
                        functools.partial(
                            run_market_updater,
                            markets[i],
                            stores[i],
                            interval=interval,
                            pipelines=2,
                            on_tick=ticks[i].append,
                            on_pass=passes[i].append,
                            on_help=functools.partial(note_help, helped[i]),
                        )
                    )
                await trio.sleep(seconds)
                nursery.cancel_scope.cancel()
            sampler.check(ids, await valued(redis, one, ids))
    leader = 0 if ticks[0] else 1
    follower = 1 - leader
    completed = [p for side in passes for p in side if p.completed]
    shared = set(p.tick for p in passes[0]) & set(p.tick for p in passes[1])
    print(
        f"\nticks by updater {[len(t) for t in ticks]}; passes walked "
        f"{[len(p) for p in passes]}, completed {len(completed)}, shared {len(shared)}; "
        f"buckets {[sum(p.buckets for p in side) for side in passes]}"
    )
    assert ticks[follower] == [], "both updaters advanced the market"
    assert [r.tick for r in ticks[leader]] == list(range(1, len(ticks[leader]) + 1))
    assert sum(r.ticks_skipped for r in ticks[leader]) == 0
    assert len(completed) >= 3
    assert len({p.tick for p in completed}) == len(completed), "a pass completed twice"
    assert len(shared) >= 2, "the two updaters never walked the same pass"
    assert helped[follower], "the non-leader's shares were not reported by on_help"
    assert not helped[leader], "on_help reported the leader's share"
    for tick in {p.tick for p in completed}:
        walked = sum(p.buckets for side in passes for p in side if p.tick == tick)
        assert walked >= INDEX_BUCKETS, f"pass {tick}: only {walked} buckets done"
    assert sampler.violations == [], sampler.violations[:5]
    assert all(sampler.last[s][0] > sampler.first[s] for s in ids)


@pytest.fixture
async def parts(store_target: StoreTarget, key_prefix: str) -> AsyncIterator[Parts]:
    async with parts_on(store_target.server.url, key_prefix, store_target.layout) as p:
        yield p


async def ticks_of(redis: RedisClient, store: SessionStore, ids: list[str]) -> list[int | None]:
    """Each session's ``valued_tick`` in either layout (None: never revalued)."""
    out: list[int | None] = []
    for session_id in ids:
        key = store.keys.session(session_id)
        if store.layout == "hash":
            raw = await redis.execute("HGET", key, "valued_tick")
        else:
            reply = await redis.execute("JSON.GET", key, "$.valued_tick")
            raw = None if reply in (None, "[]", "[null]") else reply.strip("[]")
        out.append(None if raw in (None, "") else int(raw))
    return out


async def test_a_pass_outlives_ticks_and_never_moves_a_session_back(parts: Parts) -> None:
    """Ticks taken while a pass runs leave it open; it is walked with the newest
    prices, labelled with their tick (not the pass's); a session a newer writer
    already valued is fenced; once complete the next pass opens at the newest tick."""
    redis, store, market = parts
    with trio.fail_after(30):
        ids = await fill(store, market, 20)
        assert (await market.advance())[0] == 1
        assert await market.tick_progress() == (-1, 0), "the first pass is the walkers' to open"
        state = await market.open_pass()
        assert (state.tick, state.market_tick, state.opened) == (1, 1, True)
        for expected in (2, 3):
            assert (await market.advance())[0] == expected
        assert await market.tick_progress() == (1, 0), "a tick replaced a running pass"
        state = await market.open_pass()
        assert (state.tick, state.market_tick, state.opened) == (1, 3, False)
        # A newer writer (prices of a tick 5 some other view had) got to s0 first.
        (ahead,) = await store.revalue_many(["s0"], {t: 1.0 for t in TICKERS}, "later", tick=5)
        assert ahead.changed

        share = await revalue_pass(market, store, 1, taker="me", cache=PriceCache())
        assert share.completed, "the pass did not complete"
        assert share.lag == 2, "the pass did not complete 2 ticks behind"
        assert share.prices_tick == 3
        assert share.fenced == 1
        assert share.revalued == len(ids) - 1
        assert await ticks_of(redis, store, ids) == [5] + [3] * (len(ids) - 1)
        latest = await market.read()
        portfolio = await store.get("s1")
        assert portfolio is not None
        assert portfolio.prices == {t: latest.prices[t] for t in portfolio.holdings}

        state = await market.open_pass()
        assert (state.tick, state.done, state.opened) == (3, 0, True), "next pass not at newest"
        assert (await market.open_pass()).opened is False, "a pass was opened twice"
        # A done of the old pass, arriving late, records nothing.
        assert await market.finish_buckets(1, [0, 1], {"T00"}) is None
        assert await market.tick_progress() == (3, 0)

        # tick_once walks the open pass (of 3) with tick 4's prices, then opens and
        # walks the pass of 4 (already valued: fenced); s0 stays at 5.
        report = await tick_once(market, store)
        assert report.tick == 4
        assert await ticks_of(redis, store, ids) == [5] + [4] * (len(ids) - 1)
        assert report.sessions_revalued == len(ids) - 1
        assert report.sessions_fenced == len(ids) + 1  # s0 in both passes, the rest in 4's
        assert await market.tick_progress() == (4, INDEX_BUCKETS)


async def test_a_slow_walker_renews_its_buckets_and_a_stopped_one_holds_up_a_pass_briefly(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    """A walker slower than its lease keeps its buckets by renewing them (nothing is
    redone); one cancelled mid-pass gives its buckets back at once; a dead taker's
    buckets are handed out again when its lease runs out.  (Timing: one real server.)"""
    async with parts_on(real_redis.url, key_prefix) as (redis, store, market):
        await _slow_stopped_and_dead_walkers(redis, store, market)


async def _slow_stopped_and_dead_walkers(
    redis: RedisClient, store: SessionStore, market: MarketData
) -> None:
    with trio.fail_after(30):
        ids = await fill(store, market, 128)
        await market.advance()
        assert (await market.open_pass()).opened
        slow_pages(store, 0.12)  # four buckets a take: about 0.5 s, longer than the lease
        share = await revalue_pass(
            market, store, 1, taker="slow", cache=PriceCache(), pipelines=4, bucket_lease=0.4
        )
        assert share.completed
        assert share.buckets == INDEX_BUCKETS
        assert share.revalued == len(ids), "buckets were redone"
        assert share.fenced == 0, "buckets were redone"

        await market.advance()
        assert (await market.open_pass()).tick == 2
        with trio.move_on_after(0.1):  # mid-pass: a shutdown
            await revalue_pass(market, store, 2, taker="stopped", cache=PriceCache())
        store.revalue_many = type(store).revalue_many.__get__(store)  # type: ignore[method-assign]
        began = trio.current_time()
        share = await revalue_pass(market, store, 2, taker="next", cache=PriceCache())
        assert share.completed, "the stopped walker's buckets were not given back"
        assert trio.current_time() - began < 1.0

        await market.advance()
        assert (await market.open_pass()).tick == 3
        ghost_until = trio.current_time() + 1.5
        ghost = await market.take_buckets("ghost", 1.5, 4, 3)  # and never heard of again
        assert ghost is not None
        share = await revalue_pass(market, store, 3, taker="next", cache=PriceCache())
        assert not share.completed
        assert share.buckets == INDEX_BUCKETS - 4
        await trio.sleep_until(ghost_until + 0.1)
        share = await revalue_pass(market, store, 3, taker="next", cache=PriceCache())
        assert share.completed
        assert share.buckets == 4
        assert set(await ticks_of(redis, store, ids)) == {3}


async def test_a_cancelled_walker_gives_back_buckets_it_never_heard_it_took(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    """A take cancelled while its answer was on the way holds buckets its walker does not
    know of; the give-back on cancellation ends every lease of the taker in the pass, and
    nobody else's."""
    async with parts_on(real_redis.url, key_prefix) as (_redis, store, market):
        with trio.fail_after(30):
            await fill(store, market, 16)
            await market.advance()
            pass_tick = (await market.open_pass()).tick
            lost = await market.take_buckets("lost", 60.0, 4, pass_tick)  # the lost answer
            other = await market.take_buckets("other", 60.0, 2, pass_tick)
            assert lost is not None
            assert other is not None
            assert await market.release_buckets("lost", pass_tick) == 4
            assert await market.release_buckets("lost", pass_tick + 1) == 0  # another pass
            again = await market.take_buckets("next", 60.0, 64, pass_tick)
            assert again is not None
            assert set(lost.buckets) <= set(again.buckets)
            assert not set(other.buckets) & set(again.buckets), "another taker's leases ended"
