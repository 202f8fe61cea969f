"""A market updater alone in a process, for tests that pause or kill one (not a test module).

    python tests/market_updater_runner.py REDIS_URL KEY_PREFIX INTERVAL [PIPELINES]

Prints one JSON line when ready and one per tick it takes as leader
(``{"tick": n, "seconds": s, "revalued": k, "pid": p}``), flushed at once,
so a test reading its stdout knows which process leads.  Runs until killed.
"""

from __future__ import annotations

import json
import os
import sys

import trio

from trio_portfolio.market import (
    DEFAULT_PIPELINES,
    MarketData,
    TickReport,
    TickShare,
    run_market_updater,
)
from trio_portfolio.redis_io import open_redis
from trio_portfolio.simulation import GbmSimulator
from trio_portfolio.store import open_store


async def main(url: str, prefix: str, interval: float, pipelines: int) -> None:
    async with open_redis(url, timeout=30) as redis:
        store = await open_store(redis, layout="hash", key_prefix=prefix)
        market = MarketData(redis, GbmSimulator(seed=1), key_prefix=prefix)
        await market.load_scripts()

        def on_tick(report: TickReport) -> None:
            line = {
                "tick": report.tick,
                "seconds": report.seconds,
                "revalued": report.sessions_revalued,
                "skipped": report.ticks_skipped,
                "pid": os.getpid(),
            }
            print(json.dumps(line), flush=True)

        def on_help(tick: int, share: TickShare) -> None:
            print(json.dumps({"helped": tick, "buckets": share.buckets}), flush=True)

        print(json.dumps({"ready": os.getpid()}), flush=True)
        await run_market_updater(
            market,
            store,
            interval=interval,
            on_tick=on_tick,
            on_help=on_help,
            pipelines=pipelines,
        )


if __name__ == "__main__":
    pipelines = int(sys.argv[4]) if len(sys.argv) > 4 else DEFAULT_PIPELINES
    trio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]), pipelines)
