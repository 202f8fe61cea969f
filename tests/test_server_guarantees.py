"""The numbered guarantees 1-6 of the wire contract, checked from outside.

``docs/protocol.md`` ("Ordering and freshness") says how the server keeps
them; in short: (1) no interleaving: after the first frame about ticker B,
nothing of an earlier analysis; (2) fenced writes: only the session's current
analysis stores results; (3) one snapshot, never stale; (4) every stored
result was streamed and every streamed one stored, exactly once; (5) a
session expires after its TTL without client activity, and market updates
are not activity; (6) bad input is answered, not fatal.

Rules of this suite: whole servers run in-process on 127.0.0.1, port 0,
against the harness's real redis-server; clients are real WebSockets.  What
a client receives is recorded frame by frame and checked *afterwards*
against what the session stores (read through the server's store, which is
not activity), so each property is checked on both sides of the wire.
Timing is compressed (metric delays of tens or hundreds of milliseconds,
market ticks a few tenths of a second apart, a 2 s session TTL) and every
wait is bounded by ``fail_after``.
"""

from __future__ import annotations

import collections
import functools
import random
from collections.abc import Iterable
from typing import Any

import attrs
import pytest
import trio

from trio_portfolio.models import AnalysisResult
from trio_portfolio.testing import (
    IO,
    ISO_Z,
    METRIC_NAMES,
    Client,
    Frame,
    LiveServer,
    RedisServerInfo,
    greet,
    is_type,
    live,
    new_session_id,
    open_client,
    open_live_server,
    read_forever,
    start_analysis,
    store_of,
)
from trio_portfolio.testing import test_settings as server_settings

TICKERS = ("AAPL", "GOOGL", "MSFT")
SENTINEL = "sentinel: not json"
"""A frame every dialect answers with ``bad_json``, in order: a marker in the stream."""


async def stored_results(server: LiveServer, session_id: str) -> list[AnalysisResult]:
    portfolio = await store_of(server).get(session_id)
    assert portfolio is not None, f"session {session_id} is gone"
    return list(portfolio.analysis_results)


async def wait_until_idle(server: LiveServer, session_id: str, timeout: float = 20.0) -> None:
    """Until the session has no current analysis (its last one finished or stopped)."""
    with trio.fail_after(timeout):
        while True:
            portfolio = await store_of(server).get(session_id)
            if portfolio is not None and portfolio.current_analysis is None:
                return
            await trio.sleep(0.02)


async def settle(client: Client, server: LiveServer, session_id: str) -> None:
    """Read everything the client's requests so far will ever produce.

    A sentinel frame is answered (``bad_json``) only after every earlier
    request was handled, so once it is back the last ``analyze`` has taken
    its snapshot; once the store shows no current analysis, that analysis
    has committed everything it will; a short quiet period then collects the
    frames still in flight.
    """
    await client.send_raw(SENTINEL)
    await client.recv_until(lambda f: f["type"] == "error" and f["code"] == "bad_json", timeout=IO)
    await wait_until_idle(server, session_id)
    with trio.move_on_after(60):
        while True:
            with trio.move_on_after(0.3):
                await client.recv(IO)
                continue
            break


def result_key(result: Frame | AnalysisResult, *, v2: bool) -> tuple[Any, ...]:
    """What identifies a result on both sides (v1 frames carry no id)."""
    names = ["ticker", "metric", "value", "timestamp"]
    if v2:
        names += ["analysis_id", "portfolio_version"]
    if isinstance(result, AnalysisResult):
        return tuple(getattr(result, name) for name in names)
    return tuple(result[name] for name in names)


def results_in(frames: Iterable[Frame]) -> list[Frame]:
    return [f for f in frames if f["type"] == "analysis_result"]


def assert_blocks_contiguous(stored: list[AnalysisResult]) -> list[str]:
    """Every analysis's stored results form one run (fenced writes); the runs' ids in order."""
    order: list[str] = []
    for result in stored:
        if not order or order[-1] != result.analysis_id:
            assert result.analysis_id not in order, (
                f"results of {result.analysis_id} were stored after another analysis's"
            )
            order.append(result.analysis_id)
    return order


