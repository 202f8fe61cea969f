"""The session store's contract, run unchanged on every (server, layout) pair.

Rules of this suite: one test body per rule, parametrised by the harness's
``store_target`` (real redis-servers, and the fakeredis JSON emulator where
no real Redis has JSON); keys under the per-test ``key_prefix``;
``fail_after`` around everything that talks to Redis.  Totals are compared
with a relative tolerance; prices must read back exactly.  No test provokes
an error reply from the server: the emulator closes the connection after
one.  Concurrency lives in ``test_store_concurrency.py``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio

from trio_portfolio.models import (
    AnalysisResult,
    AppendStatus,
    CurrentAnalysis,
    RevalueOutcome,
    Snapshot,
    StartRefused,
)
from trio_portfolio.redis_connect import open_pubsub, open_redis
from trio_portfolio.redis_io import RedisClient
from trio_portfolio.redis_pubsub import PubSub
from trio_portfolio.store import (
    SessionStore,
    StoreLayoutUnavailable,
    detect_layout,
    open_store,
)
from trio_portfolio.testing import StoreTarget

HOLDINGS = {"AAPL": 100.0, "GOOGL": 50.0, "BRK.B": 0.125}
PRICES = {"AAPL": 187.25, "GOOGL": 0.1, "BRK.B": 1 / 3, "MSFT": 400.0}
T0, T1, T2, T3 = (f"2026-11-21T10:00:0{i}.000Z" for i in range(4))
TTL = 3600


def expected_total(holdings: Mapping[str, float], prices: Mapping[str, float]) -> float:
    return sum(holdings[t] * prices[t] for t in sorted(holdings))


def result(analysis_id: str, version: int, n: int = 0, metric: str = "momentum") -> AnalysisResult:
    return AnalysisResult(
        analysis_id=analysis_id,
        ticker="AAPL",
        metric=metric,
        value=n / 7,
        timestamp=f"2026-11-21T10:00:00.{n:03d}Z",
        portfolio_version=version,
    )


@asynccontextmanager
async def target_store(
    target: StoreTarget, key_prefix: str, **options: Any
) -> AsyncIterator[tuple[SessionStore, RedisClient]]:
    """A store of ``target``'s layout on its server, and the client under it."""
    options.setdefault("session_ttl_seconds", TTL)
    async with open_redis(target.server.url) as redis:
        with trio.fail_after(10):
            store = await open_store(redis, layout=target.layout, key_prefix=key_prefix, **options)
        assert store.layout == target.layout
        yield store, redis


async def pttls(redis: RedisClient, store: SessionStore, session_id: str) -> list[int]:
    """PTTL of every existing key of the session (missing keys left out)."""
    replies = await redis.pipeline([("PTTL", k) for k in store.session_keys(session_id)])
    return [ttl for ttl in replies if ttl != -2]


async def stored_results(redis: RedisClient, store: SessionStore, session_id: str) -> int:
    """How many results are physically stored (reads return at most the limit)."""
    if store.layout == "json":
        (length,) = await redis.execute(
            "JSON.ARRLEN", store.keys.session(session_id), "$.analysis_results"
        )
        return int(length)
    return int(await redis.execute("LLEN", store.keys.results(session_id)))


async def age_session(
    redis: RedisClient, store: SessionStore, session_id: str, ms: int = 50_000
) -> None:
    """Pretend time passed: shorten every key's TTL to ``ms``."""
    await redis.pipeline([("PEXPIRE", k, ms) for k in store.session_keys(session_id)])


async def next_event(pubsub: PubSub) -> dict[str, Any]:
    with trio.fail_after(5):
        message = await pubsub.messages.receive()
    event: dict[str, Any] = orjson.loads(message.data)
    return event


async def no_event(pubsub: PubSub, seconds: float = 0.3) -> None:
    with trio.move_on_after(seconds):
        message = await pubsub.messages.receive()
        pytest.fail(f"unexpected event {message.data}")


# -- creation, reads and activity ----------------------------------------------------------


