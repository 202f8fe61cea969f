"""Sub-second market ticks at 10k sessions: does the updater keep its schedule?

Fills a fresh redis-server with ``--sessions`` sessions (3 holdings each, a
universe of 60 tickers), then runs the production updater
(:func:`trio_portfolio.market.run_market_updater`) for ``--seconds`` at each
``--intervals`` value.  Printed per interval, for the ticks (the advance of
prices): ticks taken and slots skipped (an advance that overruns its slot
skips the missed ones instead of queueing), median and worst advance
duration, the drift of the tick times from the ``t0 + k * interval`` grid;
for the revaluation passes (a walk of every session, decoupled from the
ticks): how many completed, their median and worst duration, and their lag
(how many ticks the market was past a pass's tick when it completed: how far
sessions trail the ticks); and the age of the prices a ``portfolio`` event
carries when it reaches a subscriber of ``--watch`` sessions (from the tick
that made those prices to the event: what a connected v2 client's
``market_update`` waits for, before the WebSocket hop).

    python bench/bench_tick_rate.py [--sessions 10000] [--intervals 0.1,0.25,0.5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
from pathlib import Path

import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trio_portfolio.market import MarketData, PassReport, TickReport, run_market_updater
from trio_portfolio.models import utc_now
from trio_portfolio.redis_io import open_redis
from trio_portfolio.redis_pubsub import open_pubsub
from trio_portfolio.simulation import GbmSimulator
from trio_portfolio.store import open_store
from trio_portfolio.testing import find_redis_binaries, run_redis_binary

TICKERS = [f"T{i:03d}" for i in range(60)]


async def run(url: str, sessions: int, intervals: list[float], seconds: float, watch: int) -> None:
    async with open_redis(url, timeout=30) as redis, open_pubsub(url) as pubsub:
        store = await open_store(redis, layout="hash", key_prefix="rate")
        market = MarketData(redis, GbmSimulator(seed=1), key_prefix="rate")
        await market.load_scripts()
        prices = dict(await market.ensure_prices(TICKERS, holder="bench"))
        rng = random.Random(3)
        todo = iter(range(sessions))

        async def creator() -> None:
            for i in todo:
                holdings = {t: float(rng.randint(1, 99)) for t in rng.sample(TICKERS, 3)}
                await store.create_if_missing(f"s{i}", holdings, prices, utc_now())

        async with trio.open_nursery() as nursery:
            for _ in range(128):
                nursery.start_soon(creator)
        watched = [f"s{i}" for i in rng.sample(range(sessions), watch)]
        await pubsub.subscribe(*(store.events_channel(s) for s in watched))
        print(f"{sessions} sessions, {watch} watched; {os.cpu_count()} CPUs")
        print(
            f"{'interval':>8} {'slots':>6} {'ticks':>6} {'skipped':>7} {'adv p50 s':>9} "
            f"{'adv max s':>9} {'max drift s':>11} {'passes':>6} {'pass p50 s':>10} "
            f"{'pass max s':>10} {'lag p50':>7} {'lag max':>7} {'age p50 s':>9} {'age max s':>9}"
        )
        for interval in intervals:
            reports: list[tuple[float, TickReport]] = []
            passes: list[PassReport] = []
            starts: dict[str, float] = {}
            ages: list[float] = []

            def on_tick(
                report: TickReport, reports: list[tuple[float, TickReport]] = reports
            ) -> None:
                reports.append((trio.current_time(), report))

            async def listen(starts: dict[str, float] = starts, ages: list[float] = ages) -> None:
                async for message in pubsub:
                    event = orjson.loads(message.data)
                    made = starts.get(event.get("as_of", ""))
                    if event.get("cause") == "market" and made is not None:
                        ages.append(trio.current_time() - made)

            async def watch_ticks(starts: dict[str, float] = starts) -> None:
                while True:  # when each tick's as_of first appeared
                    as_of = await redis.execute("GET", market.tick_at_key)
                    if as_of is not None:
                        starts.setdefault(as_of, trio.current_time())
                    await trio.sleep(0.002)

            began = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen)
                nursery.start_soon(watch_ticks)
                nursery.start_soon(
                    functools.partial(
                        run_market_updater,
                        market,
                        store,
                        interval=interval,
                        on_tick=on_tick,
                        on_pass=passes.append,
                    )
                )
                await trio.sleep(seconds)
                nursery.cancel_scope.cancel()
            await redis.execute("DEL", market.leader_key)
            durations = [r.seconds for _, r in reports]
            ends = [at - r.seconds for at, r in reports]
            first = ends[0] if ends else began
            drift = max(
                (
                    abs((t - first) / interval - round((t - first) / interval)) * interval
                    for t in ends
                ),
                default=0.0,
            )
            skipped = sum(r.ticks_skipped for _, r in reports)
            slots = int((trio.current_time() - first) / interval)
            done = [p for p in passes if p.completed]
            took = [p.pass_seconds for p in done] or [0.0]
            lags = [p.lag for p in done] or [0]
            print(
                f"{interval:>8.2f} {slots:>6} {len(reports):>6} {skipped:>7} "
                f"{statistics.median(durations):>9.3f} {max(durations):>9.3f} {drift:>11.3f} "
                f"{len(done):>6} {statistics.median(took):>10.3f} {max(took):>10.3f} "
                f"{statistics.median(lags):>7.1f} {max(lags):>7} "
                f"{statistics.median(ages) if ages else 0:>9.3f} {max(ages, default=0):>9.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--intervals", default="0.1,0.25,0.5")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--watch", type=int, default=50)
    args = parser.parse_args()
    intervals = [float(x) for x in args.intervals.split(",")]
    with run_redis_binary(find_redis_binaries()[0]) as server:
        trio.run(run, server.url, args.sessions, intervals, args.seconds, args.watch)


if __name__ == "__main__":
    main()