def assert_streamed_equals_stored(
    frames: list[Frame], stored: list[AnalysisResult], *, v2: bool
) -> None:
    """Guarantee 4: the same results on both sides, each exactly once."""
    streamed = collections.Counter(result_key(f, v2=v2) for f in results_in(frames))
    kept = collections.Counter(result_key(r, v2=v2) for r in stored)
    assert streamed == kept, (
        f"streamed-not-stored {list((streamed - kept).elements())[:5]}, "
        f"stored-not-streamed {list((kept - streamed).elements())[:5]}"
    )
    if v2:
        assert max(streamed.values(), default=1) == 1


def v2_interleavings(frames: list[Frame]) -> int:
    """Guarantee 1 in v2: results of any analysis but the last started one."""
    current = None
    bad = 0
    for frame in frames:
        if frame["type"] == "analysis_started":
            current = frame["analysis_id"]
        elif frame["type"] == "analysis_result" and frame["analysis_id"] != current:
            bad += 1
    return bad


def v1_interleavings(frames: list[Frame], stored: list[AnalysisResult]) -> int:
    """Guarantee 1 in v1: results of an analysis after a result of a later one.

    v1 frames carry no analysis id, so each is matched to its stored twin
    (guarantee 4 makes that a bijection); fenced writes store analyses in
    start order, so the stream's analyses must appear in stored order.
    """
    rank = {aid: i for i, aid in enumerate(assert_blocks_contiguous(stored))}
    twins: dict[tuple[Any, ...], collections.deque[str]] = collections.defaultdict(
        collections.deque
    )
    for result in stored:
        twins[result_key(result, v2=False)].append(result.analysis_id)
    bad = 0
    highest = -1
    for frame in results_in(frames):
        twin = twins[result_key(frame, v2=False)]
        if not twin:
            continue  # streamed, never stored: assert_streamed_equals_stored reports it
        position = rank[twin.popleft()]
        if position < highest:
            bad += 1
        highest = max(highest, position)
    return bad


# -- 1 and 4: no interleaving, streamed == stored --------------------------------------------


async def test_v2_switch_cancels_before_the_new_analysis_starts(
    real_redis: RedisServerInfo,
) -> None:
    session_id = new_session_id()
    async with (
        live(real_redis, metric_delay_seconds=(0.05, 0.3)) as server,
        open_client(server, session_id) as client,
    ):
        await greet(client)
        await client.send("analyze", ticker="AAPL")
        await client.recv_until(is_type("analysis_result"), timeout=IO)
        await client.send("analyze", ticker="GOOGL")
        await client.recv_until(
            lambda f: f["type"] == "analysis_complete" and f["ticker"] == "GOOGL", timeout=IO
        )
        await client.expect_quiet(0.4)
        kinds = [(f["type"], f.get("ticker")) for f in client.frames[1:]]
        cancelled = kinds.index(("analysis_cancelled", "AAPL"))
        started = kinds.index(("analysis_started", "GOOGL"))
        assert cancelled < started
        assert client.frames[1 + cancelled]["reason"] == "switched"
        assert all(t == "GOOGL" for _, t in kinds[started:])
        assert v2_interleavings(client.frames) == 0
        assert_streamed_equals_stored(
            client.frames, await stored_results(server, session_id), v2=True
        )


@attrs.define
class StormConnection:
    session_id: str
    v2: bool
    switches: int = 0
    frames: list[Frame] = attrs.field(factory=list)


async def storm_one(
    server: LiveServer, conn: StormConnection, until: float, rng: random.Random
) -> None:
    """Switch tickers at random until ``until``, then collect every last frame."""
    async with open_client(server, conn.session_id, v2=conn.v2) as client:
        if conn.v2:
            await greet(client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_forever, client)
            last = None
            while trio.current_time() < until:
                ticker = rng.choice([t for t in TICKERS if t != last])
                await client.send("analyze", ticker=ticker)
                conn.switches += 1
                last = ticker
                await trio.sleep(rng.uniform(0.0, 0.3))
            nursery.cancel_scope.cancel()
        await settle(client, server, conn.session_id)
        conn.frames = client.frames


