"""Market revaluation rate: this tree against commit 2607a4b, same machine, same run.

For each holdings count (3 and 50 by default) and each implementation, a
child process (``--child``) fills a fresh key prefix of one local
redis-server with ``--sessions`` sessions in the hash layout, each holding
that many tickers drawn from a universe of ``--universe`` tickers, then
takes ``--ticks`` market ticks and reports the best and median tick: its
duration, sessions revalued per second, and the Redis CPU time per session
(``INFO CPU`` before and after).  The children of 2607a4b import that
commit's code from a ``git worktree`` (``--ref-tree``, default
``/work/wt/ref-2607a4b``) through ``PYTHONPATH``; the others import this
tree.  Both run alternately against the same redis-server, which is
flushed in between, so machine noise hits both alike.

    git worktree add --detach /work/wt/ref-2607a4b 2607a4b    # once
    python bench/bench_revalue.py [--sessions 100000] [--holdings 3,50] [--ticks 3]
    python bench/bench_revalue.py --processes 2     # this tree's tick shared by 2 processes

Targets (issue 11): >= 4x the sessions/s of 2607a4b, >= 50k sessions/s with 3 holdings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REF = Path("/work/wt/ref-2607a4b")


# -- the child: runs inside either tree -------------------------------------------------------


async def _fill(url: str, prefix: str, sessions: int, holdings: int, universe: int) -> None:
    import trio

    from trio_portfolio.market import MarketData
    from trio_portfolio.models import utc_now
    from trio_portfolio.redis_io import open_redis
    from trio_portfolio.simulation import GbmSimulator
    from trio_portfolio.store import open_store

    tickers = [f"T{i:04d}" for i in range(universe)]
    async with open_redis(url, connections=4, timeout=60) as redis:
        store = await open_store(redis, layout="hash", key_prefix=prefix)
        market = MarketData(redis, GbmSimulator(seed=1), key_prefix=prefix)
        await market.load_scripts()
        prices = dict(await market.ensure_prices(tickers, holder="bench"))
        rng = random.Random(7)
        portfolios = [
            {t: float(rng.randint(1, 500)) for t in rng.sample(tickers, holdings)}
            for _ in range(sessions)
        ]
        next_index = iter(range(sessions))

        async def creator() -> None:
            for i in next_index:
                await store.create_if_missing(f"s{i}", portfolios[i], prices, utc_now())

        async with trio.open_nursery() as nursery:
            for _ in range(256):
                nursery.start_soon(creator)


async def _measure(url: str, prefix: str, ticks: int) -> dict[str, Any]:
    import trio

    from trio_portfolio.market import MarketData, tick_once
    from trio_portfolio.redis_io import open_redis
    from trio_portfolio.simulation import GbmSimulator
    from trio_portfolio.store import open_store

    async with open_redis(url, connections=4, timeout=60) as redis:
        store = await open_store(redis, layout="hash", key_prefix=prefix)
        market = MarketData(redis, GbmSimulator(seed=1), key_prefix=prefix)
        await market.load_scripts()
        results = []
        for _ in range(ticks):
            cpu_before = await _redis_cpu(redis)
            own_before = time.process_time()
            started = trio.current_time()
            report = await tick_once(market, store)
            seconds = trio.current_time() - started
            own = time.process_time() - own_before
            cpu = await _redis_cpu(redis) - cpu_before
            results.append(
                {
                    "seconds": seconds,
                    "sessions": report.sessions_revalued,
                    "redis_cpu": cpu,
                    "client_cpu": own,
                }
            )
        return {"ticks": results}


async def _redis_cpu(redis: Any) -> float:
    info = await redis.execute("INFO", "CPU")
    fields = dict(
        line.split(":", 1) for line in info.splitlines() if ":" in line and not line.startswith("#")
    )
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def child(args: argparse.Namespace) -> None:
    import trio

    if args.child == "fill":
        trio.run(_fill, args.redis_url, args.prefix, args.sessions, args.holdings, args.universe)
        print(json.dumps({"filled": args.sessions}))
    else:
        print(json.dumps(trio.run(_measure, args.redis_url, args.prefix, args.ticks)))


# -- the parent: one redis-server, children of both trees ------------------------------------


def run_child(tree: Path, *extra: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        sys.exit(f"child in {tree} failed:\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def measure_shared(tree: Path, url: str, prefix: str, ticks: int, processes: int) -> dict[str, Any]:
    """This tree's tick with ``processes - 1`` helper processes joining the leader."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "help"]
    command += ["--redis-url", url, "--prefix", prefix]
    helpers = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL) for _ in range(processes - 1)
    ]
    try:
        time.sleep(1.0)  # the helpers connect and start polling
        return run_child(
            tree,
            "--child",
            "measure",
            "--redis-url",
            url,
            "--prefix",
            prefix,
            "--ticks",
            str(ticks),
        )
    finally:
        for helper in helpers:
            helper.kill()
            helper.wait()