async def test_create_if_missing_creates_once(store_target: StoreTarget, key_prefix: str) -> None:
    async with target_store(store_target, key_prefix) as (store, redis):
        with trio.fail_after(10):
            created = await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            assert created.session_id == "s1"
            assert created.holdings == HOLDINGS
            assert created.prices == {t: PRICES[t] for t in HOLDINGS}  # exact, held only
            assert created.total_value == pytest.approx(expected_total(HOLDINGS, PRICES))
            assert created.portfolio_version == 1
            assert created.current_analysis is None
            assert created.analysis_results == ()
            assert created.last_activity == created.created_at == T0

            again = await store.create_if_missing("s1", {"MSFT": 1.0}, PRICES, T1)
            assert again.holdings == HOLDINGS
            assert again.portfolio_version == 1
            assert (again.created_at, again.last_activity) == (T0, T1)
            assert await store.get("s1") == again
            bucket = store.keys.index_bucket(store.keys.bucket_of("s1"))
            assert await redis.execute("SISMEMBER", bucket, "s1") == 1
            assert (await store.session_census("s1")).exists


async def test_get_is_not_activity_and_missing_is_none(
    store_target: StoreTarget, key_prefix: str
) -> None:
    async with target_store(store_target, key_prefix) as (store, redis):
        with trio.fail_after(10):
            assert await store.get("nobody") is None
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            await age_session(redis, store, "s1")
            portfolio = await store.get("s1")
            assert portfolio is not None
            assert portfolio.last_activity == T0
            assert all(0 < ttl <= 50_000 for ttl in await pttls(redis, store, "s1"))


async def test_touch_refreshes_activity(store_target: StoreTarget, key_prefix: str) -> None:
    async with target_store(store_target, key_prefix) as (store, redis):
        with trio.fail_after(10):
            assert await store.touch("nobody", T1) is False
            assert await store.get("nobody") is None  # touch does not create
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            await age_session(redis, store, "s1")
            assert await store.touch("s1", T1) is True
            portfolio = await store.get("s1")
            assert portfolio is not None
            assert portfolio.last_activity == T1
            assert all(ttl > 50_000 for ttl in await pttls(redis, store, "s1"))


# -- analyses and the fence ----------------------------------------------------------------


async def test_start_analysis_snapshot_and_refusals(
    store_target: StoreTarget, key_prefix: str
) -> None:
    async with target_store(store_target, key_prefix) as (store, redis):
        with trio.fail_after(10):
            assert await store.start_analysis("nobody", "a1", "AAPL", T0) is StartRefused.MISSING
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)

            await age_session(redis, store, "s1")
            assert await store.start_analysis("s1", "a0", "TSLA", T1) is StartRefused.NOT_HELD
            portfolio = await store.get("s1")
            assert portfolio is not None
            assert portfolio.last_activity == T1  # refused, but still activity
            assert portfolio.current_analysis is None
            assert all(ttl > 50_000 for ttl in await pttls(redis, store, "s1"))

            snapshot = await store.start_analysis("s1", "a1", "BRK.B", T2)
            assert snapshot == Snapshot(
                session_id="s1",
                analysis_id="a1",
                ticker="BRK.B",
                holdings=HOLDINGS,
                prices={t: PRICES[t] for t in HOLDINGS},
                total_value=portfolio.total_value,
                portfolio_version=1,
                started_at=T2,
                as_of=T0,  # the prices' time: the creation, before any revaluation
            )
            portfolio = await store.get("s1")
            assert portfolio is not None
            assert portfolio.current_analysis == CurrentAnalysis("a1", "BRK.B", 1, T2)
            assert portfolio.last_activity == T2