async def test_switch_storm(real_redis: RedisServerInfo) -> None:
    """100 sessions (half v1, half v2) switching at random: zero interleavings anywhere,
    and every session's stored results are exactly its streamed results."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    sessions = 100
    storm_seconds = 4.0
    async with live(real_redis, metric_delay_seconds=(0.0, 0.05), results_limit=100_000) as server:
        conns = [StormConnection(new_session_id(), v2=i % 2 == 0) for i in range(sessions)]
        began = trio.current_time()
        with trio.fail_after(storm_seconds + 60):
            async with trio.open_nursery() as nursery:
                for conn in conns:
                    child = random.Random(rng.randrange(2**32))
                    nursery.start_soon(storm_one, server, conn, began + storm_seconds, child)
        duration = trio.current_time() - began
        stored = {c.session_id: await stored_results(server, c.session_id) for c in conns}
        interleavings = late_events = 0
        for conn in conns:
            frames = conn.frames
            if conn.v2:
                interleavings += v2_interleavings(frames)
                late_events += late_analysis_events(frames)
            else:
                interleavings += v1_interleavings(frames, stored[conn.session_id])
        switches = sum(c.switches for c in conns)
        results = sum(len(results_in(c.frames)) for c in conns)
        print(
            f"\nswitch storm (seed {seed}): {sessions} sessions, {switches} switches, "
            f"{results} results streamed, {interleavings} interleavings, {duration:.1f}s"
        )
        assert interleavings == 0
        assert late_events == 0
        for conn in conns:
            assert_blocks_contiguous(stored[conn.session_id])
            assert_streamed_equals_stored(conn.frames, stored[conn.session_id], v2=conn.v2)
            errors = [f for f in conn.frames if f["type"] == "error"]
            assert [e["code"] for e in errors] == ["bad_json"], errors
            if conn.v2:
                check_v2_storm_stream(conn.frames, conn.switches)
            else:
                assert {f["type"] for f in conn.frames} <= {"analysis_result", "error"}
        assert switches > sessions * 10
        assert results > switches / 4, "too few results to make the storm meaningful"
        assert server.info.server.connections == set()


def late_analysis_events(frames: list[Frame]) -> int:
    """``analysis_*`` events of an analysis after the next one started (stricter than
    guarantee 1, which speaks of results; the server never sends them either)."""
    current = None
    late = 0
    for frame in frames:
        if frame["type"] == "analysis_started":
            current = frame["analysis_id"]
        elif frame["type"] in ("analysis_result", "analysis_complete", "analysis_cancelled"):
            late += frame["analysis_id"] != current
    return late


def check_v2_storm_stream(frames: list[Frame], requests: int) -> None:
    """One v2 connection's stream: one started per request, each analysis well formed."""
    assert frames[0]["type"] == "session"
    started = [f for f in frames if f["type"] == "analysis_started"]
    assert len(started) == requests
    by_id: dict[str, list[Frame]] = {s["analysis_id"]: [] for s in started}
    for frame in frames:
        if frame["type"] in ("analysis_result", "analysis_complete", "analysis_cancelled"):
            by_id[frame["analysis_id"]].append(frame)
    for i, start in enumerate(started):
        events = by_id[start["analysis_id"]]
        results = [e for e in events if e["type"] == "analysis_result"]
        ends = [e for e in events if e["type"] != "analysis_result"]
        assert len(ends) == 1, events
        assert events[-1] is ends[0]
        assert len({r["metric"] for r in results}) == len(results) <= 5
        assert all(r["portfolio_version"] == start["portfolio_version"] for r in results)
        assert all(r["ticker"] == start["ticker"] for r in events)
        if ends[0]["type"] == "analysis_complete":
            assert len(results) == 5
        else:
            assert ends[0]["reason"] == "switched"
            assert i < len(started) - 1, "the last analysis must complete"


# -- 2: fenced writes ---------------------------------------------------------------------


