"""Load generator: real v1 WebSocket clients against a running server.

A separate process from the server, so that what ``/proc`` says about the
server's CPU is the server's alone.  Each scenario prints one JSON object
on stdout (the runner, ``bench/compare.py``, reads it):

* ``throughput`` - ``--sessions`` sessions connect (not measured), then all
  at once each runs ``--analyses`` analyses back to back: send ``analyze``,
  wait for the five ``analysis_result`` frames of that ticker, next.
  Reports analyses per second, server CPU per analysis and the result
  latency (send to fifth result) p50/p99.
* ``switch`` - ``--connections`` connections each run ``--rounds`` rounds:
  ``analyze A``; on A's first result ``analyze B``; collect B's five.
  Reports rounds per second, server CPU per round, switch latency (send of
  B to B's fifth result) p50/p99, and interleavings: frames of A received
  after the first frame of B (guarantee 1; must be 0).
* ``idle`` - after a warm-up of ``--warmup`` connections opened and
  closed, ``--connections`` v1 connections (one session each) are opened
  and left idle.  Reports server RSS per connection (RSS growth over the
  connect phase, after a settle pause, divided by the count) and server
  CPU per connect.

Server CPU is ``utime + stime`` of ``--server-pid`` and its descendants
(``/proc/<pid>/stat``, so exited threads count too), RSS is the sum of
their ``VmRSS``.  v1 clients offer no subprotocol and receive only
``analysis_result`` and ``error`` frames; any ``error`` frame fails the
scenario, because a refused request would make the figures meaningless.

    python bench/loadgen.py throughput --url ws://127.0.0.1:8000 --server-pid PID
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio
from trio_websocket import WebSocketConnection, connect_websocket_url, open_websocket_url

METRICS = frozenset(
    {"portfolio_risk", "concentration", "correlation", "momentum", "allocation_score"}
)
TICKERS = ("AAPL", "GOOGL", "MSFT")  # the server's default holdings
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
IO_TIMEOUT = 120.0


class ScenarioError(Exception):
    """The server answered something a benchmark cannot count (an error frame)."""


# --- /proc ---------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as file:
                found += [int(child) for child in file.read().split()]
        except OSError:
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that exist now."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += _children(current)
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of the process tree, in seconds (all threads, dead ones too)."""
    ticks = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / CLOCK_TICKS


