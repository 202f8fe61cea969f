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
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
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
    open_redis_cluster,
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
            assert frame["analysis_id"] == current, f"interleaved: {frame} during {current}"
            assert frame["portfolio_version"] == started[current], frame
            assert frame["portfolio_version"] >= heard, f"stale result {frame} after v{heard}"
            per_analysis[current].append(frame)
        elif kind == "analysis_complete":
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
                    except ConnectionClosed as exc:  # pragma: no cover - the failure reported
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


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    """Poll ``condition()`` every 50 ms until true; fail with ``what`` after ``timeout``."""
    try:
        with trio.fail_after(timeout):
            while not condition():  # noqa: ASYNC110  # polling clients' progress
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None


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


# -- failover and resharding under live analyses ------------------------------------------


async def test_cluster_failover_during_analyses_loses_nothing() -> None:
    """``CLUSTER FAILOVER`` of a master serving live sessions while all six sessions (two per
    master, half on each process) analyse: afterwards stored == streamed everywhere, nothing
    stale or duplicated, no client disconnected, every session analyses on."""
    binary = find_topology_binary()
    assert binary is not None, "no redis-server >= 7.0 for a cluster"
    async with open_redis_cluster(binary) as cluster:
        spread = await trio.to_thread.run_sync(cluster.spread_over_masters, session_ids(), 2)
        victim_port = next(iter(spread))
        victim = cluster.node_at(victim_port)
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
                await wait_for(
                    lambda: all(
                        len(x.completed_at) >= before[x.session_id] + 2
                        and x.heard_market_after(began + promoted)
                        for x in analysts
                    ),
                    120,
                    "two analyses and a market update per session after the failover",
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
            f" analyses completed {sum(len(x.completed_at) for x in analysts)}; nodes answered {seen}"
        )


async def test_resharding_a_live_sessions_slot_loses_nothing() -> None:
    """A live session's slot moves to another master (IMPORTING/MIGRATING, its keys MIGRATEd
    one by one 0.3 s apart, SETSLOT NODE everywhere) while every session analyses: the
    ASK/TRYAGAIN/MOVED path under live traffic; same checks as the failover."""
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
                await wait_for(
                    lambda: all(
                        len(x.completed_at) >= before[x.session_id] + 2
                        and x.heard_market_after(began + moved_in)
                        for x in analysts
                    ),
                    120,
                    "two analyses and a market update per session after the resharding",
                )
                stop.set()
            owner = await trio.to_thread.run_sync(cluster.slot_owner, slot)
            assert owner.port == target_port
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
            f" store_unavailable answers {sum(x.unavailable for x in analysts)};"
            f" nodes answered {seen}"
        )