@pytest.mark.parametrize("servers", [1, 2], ids=["one-server", "two-servers"])
async def test_a_second_connection_takes_the_session_over(
    real_redis: RedisServerInfo, servers: int
) -> None:
    """A's analysis stops (``switched``) when B analyzes on the same session, even
    through another server process; nothing of A's is stored after B started."""
    session_id = new_session_id()
    settings = server_settings(real_redis.url, metric_delay_seconds=(0.3, 0.7))
    async with open_live_server(settings) as first, open_live_server(settings) as second:
        other = second if servers == 2 else first
        async with open_client(first, session_id) as a, open_client(other, session_id) as b:
            await greet(a)
            await greet(b)
            a_started = await start_analysis(a, "AAPL")
            await a.recv_until(is_type("analysis_result"), timeout=IO)
            await b.send("analyze", ticker="GOOGL")
            b_frames = await b.recv_until(is_type("analysis_complete"), timeout=IO)
            await a.recv_until(is_type("analysis_cancelled"), timeout=IO)
            await a.expect_quiet(0.8)  # past every metric delay of A's
            cancelled = a.frames[-1]
            assert cancelled == {
                "type": "analysis_cancelled",
                "analysis_id": a_started["analysis_id"],
                "ticker": "AAPL",
                "reason": "switched",
            }
            a_results = results_in(a.frames)
            assert 1 <= len(a_results) < 5
            assert {f["analysis_id"] for f in a_results} == {a_started["analysis_id"]}
            assert len(results_in(b_frames)) == 5
            stored = await stored_results(first, session_id)
            order = assert_blocks_contiguous(stored)
            assert order == [a_started["analysis_id"], b_frames[0]["analysis_id"]]
            assert_streamed_equals_stored(a.frames + b.frames, stored, v2=True)
            await trio.sleep(0.5)
            assert await stored_results(other, session_id) == stored
            portfolio = await store_of(first).get(session_id)
            assert portfolio is not None
            assert portfolio.current_analysis is None


async def test_two_connections_analyzing_at_once_leave_exactly_one_running(
    real_redis: RedisServerInfo,
) -> None:
    """Two connections on one session analyze at the same moment, on ten sessions at
    once: the analysis Redis started last completes, the other stops (``switched``);
    neither may stop the other's newer analysis because of its own older start."""

    async def race(server: LiveServer, session_id: str) -> tuple[Client, Client]:
        async with open_client(server, session_id) as x, open_client(server, session_id) as y:
            await greet(x)
            await greet(y)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(x.send, "analyze", ticker="AAPL"))
                nursery.start_soon(functools.partial(y.send, "analyze", ticker="MSFT"))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(settle, x, server, session_id)
                nursery.start_soon(settle, y, server, session_id)
            return x, y

    async with live(real_redis, metric_delay_seconds=(0.05, 0.15)) as server:
        session_ids = [new_session_id() for _ in range(10)]
        outcomes: dict[str, tuple[Client, Client]] = {}

        async def run(session_id: str) -> None:
            outcomes[session_id] = await race(server, session_id)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for session_id in session_ids:
                    nursery.start_soon(run, session_id)
        for session_id, (x, y) in outcomes.items():
            frames = x.frames + y.frames
            ends = {
                f["analysis_id"]: f
                for f in frames
                if f["type"] in ("analysis_complete", "analysis_cancelled")
            }
            assert sorted(f["type"] for f in ends.values()) == [
                "analysis_cancelled",
                "analysis_complete",
            ], frames
            loser, winner = sorted(ends.values(), key=lambda f: f["type"] == "analysis_complete")
            assert loser["reason"] == "switched"
            stored = await stored_results(server, session_id)
            assert assert_blocks_contiguous(stored)[-1] == winner["analysis_id"]
            assert [r.analysis_id for r in stored[-5:]] == [winner["analysis_id"]] * 5
            assert_streamed_equals_stored(frames, stored, v2=True)


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
async def test_a_cancelled_analysis_stores_nothing_more(
    real_redis: RedisServerInfo, v2: bool
) -> None:
    session_id = new_session_id()
    async with (
        live(real_redis, metric_delay_seconds=(0.05, 0.6)) as server,
        open_client(server, session_id, v2=v2) as client,
    ):
        if v2:
            await greet(client)
        await client.send("analyze", ticker="MSFT")
        await client.recv_until(is_type("analysis_result"), timeout=IO)
        await client.send("cancel")
        if v2:
            await client.recv_until(is_type("analysis_cancelled"), timeout=IO)
            assert client.frames[-1]["reason"] == "cancelled"
        else:  # v1 has no analysis_cancelled: a sentinel marks where the cancel was handled
            await client.send_raw(SENTINEL)
            await client.recv_until(is_type("error"), timeout=IO)
        await client.expect_quiet(0.8)  # past every metric delay
        streamed = results_in(client.frames)
        assert 1 <= len(streamed) < 5
        stored = await stored_results(server, session_id)
        assert_streamed_equals_stored(client.frames, stored, v2=v2)
        portfolio = await store_of(server).get(session_id)
        assert portfolio is not None
        assert portfolio.current_analysis is None
        await trio.sleep(0.3)
        assert await stored_results(server, session_id) == stored