async def test_append_result_is_fenced(store_target: StoreTarget, key_prefix: str) -> None:
    async with target_store(store_target, key_prefix) as (store, _):
        with trio.fail_after(10):
            assert await store.append_result("nobody", result("a1", 1)) is AppendStatus.MISSING
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            # No analysis is current yet.
            assert await store.append_result("s1", result("a1", 1)) is AppendStatus.SUPERSEDED

            await store.start_analysis("s1", "a1", "AAPL", T1)
            first = result("a1", 1, 1, "portfolio_risk")
            assert await store.append_result("s1", first) is AppendStatus.STORED
            assert await store.append_result("s1", result("a1", 2, 2)) is AppendStatus.STALE

            await store.start_analysis("s1", "a2", "GOOGL", T2)  # a2 supersedes a1
            assert await store.append_result("s1", result("a1", 1, 3)) is AppendStatus.SUPERSEDED
            second = result("a2", 1, 4, "concentration")
            assert await store.append_result("s1", second) is AppendStatus.STORED

            await store.set_holdings("s1", {"AAPL": 1.0}, PRICES, T3)  # version 2
            assert await store.append_result("s1", result("a2", 1, 5)) is AppendStatus.STALE

            await store.finish_analysis("s1", "a2")
            assert await store.append_result("s1", result("a2", 2, 6)) is AppendStatus.SUPERSEDED

            portfolio = await store.get("s1")
            assert portfolio is not None
            assert portfolio.analysis_results == (first, second)


async def test_append_is_not_activity(store_target: StoreTarget, key_prefix: str) -> None:
    async with target_store(store_target, key_prefix) as (store, redis):
        with trio.fail_after(10):
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            await store.start_analysis("s1", "a1", "AAPL", T1)
            await age_session(redis, store, "s1")
            for n in range(3):
                assert await store.append_result("s1", result("a1", 1, n)) is AppendStatus.STORED
            assert await store.finish_analysis("s1", "a1") is True
            ttls = await pttls(redis, store, "s1")
            # Every key expires with the session, the results list included.
            assert len(ttls) == len(store.session_keys("s1"))
            assert all(0 < ttl <= 50_000 for ttl in ttls)
            portfolio = await store.get("s1")
            assert portfolio is not None
            assert portfolio.last_activity == T1


async def test_finish_analysis_is_fenced(store_target: StoreTarget, key_prefix: str) -> None:
    async with target_store(store_target, key_prefix) as (store, _):
        with trio.fail_after(10):
            assert await store.finish_analysis("nobody", "a1") is False
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            assert await store.finish_analysis("s1", "a1") is False
            await store.start_analysis("s1", "a1", "AAPL", T1)
            await store.start_analysis("s1", "a2", "AAPL", T2)
            assert await store.finish_analysis("s1", "a1") is False  # late: a2 stays current
            portfolio = await store.get("s1")
            assert portfolio is not None
            assert portfolio.current_analysis is not None
            assert portfolio.current_analysis.analysis_id == "a2"
            assert await store.finish_analysis("s1", "a2") is True
            assert await store.finish_analysis("s1", "a2") is False
            portfolio = await store.get("s1")
            assert portfolio is not None
            assert portfolio.current_analysis is None


async def test_results_limit_keeps_the_newest_in_order(
    store_target: StoreTarget, key_prefix: str
) -> None:
    async with target_store(store_target, key_prefix, results_limit=5) as (store, redis):
        with trio.fail_after(20):
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            await store.start_analysis("s1", "a1", "AAPL", T1)
            appended = [result("a1", 1, n) for n in range(20)]
            for n, item in enumerate(appended, 1):
                assert await store.append_result("s1", item) is AppendStatus.STORED
                portfolio = await store.get("s1")
                assert portfolio is not None
                assert portfolio.analysis_results == tuple(appended[max(0, n - 5) : n])
                # Storage stays bounded (the json layout trims lazily, by the slack).
                assert await stored_results(redis, store, "s1") <= 5 + store.trim_slack
            again = await store.create_if_missing("s1", HOLDINGS, PRICES, T2)
            assert again.analysis_results == tuple(appended[-5:])
            replaced = await store.set_holdings("s1", HOLDINGS, PRICES, T3)
            assert replaced is not None
            assert replaced.portfolio.analysis_results == tuple(appended[-5:])


