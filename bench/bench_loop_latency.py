"""Loop-latency probe: does analysis work stall the Trio loop?

A probe task sleeps 0.2 ms in a loop and records how late it wakes; the
lateness is how long something else held the loop.  Meanwhile analyses of a
100-holding portfolio with a full 256-tick history run back to back, exactly
as the server runs them: fetch the histories from Redis (on the loop), then
parse and compute the five metrics.  Two modes, in one run:

* ``thread`` - the server's way: parse + compute in a worker thread;
* ``inline`` - the same work on the loop, to show what offloading buys.

Prints, per mode, analyses per second and the probe's lateness (p50, p99,
max).  Target: the server's way never holds the loop more than 1 ms.

    python bench/bench_loop_latency.py [--seconds 5] [--holdings 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import trio

from trio_portfolio.analysis import _compute_values
from trio_portfolio.market import HISTORY_LENGTH, MarketData
from trio_portfolio.models import Snapshot
from trio_portfolio.redis_io import open_redis
from trio_portfolio.simulation import DEFAULT_PROFILES, GbmSimulator
from trio_portfolio.testing import find_redis_binaries, run_redis_binary, unique_key_prefix


def tickers(count: int) -> list[str]:
    """Known tickers first, then made-up ones with the default profile."""
    names = sorted(DEFAULT_PROFILES)[:count]
    names += [f"X{i:03d}" for i in range(count - len(names))]
    return names


async def measure(url: str, seconds: float, holdings: int, mode: str) -> dict[str, float]:
    async with open_redis(url) as redis:
        market = MarketData(redis, GbmSimulator(seed=1), key_prefix=unique_key_prefix())
        await market.load_scripts()
        names = tickers(holdings)
        prices = await market.ensure_prices(names)
        snapshot = Snapshot(
            session_id="bench",
            analysis_id="bench-1",
            ticker=names[0],
            holdings={t: 10.0 + i for i, t in enumerate(names)},
            prices=prices,
            total_value=0.0,
            portfolio_version=1,
            started_at="2026-01-01T00:00:00Z",
        )
        lateness: list[float] = []
        analyses = 0
        period = 0.0002

        async def probe() -> None:
            while True:
                before = trio.current_time()
                await trio.sleep(period)
                lateness.append(max(0.0, trio.current_time() - before - period))

        async def analyse_forever() -> None:
            nonlocal analyses
            while True:
                raw = await market.raw_histories(names)
                if mode == "thread":
                    await trio.to_thread.run_sync(_compute_values, snapshot, raw)
                else:
                    _compute_values(snapshot, raw)
                    await trio.lowlevel.checkpoint()
                analyses += 1

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe)
                nursery.start_soon(analyse_forever)
        ordered = sorted(lateness)
        return {
            "analyses_per_s": analyses / seconds,
            "p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[int(len(ordered) * 0.99)] * 1000,
            "max_ms": ordered[-1] * 1000,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--holdings", type=int, default=100)
    args = parser.parse_args()
    binaries = find_redis_binaries()
    if not binaries:
        sys.exit("no redis-server binary found")
    with run_redis_binary(binaries[-1]) as server:
        print(
            f"{args.holdings} holdings x {HISTORY_LENGTH} ticks of history, {args.seconds:g} s each"
        )
        print(f"{'mode':<8}{'analyses/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
        for mode in ("thread", "inline"):
            r = trio.run(measure, server.url, args.seconds, args.holdings, mode)
            print(
                f"{mode:<8}{r['analyses_per_s']:>12.1f}{r['p50_ms']:>10.3f}"
                f"{r['p99_ms']:>10.3f}{r['max_ms']:>10.3f}"
            )
        print("target: mode 'thread' (the server's) holds the loop < 1 ms (p99)")


if __name__ == "__main__":
    main()
