"""Revaluation sessions/s and analyses/s: a 3-master Redis Cluster next to one node, one run.

Both targets are started here from the same redis-server binary
(:func:`trio_portfolio.testing.find_topology_binary`, Redis >= 7): one
plain node, and a local cluster of 3 masters with 1 replica each (6
processes, as the tests use).  For each target, in the same process:

* **revaluation** - ``--sessions`` hash-layout sessions (3 holdings each from
  a universe of 100 tickers) are created through the adapter
  (``redis_connect.open_redis``: the cluster router on the cluster), then
  ``--ticks`` market ticks are taken with :func:`trio_portfolio.market.tick_once`;
  the best and median tick are reported as sessions revalued per second.
* **analyses** - a whole server (in this process, ``metric_delay_seconds``
  0,0) and ``--clients`` v2 WebSocket clients, one session each (so on the
  cluster their sessions are spread over the masters), each asking for
  analysis after analysis for ``--seconds``; completed analyses (all five
  results delivered) per second.

    python bench/bench_cluster.py [--sessions 20000] [--ticks 3] [--clients 32] [--seconds 5]

The machine is shared by the client, the server and every redis-server
(6 on the cluster), so the cluster's figures include the cost of running
three masters and three replicas on the same cores: compare the columns as
"what routing across masters costs here", not as a scaling figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trio_portfolio.market import MarketData, tick_once  # noqa: E402
from trio_portfolio.models import utc_now  # noqa: E402
from trio_portfolio.redis_connect import open_redis  # noqa: E402
from trio_portfolio.simulation import GbmSimulator  # noqa: E402
from trio_portfolio.store import open_store  # noqa: E402
from trio_portfolio.testing import (  # noqa: E402
    connect_client,
    find_topology_binary,
    open_live_server,
    run_redis_binary,
    run_redis_cluster,
    test_settings,
    unique_key_prefix,
)

UNIVERSE = [f"T{i:03d}" for i in range(100)]


async def fill(url: str, prefix: str, sessions: int) -> float:
    """Create ``sessions`` sessions under ``prefix``; seconds it took."""
    async with open_redis(url, connections=4, timeout=60) as redis:
        store = await open_store(redis, layout="hash", key_prefix=prefix)
        market = MarketData(redis, GbmSimulator(seed=1), key_prefix=prefix)
        await market.load_scripts()
        prices = dict(await market.ensure_prices(UNIVERSE, holder="bench"))
        rng = random.Random(7)
        portfolios = [
            {t: float(rng.randint(1, 500)) for t in rng.sample(UNIVERSE, 3)}
            for _ in range(sessions)
        ]
        todo = iter(range(sessions))
        started = trio.current_time()

        async def creator() -> None:
            for i in todo:
                await store.create_if_missing(f"s{i}", portfolios[i], prices, utc_now())

        async with trio.open_nursery() as nursery:
            for _ in range(256):
                nursery.start_soon(creator)
        return trio.current_time() - started


async def revalue(url: str, prefix: str, ticks: int) -> list[dict[str, float]]:
    """``ticks`` market ticks over every session of ``prefix``: seconds and sessions each."""
    async with open_redis(url, connections=4, timeout=60) as redis:
        store = await open_store(redis, layout="hash", key_prefix=prefix)
        market = MarketData(redis, GbmSimulator(seed=1), key_prefix=prefix)
        await market.load_scripts()
        rows = []
        for _ in range(ticks):
            started = trio.current_time()
            report = await tick_once(market, store)
            seconds = trio.current_time() - started
            rows.append({"seconds": seconds, "sessions": float(report.sessions_revalued)})
        return rows


async def analyses(url: str, clients: int, seconds: float) -> dict[str, float]:
    """Completed analyses per second of ``clients`` clients against a server on ``url``."""
    settings = test_settings(
        url,
        metric_delay_seconds=(0.0, 0.0),
        messages_per_second=1e6,  # the flood limits would cap one client at 20 analyses/s
        message_burst=1_000_000,
        sessions_per_second=1e6,
        session_burst=1_000_000,
    )
    done = 0
    async with open_live_server(settings) as server:

        async def client(n: int) -> None:
            nonlocal done
            async with connect_client(server.port, f"bench-{n}") as ws:
                await ws.recv()  # the session frame
                while True:
                    await ws.send("analyze", ticker="AAPL")
                    while (frame := await ws.recv(30))["type"] != "analysis_complete":
                        if frame["type"] in ("error", "analysis_cancelled"):
                            raise RuntimeError(f"analysis not completed: {frame}")
                    done += 1

        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(client, n)
            await trio.sleep(1.0)  # warm-up: connections open, scripts cached
            before, started = done, trio.current_time()
            await trio.sleep(seconds)
            counted, elapsed = done - before, trio.current_time() - started
            nursery.cancel_scope.cancel()
    return {"analyses": float(counted), "seconds": elapsed, "per_second": counted / elapsed}


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    prefix = unique_key_prefix()
    fill_seconds = await fill(url, prefix, args.sessions)
    ticks = await revalue(url, prefix, args.ticks)
    rates = [t["sessions"] / t["seconds"] for t in ticks]
    served = await analyses(url, args.clients, args.seconds)
    return {
        "sessions": args.sessions,
        "fill_per_second": args.sessions / fill_seconds,
        "revalued_per_tick": [t["sessions"] for t in ticks],
        "revalue_best_per_second": max(rates),
        "revalue_median_per_second": statistics.median(rates),
        **{f"analyses_{k}": v for k, v in served.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print one JSON line, not a table")
    args = parser.parse_args()
    # Cancelling the clients and the server at the end of each run logs "connection closed"
    # warnings of the analyses cut short; they are the bench's doing, not findings.
    logging.getLogger("trio_portfolio").setLevel(logging.ERROR)
    binary = find_topology_binary()
    if binary is None:
        sys.exit("no redis-server >= 7.0 found (apt-get install redis-server)")
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        single = stack.enter_context(run_redis_binary(binary))
        cluster = stack.enter_context(run_redis_cluster(binary))
        targets = {
            f"single node {single.version}": single.url,
            f"cluster 3 masters + 3 replicas {cluster.version}": cluster.url,
        }
        for name, url in targets.items():
            results[name] = trio.run(measure, url, args)
    if args.json:
        print(json.dumps(results))
        return
    print(
        f"{args.sessions} sessions (3 holdings), {args.ticks} ticks;"
        f" {args.clients} clients for {args.seconds:g} s, metric delay 0"
    )
    header = ("target", "fill/s", "revalue best/s", "revalue median/s", "analyses/s")
    rows = [header] + [
        (
            name,
            f"{r['fill_per_second']:.0f}",
            f"{r['revalue_best_per_second']:.0f}",
            f"{r['revalue_median_per_second']:.0f}",
            f"{r['analyses_per_second']:.1f}",
        )
        for name, r in results.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    for name, r in results.items():
        assert all(n == args.sessions for n in r["revalued_per_tick"]), (name, r)


if __name__ == "__main__":
    main()