# -- holdings, market, versions ------------------------------------------------------------


async def test_set_holdings_replaces_and_bumps(store_target: StoreTarget, key_prefix: str) -> None:
    async with target_store(store_target, key_prefix) as (store, redis):
        with trio.fail_after(10):
            assert await store.set_holdings("nobody", HOLDINGS, PRICES, T1) is None
            assert await store.get("nobody") is None
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            await store.start_analysis("s1", "a1", "AAPL", T0)
            await age_session(redis, store, "s1")
            new = {"MSFT": 3.0, "AAPL": 0.5}
            written = await store.set_holdings("s1", new, PRICES, T1)
            assert written is not None
            assert written.let_go == ("BRK.B", "GOOGL")
            replaced = written.portfolio
            assert replaced.holdings == new
            assert replaced.prices == {"MSFT": 400.0, "AAPL": 187.25}
            assert replaced.total_value == pytest.approx(expected_total(new, PRICES))
            assert replaced.portfolio_version == 2
            assert replaced.last_activity == T1
            assert replaced.created_at == T0
            assert replaced.current_analysis is not None  # left in place; its appends go stale
            assert await store.get("s1") == replaced
            assert all(ttl > 50_000 for ttl in await pttls(redis, store, "s1"))
            # The same holdings again are still a replacement: a new version.
            again = await store.set_holdings("s1", new, PRICES, T2)
            assert again is not None
            assert again.let_go == ()
            assert again.portfolio.portfolio_version == 3


async def test_revalue_many(store_target: StoreTarget, key_prefix: str) -> None:
    async with target_store(store_target, key_prefix) as (store, redis):
        with trio.fail_after(10):
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            await store.create_if_missing("s2", {"MSFT": 2.0}, PRICES, T0)
            await age_session(redis, store, "s1")
            await age_session(redis, store, "s2")

            market = {"AAPL": 190.5, "MSFT": 400.0, "TSLA": 1.0}  # no GOOGL, no BRK.B
            outcomes = await store.revalue_many(["s1", "gone", "s2"], market, T1)
            moved = {**PRICES, "AAPL": 190.5}
            s1_total = expected_total(HOLDINGS, moved)
            assert [(o.session_id, o.missing, o.changed) for o in outcomes] == [
                ("s1", False, True),
                ("gone", True, False),
                ("s2", False, False),  # MSFT did not move
            ]
            assert outcomes[0].portfolio_version == 2
            assert outcomes[0].total_value == pytest.approx(s1_total)
            assert outcomes[2] == RevalueOutcome("s2", False, False, 1, 800.0)

            portfolio = await store.get("s1")
            assert portfolio is not None
            assert portfolio.prices == {t: moved[t] for t in HOLDINGS}  # others kept
            assert portfolio.total_value == pytest.approx(s1_total)
            assert portfolio.portfolio_version == 2
            assert portfolio.last_activity == T0  # market updates are not activity
            for session_id in ("s1", "s2"):
                assert all(0 < ttl <= 50_000 for ttl in await pttls(redis, store, session_id))

            # The same prices again change nothing: no new version.
            again = await store.revalue_many(["s1"], market, T2)
            assert again == [RevalueOutcome("s1", False, False, 2, outcomes[0].total_value)]
            assert await store.revalue_many([], market, T2) == []


async def test_version_only_increases(store_target: StoreTarget, key_prefix: str) -> None:
    async with target_store(store_target, key_prefix) as (store, _):
        with trio.fail_after(10):
            versions = [
                (await store.create_if_missing("s1", HOLDINGS, PRICES, T0)).portfolio_version
            ]
            for step in range(6):
                if step % 2:
                    replaced = await store.set_holdings("s1", {"AAPL": step + 1.0}, PRICES, T1)
                    assert replaced is not None
                    versions.append(replaced.portfolio.portfolio_version)
                else:
                    (outcome,) = await store.revalue_many(["s1"], {"AAPL": 100.0 + step}, T1)
                    versions.append(outcome.portfolio_version)
                # Neither activity nor analyses move the version.
                await store.touch("s1", T2)
                snapshot = await store.start_analysis("s1", f"a{step}", "AAPL", T2)
                assert isinstance(snapshot, Snapshot)
                assert snapshot.portfolio_version == versions[-1]
            assert versions == list(range(1, 8))