# -- 3: one snapshot, never stale -----------------------------------------------------------


def assert_fresh(frames: list[Frame]) -> None:
    """Every result carries its analysis's snapshot version, never below a version
    the connection already heard of; market updates only ever move forward."""
    started: dict[str, int] = {}
    heard = 0
    updates: list[int] = []
    for frame in frames:
        kind = frame["type"]
        if kind == "analysis_started":
            started[frame["analysis_id"]] = frame["portfolio_version"]
        elif kind == "market_update":
            assert set(frame) == {"type", "total_value", "prices", "portfolio_version", "as_of"}
            assert ISO_Z.match(frame["as_of"])
            assert frame["total_value"] > 0
            updates.append(frame["portfolio_version"])
            heard = max(heard, frame["portfolio_version"])
        elif kind == "portfolio":
            heard = max(heard, frame["portfolio_version"])
        elif kind == "analysis_result":
            assert frame["portfolio_version"] == started[frame["analysis_id"]], frame
            assert frame["portfolio_version"] >= heard, f"stale result {frame} after v{heard}"
    assert updates == sorted(set(updates)), f"market_update versions went back: {updates}"


def assert_analyses_well_formed(frames: list[Frame]) -> None:
    """Each analysis (v2): started, at most five distinct results, then one ending;
    cancelled only if it was cut short, complete only with all five."""
    events: dict[str, list[Frame]] = collections.defaultdict(list)
    for frame in frames:
        if frame["type"].startswith("analysis_"):
            events[frame["analysis_id"]].append(frame)
    for analysis_id, seen in events.items():
        kinds = [f["type"] for f in seen]
        assert kinds[0] == "analysis_started", (analysis_id, kinds)
        results = [f for f in seen if f["type"] == "analysis_result"]
        assert len({r["metric"] for r in results}) == len(results) <= 5
        assert kinds[1 : 1 + len(results)] == ["analysis_result"] * len(results), kinds
        assert len(kinds) <= len(results) + 2, kinds
        if kinds[-1] == "analysis_complete":
            assert len(results) == 5, kinds
        elif kinds[-1] == "analysis_cancelled":
            assert len(results) < 5, f"{analysis_id} delivered all five, then was cancelled"


async def test_set_holdings_from_another_connection_restarts_the_analysis(
    real_redis: RedisServerInfo,
) -> None:
    session_id = new_session_id()
    async with (
        live(real_redis, metric_delay_seconds=(0.1, 0.5)) as server,
        open_client(server, session_id) as watcher,
        open_client(server, session_id) as editor,
    ):
        await greet(watcher)
        await greet(editor)
        first = await start_analysis(watcher, "AAPL")
        await watcher.recv_until(is_type("analysis_result"), timeout=IO)
        await editor.send("set_holdings", holdings={"AAPL": 200, "GOOGL": 50, "MSFT": 75})
        edited = (await editor.recv_until(is_type("portfolio"), timeout=IO))[-1]
        assert edited["portfolio_version"] > first["portfolio_version"]
        frames = await watcher.recv_until(is_type("analysis_complete"), timeout=IO)
        await watcher.expect_quiet(0.6)
        kinds = [f["type"] for f in frames]
        cut = kinds.index("analysis_cancelled")
        assert frames[cut] == {
            "type": "analysis_cancelled",
            "analysis_id": first["analysis_id"],
            "ticker": "AAPL",
            "reason": "portfolio_changed",
        }
        restart = frames[cut + 1]
        assert restart["type"] == "analysis_started"
        assert restart["ticker"] == "AAPL"
        assert restart["portfolio_version"] == edited["portfolio_version"]
        assert restart["analysis_id"] != first["analysis_id"]
        fresh = results_in(frames[cut + 1 :])
        assert len(fresh) == 5
        assert {r["metric"] for r in fresh} == METRIC_NAMES
        assert {r["analysis_id"] for r in fresh} == {restart["analysis_id"]}
        assert "market_update" not in kinds  # a holdings change is not a market update
        assert_fresh(watcher.frames)
        assert_analyses_well_formed(watcher.frames)
        stored = await stored_results(server, session_id)
        assert assert_blocks_contiguous(stored) == [first["analysis_id"], restart["analysis_id"]]
        assert_streamed_equals_stored(watcher.frames, stored, v2=True)
        versions = [r.portfolio_version for r in stored]
        assert versions == sorted(versions)
        # The editor's own connection heard nothing of the watcher's analysis.
        assert {f["type"] for f in editor.frames} == {"session", "portfolio"}


