"""EVALSHA throughput: this project's Trio adapter against redis.asyncio (+hiredis).

Both clients run the same Lua script from 100 concurrent tasks against the
same local redis-server, in one process run, alternating rounds so that
machine noise hits both alike; the best round of each is compared.  The
figure that matters is the ratio (target >= 0.8), not the absolute rate.

    python bench/bench_evalsha.py [--tasks 100] [--calls 300] [--rounds 3]
    python bench/bench_evalsha.py --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator

import trio
from redis import asyncio as redis_asyncio
from redis.utils import HIREDIS_AVAILABLE

from trio_portfolio.redis_io import Script, open_redis
from trio_portfolio.testing import find_redis_binaries, run_redis_binary

SCRIPT = """
local v = redis.call('HINCRBY', KEYS[1], 'n', 1)
return {v, ARGV[1]}
"""


async def trio_round(url: str, tasks: int, calls: int, connections: int) -> float:
    """Calls per second through the Trio adapter."""
    script = Script(SCRIPT)
    async with open_redis(url, connections=connections) as redis:
        await redis.load_scripts([script])

        async def worker(i: int) -> None:
            for _ in range(calls):
                await redis.evalsha(script, [f"bench:{{{i}}}"], ["x"])

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(tasks):
                nursery.start_soon(worker, i)
        return tasks * calls / (time.perf_counter() - start)


async def asyncio_round(url: str, tasks: int, calls: int) -> float:
    """Calls per second through redis.asyncio with its default pool."""
    client = redis_asyncio.Redis.from_url(url)
    try:
        script = client.register_script(SCRIPT)
        await script(keys=["bench:warm"], args=["x"])

        async def worker(i: int) -> None:
            for _ in range(calls):
                await script(keys=[f"bench:{{{i}}}"], args=["x"])

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(tasks)))
        return tasks * calls / (time.perf_counter() - start)
    finally:
        await client.aclose()


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    """The given URL, or a fresh local redis-server for the run."""
    if given:
        yield given
        return
    binaries = find_redis_binaries()
    if not binaries:
        sys.exit("no redis-server binary found; pass --redis-url")
    with run_redis_binary(binaries[-1]) as server:
        yield server.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=2)
    args = parser.parse_args()
    with redis_url(args.redis_url) as url:
        trio_rates: list[float] = []
        asyncio_rates: list[float] = []
        for _ in range(args.rounds):
            trio_rates.append(trio.run(trio_round, url, args.tasks, args.calls, args.connections))
            asyncio_rates.append(asyncio.run(asyncio_round(url, args.tasks, args.calls)))
        best_trio, best_asyncio = max(trio_rates), max(asyncio_rates)
        print(f"redis: {url}   tasks: {args.tasks}   calls/task: {args.calls}")
        print(f"hiredis available to redis.asyncio: {HIREDIS_AVAILABLE}")
        print("trio adapter   EVALSHA/s per round: " + ", ".join(f"{r:,.0f}" for r in trio_rates))
        print(
            "redis.asyncio  EVALSHA/s per round: " + ", ".join(f"{r:,.0f}" for r in asyncio_rates)
        )
        print(f"best: trio {best_trio:,.0f}/s, asyncio {best_asyncio:,.0f}/s")
        print(f"ratio trio/asyncio: {best_trio / best_asyncio:.2f}  (target >= 0.80)")


if __name__ == "__main__":
    main()