async def _help_forever(url: str, prefix: str) -> None:
    import trio

    from trio_portfolio.market import MarketData, help_current_tick
    from trio_portfolio.redis_io import open_redis
    from trio_portfolio.simulation import GbmSimulator
    from trio_portfolio.store import open_store

    async with open_redis(url, connections=4, timeout=60) as redis:
        store = await open_store(redis, layout="hash", key_prefix=prefix)
        market = MarketData(redis, GbmSimulator(seed=1), key_prefix=prefix)
        await market.load_scripts()
        while True:
            await help_current_tick(market, store, taker=f"helper-{os.getpid()}")
            await trio.sleep(0.005)


def summarize(result: dict[str, Any]) -> dict[str, float]:
    ticks = result["ticks"]
    sessions = ticks[0]["sessions"]
    seconds = [t["seconds"] for t in ticks]
    best = min(seconds)
    return {
        "sessions": sessions,
        "best_s": best,
        "median_s": statistics.median(seconds),
        "rate": sessions / best if best else 0.0,
        "cpu_us": min(t["redis_cpu"] for t in ticks) / max(1, sessions) * 1e6,
        "client_us": min(t["client_cpu"] for t in ticks) / max(1, sessions) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["fill", "measure", "help"])
    parser.add_argument("--redis-url")
    parser.add_argument("--prefix", default="bench")
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--holdings", default="3,50")
    parser.add_argument("--universe", type=int, default=200)
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--ref-tree", type=Path, default=DEFAULT_REF)
    args = parser.parse_args()
    if args.child == "help":
        import trio

        trio.run(_help_forever, args.redis_url, args.prefix)
        return
    if args.child:
        args.holdings = int(args.holdings.split(",")[0])
        child(args)
        return
    if not (args.ref_tree / "trio_portfolio").is_dir():
        sys.exit(f"no tree at {args.ref_tree}: git worktree add --detach {args.ref_tree} 2607a4b")

    sys.path.insert(0, str(ROOT))
    from trio_portfolio.testing import find_redis_binaries, run_redis_binary

    binaries = find_redis_binaries()  # the first is the preferred one (a system redis-server)
    with run_redis_binary(binaries[0]) as server:
        url = server.url
        print(f"redis-server {server.version} at {url}; {os.cpu_count()} CPUs")
        print(f"{args.sessions} sessions, universe {args.universe} tickers, {args.ticks} ticks")
        rows = []
        for holdings in (int(h) for h in args.holdings.split(",")):
            for name, tree in (("2607a4b", args.ref_tree), ("this tree", ROOT)):
                prefix = f"bench{holdings}{'r' if tree == args.ref_tree else 'n'}"
                common = ["--redis-url", url, "--prefix", prefix]
                run_child(
                    tree,
                    "--child",
                    "fill",
                    *common,
                    "--sessions",
                    str(args.sessions),
                    "--holdings",
                    str(holdings),
                    "--universe",
                    str(args.universe),
                )
                if tree == ROOT and args.processes > 1:
                    result = measure_shared(tree, url, prefix, args.ticks, args.processes)
                    name = f"this tree x{args.processes}"
                else:
                    result = run_child(
                        tree, "--child", "measure", *common, "--ticks", str(args.ticks)
                    )
                rows.append((holdings, name, summarize(result)))
                _flush(url)
        print()
        print(
            f"{'holdings':>8} {'code':<14} {'sessions':>9} {'best tick s':>11} "
            f"{'median s':>9} {'sessions/s':>11} {'redis us/session':>16} {'client us/session':>17}"
        )
        for holdings, name, s in rows:
            print(
                f"{holdings:>8} {name:<14} {s['sessions']:>9.0f} {s['best_s']:>11.3f} "
                f"{s['median_s']:>9.3f} {s['rate']:>11,.0f} {s['cpu_us']:>16.1f} "
                f"{s['client_us']:>17.1f}"
            )
        print()
        for holdings in sorted({h for h, _, _ in rows}):
            ref = next(s for h, n, s in rows if h == holdings and n == "2607a4b")
            new = next(s for h, n, s in rows if h == holdings and n != "2607a4b")
            print(
                f"{holdings} holdings: {new['rate'] / ref['rate']:.1f}x the sessions/s of 2607a4b "
                f"(target >= 4x); {new['rate']:,.0f} sessions/s"
                + (" (target >= 50,000)" if holdings == 3 else "")
            )


def _flush(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


if __name__ == "__main__":
    main()
