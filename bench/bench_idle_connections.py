"""Memory per idle WebSocket: the server's RSS before and after N idle v1 connections.

Starts a real redis-server (the harness's newest binary) and ``python -m
trio_portfolio serve`` in a subprocess, opens ``--connections`` v1
WebSockets that send nothing (trio-websocket clients, which answer pings),
waits ``--hold`` seconds (several ping intervals, so every connection has
pinged), and prints the server's resident set size before and after, and
the difference per connection.  ``--server-path DIR`` runs the server from
another checkout (to compare before/after a change); extra server flags go
after ``--``.

    python bench/bench_idle_connections.py [--connections 1000] [--hold 3] \\
        [--server-path DIR] [-- --ping-interval-seconds 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

from trio_portfolio.testing import (
    find_redis_binaries,
    free_port,
    run_redis_binary,
    unique_key_prefix,
)


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def wait_ready(port: int) -> None:
    request = b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with trio.fail_after(30):
        while True:
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                    await stream.send_all(request)
                    if (await stream.receive_some()).startswith(b"HTTP/1.1 200"):
                        return
            await trio.sleep(0.1)


async def hold(url: str, opened: trio.Semaphore, stop: trio.Event) -> None:
    async with open_websocket_url(url):
        opened.release()
        await stop.wait()


async def measure(args: argparse.Namespace, redis_url: str) -> None:
    port = free_port()
    command = [sys.executable, "-m", "trio_portfolio", "serve", "--port", str(port)]
    command += ["--redis-url", redis_url, "--key-prefix", unique_key_prefix()]
    command += ["--max-connections", str(args.connections + 10), "--log-level", "warning"]
    command += args.server_flags
    env = dict(os.environ)
    if args.server_path:
        env["PYTHONPATH"] = str(args.server_path)
    process = await trio.lowlevel.open_process(
        command, cwd=args.server_path, env=env, stdout=subprocess.DEVNULL
    )
    try:
        await wait_ready(port)
        await trio.sleep(1.0)
        before = rss_kib(process.pid)
        stop = trio.Event()
        opened = trio.Semaphore(0, max_value=args.connections)
        async with trio.open_nursery() as nursery:
            for i in range(args.connections):
                nursery.start_soon(hold, f"ws://127.0.0.1:{port}/ws/idle-{i}", opened, stop)
            with trio.fail_after(120):
                for _ in range(args.connections):
                    await opened.acquire()
            await trio.sleep(args.hold)
            after = rss_kib(process.pid)
            assert process.poll() is None, "the server died"
            process.kill()  # first, so no client is left in a close handshake
            await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.poll() is None:
            process.kill()
        await process.wait()
    per = (after - before) * 1024 / args.connections
    print(f"server: {args.server_path or 'this checkout'}  flags: {' '.join(args.server_flags)}")
    print(f"RSS before {before} KiB, after {args.connections} idle connections {after} KiB")
    print(f"per idle connection: {per:,.0f} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=3.0, help="seconds to hold them open")
    parser.add_argument("--server-path", type=Path, default=None)
    parser.add_argument("server_flags", nargs="*")
    args = parser.parse_args()
    binaries = find_redis_binaries()
    if not binaries:
        sys.exit("no redis-server binary found")
    with run_redis_binary(binaries[-1]) as server:
        trio.run(measure, args, server.url)


if __name__ == "__main__":
    main()