async def test_set_holdings_on_the_same_connection_restarts_the_analysis(
    real_redis: RedisServerInfo,
) -> None:
    session_id = new_session_id()
    async with (
        live(real_redis, metric_delay_seconds=(0.1, 0.5)) as server,
        open_client(server, session_id) as client,
    ):
        await greet(client)
        first = await start_analysis(client, "GOOGL")
        await client.send("set_holdings", holdings={"GOOGL": 1, "NVDA": 2})
        frames = await client.recv_until(is_type("analysis_complete"), timeout=IO)
        kinds = [f["type"] for f in frames]
        edited = frames[kinds.index("portfolio")]
        cut = kinds.index("analysis_cancelled")
        assert frames[cut]["analysis_id"] == first["analysis_id"]
        assert frames[cut]["reason"] == "portfolio_changed"
        restart = frames[cut + 1]
        assert restart["type"] == "analysis_started"
        assert restart["portfolio_version"] == edited["portfolio_version"]
        assert len(results_in(frames[cut + 1 :])) == 5
        assert_fresh(client.frames)
        assert_analyses_well_formed(client.frames)
        assert_streamed_equals_stored(
            client.frames, await stored_results(server, session_id), v2=True
        )


async def test_holdings_dropping_the_ticker_end_the_analysis(real_redis: RedisServerInfo) -> None:
    session_id = new_session_id()
    async with (
        live(real_redis, metric_delay_seconds=(0.2, 0.5)) as server,
        open_client(server, session_id) as watcher,
        open_client(server, session_id) as editor,
    ):
        await greet(watcher)
        await greet(editor)
        first = await start_analysis(watcher, "MSFT")
        await editor.send("set_holdings", holdings={"AAPL": 1})
        await editor.recv_until(is_type("portfolio"), timeout=IO)
        frames = await watcher.recv_until(is_type("error"), timeout=IO)
        assert frames[-1]["code"] == "ticker_not_held"
        cancelled = [f for f in frames if f["type"] == "analysis_cancelled"]
        assert [(c["analysis_id"], c["reason"]) for c in cancelled] == [
            (first["analysis_id"], "portfolio_changed")
        ]
        await watcher.expect_quiet(0.6)
        portfolio = await store_of(server).get(session_id)
        assert portfolio is not None
        assert portfolio.current_analysis is None
        assert_streamed_equals_stored(watcher.frames, list(portfolio.analysis_results), v2=True)


MARKET = {"market_update_interval_seconds": 0.3, "metric_delay_seconds": (0.02, 0.25)}
"""Ticks every 0.3 s; an analysis needs up to 0.25 s: some finish, some are overtaken."""


async def test_market_ticks_restart_analyses_and_nothing_stale_is_stored(
    real_redis: RedisServerInfo,
) -> None:
    session_id = new_session_id()
    async with (
        live(real_redis, results_limit=10_000, **MARKET) as server,
        open_client(server, session_id) as client,
    ):
        await greet(client)
        restarted = completed = 0
        with trio.fail_after(30):
            while restarted < 2 or completed < 2:
                await client.send("analyze", ticker="AAPL")
                frames = await client.recv_until(is_type("analysis_complete"), timeout=IO)
                completed += 1
                events = [f for f in frames if f["type"].startswith("analysis_")]
                for i, frame in enumerate(events):
                    if frame["type"] == "analysis_cancelled":
                        assert frame["reason"] == "portfolio_changed"
                        nxt = events[i + 1]
                        assert nxt["type"] == "analysis_started"
                        assert nxt["ticker"] == "AAPL"
                        assert nxt["portfolio_version"] > events_started_before(events, i)
                        restarted += 1
                last = [f for f in events if f["type"] == "analysis_started"][-1]
                fresh = [f for f in events if f.get("analysis_id") == last["analysis_id"]]
                assert [f["type"] for f in fresh] == ["analysis_started"] + [
                    "analysis_result"
                ] * 5 + ["analysis_complete"]
        await settle(client, server, session_id)
        updates = [f for f in client.frames if f["type"] == "market_update"]
        assert len(updates) >= 3
        assert all(set(u["prices"]) == set(TICKERS) for u in updates)
        assert_fresh(client.frames)
        assert_analyses_well_formed(client.frames)
        stored = await stored_results(server, session_id)
        assert_blocks_contiguous(stored)
        assert_streamed_equals_stored(client.frames, stored, v2=True)
        versions = [r.portfolio_version for r in stored]
        assert versions == sorted(versions), "a result older than a stored one was stored"


