"""Live analyses on a 3-master cluster through failover and resharding (issue 12, acceptance).

Rules of this suite: two ``python -m trio_portfolio serve --redis-url
redis+cluster://...`` processes (environment cleared of ``PORTFOLIO_*``)
share one key prefix on one local 3-master cluster; clients speak v2 over
real WebSockets; session ids are chosen by the slot of their hash tag
(``redis.crc.key_slot`` of the id: every key of a session carries it) so the
sessions cover every master.  What a client receives is recorded frame by
frame and checked afterwards against what the session stores, read from
the cluster with a store of the test's own (reading is not activity).

* The guarantees 1-7 of ``../shared/PROTOCOL.md`` on the session-scoped
  cluster (which keeps its shape): switches, take-overs across the two
  processes, holdings edits and market ticks, bad input, inactivity expiry,
  and an outage of one master (``CLIENT PAUSE``, which leaves the topology
  alone) that only its own sessions see.
* ``CLUSTER FAILOVER`` of a master that serves live sessions while every
  session is analysing, and a resharding of a live session's slot (keys
  moved one by one, so the ``ASK``/``TRYAGAIN`` window is met by live
  traffic), each on a private cluster: no stale, lost or duplicated result
  (stored == streamed), no client disconnected, at most ``store_unavailable``
  answers, which the client answers by asking again.  The time each takes
  and what the clients saw are printed for the closing note.

Every wait is a condition with a generous bound (a loaded 2-core machine
runs the six redis-servers, both processes and the clients).
"""

from __future__ import annotations

import collections
import itertools
import random
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from redis.crc import key_slot
from trio_websocket import ConnectionClosed

from trio_portfolio.models import AnalysisResult
from trio_portfolio.redis_connect import open_redis
from trio_portfolio.store import SessionStore, open_store
from trio_portfolio.testing import (
    METRIC_NAMES,
    RedisCluster,
    find_topology_binary,
    greet,
    is_type,
    open_redis_cluster,
    start_analysis,
    unique_key_prefix,
    wait_for_cluster_ok,
)
from trio_portfolio.testing.live_server import Client, Frame, connect_client
from trio_portfolio.testing.processes import server_process, wait_for_ready
from trio_portfolio.testing.redis_topologies import cluster_failover, cluster_migrate_slot

IO = 30.0
"""Seconds one wait for a frame may take (an analysis is under 2 s; the slack is for load)."""
TICKERS = ("AAPL", "GOOGL", "MSFT")
LIVE = ("--metric-delay-seconds", "0.05,0.3", "--market-update-interval-seconds", "1")
"""Analyses in flight most of the time, market ticks every second (some analyses restart)."""
RESULTS_LIMIT = "100000"
"""Every result of a test stays stored, so stored == streamed compares whole histories."""
NO_TICKS = ("--market-update-interval-seconds", "3600")
"""For checks that a market tick would disturb (a restart where none is expected)."""
MARKET_SLOT = key_slot(b"market")
"""The slot of every ``<prefix>:{market}:...`` key (prices, history, tick, leader lease)."""


def session_ids() -> Iterator[str]:
    tag = secrets.token_hex(4)
    return (f"cl-{tag}-{n}" for n in itertools.count())


@asynccontextmanager
async def two_servers(cluster: RedisCluster, *args: str) -> AsyncIterator[tuple[int, int, str]]:
    """Two ``serve`` processes on ``cluster`` with one fresh key prefix, both ready."""
    key_prefix = unique_key_prefix()
    common = ("--redis-url", cluster.url, "--key-prefix", key_prefix)
    async with (
        server_process(*common, "--results-limit", RESULTS_LIMIT, *args) as a,
        server_process(*common, "--results-limit", RESULTS_LIMIT, *args) as b,
    ):
        await wait_for_ready(a.port, timeout=60)
        await wait_for_ready(b.port, timeout=60)
        yield a.port, b.port, key_prefix


@asynccontextmanager
async def cluster_store(cluster: RedisCluster, key_prefix: str) -> AsyncIterator[SessionStore]:
    """A store of the test's own on ``cluster``, for reading what the servers stored."""
    async with open_redis(cluster.url, timeout=10.0) as redis:
        yield await open_store(redis, layout="hash", key_prefix=key_prefix)


