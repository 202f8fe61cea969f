"""Two server processes on one 3-master cluster, from outside (issue 12, acceptance).

Rules of this suite: the servers run as ``python -m trio_portfolio serve
--redis-url redis+cluster://...`` subprocesses with their environment cleared
of ``PORTFOLIO_*`` settings; clients speak v2 over real WebSockets; the
session ids are chosen so the sessions' slots cover every master.  The
``kill -9`` test runs on a private cluster (the session-scoped one must keep
its shape), and prints the time from the kill to the first answer that
works again.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
from redis.crc import key_slot

from trio_portfolio.testing import (
    RedisCluster,
    RedisNode,
    find_topology_binary,
    open_redis_cluster,
    unique_key_prefix,
    wait_for_cluster_ok,
)
from trio_portfolio.testing.live_server import Client, connect_client
from trio_portfolio.testing.processes import server_process as serve_process
from trio_portfolio.testing.processes import wait_for_ready

Frame = dict[str, Any]
IO = 15.0
CLI = [sys.executable, "-m", "trio_portfolio", "serve"]
RECOVERY_LIMIT = 30.0
"""Seconds a killed master's sessions may stay unavailable (node timeout 1 s, then an election)."""


def is_type(kind: str) -> Callable[[Frame], bool]:
    return lambda frame: frame["type"] == kind


@asynccontextmanager
async def server_process(redis_url: str, key_prefix: str, *args: str) -> AsyncIterator[int]:
    """One ``serve`` on a free port, ready; SIGTERM (then SIGKILL) on the way out; its port."""
    async with serve_process("--redis-url", redis_url, "--key-prefix", key_prefix, *args) as server:
        await wait_for_ready(server.port, timeout=30)
        yield server.port


def _masters_by_range(cluster: RedisCluster) -> list[tuple[RedisNode, tuple[tuple[int, int], ...]]]:
    """Each master now and the slot ranges it serves."""
    views = cluster.view(cluster.masters()[0])
    return [
        (cluster.node_at(v.port), v.slots)
        for v in views
        if v.role == "master" and v.healthy and v.slots
    ]


def sessions_on_every_master(cluster: RedisCluster, per_master: int = 1) -> dict[int, list[str]]:
    """Fresh session ids, ``per_master`` of them in each master's slots, by master port."""
    owners = _masters_by_range(cluster)
    found: dict[int, list[str]] = {node.port: [] for node, _ in owners}
    tag = secrets.token_hex(4)
    n = 0
    while any(len(ids) < per_master for ids in found.values()):
        session_id = f"c-{tag}-{n}"
        slot = key_slot(session_id.encode())  # the keys' hash tag is the id itself
        for node, ranges in owners:
            if any(lo <= slot <= hi for lo, hi in ranges) and len(found[node.port]) < per_master:
                found[node.port].append(session_id)
        n += 1
    return found


async def complete_analysis(client: Client, ticker: str) -> list[Frame]:
    """``analyze`` and every frame up to its ``analysis_complete``."""
    await client.send("analyze", ticker=ticker)
    return await client.recv_until(is_type("analysis_complete"), timeout=IO)


async def stored_equals_streamed(client: Client, frames: list[Frame]) -> None:
    """The completed analysis's stored results are exactly its streamed five (each once)."""
    complete = frames[-1]
    streamed = [
        (f["analysis_id"], f["metric"], f["value"])
        for f in frames
        if f["type"] == "analysis_result" and f["analysis_id"] == complete["analysis_id"]
    ]
    assert len(streamed) == 5, frames
    assert len(set(streamed)) == 5
    await client.send("get_portfolio")
    portfolio = (await client.recv_until(is_type("portfolio"), timeout=IO))[-1]
    stored = [
        (r["analysis_id"], r["metric"], r["value"])
        for r in portfolio["analysis_results"]
        if r["analysis_id"] == complete["analysis_id"]
    ]
    assert sorted(stored) == sorted(streamed)