async def test_events_are_published(store_target: StoreTarget, key_prefix: str) -> None:
    async with (
        target_store(store_target, key_prefix) as (store, _),
        open_pubsub(store_target.server.url) as pubsub,
    ):
        with trio.fail_after(20):
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            await pubsub.subscribe(store.events_channel("s1"))
            assert store.events_channel("s1").endswith("{s1}:events")

            await store.start_analysis("s1", "a1", "AAPL", T1)
            assert await next_event(pubsub) == {
                "kind": "analysis_started",
                "analysis_id": "a1",
                "ticker": "AAPL",
                "portfolio_version": 1,
                "started_at": T1,
            }

            replaced = await store.set_holdings("s1", {"AAPL": 2.0, "MSFT": 1.0}, PRICES, T2)
            assert replaced is not None
            event = await next_event(pubsub)
            assert event == {
                "kind": "portfolio",
                "portfolio_version": 2,
                "total_value": pytest.approx(2 * 187.25 + 400.0),
                "prices": {"AAPL": 187.25, "MSFT": 400.0},
                "as_of": T2,
                "cause": "holdings",
            }

            await store.revalue_many(["s1"], {"MSFT": 401.5}, T3)
            event = await next_event(pubsub)
            assert event["kind"] == "portfolio"
            assert event["cause"] == "market"
            assert event["portfolio_version"] == 3
            assert event["as_of"] == T3
            assert event["prices"] == {"AAPL": 187.25, "MSFT": 401.5}
            assert event["total_value"] == pytest.approx(2 * 187.25 + 401.5)

            # No change, no event; appends, finishes and touches are silent too.
            await store.revalue_many(["s1"], {"MSFT": 401.5}, T3)
            await store.touch("s1", T3)
            await store.append_result("s1", result("a1", 1))
            await store.finish_analysis("s1", "a1")
            await no_event(pubsub)


# -- expiry --------------------------------------------------------------------------------


async def test_sessions_expire_without_activity(store_target: StoreTarget, key_prefix: str) -> None:
    async with target_store(store_target, key_prefix, session_ttl_seconds=1) as (store, redis):
        with trio.fail_after(20):
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            await store.start_analysis("s1", "a1", "AAPL", T0)
            await store.append_result("s1", result("a1", 1))
            assert all(0 < ttl <= 1000 for ttl in await pttls(redis, store, "s1"))
            # Market updates and appends keep coming, but they are not activity.
            deadline = trio.current_time() + 1.6
            while trio.current_time() < deadline:
                await store.revalue_many(["s1"], {"AAPL": 150 + trio.current_time() % 1}, T1)
                await store.append_result("s1", result("a1", 1))
                await trio.sleep(0.1)
            assert await store.get("s1") is None
            assert await store.touch("s1", T2) is False
            assert await pttls(redis, store, "s1") == []  # every key is gone
            (outcome,) = await store.revalue_many(["s1"], {"AAPL": 1.0}, T2)
            assert outcome.missing
            # A new session of the same id starts afresh.
            fresh = await store.create_if_missing("s1", {"MSFT": 1.0}, PRICES, T3)
            assert fresh.holdings == {"MSFT": 1.0}
            assert fresh.analysis_results == ()


# -- the index -----------------------------------------------------------------------------


