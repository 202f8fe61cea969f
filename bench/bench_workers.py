"""Analyses per second and server CPU per analysis: ``serve --workers 1`` against ``--workers 2``.

One redis-server for the whole run.  Each round starts the server as a real
process tree (``python -m trio_portfolio serve --workers W`` with
``--metric-delay-seconds 0,0``), waits for ``/ready``, then runs the load
generator, a separate process of real v1 WebSocket clients (``--sessions``
sessions, each running ``--analyses`` analyses one after another and
waiting for the five results of each).  Rounds alternate 1, 2, 1, 2, ... so
machine noise hits both alike.  For every round it prints analyses/s (over
the load generator's wall time) and the server's CPU seconds per analysis
(utime + stime of every process of the tree, from ``/proc/<pid>/stat``,
read just before and just after the load), then the medians and the ratios.

    python bench/bench_workers.py [--rounds 3] [--sessions 100] [--analyses 20]
    python bench/bench_workers.py --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from trio_portfolio.testing import find_redis_binaries, run_redis_binary
from trio_portfolio.testing.live_server import connect_client

CLI = [sys.executable, "-m", "trio_portfolio"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the load generator (its own process) -------------------------------------------------


async def load(port: int, sessions: int, analyses: int) -> dict[str, float]:
    """Run the load; ``{"analyses", "seconds"}`` of the whole of it."""
    done = 0
    prefix = secrets.token_hex(4)
    connected = trio.Event()
    go = trio.Event()
    ready = 0

    async def session(i: int) -> None:
        nonlocal done, ready
        async with connect_client(port, f"bench-{prefix}-{i}", v2=False, timeout=60) as client:
            ready += 1
            if ready == sessions:
                connected.set()
            await go.wait()
            for _ in range(analyses):
                await client.send("analyze", ticker="AAPL")
                results = 0
                while results < 5:
                    frame = await client.recv(60)
                    results += frame.get("type") == "analysis_result"
                done += 1

    async with trio.open_nursery() as nursery:
        for i in range(sessions):
            nursery.start_soon(session, i)
        with trio.fail_after(60):
            await connected.wait()
        started = time.perf_counter()
        cpu = time.process_time()
        print("go", flush=True)  # the parent reads the server's CPU now
        go.set()
    return {
        "analyses": done,
        "seconds": time.perf_counter() - started,
        "cpu": time.process_time() - cpu,
    }


def load_main(port: int, sessions: int, analyses: int) -> None:
    result = trio.run(load, port, sessions, analyses)
    print(json.dumps(result), flush=True)


# -- the measuring parent ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tree_of(root: int) -> list[int]:
    """``root`` and all its live descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
                parents[int(entry)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (fields 14 and 15 of /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def machine_busy() -> tuple[float, float]:
    """``(busy, total)`` CPU seconds of the whole machine so far (first line of /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / CLOCK_TICKS, sum(fields) / CLOCK_TICKS


def wait_ready(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    request = b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request)
            if sock.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    sys.exit(f"server on :{port} not ready within {timeout:g}s")


def one_round(url: str, workers: int, sessions: int, analyses: int) -> dict[str, float]:
    """Analyses/s, server and load generator CPU s per analysis, machine cores busy."""
    port = free_port()
    server = subprocess.Popen(
        [
            *CLI, "serve", "--workers", str(workers), "--port", str(port),
            "--redis-url", url, "--key-prefix", f"bench-{secrets.token_hex(4)}",
            "--metric-delay-seconds", "0,0", "--log-level", "warning",
            "--market-update-interval-seconds", "3600",
            "--max-connections", str(sessions + 100),
            "--messages-per-second", "1000", "--message-burst", "1000",
        ],
        env={k: v for k, v in os.environ.items() if not k.startswith("PORTFOLIO_")},
    )  # fmt: skip
    try:
        wait_ready(port)
        generator = subprocess.Popen(
            [sys.executable, __file__, "--load", str(port), str(sessions), str(analyses)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert generator.stdout is not None
        if generator.stdout.readline().strip() != "go":
            sys.exit("the load generator failed to connect")
        pids = tree_of(server.pid)
        cpu_before, busy_before = cpu_seconds(pids), machine_busy()
        result = json.loads(generator.stdout.readline())
        cpu_after, busy_after = cpu_seconds(pids), machine_busy()
        generator.wait()
    finally:
        server.terminate()
        server.wait(timeout=30)
    n = result["analyses"]
    return {
        "rate": n / result["seconds"],
        "server_cpu": (cpu_after - cpu_before) / n,
        "load_cpu": result["cpu"] / n,
        "busy_cores": (busy_after[0] - busy_before[0]) / result["seconds"],
    }


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    """The given URL, or a fresh local redis-server for the run (newest binary)."""
    if given:
        yield given
        return
    binaries = find_redis_binaries()
    if not binaries:
        sys.exit("no redis-server binary found; pass --redis-url")
    with run_redis_binary(binaries[0]) as server:
        yield server.url


def main() -> None:
    if sys.argv[1:2] == ["--load"]:
        load_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--analyses", type=int, default=20)
    args = parser.parse_args()
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with redis_url(args.redis_url) as url:
        print(f"redis: {url}   load: {args.sessions} v1 sessions x {args.analyses} analyses")
        print(f"cpus: {os.cpu_count()}   metric delay 0,0")
        for round_ in range(args.rounds):
            for workers in (1, 2):
                run = one_round(url, workers, args.sessions, args.analyses)
                runs[workers].append(run)
                print(
                    f"round {round_ + 1} --workers {workers}: {run['rate']:,.0f} analyses/s, "
                    f"server CPU {run['server_cpu'] * 1000:.2f} ms/analysis, "
                    f"load generator {run['load_cpu'] * 1000:.2f} ms/analysis, "
                    f"machine busy {run['busy_cores']:.2f} of {os.cpu_count()} cores",
                    flush=True,
                )

    def median(workers: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[workers])

    for workers in (1, 2):
        print(
            f"median --workers {workers}: {median(workers, 'rate'):,.0f} analyses/s, "
            f"{median(workers, 'server_cpu') * 1000:.2f} ms server CPU/analysis, "
            f"machine busy {median(workers, 'busy_cores'):.2f} cores"
        )
    rate_ratio = median(2, "rate") / median(1, "rate")
    cpu_ratio = median(2, "server_cpu") / median(1, "server_cpu")
    print(f"ratio analyses/s 2/1: {rate_ratio:.2f}  (target >= 1.40)")
    print(f"ratio server CPU/analysis 2/1: {cpu_ratio:.2f}  (target within 0.90-1.10)")


if __name__ == "__main__":
    main()