async def stored_results(store: SessionStore, session_id: str) -> list[AnalysisResult]:
    portfolio = await store.get(session_id)
    assert portfolio is not None, f"session {session_id} is gone"
    return list(portfolio.analysis_results)


async def wait_until_idle(store: SessionStore, session_id: str, timeout: float = 60.0) -> None:
    """Until the session has no current analysis (its last one committed everything)."""
    with trio.fail_after(timeout):
        while True:
            portfolio = await store.get(session_id)
            if portfolio is not None and portfolio.current_analysis is None:
                return
            await trio.sleep(0.05)


# -- what a session's two sides must agree on --------------------------------------------


def result_key(result: Frame | AnalysisResult) -> tuple[Any, ...]:
    names = ("analysis_id", "ticker", "metric", "value", "timestamp", "portfolio_version")
    if isinstance(result, AnalysisResult):
        return tuple(getattr(result, name) for name in names)
    return tuple(result[name] for name in names)


def check_session(frames: list[Frame], stored: list[AnalysisResult]) -> None:
    """Guarantees 1-4 for one v2 connection that was the session's only one.

    1: no result of an analysis after the next one started; 2: each
    analysis's stored results are one run, in start order; 3: every result
    carries its analysis's snapshot version, never below a version the
    connection already heard of, and stored versions never go back; 4:
    stored == streamed, each exactly once; and every completed analysis
    delivered its five metrics.
    """
    current: str | None = None
    started: dict[str, int] = {}
    heard = 0
    per_analysis: dict[str, list[Frame]] = collections.defaultdict(list)
    for frame in frames:
        kind = frame["type"]
        if kind == "analysis_started":
            current = frame["analysis_id"]
            started[current] = frame["portfolio_version"]
        elif kind in ("portfolio", "market_update"):
            heard = max(heard, frame["portfolio_version"])
        elif kind == "session":
            heard = max(heard, frame["portfolio"]["portfolio_version"])
        elif kind == "analysis_result":
            assert current is not None, f"a result before any analysis_started: {frame}"
            assert frame["analysis_id"] == current, f"interleaved: {frame} during {current}"
            assert frame["portfolio_version"] == started[current], frame
            assert frame["portfolio_version"] >= heard, f"stale result {frame} after v{heard}"
            per_analysis[current].append(frame)
        elif kind == "analysis_complete":
            assert current is not None
            assert frame["analysis_id"] == current
            assert {r["metric"] for r in per_analysis[current]} == METRIC_NAMES, frame
    for results in per_analysis.values():
        assert len({r["metric"] for r in results}) == len(results) <= 5, results
    order: list[str] = []
    for result in stored:
        if not order or order[-1] != result.analysis_id:
            assert result.analysis_id not in order, f"{result.analysis_id} stored in two runs"
            order.append(result.analysis_id)
    versions = [r.portfolio_version for r in stored]
    assert versions == sorted(versions), "a result older than a stored one was stored"
    streamed = collections.Counter(result_key(f) for f in frames if f["type"] == "analysis_result")
    kept = collections.Counter(result_key(r) for r in stored)
    assert streamed == kept, (
        f"streamed-not-stored {list((streamed - kept).elements())[:5]}, "
        f"stored-not-streamed {list((kept - streamed).elements())[:5]}"
    )
    assert max(streamed.values(), default=1) == 1, "a result was streamed twice"


# -- clients that keep analysing ----------------------------------------------------------