async def test_index_iteration_and_forget(store_target: StoreTarget, key_prefix: str) -> None:
    async with target_store(store_target, key_prefix) as (store, redis):
        with trio.fail_after(10):
            ids = [f"s{i}" for i in range(7)]
            for session_id in ids:
                await store.create_if_missing(session_id, HOLDINGS, PRICES, T0)
            seen: list[str] = []
            async for batch in store.iter_session_ids(3):
                assert 1 <= len(batch) <= 3
                seen += batch
            assert sorted(set(seen)) == ids

            assert await store.forget(["s0", "s1"]) == 0  # they exist: kept
            await redis.execute("DEL", *store.session_keys("s1"))
            (outcome,) = await store.revalue_many(["s1"], {"AAPL": 1.0}, T1)
            assert outcome.missing
            assert await store.forget(["s1", "s2"]) == 1
            remaining: list[str] = []
            async for batch in store.iter_session_ids():
                remaining += batch
            assert sorted(remaining) == [i for i in ids if i != "s1"]


# -- numbers and arguments -----------------------------------------------------------------


async def test_numbers_read_back_exactly(store_target: StoreTarget, key_prefix: str) -> None:
    holdings = {"A": 1e-3, "B": 123456789.125, "C": 3.0, "D": 0.1 + 0.2}
    prices = {"A": 1 / 3, "B": 0.1, "C": 2.5e-7, "D": 1e15 / 7}
    async with target_store(store_target, key_prefix) as (store, _):
        with trio.fail_after(10):
            created = await store.create_if_missing("s1", holdings, prices, T0)
            assert created.holdings == holdings
            assert created.prices == prices
            assert created.total_value == pytest.approx(expected_total(holdings, prices))
            assert math.isclose(
                created.total_value, expected_total(holdings, prices), rel_tol=1e-15
            )
            (outcome,) = await store.revalue_many(["s1"], {"A": 2 / 3}, T1)
            portfolio = await store.get("s1")
            assert portfolio is not None
            assert portfolio.prices == {**prices, "A": 2 / 3}
            assert portfolio.total_value == outcome.total_value
            await store.start_analysis("s1", "a1", "A", T1)
            stored = AnalysisResult("a1", "A", "momentum", -1 / 3, T2, 2)
            assert await store.append_result("s1", stored) is AppendStatus.STORED
            portfolio = await store.get("s1")
            assert portfolio is not None
            assert portfolio.analysis_results == (stored,)


async def test_arguments_are_validated(store_target: StoreTarget, key_prefix: str) -> None:
    async with target_store(store_target, key_prefix) as (store, _):
        with trio.fail_after(10):
            with pytest.raises(ValueError, match="session id"):
                await store.get("bad id")
            with pytest.raises(ValueError, match="session id"):
                await store.touch("{x}", T0)
            with pytest.raises(ValueError, match="empty"):
                await store.create_if_missing("s1", {}, PRICES, T0)
            with pytest.raises(ValueError, match="no price"):
                await store.create_if_missing("s1", {"TSLA": 1.0}, PRICES, T0)
            with pytest.raises(ValueError, match="finite"):
                await store.create_if_missing("s1", {"AAPL": math.nan}, PRICES, T0)
            with pytest.raises(ValueError, match="finite"):
                await store.revalue_many(["s1"], {"AAPL": math.inf}, T0)
            with pytest.raises(ValueError, match="finite"):
                await store.append_result("s1", AnalysisResult("a", "A", "m", math.nan, T0, 1))
            assert await store.get("s1") is None  # nothing was written


# -- layouts -------------------------------------------------------------------------------


async def test_auto_layout_detection(store_target: StoreTarget, key_prefix: str) -> None:
    server = store_target.server
    async with open_redis(server.url) as redis:
        with trio.fail_after(10):
            auto = await open_store(redis, key_prefix=key_prefix)
            assert auto.layout == ("json" if server.has_json else "hash")
            # Where sessions exist, auto follows them (here: this target's layout).
            store = await open_store(redis, layout=store_target.layout, key_prefix=key_prefix)
            await store.create_if_missing("s1", HOLDINGS, PRICES, T0)
            assert await detect_layout(redis, key_prefix=key_prefix) == store_target.layout
            if not server.has_json:
                with pytest.raises(StoreLayoutUnavailable):
                    await open_store(redis, layout="json", key_prefix=key_prefix)