def events_started_before(events: list[Frame], index: int) -> int:
    """The version of the last ``analysis_started`` before ``events[index]``."""
    version: int = [e for e in events[:index] if e["type"] == "analysis_started"][-1][
        "portfolio_version"
    ]
    return version


async def test_v1_under_market_ticks_sees_partial_sets_then_a_complete_one(
    real_redis: RedisServerInfo,
) -> None:
    session_id = new_session_id()
    async with (
        live(real_redis, results_limit=10_000, **MARKET) as server,
        open_client(server, session_id, v2=False) as client,
    ):
        partial_seen = False
        with trio.fail_after(40):
            while not partial_seen:
                existing = await store_of(server).get(session_id)
                before = 0 if existing is None else len(existing.analysis_results)
                received = len(client.frames)
                await client.send("analyze", ticker="GOOGL")
                await settle(client, server, session_id)
                frames = [f for f in client.frames[received:] if f["type"] != "error"]
                assert {f["type"] for f in frames} == {"analysis_result"}
                stored = (await stored_results(server, session_id))[before:]
                # Stored per analysis, in order: partial sets, then one complete set.
                groups = [
                    [r for r in stored if r.analysis_id == aid]
                    for aid in assert_blocks_contiguous(stored)
                ]
                assert len(groups[-1]) == 5
                assert {r.metric for r in groups[-1]} == METRIC_NAMES
                assert all(len(g) < 5 for g in groups[:-1])
                partial_seen = len(groups) > 1
                # The client sees exactly that, and its last five are the complete set.
                assert_streamed_equals_stored(frames, stored, v2=False)
                latest = {f["metric"]: f["value"] for f in frames}
                assert latest == {r.metric: r.value for r in groups[-1]}
                last_five = collections.Counter(result_key(f, v2=False) for f in frames[-5:])
                assert last_five == collections.Counter(result_key(r, v2=False) for r in groups[-1])


# -- 5: inactivity expiry -------------------------------------------------------------------


async def test_activity_keeps_a_session_market_ticks_do_not(real_redis: RedisServerInfo) -> None:
    active_id, idle_id, gone_id = new_session_id(), new_session_id(), new_session_id()
    async with live(
        real_redis, session_ttl_seconds=2, market_update_interval_seconds=0.2
    ) as server:
        store = store_of(server)
        redis = server.info.server.redis
        async with (
            open_client(server, active_id) as active,
            open_client(server, idle_id) as idle,
        ):
            await greet(active)
            await greet(idle)
            # A session nobody is connected to, with holdings of its own.
            async with open_client(server, gone_id) as client:
                await greet(client)
                await client.send("set_holdings", holdings={"NVDA": 7})
                await client.recv_until(is_type("portfolio"), timeout=IO)
            await idle.send("set_holdings", holdings={"NVDA": 7})
            await idle.recv_until(is_type("portfolio"), timeout=IO)
            idle_since = trio.current_time()
            gone_at: float | None = None
            with trio.fail_after(10):
                while gone_at is None or trio.current_time() < idle_since + 3.2:
                    await active.send("get_portfolio")
                    await active.recv_until(is_type("portfolio"), timeout=IO)
                    if gone_at is None and await store.get(idle_id) is None:
                        gone_at = trio.current_time() - idle_since
                    await trio.sleep(0.1)
            # The idle session vanished about one TTL after its last activity...
            assert gone_at is not None
            assert 1.7 <= gone_at <= 2.9, gone_at
            assert await store.get(gone_id) is None
            # ...although market ticks kept revaluing it, and the idle client heard them.
            with trio.move_on_after(0.5):
                while True:
                    await idle.recv(IO)
            updates = [f for f in idle.frames if f["type"] == "market_update"]
            assert len(updates) >= 5
            # The active session lives on: only client frames count.
            kept = await store.get(active_id)
            assert kept is not None
            ttl = await redis.execute("PTTL", store.keys.session(active_id))
            assert 0 < ttl <= 2000
            # The idle connection's next action finds the session expired and starts afresh.
            await idle.send("get_portfolio")
            error, session = await idle.recv(IO), await idle.recv(IO)
            assert (error["type"], error["code"]) == ("error", "session_expired")
            assert session["type"] == "session"
            assert session["portfolio"]["holdings"] == {"AAPL": 100.0, "GOOGL": 50.0, "MSFT": 75.0}
        # A reconnect to an expired session gets a fresh one.
        async with open_client(server, gone_id) as client:
            fresh = (await greet(client))["portfolio"]
            assert fresh["holdings"] == {"AAPL": 100.0, "GOOGL": 50.0, "MSFT": 75.0}
            assert fresh["analysis_results"] == []


