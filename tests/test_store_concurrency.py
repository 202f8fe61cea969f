"""The session store under concurrent load: many Trio tasks on one session.

Rules of this suite: every (server, layout) pair from the harness
(``store_target``); keys under the per-test ``key_prefix``; ``fail_after``
around each test; seeded randomness per task (timing still varies, so the
assertions are invariants that must hold for *every* interleaving):

* no lost update - every result stored is present (the results limit is
  sized so nothing is trimmed), and nothing refused or forged is;
* the fence - in the stored order, an analysis never reappears once another
  one has stored after it, and portfolio versions never decrease;
* every version from 2 to the final one was made by exactly one recorded
  ``set_holdings`` or changing revaluation, and each task saw versions only
  increase;
* the session always reads back whole: totals equal the sum of quantity x
  price over the stored holdings and prices, every key keeps a TTL.

Some appends are cancelled mid-call: their results may or may not be stored
(each append is one script: it ran or it did not), but never twice.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import attrs
import pytest
import trio

from trio_portfolio.models import (
    METRICS,
    AnalysisResult,
    AppendStatus,
    Portfolio,
    Snapshot,
    utc_now,
)
from trio_portfolio.redis_connect import open_redis
from trio_portfolio.redis_io import RedisClient
from trio_portfolio.store import SessionStore, open_store
from trio_portfolio.testing import StoreTarget

SESSION = "busy"
TICKERS = ("AAA", "BBB", "CCC", "DDD", "EEE")
DURATION = 2.5
LIMIT = 100_000  # nothing is trimmed during the run


def total_of(holdings: Mapping[str, float], prices: Mapping[str, float]) -> float:
    return sum(holdings[t] * prices[t] for t in sorted(holdings))


def check_whole(portfolio: Portfolio) -> None:
    """The invariants any read of the session must satisfy."""
    assert portfolio.holdings
    assert set(portfolio.prices) == set(portfolio.holdings)
    assert portfolio.total_value == pytest.approx(
        total_of(portfolio.holdings, portfolio.prices), rel=1e-12
    )


@attrs.define
class Ledger:
    """What the tasks did, for the final checks."""

    stored: dict[str, AnalysisResult] = attrs.Factory(dict)
    refused: set[str] = attrs.Factory(set)
    forged: set[str] = attrs.Factory(set)
    uncertain: set[str] = attrs.Factory(set)
    bumps: list[int] = attrs.Factory(list)
    statuses: dict[AppendStatus, int] = attrs.Factory(dict)

    def count(self, status: AppendStatus) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


class Observer:
    """One task's view of the version: it may only increase."""

    def __init__(self) -> None:
        self.last = 0

    def see(self, version: int) -> None:
        assert version >= self.last, f"version went back from {self.last} to {version}"
        self.last = version


async def analyst(store: SessionStore, ledger: Ledger, index: int, deadline: float) -> None:
    """Like a connection's runner: start an analysis, then five metric tasks append at once."""
    rng = random.Random(index)
    observer = Observer()
    previous: str | None = None
    attempt = 0
    while trio.current_time() < deadline:
        attempt += 1
        analysis_id = f"a{index}-{attempt}"
        started = await store.start_analysis(SESSION, analysis_id, rng.choice(TICKERS), utc_now())
        if isinstance(started, Snapshot):
            observer.see(started.portfolio_version)
            async with trio.open_nursery() as nursery:
                for n in range(len(METRICS)):
                    seed = rng.random()
                    nursery.start_soon(metric, store, ledger, started, previous, n, seed)
            if rng.random() < 0.5:
                await store.finish_analysis(SESSION, analysis_id)
            previous = analysis_id
        await trio.sleep(rng.uniform(0, 0.05))