async def test_two_servers_on_three_masters(redis_cluster: RedisCluster) -> None:
    """Analyses complete on sessions of every master; a set_holdings on one process restarts the
    other's analysis; stored == streamed everywhere."""
    await wait_for_cluster_ok(redis_cluster)
    sessions = await trio.to_thread.run_sync(sessions_on_every_master, redis_cluster)
    assert len(sessions) == 3
    key_prefix = unique_key_prefix()
    delays = ("--metric-delay-seconds", "0.3,0.8")
    async with (
        server_process(redis_cluster.url, key_prefix, *delays) as port_a,
        server_process(redis_cluster.url, key_prefix, *delays) as port_b,
        AsyncExitStack() as stack,
    ):
        for (session_id,) in sessions.values():
            watcher = await stack.enter_async_context(connect_client(port_a, session_id))
            editor = await stack.enter_async_context(connect_client(port_b, session_id))
            for client in (watcher, editor):
                assert (await client.recv(IO))["type"] == "session"
            # plain analyses on both processes
            await stored_equals_streamed(watcher, await complete_analysis(watcher, "AAPL"))
            await stored_equals_streamed(editor, await complete_analysis(editor, "GOOGL"))
            # a set_holdings on B restarts A's analysis
            await watcher.send("analyze", ticker="MSFT")
            first = (await watcher.recv_until(is_type("analysis_started"), timeout=IO))[-1]
            await editor.send("set_holdings", holdings={"AAPL": 200, "GOOGL": 50, "MSFT": 75})
            edited = (await editor.recv_until(is_type("portfolio"), timeout=IO))[-1]
            assert edited["portfolio_version"] > first["portfolio_version"]
            frames = await watcher.recv_until(is_type("analysis_complete"), timeout=IO)
            kinds = [f["type"] for f in frames]
            cut = kinds.index("analysis_cancelled")
            assert frames[cut]["analysis_id"] == first["analysis_id"]
            assert frames[cut]["reason"] == "portfolio_changed"
            restart = frames[kinds.index("analysis_started", cut)]
            assert restart["portfolio_version"] >= edited["portfolio_version"]
            await stored_equals_streamed(watcher, frames)


async def _answer(client: Client) -> Frame:
    """``get_portfolio``'s answer: the ``portfolio`` frame or an ``error``."""
    await client.send("get_portfolio")
    frames = await client.recv_until(lambda f: f["type"] in ("portfolio", "error"), timeout=IO)
    return frames[-1]


async def test_kill_9_of_a_master_recovers_without_a_restart() -> None:
    """kill -9 of a master: its sessions answer store_unavailable until the replica is
    promoted, then work again on the same connections; the time to recover is printed."""
    binary = find_topology_binary()
    assert binary is not None, "no redis-server >= 7.0 for a cluster"
    async with open_redis_cluster(binary) as cluster:
        sessions = await trio.to_thread.run_sync(sessions_on_every_master, cluster)
        key_prefix = unique_key_prefix()
        delays = ("--metric-delay-seconds", "0.05,0.2")
        async with (
            server_process(cluster.url, key_prefix, *delays) as port_a,
            server_process(cluster.url, key_prefix, *delays) as port_b,
            AsyncExitStack() as stack,
        ):
            clients: dict[int, Client] = {}
            for i, (master_port, (session_id,)) in enumerate(sessions.items()):
                port = (port_a, port_b)[i % 2]
                client = await stack.enter_async_context(connect_client(port, session_id))
                assert (await client.recv(IO))["type"] == "session"
                await stored_equals_streamed(client, await complete_analysis(client, "AAPL"))
                clients[master_port] = client
            victim_port = next(iter(sessions))
            victim = cluster.node_at(victim_port)
            victim_client = clients[victim_port]
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = trio.current_time()
            unavailable = 0
            with trio.fail_after(RECOVERY_LIMIT):
                while True:
                    frame = await _answer(victim_client)
                    if frame["type"] == "portfolio":
                        break
                    assert frame["code"] == "store_unavailable", frame
                    unavailable += 1
                    await trio.sleep(0.05)
            recovered = trio.current_time() - killed_at
            print(
                f"\nkill -9 of master :{victim_port}: store_unavailable x{unavailable},"
                f" recovered after {recovered:.2f} s (node timeout 1 s)"
            )
            assert unavailable > 0, "the killed master's session never saw the outage"
            # every session, the killed master's included, works again on its connection
            for client in clients.values():
                await stored_equals_streamed(client, await complete_analysis(client, "GOOGL"))