# -- 6: bad input does not disturb a running analysis ---------------------------------------


async def test_malformed_input_does_not_disturb_a_running_analysis(
    real_redis: RedisServerInfo,
) -> None:
    session_id = new_session_id()
    bad: list[tuple[str | bytes, str]] = [
        ("{nope", "bad_json"),
        (b"\x00\xff", "bad_json"),
        ('{"action": "dance"}', "unknown_action"),
        ('{"action": "analyze", "ticker": "not a ticker"}', "bad_ticker"),
        ('{"action": "analyze"}', "bad_ticker"),
        ('{"action": "set_holdings", "holdings": {"AAPL": -1}}', "bad_holdings"),
        ('{"action": "set_holdings", "holdings": {}}', "bad_holdings"),
    ]
    async with (
        live(real_redis, metric_delay_seconds=(0.3, 0.6)) as server,
        open_client(server, session_id) as client,
    ):
        await greet(client)
        started = await start_analysis(client, "AAPL")
        for text, _ in bad:
            await client.send_raw(text)
            await client.send("get_portfolio")  # well-formed, and no reason to stop either
            await trio.sleep(0.02)
        frames = await client.recv_until(is_type("analysis_complete"), timeout=IO)
        await client.expect_quiet(0.2)
        errors = [f["code"] for f in frames if f["type"] == "error"]
        assert errors == [code for _, code in bad]
        assert sum(f["type"] == "portfolio" for f in frames) == len(bad)
        assert not [f for f in frames if f["type"] in ("analysis_cancelled", "analysis_started")]
        results = results_in(frames)
        assert len(results) == 5
        assert {r["analysis_id"] for r in results} == {started["analysis_id"]}
        assert_streamed_equals_stored(
            client.frames, await stored_results(server, session_id), v2=True
        )


async def test_analyze_of_a_ticker_not_held_is_refused_after_stopping_the_current_one(
    real_redis: RedisServerInfo,
) -> None:
    """``analyze`` first stops the analysis in flight, then the snapshot refuses a ticker
    the session does not hold (the order of the protocol's ``analyze`` row): the
    client hears ``switched``, then ``ticker_not_held``, and the connection works on."""
    session_id = new_session_id()
    async with (
        live(real_redis, metric_delay_seconds=(0.3, 0.6)) as server,
        open_client(server, session_id) as client,
    ):
        await greet(client)
        started = await start_analysis(client, "AAPL")
        await client.send("analyze", ticker="TSLA")
        frames = await client.recv_until(is_type("error"), timeout=IO)
        assert [f["type"] for f in frames] == ["analysis_cancelled", "error"]
        assert frames[0]["analysis_id"] == started["analysis_id"]
        assert frames[0]["reason"] == "switched"
        assert frames[1]["code"] == "ticker_not_held"
        await client.expect_quiet(0.7)
        portfolio = await store_of(server).get(session_id)
        assert portfolio is not None
        assert portfolio.current_analysis is None
        assert portfolio.analysis_results == ()
        await client.send("analyze", ticker="MSFT")
        done = await client.recv_until(is_type("analysis_complete"), timeout=IO)
        assert len(results_in(done)) == 5