def tree_rss_kb(pid: int) -> float:
    """Resident set size of the process tree, in KiB."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/statm") as file:
                total += int(file.read().split()[1]) * PAGE_KB
        except OSError:
            continue
    return float(total)


# --- client helpers ------------------------------------------------------------------------------


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


async def receive_result(ws: WebSocketConnection) -> tuple[str, str]:
    """The next ``analysis_result`` as ``(ticker, metric)``; raises on an ``error`` frame."""
    with trio.fail_after(IO_TIMEOUT):
        message = await ws.get_message()
    frame: dict[str, Any] = json.loads(message)
    if frame.get("type") == "error":
        raise ScenarioError(f"server answered an error frame: {frame}")
    if frame.get("type") != "analysis_result":
        raise ScenarioError(f"unexpected frame on a v1 connection: {frame}")
    return str(frame["ticker"]), str(frame["metric"])


async def analyze(ws: WebSocketConnection, ticker: str) -> None:
    await ws.send_message(json.dumps({"action": "analyze", "ticker": ticker}))


def session_url(base: str, tag: str, index: int) -> str:
    return f"{base.rstrip('/')}/ws/bench-{tag}-{index}"


async def run_all(count: int, job: Callable[[int], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(job, index)


async def measured_phase(
    args: argparse.Namespace,
    count: int,
    client: Callable[[int], Awaitable[None]],
    all_connected: trio.Event,
    ready: trio.Event,
    finished: list[tuple[float, float]],
) -> tuple[float, float]:
    """Run ``count`` clients; measure from their release (``ready``) to the last one's end.

    The clients connect, then wait for ``ready``; each appends ``(wall clock,
    server CPU)`` to ``finished`` when done.  Returns ``(wall, cpu)`` seconds.
    """
    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(client, index)
        with trio.fail_after(IO_TIMEOUT):
            await all_connected.wait()
        await trio.sleep(args.settle)
        cpu0, wall0 = tree_cpu_seconds(args.server_pid), time.perf_counter()
        ready.set()
    wall1, cpu1 = max(finished)  # when the last client had its last result
    return wall1 - wall0, cpu1 - cpu0


# --- scenarios -----------------------------------------------------------------------------------


async def throughput(args: argparse.Namespace) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    latencies: list[float] = []
    ready = trio.Event()
    connected = 0
    all_connected = trio.Event()

    async def session(index: int) -> None:
        nonlocal connected
        async with open_websocket_url(session_url(args.url, tag, index)) as ws:
            connected += 1
            if connected == args.sessions:
                all_connected.set()
            await ready.wait()
            for round_ in range(args.analyses):
                ticker = TICKERS[(index + round_) % len(TICKERS)]
                started = time.perf_counter()
                await analyze(ws, ticker)
                seen: set[str] = set()
                while len(seen) < len(METRICS):
                    got, metric = await receive_result(ws)
                    if got == ticker:
                        seen.add(metric)
                latencies.append(time.perf_counter() - started)
            finished.append((time.perf_counter(), tree_cpu_seconds(args.server_pid)))

    finished: list[tuple[float, float]] = []
    wall, cpu = await measured_phase(args, args.sessions, session, all_connected, ready, finished)
    count = len(latencies)
    return {
        "analyses": count,
        "analyses_per_s": count / wall,
        "cpu_ms_per_analysis": 1000 * cpu / count,
        "server_cores": cpu / wall,
        "result_p50_ms": 1000 * percentile(latencies, 0.5),
        "result_p99_ms": 1000 * percentile(latencies, 0.99),
    }


async def switch(args: argparse.Namespace) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    first, second = TICKERS[0], TICKERS[1]
    latencies: list[float] = []
    interleavings = 0
    ready = trio.Event()
    connected = 0
    all_connected = trio.Event()

    async def connection(index: int) -> None:
        nonlocal connected, interleavings
        async with open_websocket_url(session_url(args.url, tag, index)) as ws:
            connected += 1
            if connected == args.connections:
                all_connected.set()
            await ready.wait()
            for _ in range(args.rounds):
                await analyze(ws, first)
                while (await receive_result(ws))[0] != first:
                    pass
                switched = time.perf_counter()
                await analyze(ws, second)
                seen: set[str] = set()
                while len(seen) < len(METRICS):
                    got, metric = await receive_result(ws)
                    if got == second:
                        seen.add(metric)
                    elif seen:
                        interleavings += 1  # an earlier analysis after B's first frame
                latencies.append(time.perf_counter() - switched)
            finished.append((time.perf_counter(), tree_cpu_seconds(args.server_pid)))

    finished: list[tuple[float, float]] = []
    wall, cpu = await measured_phase(
        args, args.connections, connection, all_connected, ready, finished
    )
    rounds = len(latencies)
    return {
        "rounds": rounds,
        "rounds_per_s": rounds / wall,
        "cpu_ms_per_round": 1000 * cpu / rounds,
        "server_cores": cpu / wall,
        "switch_p50_ms": 1000 * percentile(latencies, 0.5),
        "switch_p99_ms": 1000 * percentile(latencies, 0.99),
        "interleavings": interleavings,
    }


async def idle(args: argparse.Namespace) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    limiter = trio.CapacityLimiter(args.concurrency)

    async def warm(index: int) -> None:
        async with limiter, open_websocket_url(session_url(args.url, f"{tag}w", index)):
            pass

    await run_all(args.warmup, warm)
    await trio.sleep(args.settle)
    rss0, cpu0 = tree_rss_kb(args.server_pid), tree_cpu_seconds(args.server_pid)
    async with trio.open_nursery() as nursery:
        connections: list[WebSocketConnection] = []

        async def connect(index: int) -> None:
            async with limiter:
                with trio.fail_after(IO_TIMEOUT):
                    url = session_url(args.url, tag, index)
                    connections.append(await connect_websocket_url(nursery, url))

        await run_all(args.connections, connect)
        await trio.sleep(args.settle)
        rss1, cpu1 = tree_rss_kb(args.server_pid), tree_cpu_seconds(args.server_pid)
        nursery.cancel_scope.cancel()
    count = len(connections)
    return {
        "connections": count,
        "rss_kb_per_connection": (rss1 - rss0) / count,
        "cpu_ms_per_connect": 1000 * (cpu1 - cpu0) / count,
    }


SCENARIOS: dict[str, Callable[[argparse.Namespace], Awaitable[dict[str, float]]]] = {
    "throughput": throughput,
    "switch": switch,
    "idle": idle,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--url", required=True, help="base URL, e.g. ws://127.0.0.1:8000")
    parser.add_argument("--server-pid", type=int, required=True, help="process to measure")
    parser.add_argument("--sessions", type=int, default=100, help="throughput: sessions")
    parser.add_argument("--analyses", type=int, default=20, help="throughput: per session")
    parser.add_argument("--connections", type=int, help="switch: 100, idle: 1000")
    parser.add_argument("--rounds", type=int, default=10, help="switch: rounds per connection")
    parser.add_argument("--warmup", type=int, default=50, help="idle: warm-up connections")
    parser.add_argument("--concurrency", type=int, default=50, help="idle: connects in flight")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds before measuring")
    args = parser.parse_args(argv)
    if args.connections is None:
        args.connections = 1000 if args.scenario == "idle" else 100
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = trio.run(SCENARIOS[args.scenario], args)
    json.dump({"scenario": args.scenario, **result}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
