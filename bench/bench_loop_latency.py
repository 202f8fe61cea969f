"""Loop-latency probe: does analysis work stall the Trio loop?

Two measurements.  A Trio *instrument* times every task step, i.e. each
stretch during which one task held the loop without yielding: the longest
step of the analysis task is how long analysis work blocks the loop.  And a
probe task sleeps 0.2 ms in a loop and records how late it wakes, which adds
what the operating system and the GIL cost on a busy 2-core machine.  Meanwhile analyses of a
100-holding portfolio with a full 256-tick history run back to back, exactly
as the server runs them: fetch the histories from Redis (on the loop), then
parse and compute the five metrics.  Two modes, in one run:

* ``server`` - the server's way: on a history cache hit (every analysis but
  the first, as between two market ticks) the metrics are computed on the
  loop, on a miss decode + compute run in a worker thread, with the switch
  interval ``trio-portfolio serve`` sets (0.5 ms);
* ``thread-5ms`` - the same with Python's default 5 ms switch interval;
* ``inline`` - every analysis a cache miss, decoded and computed on the
  loop itself, to show what offloading buys.

Prints, per mode, analyses per second and the probe's lateness (p50, p99,
max).  Target: the server's way never holds the loop more than 1 ms.

    python bench/bench_loop_latency.py [--seconds 5] [--holdings 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import trio
import trio.lowlevel

from trio_portfolio.__main__ import SWITCH_INTERVAL
from trio_portfolio.analysis import INLINE_MAX_HOLDINGS, _compute_values, _fingerprint
from trio_portfolio.analytics import HistoryCache, cache_key
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


class StepTimer(trio.abc.Instrument):
    """Durations of the task steps of tasks whose name contains ``match``."""

    def __init__(self, match: str) -> None:
        self.match = match
        self.started = 0.0
        self.steps: list[float] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.match in task.name:
            self.steps.append(time.perf_counter() - self.started)


async def measure(url: str, seconds: float, holdings: int, mode: str) -> dict[str, float]:
    async with open_redis(url) as redis:
        market = MarketData(redis, GbmSimulator(seed=1), key_prefix=unique_key_prefix())
        await market.load_scripts()
        names = tickers(holdings)
        prices = await market.ensure_prices(names, holder="bench")
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
        cache = HistoryCache()
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
                if mode == "inline":
                    _compute_values(snapshot, raw, HistoryCache())  # a miss, on the loop
                    await trio.lowlevel.checkpoint()
                elif (
                    len(names) <= INLINE_MAX_HOLDINGS
                    and cache_key(names, _fingerprint(raw)) in cache
                ):
                    _compute_values(snapshot, raw, cache)  # the server's hit: on the loop
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.to_thread.run_sync(_compute_values, snapshot, raw, cache)
                analyses += 1

        timer = StepTimer("analyse_forever")
        trio.lowlevel.add_instrument(timer)
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe)
                nursery.start_soon(analyse_forever)
        trio.lowlevel.remove_instrument(timer)
        ordered = sorted(lateness)
        steps = sorted(timer.steps)
        return {
            "analyses_per_s": analyses / seconds,
            "step_p99_ms": steps[int(len(steps) * 0.99)] * 1000,
            "step_max_ms": steps[-1] * 1000,
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
        print(f"{'':<23}{'analysis task steps':>22}{'probe lateness':>30}")
        print(
            f"{'mode':<11}{'analyses/s':>12}{'p99 ms':>11}{'max ms':>11}"
            f"{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}"
        )
        for mode, interval in (
            ("server", SWITCH_INTERVAL),
            ("thread-5ms", 0.005),
            ("inline", SWITCH_INTERVAL),
        ):
            sys.setswitchinterval(interval)
            r = trio.run(measure, server.url, args.seconds, args.holdings, mode)
            print(
                f"{mode:<11}{r['analyses_per_s']:>12.1f}{r['step_p99_ms']:>11.3f}"
                f"{r['step_max_ms']:>11.3f}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}"
                f"{r['max_ms']:>10.3f}"
            )
        print("target: in mode 'server' no analysis step holds the loop for 1 ms (step max)")


if __name__ == "__main__":
    main()