async def metric(
    store: SessionStore,
    ledger: Ledger,
    snapshot: Snapshot,
    previous: str | None,
    n: int,
    seed: float,
) -> None:
    """One metric's append: mostly genuine, some forged, some cancelled mid-call."""
    rng = random.Random(seed)
    await trio.sleep(rng.uniform(0, 0.02))
    token = f"{snapshot.analysis_id}-{n}"
    owner, version = snapshot.analysis_id, snapshot.portfolio_version
    roll = rng.random()
    if roll < 0.1 and previous is not None:
        owner = previous  # superseded by this task's own later start
    elif roll < 0.2:
        version -= 1  # older than the snapshot: stale by construction
    forged = (owner, version) != (snapshot.analysis_id, snapshot.portfolio_version)
    if forged:
        ledger.forged.add(token)
    item = AnalysisResult(
        analysis_id=owner,
        ticker=snapshot.ticker,
        metric=METRICS[n],
        value=rng.uniform(-1, 1),
        timestamp=token,
        portfolio_version=version,
    )
    status: AppendStatus | None = None
    if rng.random() < 0.1:
        with trio.move_on_after(rng.uniform(0, 0.003)):
            status = await store.append_result(SESSION, item)
        if status is None:
            ledger.uncertain.add(token)
    else:
        status = await store.append_result(SESSION, item)
    if status is not None:
        ledger.count(status)
        assert status is not AppendStatus.MISSING
        if status is AppendStatus.STORED:
            assert not forged, f"forged result {token} was stored"
            ledger.stored[token] = item
        else:
            ledger.refused.add(token)


async def rogue(store: SessionStore, ledger: Ledger, index: int, deadline: float) -> None:
    """Appends for analyses that were never started: always superseded."""
    rng = random.Random(1000 + index)
    n = 0
    while trio.current_time() < deadline:
        n += 1
        token = f"rogue{index}-{n}"
        ledger.forged.add(token)
        item = AnalysisResult(f"rogue{index}", "AAA", "momentum", 0.5, token, rng.randint(1, 50))
        status = await store.append_result(SESSION, item)
        assert status is AppendStatus.SUPERSEDED
        await trio.sleep(rng.uniform(0, 0.02))


async def revaluer(store: SessionStore, ledger: Ledger, index: int, deadline: float) -> None:
    """Market updates with random prices for random tickers (some repeated: no change)."""
    rng = random.Random(2000 + index)
    observer = Observer()
    prices: dict[str, float] = {}
    while trio.current_time() < deadline:
        if not prices or rng.random() < 0.8:
            prices = {t: round(rng.uniform(10, 20), 2) for t in rng.sample(TICKERS, 3)}
        (outcome,) = await store.revalue_many([SESSION], prices, utc_now())
        assert not outcome.missing
        observer.see(outcome.portfolio_version)
        if outcome.changed:
            ledger.bumps.append(outcome.portfolio_version)
        await trio.sleep(rng.uniform(0.02, 0.3))


async def holder(store: SessionStore, ledger: Ledger, index: int, deadline: float) -> None:
    """Replaces the holdings."""
    rng = random.Random(3000 + index)
    observer = Observer()
    while trio.current_time() < deadline:
        holdings = {t: float(rng.randint(1, 100)) for t in rng.sample(TICKERS, rng.randint(1, 5))}
        prices = {t: round(rng.uniform(10, 20), 2) for t in TICKERS}
        replaced = await store.set_holdings(SESSION, holdings, prices, utc_now())
        assert replaced is not None
        portfolio = replaced.portfolio
        assert portfolio.holdings == holdings
        check_whole(portfolio)
        observer.see(portfolio.portfolio_version)
        ledger.bumps.append(portfolio.portfolio_version)
        await trio.sleep(rng.uniform(0.1, 0.5))


async def reader(store: SessionStore, ledger: Ledger, index: int, deadline: float) -> None:
    """Reads (and touches) the session, checking each read is whole."""
    rng = random.Random(4000 + index)
    observer = Observer()
    while trio.current_time() < deadline:
        portfolio = await store.get(SESSION)
        assert portfolio is not None
        check_whole(portfolio)
        observer.see(portfolio.portfolio_version)
        assert await store.touch(SESSION, utc_now())
        await trio.sleep(rng.uniform(0, 0.02))


