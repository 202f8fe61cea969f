"""The market under a set_holdings flood: universe size, tick time before/after, refusals.

Issue 9's flood, from outside: a whole server in-process on a fresh local
redis-server (so its ticks can be timed), one well-behaved v2 client holding
the defaults, and one v2 client, in a process of its own as a hostile
client would be, sending ``set_holdings`` with ``--fresh`` never-seen
tickers ``--rate`` times a second for ``--seconds``, with ticks every
``--interval``.  Then the flooder leaves and its session expires
(``--session-ttl``).  Printed: the universe (tickers priced) before, at its
peak and after expiry; the median price tick (the leader's advance), the
median revaluation pass and their sum (how long a tick takes to reach every
session) before the flood, during it and after; and the flooder's refusals
by error code.

    python bench/bench_market_flood.py [--seconds 60] [--rate 5] [--fresh 100] [--interval 1]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trio_portfolio.testing import (
    find_redis_binaries,
    record_market_passes,
    record_market_ticks,
    run_redis_binary,
)
from trio_portfolio.testing.live_server import (
    Client,
    LiveServer,
    connect_client,
    open_client,
    open_live_server,
)
from trio_portfolio.testing.live_server import test_settings as server_settings


async def universe(server: LiveServer) -> int:
    services = server.info.server.services
    assert services is not None
    return await services.market.universe_size()


async def held(server: LiveServer, sessions: tuple[str, ...]) -> set[str]:
    """The tickers the live ``sessions`` hold now, read from the store."""
    services = server.info.server.services
    assert services is not None
    tickers: set[str] = set()
    for session_id in sessions:
        portfolio = await services.store.get(session_id)
        if portfolio is not None:
            tickers.update(portfolio.holdings)
    return tickers


def median_between(ticks: list[tuple[float, float]], start: float, end: float) -> float:
    window = [v for at, v in ticks if start <= at < end]
    return statistics.median(window) if window else float("nan")


async def drain(client: Client, refusals: collections.Counter[str] | None = None) -> None:
    """Read frames forever (counting ``error`` codes into ``refusals`` if given)."""
    while True:
        frame = await client.recv(timeout=3600)
        client.frames.clear()
        if refusals is not None and frame.get("type") == "error":
            refusals[frame.get("code", "?")] += 1


async def flood(port: int, args: argparse.Namespace) -> None:
    """The flooder (run in a child process): prints its refusals by code as JSON at the end."""
    refusals: collections.Counter[str] = collections.Counter()
    sent = 0
    fresh = (f"F{n:06d}" for n in itertools.count())
    async with connect_client(port, "flooder") as flooder, trio.open_nursery() as nursery:
        nursery.start_soon(drain, flooder, refusals)
        until = trio.current_time() + args.seconds
        while trio.current_time() < until:
            await flooder.send(
                "set_holdings", holdings={next(fresh): 1.0 for _ in range(args.fresh)}
            )
            sent += 1
            await trio.sleep(1 / args.rate)
        nursery.cancel_scope.cancel()
    print(json.dumps({"sent": sent, "refusals": refusals}))


async def run(url: str, args: argparse.Namespace) -> None:
    settings = server_settings(
        url,
        market_update_interval_seconds=args.interval,
        session_ttl_seconds=args.session_ttl,
        max_tickers=args.max_tickers,
    )

    async def keep_alive(client: Client) -> None:
        while True:
            await client.send("get_portfolio")
            await trio.sleep(args.session_ttl / 4)

    async with open_live_server(settings) as server, open_client(server, "steady") as steady:
        await steady.recv()
        ticks = record_market_ticks(server)
        passes = record_market_passes(server)
        async with trio.open_nursery() as keep:
            keep.start_soon(keep_alive, steady)
            keep.start_soon(drain, steady)
            await trio.sleep(2 * args.interval)  # start-up: scripts loaded, first ticks
            t0 = trio.current_time()
            await trio.sleep(args.settle * args.interval)
            before = await universe(server)
            t1 = trio.current_time()
            peak = before
            unheld = 0  # most tickers priced that no live session held at that moment
            command = [
                sys.executable,
                __file__,
                "--flood-port",
                str(server.port),
                *("--seconds", str(args.seconds), "--rate", str(args.rate)),
                *("--fresh", str(args.fresh)),
            ]
            finished: list[subprocess.CompletedProcess[bytes]] = []

            async def run_flooder() -> None:
                finished.append(await trio.run_process(command, capture_stdout=True))

            async with trio.open_nursery() as flooding:
                flooding.start_soon(run_flooder)
                with trio.fail_after(args.seconds + 30):
                    while not finished:
                        holding = await held(server, ("steady", "flooder"))
                        size = await universe(server)
                        peak = max(peak, size)
                        unheld = max(unheld, size - len(holding))
                        await trio.sleep(0.1)
            t2 = trio.current_time()
            with trio.move_on_after(args.session_ttl + 10 * args.interval + 5):
                while True:
                    if await universe(server) <= before:
                        break
                    await trio.sleep(0.1)
            t3 = trio.current_time()
            await trio.sleep(args.settle * args.interval)
            after = await universe(server)
            t4 = trio.current_time()
            keep.cancel_scope.cancel()
    report = json.loads(finished[0].stdout.decode().strip().splitlines()[-1])
    sent, refusals = report["sent"], report["refusals"]
    print(
        f"flood: {sent} set_holdings of {args.fresh} fresh tickers over {args.seconds:g} s "
        f"({sent * args.fresh} tickers) from another process, ticks every {args.interval:g} s, "
        f"cap {args.max_tickers}"
    )
    print(f"universe (tickers priced): before {before}, peak {peak}, after expiry {after}")
    print(
        f"priced but held by no live session, at most: {unheld} "
        "(sampled every 0.1 s: the universe minus what the sessions held just before)"
    )
    print(
        f"back to its size {t3 - t2:.1f} s after the flooder left "
        f"(session TTL {args.session_ttl} s)"
    )
    windows = {"before": (t0, t1), "during": (t1, t2), "after": (t3, t4)}
    advance = {k: median_between(ticks, *w) * 1000 for k, w in windows.items()}
    walk = {k: median_between(passes, *w) * 1000 for k, w in windows.items()}
    total = {k: advance[k] + walk[k] for k in windows}
    for label, figures in (
        ("price tick (advance)", advance),
        ("revaluation pass", walk),
        ("tick to revalued (advance + pass)", total),
    ):
        print(
            f"median {label}: before {figures['before']:.1f} ms, "
            f"during {figures['during']:.1f} ms ({figures['during'] / figures['before']:.2f}x), "
            f"after {figures['after']:.1f} ms"
        )
    print(f"refusals by code: {dict(refusals) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--fresh", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--session-ttl", type=int, default=5)
    parser.add_argument("--max-tickers", type=int, default=10_000)
    parser.add_argument(
        "--settle", type=int, default=10, help="ticks measured before and after the flood"
    )
    parser.add_argument("--flood-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_port:
        trio.run(flood, args.flood_port, args)
        return
    with run_redis_binary(find_redis_binaries()[0]) as server:
        trio.run(run, server.url, args)


if __name__ == "__main__":
    main()
