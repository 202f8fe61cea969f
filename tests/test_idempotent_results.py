"""Exactly once through store faults (guarantee 4): result ids, idempotent appends, re-asks.

The store: an append with a result id already stored answers
``ALREADY_STORED`` and stores nothing; the session records at most one id
per metric, cleared by the next start; a re-ask (``retry=True``) for an
analysis that is no longer current stores nothing and finds a stored
result by its id.  The runner: an append whose outcome is lost (a timeout
or a cut connection) is asked again until a definite answer, and a result
still unconfirmed at the commit deadline is resolved (finish, then re-ask)
before its attempt is reported.  Checked from outside: v2 clients switching
tickers while Redis stalls (a busy script, like ``DEBUG SLEEP``, longer than the adapter's
timeout, so every call in flight fails although Redis runs it afterwards)
or while the fault proxy cuts the connections; afterwards every session's
stored results are exactly its streamed results, each once.
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from trio_portfolio import analysis
from trio_portfolio.models import AnalysisResult, AppendStatus, Snapshot, utc_now
from trio_portfolio.redis_io import RedisClient, StoreUnavailable, open_redis
from trio_portfolio.store import RESULT_IDS_LIMIT, SessionStore, open_store
from trio_portfolio.testing import (
    BUSY_SCRIPT,
    Frame,
    LiveServer,
    RedisServerInfo,
    StoreTarget,
    greet,
    new_session_id,
    open_client,
    open_live_server,
    open_tcp_proxy,
    read_forever,
    store_of,
)
from trio_portfolio.testing import test_settings as server_settings

HOLDINGS = {"AAPL": 10.0, "MSFT": 5.0}
PRICES = {"AAPL": 100.0, "MSFT": 200.0}
TICKERS = ("AAPL", "GOOGL", "MSFT")


def result_of(snapshot: Snapshot, metric: str, result_id: str | None = None) -> AnalysisResult:
    return AnalysisResult(
        analysis_id=snapshot.analysis_id,
        ticker=snapshot.ticker,
        metric=metric,
        value=0.25,
        timestamp=utc_now(),
        portfolio_version=snapshot.portfolio_version,
        as_of=snapshot.as_of,
        result_id=result_id or AnalysisResult.id_for(snapshot.analysis_id, metric),
    )


async def recorded_ids(redis: RedisClient, store: SessionStore, session_id: str) -> list[str]:
    """The ids the session records for its current analysis, as stored."""
    key = store.keys.session(session_id)
    if store.layout == "hash":
        text = await redis.execute("HGET", key, "result_ids")
    else:
        raw = await redis.execute("JSON.GET", key, "$.result_ids")
        text = raw.strip('[]"') if raw else None
    return [i for i in (text or "").split(",") if i]


@asynccontextmanager
async def a_store(target: StoreTarget, key_prefix: str) -> AsyncIterator[tuple[SessionStore, Any]]:
    async with open_redis(target.server.url) as redis:
        store = await open_store(redis, layout=target.layout, key_prefix=key_prefix)
        await store.create_if_missing("s", HOLDINGS, PRICES, utc_now())
        yield store, redis


async def test_an_append_is_idempotent_per_result_id(
    store_target: StoreTarget, key_prefix: str
) -> None:
    async with a_store(store_target, key_prefix) as (store, redis):
        with trio.fail_after(10):
            first = await store.start_analysis("s", "a1", "AAPL", utc_now())
            assert isinstance(first, Snapshot)
            risk = result_of(first, "portfolio_risk")
            assert await store.append_result("s", risk) is AppendStatus.STORED
            assert await store.append_result("s", risk) is AppendStatus.ALREADY_STORED
            assert await store.append_result("s", risk, retry=True) is AppendStatus.ALREADY_STORED
            # Bounded: one id per metric, the newest kept.
            for n in range(RESULT_IDS_LIMIT + 2):
                item = result_of(first, "momentum", result_id=f"a1:extra{n}")
                assert await store.append_result("s", item) is AppendStatus.STORED
            ids = await recorded_ids(redis, store, "s")
            assert len(ids) == RESULT_IDS_LIMIT
            assert ids[-1] == f"a1:extra{RESULT_IDS_LIMIT + 1}"

            # A new start clears the ids; a re-ask for the old analysis stores
            # nothing and still finds what was stored.
            second = await store.start_analysis("s", "a2", "AAPL", utc_now())
            assert isinstance(second, Snapshot)
            assert await recorded_ids(redis, store, "s") == []
            assert await store.append_result("s", risk) is AppendStatus.SUPERSEDED
            assert await store.append_result("s", risk, retry=True) is AppendStatus.ALREADY_STORED
            never = result_of(first, "correlation")
            assert await store.append_result("s", never, retry=True) is AppendStatus.SUPERSEDED
            # Finished: not current either.
            fresh = result_of(second, "correlation")
            assert await store.append_result("s", fresh) is AppendStatus.STORED
            assert await store.finish_analysis("s", "a2")
            assert await store.append_result("s", fresh, retry=True) is (
                AppendStatus.ALREADY_STORED
            )
            assert await store.append_result("s", fresh) is AppendStatus.ALREADY_STORED

            portfolio = await store.get("s")
            assert portfolio is not None
            ids_stored = collections.Counter(r.result_id for r in portfolio.analysis_results)
            assert ids_stored[risk.result_id] == 1
            assert ids_stored[fresh.result_id] == 1
            assert never.result_id not in ids_stored
            assert all(count == 1 for count in ids_stored.values())


# -- whole servers under faults ------------------------------------------------------------


async def switch_in_a_loop(
    server: LiveServer, session_id: str, until: float, seed: int, frames: list[Frame]
) -> None:
    """Analyze tickers at random until ``until``, then read until the session is idle."""
    rng = random.Random(seed)
    async with open_client(server, session_id) as client:
        await greet(client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_forever, client)
            while trio.current_time() < until:
                await client.send("analyze", ticker=rng.choice(TICKERS))
                await trio.sleep(rng.uniform(0.1, 0.4))
            with trio.fail_after(60):
                while True:
                    try:  # the last stall may outlast the loop (a busy script on CPU time)
                        portfolio = await store_of(server).get(session_id)
                    except StoreUnavailable:
                        portfolio = None
                    if portfolio is not None and portfolio.current_analysis is None:
                        break
                    await trio.sleep(0.1)
            await trio.sleep(1.0)  # frames still in flight
            nursery.cancel_scope.cancel()
        frames.extend(client.frames)


async def check_exactly_once(server: LiveServer, session_id: str, frames: list[Frame]) -> int:
    """Stored == streamed for one session, each once; the number of results."""
    portfolio = await store_of(server).get(session_id)
    assert portfolio is not None
    stored = collections.Counter(
        (r.analysis_id, r.metric, r.value) for r in portfolio.analysis_results
    )
    streamed = collections.Counter(
        (f["analysis_id"], f["metric"], f["value"])
        for f in frames
        if f["type"] == "analysis_result"
    )
    assert stored == streamed, (
        f"stored-not-streamed {list((stored - streamed).elements())[:5]}, "
        f"streamed-not-stored {list((streamed - stored).elements())[:5]}"
    )
    assert max(stored.values(), default=1) == 1, "a result was stored twice"
    return sum(stored.values())


async def stall(url: str, seconds: float, times: int, gap: float) -> None:
    """Stall Redis for ``seconds``, ``times`` times, from a connection of its own."""
    async with open_redis(url, timeout=seconds + 10) as redis:
        for _ in range(times):
            await trio.sleep(gap)
            await redis.execute("EVAL", BUSY_SCRIPT, 0, round(seconds * 1000), "")


async def run_under_stalls(
    real_redis: RedisServerInfo, sessions: int, stall_seconds: float, times: int
) -> tuple[list[list[Frame]], int]:
    settings = server_settings(
        real_redis.url,
        metric_delay_seconds=(0.0, 0.15),
        redis_timeout_seconds=0.3,
        results_limit=100_000,
    )
    async with open_live_server(settings) as server:
        session_ids = [new_session_id("stall") for _ in range(sessions)]
        frames: list[list[Frame]] = [[] for _ in session_ids]
        began = trio.current_time()
        until = began + times * (stall_seconds + 1.0) + 1.0
        with trio.fail_after(until - began + 120):
            async with trio.open_nursery() as nursery:
                for i, session_id in enumerate(session_ids):
                    nursery.start_soon(switch_in_a_loop, server, session_id, until, i, frames[i])
                nursery.start_soon(stall, real_redis.url, stall_seconds, times, 1.0)
        total = 0
        for session_id, received in zip(session_ids, frames, strict=True):
            total += await check_exactly_once(server, session_id, received)
    return frames, total


async def test_stored_equals_streamed_through_redis_stalls(
    real_redis: RedisServerInfo, caplog: pytest.LogCaptureFixture
) -> None:
    """Stalls of 1 s against a 0.3 s adapter timeout: every append in flight times out,
    Redis runs it anyway, the runner asks again and streams it once."""
    with caplog.at_level(logging.WARNING, logger="trio_portfolio.analysis"):
        frames, total = await run_under_stalls(real_redis, sessions=20, stall_seconds=1.0, times=3)
    reasks = sum("asking again" in r.getMessage() for r in caplog.records)
    errors = collections.Counter(f["code"] for fs in frames for f in fs if f["type"] == "error")
    print(f"\n3 stalls of 1 s: {total} results, {reasks} re-asked appends, errors {dict(errors)}")
    assert reasks > 0, "no append was in flight during a stall: the test proves nothing"
    assert total > 200
    assert set(errors) <= {"store_unavailable"}


async def test_results_unconfirmed_at_the_deadline_are_resolved_before_the_attempt_ends(
    real_redis: RedisServerInfo, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stalls of 2 s against a 0.5 s commit deadline: the attempt fails
    (``store_unavailable``), and once Redis answers its unconfirmed results are
    resolved (streamed if stored) before its ``analysis_cancelled``."""
    monkeypatch.setattr(analysis, "COMMIT_TIMEOUT", 0.5)
    with caplog.at_level(logging.INFO, logger="trio_portfolio.analysis"):
        frames, total = await run_under_stalls(real_redis, sessions=10, stall_seconds=2.0, times=2)
    messages = [r.getMessage() for r in caplog.records]
    resolved = sum("was stored: streaming it" in m for m in messages)
    handed_on = sum("resolved by the next analysis" in m for m in messages)
    not_confirmed = sum(
        1 for fs in frames for f in fs if f["type"] == "error" and "not confirmed" in f["detail"]
    )
    print(
        f"\n2 stalls of 2 s, 0.5 s commit deadline: {total} results, {not_confirmed} "
        f"attempts failed unconfirmed, {resolved} unconfirmed results found stored, "
        f"{handed_on} handed on to the next analysis"
    )
    assert not_confirmed > 0, "no commit outlived its deadline: the test proves nothing"
    for received in frames:
        check_attempts_well_formed(received, resolved_late=True)


