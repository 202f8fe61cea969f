"""The cost of ``--wait-replicas 1``: analyses/s and result latency, WAIT off vs on, one run.

A primary and one replica (two local redis-servers, ``REPLICAOF``), then,
alternating rounds so machine noise hits both alike, a real server process
(in this process, real sockets, real WebSockets) with ``--wait-replicas 0``
and one with ``--wait-replicas 1``; in each round ``--clients`` WebSocket
clients each run ``--analyses`` analyses back to back, with the metrics'
simulated compute time at 0 so the store path is what is measured.
"Result latency" is from the ``analyze`` frame sent to each
``analysis_result`` frame received.  Printed: per mode the best round's
analyses/s and the median / p99 result latency over all rounds, the
write-and-WAIT counters of the WAIT-on server, and a last JSON line.

    python bench/bench_wait.py [--clients 20] [--analyses 10] [--rounds 3] [--wait-connections 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import redis as sync_redis
import trio

from trio_portfolio.testing import find_redis_binaries, run_redis_binary
from trio_portfolio.testing.client_helpers import services_of
from trio_portfolio.testing.live_server import connect_client, open_live_server, test_settings

IO = 60.0


@contextlib.contextmanager
def primary_with_replica() -> Iterator[tuple[str, str]]:
    """URLs of a fresh primary and its replica, in sync."""
    binaries = find_redis_binaries()
    if not binaries:
        sys.exit("no redis-server binary found")
    with run_redis_binary(binaries[-1]) as primary, run_redis_binary(binaries[-1]) as replica:
        host, port = primary.address
        with sync_redis.Redis.from_url(primary.url) as p:
            p.config_set("repl-diskless-sync-delay", 0)
            with sync_redis.Redis.from_url(replica.url) as r:
                r.execute_command("REPLICAOF", host, port)
            deadline = time.monotonic() + 30
            while p.execute_command("WAIT", 1, 100) != 1:
                if time.monotonic() > deadline:
                    sys.exit("the replica did not catch up")
        yield primary.url, replica.url


async def one_client(port: int, session_id: str, analyses: int, latencies: list[float]) -> None:
    async with connect_client(port, session_id) as client:
        await client.recv(IO)  # session
        for _ in range(analyses):
            sent = trio.current_time()
            await client.send("analyze", ticker="AAPL")
            while True:
                frame = await client.recv(IO)
                if frame["type"] == "analysis_result":
                    latencies.append(trio.current_time() - sent)
                elif frame["type"] == "analysis_complete":
                    break
                elif frame["type"] == "error":
                    raise RuntimeError(f"server answered {frame}")


async def one_round(
    url: str,
    wait_replicas: int,
    clients: int,
    analyses: int,
    latencies: list[float],
    connections: int = 4,
) -> tuple[float, dict[str, float]]:
    """Analyses/s of one round, and the write-and-WAIT counters of its server."""
    settings = test_settings(
        url,
        metric_delay_seconds=(0.0, 0.0),
        wait_replicas=wait_replicas,
        wait_replicas_timeout_ms=1000,
        wait_replicas_connections=connections,
        max_connections=clients + 10,
        sessions_per_second=1000.0,
        session_burst=clients + 10,
    )
    async with open_live_server(settings) as server:
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(one_client, server.port, f"bench{i}", analyses, latencies)
        seconds = trio.current_time() - started
        waiter = services_of(server).store.replica_wait
        counters: dict[str, float] = {}
        if waiter is not None:
            stats = waiter.statistics()
            counters = {
                "waits": stats.waits,
                "acknowledged": stats.acknowledged,
                "short": stats.short,
                "unconfirmed": stats.unconfirmed,
            }
        return clients * analyses / seconds, counters


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    rates: dict[int, list[float]] = {0: [], 1: []}
    latencies: dict[int, list[float]] = {0: [], 1: []}
    counters: dict[str, float] = {}
    for _ in range(args.rounds):
        for mode in (0, 1):
            rate, seen = await one_round(
                url, mode, args.clients, args.analyses, latencies[mode], args.wait_connections
            )
            rates[mode].append(rate)
            for key, value in seen.items():
                counters[key] = counters.get(key, 0) + value
    figures: dict[str, Any] = {
        "clients": args.clients,
        "analyses": args.analyses,
        "wait_connections": args.wait_connections,
    }
    for mode, name in ((0, "off"), (1, "on")):
        figures[f"{name}_analyses_per_second"] = max(rates[mode])
        figures[f"{name}_result_p50_ms"] = statistics.median(latencies[mode]) * 1000
        figures[f"{name}_result_p99_ms"] = quantile(latencies[mode], 0.99) * 1000
        figures[f"{name}_results"] = len(latencies[mode])
    figures.update({f"wait_{k}": v for k, v in counters.items()})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--analyses", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--wait-connections", type=int, default=4, help="--wait-replicas-connections when on"
    )
    args = parser.parse_args()
    with primary_with_replica() as (url, _):
        figures = trio.run(run, args, url)
    print(f"primary {url} with one replica; {args.clients} clients x {args.analyses} analyses,")
    print(f"{args.rounds} rounds per mode, alternating; metric compute time 0;")
    print(f"WAIT on: --wait-replicas 1, --wait-replicas-connections {args.wait_connections}")
    print(f"{'':16}{'analyses/s (best)':>20}{'result p50 ms':>16}{'result p99 ms':>16}")
    for name in ("off", "on"):
        print(
            f"WAIT {name:11}{figures[f'{name}_analyses_per_second']:>20,.1f}"
            f"{figures[f'{name}_result_p50_ms']:>16.2f}{figures[f'{name}_result_p99_ms']:>16.2f}"
        )
    ratio = figures["on_analyses_per_second"] / figures["off_analyses_per_second"]
    print(f"on/off analyses/s: {ratio:.2f}")
    print(
        "write-and-WAIT (on): "
        + ", ".join(
            f"{k[5:]} {v:.0f}"
            for k, v in figures.items()
            if k.startswith("wait_") and k != "wait_connections"
        )
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