@attrs.define
class Analyst:
    """One v2 connection analysing its own session over and over until told to stop."""

    session_id: str
    port: int
    frames: list[Frame] = attrs.field(factory=list)
    received_at: list[float] = attrs.field(factory=list)
    completed_at: list[float] = attrs.field(factory=list)
    unavailable: int = 0

    async def _next(self, client: Client) -> Frame:
        frame = await client.recv(IO)
        self.received_at.append(trio.current_time())
        return frame

    async def run(self, stop: trio.Event, task_status: trio.TaskStatus[None]) -> None:
        """Greet, then analyse the held tickers in turn until ``stop``.

        A ``store_unavailable`` answer is counted and answered by asking
        again (what a client does); any other error, a close frame or a
        silence longer than :data:`IO` fails the test.  The analysis under
        way when ``stop`` is set runs to completion, so the session ends
        idle with every result committed.
        """
        async with connect_client(self.port, self.session_id, timeout=IO) as client:
            self.frames = client.frames
            assert (await self._next(client))["type"] == "session"
            task_status.started()
            for ticker in itertools.cycle(TICKERS):
                if stop.is_set():
                    break
                await client.send("analyze", ticker=ticker)
                while True:
                    try:
                        frame = await self._next(client)
                    except ConnectionClosed as exc:
                        raise AssertionError(f"{self.session_id} disconnected: {exc}") from exc
                    if frame["type"] == "analysis_complete":
                        self.completed_at.append(trio.current_time())
                        break
                    if frame["type"] == "error":
                        assert frame["code"] == "store_unavailable", frame
                        self.unavailable += 1
                        await trio.sleep(0.05)
                        break
            # the last error's attempt may still end (analysis_cancelled): collect it
            with trio.move_on_after(0.5):
                while True:
                    await self._next(client)

    def heard_market_after(self, since: float) -> bool:
        """A ``market_update`` arrived after ``since``: the session's channel works there.

        Market updates reach a connection only through the session's pub/sub
        channel (sharded: on the shard of the session's slot), so one after a
        failover or a move shows the subscription followed the slot.
        """
        return any(
            t > since and f["type"] == "market_update"
            for f, t in zip(self.frames, self.received_at, strict=False)
        )

    def longest_silence(self, since: float) -> float:
        """The longest gap between frames received after ``since`` (the outage as seen)."""
        times = [since, *(t for t in self.received_at if t > since)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition()`` every 50 ms until true; fail with ``what`` after ``timeout``."""
    try:
        with trio.fail_after(timeout):
            while not condition():  # noqa: ASYNC110  # polling clients' progress
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None


async def two_more_analyses_and_a_market_update(
    analysts: list[Analyst], before: dict[str, int], since: float, event: str
) -> None:
    """Wait until every analyst completed two more analyses and heard the market after ``since``."""
    await wait_for(
        lambda: all(
            len(x.completed_at) >= before[x.session_id] + 2 and x.heard_market_after(since)
            for x in analysts
        ),
        120,
        f"two analyses and a market update per session after {event}",
    )


def reset_redirect_stats(cluster: RedisCluster) -> None:
    """``CONFIG RESETSTAT`` on every node: the counts below start from the event."""
    for node in cluster.nodes:
        with node.client() as client:
            client.config_resetstat()


def redirect_stats(cluster: RedisCluster) -> dict[str, int]:
    """What the nodes answered since the reset, summed: the redirect path as the servers met it.

    ``MOVED``/``ASK``/``TRYAGAIN``/``NOSCRIPT`` from ``INFO errorstats``, and
    ``ASKING`` (sent before each ASK-redirected call) from ``INFO commandstats``.
    """
    totals = dict.fromkeys(("MOVED", "ASK", "TRYAGAIN", "NOSCRIPT", "ASKING"), 0)
    for node in cluster.nodes:
        with node.client() as client:
            errors = client.info("errorstats")
            commands = client.info("commandstats")
        for name in ("MOVED", "ASK", "TRYAGAIN", "NOSCRIPT"):
            totals[name] += int(errors.get(f"errorstat_{name}", {}).get("count", 0))
        totals["ASKING"] += int(commands.get("cmdstat_asking", {}).get("calls", 0))
    return totals


async def check_all(store: SessionStore, analysts: list[Analyst]) -> None:
    for analyst in analysts:
        await wait_until_idle(store, analyst.session_id)
        check_session(analyst.frames, await stored_results(store, analyst.session_id))


# -- the harness's choices ---------------------------------------------------------------


async def test_sessions_are_spread_by_slot_and_a_move_to_the_owner_is_refused(
    redis_cluster: RedisCluster,
) -> None:
    """The ids the suite picks hash into the master they are listed under (so "spans all
    three masters" is true), and ``migrate_slot`` refuses a move to the slot's own master
    before changing anything."""
    await wait_for_cluster_ok(redis_cluster)
    spread = await trio.to_thread.run_sync(redis_cluster.spread_over_masters, session_ids(), 3)
    assert len(spread) == 3
    for port, ids in spread.items():
        assert len(ids) == 3
        for session_id in ids:
            owner = await trio.to_thread.run_sync(
                redis_cluster.slot_owner, key_slot(session_id.encode())
            )
            assert owner.port == port
    with pytest.raises(ValueError, match="too few candidates"):
        await trio.to_thread.run_sync(redis_cluster.spread_over_masters, ["one-id"], 1)
    slot = key_slot(b"market")
    owner = await trio.to_thread.run_sync(redis_cluster.slot_owner, slot)
    with pytest.raises(ValueError, match="already serves"):
        await cluster_migrate_slot(redis_cluster, slot, owner)


# -- guarantees 1-7 on the session-scoped cluster -----------------------------------------

SENTINEL = "sentinel: not json"
"""A frame answered ``bad_json`` only after every earlier request: a marker in the stream."""


async def settle(client: Client, store: SessionStore, session_id: str) -> None:
    """Read everything the client's requests so far will ever produce (see the guarantee
    suite's ``settle``): the sentinel's answer, an idle session, then a quiet half second."""
    await client.send_raw(SENTINEL)
    await client.recv_until(lambda f: f["type"] == "error" and f["code"] == "bad_json", timeout=IO)
    await wait_until_idle(store, session_id)
    with trio.move_on_after(60):
        while True:
            with trio.move_on_after(0.5):
                await client.recv(IO)
                continue
            break


async def test_guarantees_1_3_4_switch_storm_under_market_ticks(
    redis_cluster: RedisCluster,
) -> None:
    """Six sessions (two per master, alternately on each process) switch tickers at random
    for 6 s while the market ticks: no interleaving (1), no stale result and restarts on
    fresh snapshots (3), stored == streamed exactly once (4), in every session."""
    await wait_for_cluster_ok(redis_cluster)
    spread = await trio.to_thread.run_sync(redis_cluster.spread_over_masters, session_ids(), 2)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    ticks = ("--metric-delay-seconds", "0.02,0.25", "--market-update-interval-seconds", "0.8")
    async with (
        two_servers(redis_cluster, *ticks) as (a, b, prefix),
        cluster_store(redis_cluster, prefix) as store,
    ):
        ids = list(itertools.chain(*spread.values()))
        frames: dict[str, list[Frame]] = {}
        switches: collections.Counter[str] = collections.Counter()

        async def storm(session_id: str, port: int, until: float, rng: random.Random) -> None:
            async with connect_client(port, session_id, timeout=IO) as client:
                await greet(client, IO)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_until_cancelled, client)
                    last = None
                    while trio.current_time() < until:
                        ticker = rng.choice([t for t in TICKERS if t != last])
                        await client.send("analyze", ticker=ticker)
                        switches[session_id] += 1
                        last = ticker
                        await trio.sleep(rng.uniform(0.0, 0.4))
                    nursery.cancel_scope.cancel()
                await settle(client, store, session_id)
                frames[session_id] = client.frames

        until = trio.current_time() + 6.0
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i, session_id in enumerate(ids):
                    child = random.Random(rng.randrange(2**32))
                    nursery.start_soon(storm, session_id, (a, b)[i % 2], until, child)
        reasons: collections.Counter[str] = collections.Counter()
        for session_id in ids:
            seen = frames[session_id]
            check_session(seen, await stored_results(store, session_id))
            errors = [f["code"] for f in seen if f["type"] == "error"]
            assert errors == ["bad_json"], errors
            reasons.update(f["reason"] for f in seen if f["type"] == "analysis_cancelled")
            assert any(f["type"] == "market_update" for f in seen), "no market tick reached it"
            started = sum(f["type"] == "analysis_started" for f in seen)
            assert started >= switches[session_id]  # one per request, restarts on top
        print(
            f"\nswitch storm on the cluster (seed {seed}): {sum(switches.values())} switches over"
            f" {len(ids)} sessions, cancellations {dict(reasons)}"
        )
        assert reasons["switched"] > 0
        assert reasons["portfolio_changed"] > 0, "no market tick restarted an analysis"


async def read_until_cancelled(client: Client) -> None:
    while True:
        await client.recv(IO)


BAD_INPUT: list[tuple[str | bytes, str]] = [
    ("{nope", "bad_json"),
    (b"\x00\xff", "bad_json"),
    ('{"action": "dance"}', "unknown_action"),
    ('{"action": "analyze", "ticker": "not a ticker"}', "bad_ticker"),
    ('{"action": "set_holdings", "holdings": {"AAPL": -1}}', "bad_holdings"),
]


async def takeover_edit_and_bad_input(a: int, b: int, session_id: str, store: SessionStore) -> None:
    """Guarantees 2, 3 and 6 on one session with a connection on each process."""
    async with (
        connect_client(a, session_id, timeout=IO) as x,
        connect_client(b, session_id, timeout=IO) as y,
    ):
        await greet(x, IO)
        await greet(y, IO)
        # 2: B's analysis fences A's out, across processes
        x_started = await start_analysis(x, "AAPL", IO)
        await x.recv_until(is_type("analysis_result"), timeout=IO)
        await y.send("analyze", ticker="GOOGL")
        y_frames = await y.recv_until(is_type("analysis_complete"), timeout=IO)
        cancelled = (await x.recv_until(is_type("analysis_cancelled"), timeout=IO))[-1]
        assert (cancelled["analysis_id"], cancelled["reason"]) == (
            x_started["analysis_id"],
            "switched",
        )
        await x.expect_quiet(1.0)  # past every metric delay of A's
        order = [r.analysis_id for r in await stored_results(store, session_id)]
        assert list(dict.fromkeys(order)) == [x_started["analysis_id"], y_frames[0]["analysis_id"]]
        # 3: holdings edited through B restart A's analysis on a fresh snapshot
        first = await start_analysis(x, "MSFT", IO)
        await x.recv_until(is_type("analysis_result"), timeout=IO)
        await y.send("set_holdings", holdings={"AAPL": 200, "GOOGL": 50, "MSFT": 75})
        edited = (await y.recv_until(is_type("portfolio"), timeout=IO))[-1]
        frames = await x.recv_until(is_type("analysis_complete"), timeout=IO)
        kinds = [f["type"] for f in frames]
        cut = kinds.index("analysis_cancelled")
        assert frames[cut]["analysis_id"] == first["analysis_id"]
        assert frames[cut]["reason"] == "portfolio_changed"
        restart = frames[kinds.index("analysis_started", cut)]
        assert restart["portfolio_version"] >= edited["portfolio_version"]
        fresh = [f for f in frames if f.get("analysis_id") == restart["analysis_id"]]
        assert {f["metric"] for f in fresh if f["type"] == "analysis_result"} == METRIC_NAMES
        # 6: bad input during an analysis is answered, the analysis runs on
        started = await start_analysis(x, "GOOGL", IO)
        for text, _ in BAD_INPUT:
            await x.send_raw(text)
        frames = await x.recv_until(is_type("analysis_complete"), timeout=IO)
        assert [f["code"] for f in frames if f["type"] == "error"] == [c for _, c in BAD_INPUT]
        assert not [f for f in frames if f["type"] in ("analysis_cancelled", "analysis_started")]
        results = [f for f in frames if f["type"] == "analysis_result"]
        assert {r["analysis_id"] for r in results} == {started["analysis_id"]}
        assert len(results) == 5
        # 4 over both connections; 2: every analysis's results are one run, in order
        await wait_until_idle(store, session_id)
        await x.expect_quiet(0.5)
        stored = await stored_results(store, session_id)
        streamed = collections.Counter(
            result_key(f) for f in x.frames + y.frames if f["type"] == "analysis_result"
        )
        assert streamed == collections.Counter(result_key(r) for r in stored)
        assert max(streamed.values()) == 1
        runs = [r.analysis_id for r in stored]
        assert len(list(dict.fromkeys(runs))) == len([k for k, _ in itertools.groupby(runs)]), (
            "an analysis's results were stored in two runs"
        )
        assert {f["type"] for f in y.frames} <= {
            "session",
            "portfolio",
            "analysis_started",
            "analysis_result",
            "analysis_complete",
        }


async def test_guarantees_2_3_6_takeover_edit_and_bad_input_across_processes(
    redis_cluster: RedisCluster,
) -> None:
    """One session per master, a connection on each process: B's analysis fences A's out (2),
    B's holdings edit restarts A's analysis (3), bad input answered mid-analysis (6), and
    stored == streamed over both connections (4)."""
    await wait_for_cluster_ok(redis_cluster)
    spread = await trio.to_thread.run_sync(redis_cluster.spread_over_masters, session_ids(), 1)
    settings = (*NO_TICKS, "--metric-delay-seconds", "0.3,0.7")
    async with (
        two_servers(redis_cluster, *settings) as (a, b, prefix),
        cluster_store(redis_cluster, prefix) as store,
    ):
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for (session_id,) in spread.values():
                    nursery.start_soon(takeover_edit_and_bad_input, a, b, session_id, store)


TTL = 3
"""Seconds of inactivity after which a session expires in the expiry test."""


async def test_guarantee_5_inactivity_expiry_on_every_master(redis_cluster: RedisCluster) -> None:
    """An idle session on each master expires about one TTL after its last client frame
    although the market kept revaluing it (and its client heard that); active ones live."""
    await wait_for_cluster_ok(redis_cluster)
    spread = await trio.to_thread.run_sync(redis_cluster.spread_over_masters, session_ids(), 2)
    settings = (
        "--session-ttl-seconds", str(TTL),
        "--market-update-interval-seconds", "0.8",
        "--metric-delay-seconds", "0.02,0.1",
    )  # fmt: skip
    async with (
        two_servers(redis_cluster, *settings) as (a, b, prefix),
        cluster_store(redis_cluster, prefix) as store,
        AsyncExitStack() as stack,
    ):
        active: list[tuple[str, Client]] = []
        idle: list[tuple[str, Client]] = []
        for i, (one, other) in enumerate(spread.values()):
            for group, session_id, port in (
                (active, one, (a, b)[i % 2]),
                (idle, other, (b, a)[i % 2]),
            ):
                client = await stack.enter_async_context(
                    connect_client(port, session_id, timeout=IO)
                )
                await greet(client, IO)
                group.append((session_id, client))
        for _, client in idle:
            await client.send("set_holdings", holdings={"NVDA": 7})
            await client.recv_until(is_type("portfolio"), timeout=IO)
        idle_since = trio.current_time()
        gone_at: dict[str, float] = {}
        with trio.fail_after(60):
            while len(gone_at) < len(idle) or trio.current_time() < idle_since + TTL + 1.5:
                for _, client in active:
                    await client.send("get_portfolio")
                    await client.recv_until(is_type("portfolio"), timeout=IO)
                for session_id, _ in idle:
                    if session_id not in gone_at and await store.get(session_id) is None:
                        gone_at[session_id] = trio.current_time() - idle_since
                await trio.sleep(0.1)
        print(f"\nidle sessions gone after {sorted(round(t, 2) for t in gone_at.values())} s")
        assert all(TTL - 0.3 <= t <= TTL + 2.5 for t in gone_at.values()), gone_at
        for session_id, _ in active:
            assert await store.get(session_id) is not None, f"active {session_id} expired"
        for _, client in idle:
            with trio.move_on_after(0.3):
                while True:
                    await client.recv(IO)
            assert sum(f["type"] == "market_update" for f in client.frames) >= 2
            await client.send("get_portfolio")
            error, session = await client.recv(IO), await client.recv(IO)
            assert (error["type"], error["code"]) == ("error", "session_expired")
            assert session["type"] == "session"
            assert "NVDA" not in session["portfolio"]["holdings"]


PAUSE_MS = 9000
"""How long the paused master stops answering: longer than the servers' 5 s Redis timeout."""


async def test_guarantee_7_one_master_out_only_its_sessions_wait(
    redis_cluster: RedisCluster,
) -> None:
    """One master stops answering (``CLIENT PAUSE``, the topology untouched): its sessions get
    ``store_unavailable`` on the same connections, the other masters' sessions are answered
    meanwhile, and once it answers again its sessions work without a restart."""
    await wait_for_cluster_ok(redis_cluster)
    spread = await trio.to_thread.run_sync(redis_cluster.spread_over_masters, session_ids(), 1)
    victim_port = next(iter(spread))
    victim = redis_cluster.node_at(victim_port)
    settings = (*NO_TICKS, "--metric-delay-seconds", "0.02,0.1")
    async with (
        two_servers(redis_cluster, *settings) as (a, b, prefix),
        cluster_store(redis_cluster, prefix) as store,
        AsyncExitStack() as stack,
    ):
        clients: dict[int, tuple[str, Client]] = {}
        for i, (master, (session_id,)) in enumerate(spread.items()):
            client = await stack.enter_async_context(
                connect_client((a, b)[i % 2], session_id, timeout=IO)
            )
            await greet(client, IO)
            await client.send("analyze", ticker="AAPL")
            await client.recv_until(is_type("analysis_complete"), timeout=IO)
            clients[master] = (session_id, client)

        def pause() -> None:
            # A pause that ends by itself: under PAUSE ALL even CLIENT UNPAUSE waits.
            with victim.client() as redis:
                redis.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")

        def answers_again() -> None:
            with victim.client(timeout=PAUSE_MS / 1000 + 10) as redis:
                redis.ping()

        session_id, client = clients[victim_port]
        await trio.to_thread.run_sync(pause)
        try:
            paused_at = trio.current_time()
            await client.send("get_portfolio")
            for port, (_, other) in clients.items():
                if port != victim_port:  # answered while the victim is still paused
                    await other.send("get_portfolio")
                    reply = (await other.recv_until(is_type("portfolio"), timeout=IO))[-1]
                    assert reply["session_id"] == clients[port][0]
            others_answered = trio.current_time() - paused_at
            answer = (await client.recv_until(is_type("error"), timeout=IO))[-1]
            assert answer["code"] == "store_unavailable", answer
            answered_after = trio.current_time() - paused_at
            assert others_answered < PAUSE_MS / 1000, "the other masters waited for the paused one"
        finally:
            await trio.to_thread.run_sync(answers_again)
        resumed_at = trio.current_time()
        unavailable = 1
        with trio.fail_after(30):
            while True:
                await client.send("get_portfolio")
                reply = (
                    await client.recv_until(
                        lambda f: f["type"] in ("portfolio", "error"), timeout=IO
                    )
                )[-1]
                if reply["type"] == "portfolio":
                    break
                assert reply["code"] == "store_unavailable", reply
                unavailable += 1
                await trio.sleep(0.05)
        recovered = trio.current_time() - resumed_at
        await client.send("analyze", ticker="GOOGL")
        await client.recv_until(is_type("analysis_complete"), timeout=IO)
        for session_id, other in clients.values():
            await wait_until_idle(store, session_id)
            stored = await stored_results(store, session_id)
            streamed = collections.Counter(
                result_key(f) for f in other.frames if f["type"] == "analysis_result"
            )
            assert streamed == collections.Counter(result_key(r) for r in stored)
        print(
            f"\none master paused: its session answered store_unavailable after"
            f" {answered_after:.2f} s (x{unavailable}), worked again {recovered:.2f} s after it"
            f" answered again; the other masters' sessions answered within {others_answered:.2f} s"
        )


# -- failover and resharding under live analyses ------------------------------------------


async def test_cluster_failover_during_analyses_loses_nothing() -> None:
    """``CLUSTER FAILOVER`` of a master serving live sessions and the market's keys while
    all six sessions (two per master, half on each process) analyse and the market ticks:
    afterwards stored == streamed everywhere, nothing stale or duplicated, no client
    disconnected, every session analyses on and hears market updates."""
    binary = find_topology_binary()
    assert binary is not None, "no redis-server >= 7.0 for a cluster"
    async with open_redis_cluster(binary) as cluster:
        spread = await trio.to_thread.run_sync(cluster.spread_over_masters, session_ids(), 2)
        # the master of the market's keys: its ticks and leader lease go through the failover too
        victim = await trio.to_thread.run_sync(cluster.slot_owner, MARKET_SLOT)
        victim_port = victim.port
        replica = await trio.to_thread.run_sync(cluster.replica_of, victim)
        async with two_servers(cluster, *LIVE) as (a, b, prefix):
            analysts = [
                Analyst(session_id, (a, b)[i % 2])
                for i, session_id in enumerate(itertools.chain(*spread.values()))
            ]
            on_victim = [x for x in analysts if x.session_id in spread[victim_port]]
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for analyst in analysts:
                    await nursery.start(analyst.run, stop)
                await wait_for(
                    lambda: all(len(x.completed_at) >= 1 for x in analysts), 90, "first analyses"
                )
                before = {x.session_id: len(x.completed_at) for x in analysts}
                await trio.to_thread.run_sync(reset_redirect_stats, cluster)
                began = trio.current_time()
                await cluster_failover(cluster, replica, timeout=30)
                promoted = trio.current_time() - began
                await two_more_analyses_and_a_market_update(
                    analysts, before, began + promoted, "the failover"
                )
                stop.set()
            owner = await trio.to_thread.run_sync(
                cluster.slot_owner, key_slot(on_victim[0].session_id.encode())
            )
            assert owner.port == replica.port, "the failover did not move the sessions' slots"
            seen = await trio.to_thread.run_sync(redirect_stats, cluster)
            assert seen["MOVED"] > 0, f"no call met the old master after the failover: {seen}"
            assert seen["NOSCRIPT"] > 0, f"the promoted replica never answered NOSCRIPT: {seen}"
            async with cluster_store(cluster, prefix) as store:
                await check_all(store, analysts)
        silence = max(x.longest_silence(began) for x in on_victim)
        unavailable = sum(x.unavailable for x in analysts)
        print(
            f"\nCLUSTER FAILOVER of :{victim_port} under {len(analysts)} analysing sessions:"
            f" promoted in {promoted:.2f} s; its sessions' longest silence {silence:.2f} s;"
            f" store_unavailable answers {unavailable};"
            f" analyses completed {sum(len(x.completed_at) for x in analysts)};"
            f" nodes answered {seen}"
        )


async def test_resharding_a_live_sessions_slot_loses_nothing() -> None:
    """A live session's slot moves to another master (IMPORTING/MIGRATING, its keys MIGRATEd
    one by one 0.3 s apart, SETSLOT NODE everywhere) while every session analyses, then the
    market's slot while it ticks: the ASK/TRYAGAIN/MOVED path under live traffic; same checks
    as the failover, and market updates still reach every session afterwards."""
    binary = find_topology_binary()
    assert binary is not None, "no redis-server >= 7.0 for a cluster"
    async with open_redis_cluster(binary) as cluster:
        spread = await trio.to_thread.run_sync(cluster.spread_over_masters, session_ids(), 2)
        source_port, target_port = list(spread)[:2]
        moving = spread[source_port][0]
        slot = key_slot(moving.encode())
        async with two_servers(cluster, *LIVE) as (a, b, prefix):
            analysts = [
                Analyst(session_id, (a, b)[i % 2])
                for i, session_id in enumerate(itertools.chain(*spread.values()))
            ]
            mover = next(x for x in analysts if x.session_id == moving)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for analyst in analysts:
                    await nursery.start(analyst.run, stop)
                await wait_for(
                    lambda: all(len(x.completed_at) >= 1 for x in analysts), 90, "first analyses"
                )
                before = {x.session_id: len(x.completed_at) for x in analysts}
                await trio.to_thread.run_sync(reset_redirect_stats, cluster)
                began = trio.current_time()
                keys = await cluster_migrate_slot(
                    cluster, slot, cluster.node_at(target_port), pause_between_keys=0.3
                )
                moved_in = trio.current_time() - began
                market_from = await trio.to_thread.run_sync(cluster.slot_owner, MARKET_SLOT)
                market_to = next(p for p in spread if p != market_from.port)
                market_began = trio.current_time()
                market_keys = await cluster_migrate_slot(
                    cluster, MARKET_SLOT, cluster.node_at(market_to), pause_between_keys=0.1
                )
                market_moved_in = trio.current_time() - market_began
                await two_more_analyses_and_a_market_update(
                    analysts, before, market_began + market_moved_in, "the resharding"
                )
                stop.set()
            owner = await trio.to_thread.run_sync(cluster.slot_owner, slot)
            assert owner.port == target_port
            market_owner = await trio.to_thread.run_sync(cluster.slot_owner, MARKET_SLOT)
            assert market_owner.port == market_to
            assert market_keys >= 3, f"only {market_keys} market keys moved"
            assert keys >= 2, f"only {keys} keys moved: the session's keys were not there"
            seen = await trio.to_thread.run_sync(redirect_stats, cluster)
            assert seen["MOVED"] > 0, f"no call met the old owner after the move: {seen}"
            assert seen["ASK"] + seen["TRYAGAIN"] > 0, f"no call met the half-moved slot: {seen}"
            async with cluster_store(cluster, prefix) as store:
                await check_all(store, analysts)
                assert await store.get(moving) is not None
        during = sum(began <= t <= began + moved_in for t in mover.completed_at)
        print(
            f"\nresharding slot {slot} :{source_port} -> :{target_port} ({keys} keys, 0.3 s"
            f" apart) in {moved_in:.2f} s: the moving session completed {during} analyses"
            f" meanwhile, longest silence {mover.longest_silence(began):.2f} s;"
            f" then the market's slot {MARKET_SLOT} ({market_keys} keys, 0.1 s apart) in"
            f" {market_moved_in:.2f} s; store_unavailable answers"
            f" {sum(x.unavailable for x in analysts)}; nodes answered {seen}"
        )