def check_attempts_well_formed(frames: list[Frame], *, resolved_late: bool = False) -> None:
    """Every started attempt ends once; nothing of it follows the next ``analysis_started``.

    With ``resolved_late``, a result may follow its own attempt's end (an
    unconfirmed result resolved by the next runner, before it starts);
    otherwise nothing of an attempt follows its end.
    """
    ended: set[str] = set()
    started: list[str] = []
    for frame in frames:
        kind = frame["type"]
        if kind == "analysis_started":
            started.append(frame["analysis_id"])
        elif kind in ("analysis_result", "analysis_complete", "analysis_cancelled"):
            analysis_id = frame["analysis_id"]
            assert started, frame
            assert analysis_id == started[-1], f"{frame} after the next analysis started"
            if analysis_id in ended:
                assert resolved_late, f"{frame} after its analysis ended"
                assert kind == "analysis_result", frame
            elif kind != "analysis_result":
                ended.add(analysis_id)
    assert set(started) == ended, set(started) - ended


async def test_stored_equals_streamed_when_connections_are_cut_mid_call(
    real_redis: RedisServerInfo,
) -> None:
    """The fault proxy cuts every Redis connection ten times while appends are in flight."""
    async with open_tcp_proxy(*real_redis.address) as proxy:
        settings = server_settings(
            proxy.url,
            metric_delay_seconds=(0.0, 0.1),
            redis_timeout_seconds=1.0,
            results_limit=100_000,
        )
        async with open_live_server(settings) as server:
            session_ids = [new_session_id("cut") for _ in range(10)]
            frames: list[list[Frame]] = [[] for _ in session_ids]
            until = trio.current_time() + 4.0

            async def cut() -> None:
                for _ in range(10):
                    await trio.sleep(0.3)
                    await proxy.cut()

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for i, session_id in enumerate(session_ids):
                        nursery.start_soon(
                            switch_in_a_loop, server, session_id, until, 100 + i, frames[i]
                        )
                    nursery.start_soon(cut)
            total = 0
            for session_id, received in zip(session_ids, frames, strict=True):
                total += await check_exactly_once(server, session_id, received)
                check_attempts_well_formed(received)
    print(f"\n10 cuts: {total} results, each stored once and streamed once")
    assert total > 50