@pytest.mark.slow
async def test_fifty_tasks_on_one_session(store_target: StoreTarget, key_prefix: str) -> None:
    ledger = Ledger()
    async with open_redis(store_target.server.url, connections=4, timeout=10) as redis:
        store = await open_store(
            redis, layout=store_target.layout, key_prefix=key_prefix, results_limit=LIMIT
        )
        await store.create_if_missing(
            SESSION, {t: 10.0 for t in TICKERS}, {t: 15.0 for t in TICKERS}, utc_now()
        )
        with trio.fail_after(DURATION + 60):
            deadline = trio.current_time() + DURATION
            async with trio.open_nursery() as nursery:
                # 4 x (1 + 5 metric tasks) + 5 + 8 + 3 + 10 = 50 tasks.
                for role, count in ((analyst, 4), (rogue, 5), (revaluer, 8), (holder, 3)):
                    for i in range(count):
                        nursery.start_soon(role, store, ledger, i, deadline)
                for i in range(10):
                    nursery.start_soon(reader, store, ledger, i, deadline)
            final = await store.get(SESSION)
            await check_keys_keep_ttl(redis, store)

    assert final is not None
    check_whole(final)
    # Enough happened for the run to mean something.
    assert ledger.statuses.get(AppendStatus.STORED, 0) > 20
    assert ledger.statuses.get(AppendStatus.STALE, 0) > 0
    assert ledger.statuses.get(AppendStatus.SUPERSEDED, 0) > 0

    present = [r.timestamp for r in final.analysis_results]
    assert len(present) == len(set(present)), "a result was stored twice"
    assert set(ledger.stored) <= set(present), "a stored result was lost"
    assert set(present) <= set(ledger.stored) | ledger.uncertain, "an unrecorded result"
    assert not set(present) & (ledger.refused | ledger.forged)
    for stored in final.analysis_results:
        if stored.timestamp in ledger.stored:
            assert stored == ledger.stored[stored.timestamp]

    # The fence, read from the stored order.
    left: set[str] = set()
    for before, after in zip(final.analysis_results, final.analysis_results[1:], strict=False):
        assert after.portfolio_version >= before.portfolio_version
        if after.analysis_id != before.analysis_id:
            left.add(before.analysis_id)
            assert after.analysis_id not in left, f"{after.analysis_id} stored after a switch"

    # Every version bump is accounted for, exactly once.
    assert sorted(ledger.bumps) == list(range(2, final.portfolio_version + 1))


async def check_keys_keep_ttl(redis: RedisClient, store: SessionStore) -> None:
    ttls = await redis.pipeline([("PTTL", k) for k in store.session_keys(SESSION)])
    assert -1 not in ttls, f"a key of the session lost its TTL: {ttls}"


async def test_concurrent_starts_leave_one_current(
    store_target: StoreTarget, key_prefix: str
) -> None:
    async with open_redis(store_target.server.url) as redis:
        store = await open_store(redis, layout=store_target.layout, key_prefix=key_prefix)
        await store.create_if_missing(SESSION, {"AAA": 1.0}, {"AAA": 2.0}, utc_now())
        snapshots: dict[str, Snapshot] = {}
        statuses: dict[str, AppendStatus] = {}

        async def start(analysis_id: str) -> None:
            started = await store.start_analysis(SESSION, analysis_id, "AAA", utc_now())
            assert isinstance(started, Snapshot)
            snapshots[analysis_id] = started

        async def append(analysis_id: str) -> None:
            version = snapshots[analysis_id].portfolio_version
            item = AnalysisResult(analysis_id, "AAA", "momentum", 0.1, utc_now(), version)
            statuses[analysis_id] = await store.append_result(SESSION, item)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(start, f"c{i}")
            async with trio.open_nursery() as nursery:
                for analysis_id in snapshots:
                    nursery.start_soon(append, analysis_id)
            final = await store.get(SESSION)
        assert final is not None
        assert final.current_analysis is not None
        winner = final.current_analysis.analysis_id
        assert [a for a, s in statuses.items() if s is AppendStatus.STORED] == [winner]
        assert [r.analysis_id for r in final.analysis_results] == [winner]


async def test_concurrent_creates_agree(store_target: StoreTarget, key_prefix: str) -> None:
    async with open_redis(store_target.server.url) as redis:
        store = await open_store(redis, layout=store_target.layout, key_prefix=key_prefix)
        created: list[Portfolio] = []

        async def create(i: int) -> None:
            holdings = {TICKERS[i % len(TICKERS)]: float(i + 1)}
            prices = {t: 10.0 for t in TICKERS}
            created.append(await store.create_if_missing(SESSION, holdings, prices, utc_now()))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(create, i)
            members = [i async for page in store.iter_session_ids() for i in page]
        assert members == [SESSION]
        assert len({(p.created_at, tuple(p.holdings.items())) for p in created}) == 1
        assert all(p.portfolio_version == 1 for p in created)
