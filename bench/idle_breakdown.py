"""What one idle v1 connection holds: a tracemalloc diff and object counts over N of them.

Starts a fresh redis-server and ``python -m trio_portfolio serve`` from
``--path`` (default: this tree) with ``tracemalloc`` on (through a
``sitecustomize`` in a temporary directory that installs two signal
handlers), opens 50 warm-up connections, takes a snapshot (SIGUSR1), opens
``--connections`` idle v1 connections, waits a second, takes a second
snapshot (SIGUSR2) and prints, per connection: the Python heap growth, the
growth attributed to the innermost line of the project (or of
trio-websocket) on each allocation's stack, and the count of new objects
by type.  A diagnosis tool, not a benchmark: tracemalloc slows the server,
and its heap figure is close to, not equal to, ``compare.py``'s RSS.

    python3 bench/idle_breakdown.py [--path DIR] [--connections 1000] [--top 30]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection, connect_websocket_url, open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # the sibling script's server and redis helpers

PROBE = """
import collections, gc, os, signal, tracemalloc
tracemalloc.start(16)
_state = {}
def _types():
    return collections.Counter(
        str(type(o).__module__) + "." + str(type(o).__qualname__) for o in gc.get_objects()
    )
def _before(*_):
    _state["snap"], _state["types"] = tracemalloc.take_snapshot(), _types()
    open(os.environ["IDLE_BREAKDOWN"] + ".0", "w").close()
def _after(*_):
    snap, types = tracemalloc.take_snapshot(), _types()
    diffs = snap.compare_to(_state["snap"], "traceback")
    lines = collections.Counter()
    for diff in diffs:
        key = "(elsewhere)"
        for frame in reversed(list(diff.traceback)):
            if "trio_portfolio" in frame.filename or "trio_websocket" in frame.filename:
                key = frame.filename.rsplit("/", 2)[-1] + ":" + str(frame.lineno)
                break
        lines[key] += diff.size_diff
    with open(os.environ["IDLE_BREAKDOWN"], "w") as out:
        out.write(f"TOTAL {sum(d.size_diff for d in diffs)}\\n")
        for key, size in lines.most_common():
            out.write(f"LINE {size} {key}\\n")
        for name, count in types.items():
            grown = count - _state["types"].get(name, 0)
            if grown > 0:
                out.write(f"TYPE {grown} {name}\\n")
    open(os.environ["IDLE_BREAKDOWN"] + ".1", "w").close()
signal.signal(signal.SIGUSR1, _before)
signal.signal(signal.SIGUSR2, _after)
"""


async def wait_for(path: Path) -> None:
    with trio.fail_after(120):
        while not os.path.exists(path):  # noqa: ASYNC110, ASYNC240 - another process's file
            await trio.sleep(0.1)


async def drive(port: int, pid: int, count: int, out: Path) -> None:
    url = f"ws://127.0.0.1:{port}/ws/idle-breakdown"
    limiter = trio.CapacityLimiter(50)

    async def warm(index: int) -> None:
        async with limiter, open_websocket_url(f"{url}-w{index}"):
            pass

    async with trio.open_nursery() as nursery:
        for index in range(50):
            nursery.start_soon(warm, index)
    await trio.sleep(0.5)
    os.kill(pid, signal.SIGUSR1)
    await wait_for(out.with_name(out.name + ".0"))
    async with trio.open_nursery() as nursery:
        held: list[WebSocketConnection] = []

        async def connect(index: int) -> None:
            async with limiter:
                held.append(await connect_websocket_url(nursery, f"{url}-{index}"))

        async with trio.open_nursery() as connecting:
            for index in range(count):
                connecting.start_soon(connect, index)
        await trio.sleep(1.0)
        os.kill(pid, signal.SIGUSR2)
        await wait_for(out.with_name(out.name + ".1"))
        nursery.cancel_scope.cancel()


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1.0) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--path", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    path = str(Path(args.path).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "probe").mkdir()
        (work / "probe" / "sitecustomize.py").write_text(PROBE)
        out = work / "breakdown.txt"
        env = {**os.environ, **compare.LIFTED_LIMITS, "IDLE_BREAKDOWN": str(out)}
        env["PYTHONPATH"] = f"{path}:{work / 'probe'}"
        with compare.fresh_redis(work) as redis_url:
            port = compare.free_port()
            command = compare.server_command(None, path).format(port=port, redis_url=redis_url)
            with (work / "server.log").open("wb") as log:
                server = subprocess.Popen(
                    command.split(), env=env, cwd=path, stdout=log, stderr=subprocess.STDOUT
                )
            try:
                compare.wait_until(lambda: ready(port), "server", server, work / "server.log")
                trio.run(drive, port, server.pid, args.connections, out)
            finally:
                compare.stop(server)
        report(out.read_text().splitlines(), args.connections, args.top)


def report(lines: list[str], count: int, top: int) -> None:
    total = int(lines[0].split()[1])
    print(f"python heap per idle connection: {total / count / 1024:.1f} KiB ({count} connections)")
    print("\nper connection, by the innermost project line on the allocating stack:")
    rows = [line.split(" ", 2) for line in lines if line.startswith("LINE ")]
    for _, size, where in rows[:top]:
        print(f"  {int(size) / count:8.0f} B  {where}")
    print("\nnew objects per connection, by type:")
    types: list[tuple[int, str]] = []
    for line in lines:
        if line.startswith("TYPE "):
            _, grown, name = line.split(" ", 2)
            types.append((int(grown), name))
    types.sort(reverse=True)
    for objects, name in types[:top]:
        print(f"  {objects / count:6.1f}  {name}")


if __name__ == "__main__":
    main()
