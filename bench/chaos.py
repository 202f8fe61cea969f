"""The chaos table: every fault of issue 10 against a real server under load.

Starts Debian's redis-server 7.0 (append-only, DEBUG enabled) with a replica,
the fault proxy in front of it, and ``python -m trio_portfolio serve`` as a
subprocess; 50 v2 sessions analyse in a loop (ticks every second) while each
fault is injected 3 times; then prints one row per fault (see
:mod:`trio_portfolio.testing.chaos` for what each column means).

    python3 bench/chaos.py [--sessions 50] [--injections 3] [--faults oom,proxy_cut]
                           [--workdir DIR]   # keep logs and AOF files

Exits 1 if any row breaks the acceptance line (the last column says which).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

from trio_portfolio.testing.chaos import FAULTS, ChaosConfig, acceptance, format_table, run_chaos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--injections", type=int, default=3)
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated")
    parser.add_argument("--outage-seconds", type=float, default=2.0)
    parser.add_argument("--redis-timeout-seconds", type=float, default=1.0)
    parser.add_argument("--redis-binary", default="/usr/bin/redis-server")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    config = ChaosConfig(
        sessions=args.sessions,
        injections=args.injections,
        faults=tuple(f for f in args.faults.split(",") if f),
        outage_seconds=args.outage_seconds,
        redis_timeout_seconds=args.redis_timeout_seconds,
        redis_binary=args.redis_binary,
        workdir=args.workdir,
        log=log,
    )
    rows = trio.run(run_chaos, config)
    print(
        f"chaos: {config.sessions} v2 sessions, {config.injections} injections per fault, "
        f"ticks every {config.market_update_interval_seconds:g} s, metric delays "
        f"{config.metric_delay_seconds[0]:g}-{config.metric_delay_seconds[1]:g} s, "
        f"Redis timeout {config.redis_timeout_seconds:g} s, outage {config.outage_seconds:g} s; "
        f"{time.monotonic() - started:.0f} s in all"
    )
    print(format_table(rows, config.recovery_limit_seconds))
    for row in rows:
        for note in row.notes[:5]:
            print(f"  {row.fault}: {note}")
    return 1 if any(acceptance(row, config.recovery_limit_seconds) for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
