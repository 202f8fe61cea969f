"""No caller's deadline breaks another's call; a dead connection is still noticed.

The rules under test (see the ``redis_io`` module docstring):

* a call whose own ``timeout`` passes fails alone with
  ``StoreUnavailable(reason=timeout)``; its reply, when Redis sends it, is
  read and dropped, and every other request on the shared connection gets
  its own reply;
* a connection is dropped only when Redis sent nothing at all for
  ``stall_timeout`` with requests outstanding; then its requests fail with
  ``reason=stalled`` and ``maybe_executed``;
* ``probe_write`` runs on a connection of its own: its deadline and its
  failures touch nobody else's requests.

Redis is stalled with ``DEBUG SLEEP`` from a second client, on a private
redis-server per binary found (so the stall cannot slow another suite's
server), reached over a unix socket (Redis 7 allows DEBUG only from local
connections, with ``--enable-debug-command local``).  Every wait is under
``fail_after``.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from trio_portfolio.embedded import RedisBinary, list_redis_binaries
from trio_portfolio.redis_io import RedisClient, StoreUnavailable, Unavailable, open_redis

BINARIES = list_redis_binaries()


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1)
                sock.connect(os.fspath(path))
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("redis-server did not answer PING in time")


@pytest.fixture(scope="module", params=BINARIES, ids=[b.name for b in BINARIES])
def sleepy_redis(request: pytest.FixtureRequest) -> Iterator[str]:
    """A private redis-server that accepts DEBUG SLEEP; yields its ``unix://`` URL."""
    binary: RedisBinary = request.param
    workdir = Path(tempfile.mkdtemp(prefix="tp-sleepy-"))
    sock = workdir / "r.sock"
    command = [
        os.fspath(binary.path),
        "--port", "0",
        "--unixsocket", os.fspath(sock),
        "--save", "",
        "--appendonly", "no",
        "--dir", os.fspath(workdir),
        "--daemonize", "no",
    ]  # fmt: skip
    if binary.version_info >= (7,):
        command += ["--enable-debug-command", "local"]
    with (workdir / "log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_socket(sock, proc, time.monotonic() + 10)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def stall(url: str, seconds: float, *, task_status: trio.TaskStatus[None]) -> None:
    """``DEBUG SLEEP`` from a client of its own; reports started once Redis is asleep."""
    async with open_redis(url, timeout=seconds + 5) as admin:
        await admin.ping()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admin.execute, "DEBUG", "SLEEP", seconds)
            await trio.sleep(0.1)  # the DEBUG SLEEP is written and Redis is inside it
            task_status.started()


async def assert_echoes_own_tokens(redis: RedisClient, count: int = 20) -> None:
    for i in range(count):
        token = f"check-{i}-{random.random()}"
        assert await redis.execute("ECHO", token) == token


async def test_a_short_deadline_fails_only_its_own_call(sleepy_redis: str) -> None:
    """The /ready regression: a 0.5 s call during a 1.5 s stall used to fail every write."""
    key = f"counter-{random.random()}"
    written: list[int] = []
    async with open_redis(sleepy_redis, connections=1, timeout=5) as redis:
        await redis.ping()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(stall, sleepy_redis, 1.5)

                async def writer() -> None:
                    written.append(await redis.execute("INCR", key))

                for _ in range(20):
                    nursery.start_soon(writer)
                await trio.sleep(0.05)  # the writes are in flight, behind the sleep
                with pytest.raises(StoreUnavailable, match="did not answer") as info:
                    await redis.execute("ECHO", "impatient", timeout=0.5)
                assert info.value.reason is Unavailable.TIMEOUT
                assert info.value.maybe_executed
                assert redis.statistics().in_flight == 21, "20 writes and the abandoned ECHO"
            await assert_echoes_own_tokens(redis)
            assert redis.statistics().in_flight == 0
        assert sorted(written) == list(range(1, 21)), "every write got its own reply"
        assert await redis.execute("GET", key) == "20"
        stats = redis.statistics()
        assert (stats.connects, stats.timeouts, stats.connections_stalled) == (1, 1, 0)
        assert stats.replies_discarded == 1, "the impatient call's reply was read and dropped"


async def test_abandoned_and_cancelled_calls_during_a_stall_never_cross_replies(
    sleepy_redis: str,
) -> None:
    """Deadlines and cancellations at random points while Redis sleeps; every reply its owner's."""
    rng = random.Random(99)
    outcomes = {"ok": 0, "timeout": 0, "cancelled": 0}
    reasons: set[Unavailable] = set()
    async with open_redis(sleepy_redis, connections=1, timeout=5) as redis:
        await redis.ping()

        async def caller(i: int) -> None:
            for j in range(10):
                token = f"{i}:{j}"
                own_timeout = rng.choice([None, 0.05, 0.3, 2.0])
                with trio.move_on_after(rng.choice([0.01, 0.2, 60])) as scope:
                    try:
                        reply = await redis.execute("ECHO", token, timeout=own_timeout)
                    except StoreUnavailable as exc:
                        reasons.add(exc.reason)
                        outcomes["timeout"] += 1
                        continue
                    assert reply == token, f"caller {token} got {reply!r}"
                    outcomes["ok"] += 1
                if scope.cancelled_caught:
                    outcomes["cancelled"] += 1

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(stall, sleepy_redis, 1.0)
                for i in range(50):
                    nursery.start_soon(caller, i)
            await assert_echoes_own_tokens(redis, 50)
        assert min(outcomes.values()) > 0, outcomes
        assert reasons == {Unavailable.TIMEOUT}
        stats = redis.statistics()
        assert stats.connects == 1, "neither a deadline nor a cancellation costs the connection"
        assert stats.replies_discarded > 0


async def test_a_connection_silent_past_the_stall_timeout_is_dropped(sleepy_redis: str) -> None:
    async with open_redis(sleepy_redis, connections=1, timeout=5, stall_timeout=0.5) as redis:
        await redis.ping()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(stall, sleepy_redis, 1.5)
                with pytest.raises(StoreUnavailable, match="sent nothing") as info:
                    await redis.execute("INCR", f"stalled-{random.random()}")
                assert info.value.reason is Unavailable.STALLED
                assert info.value.maybe_executed, "written before the stall: it may have run"
            await assert_echoes_own_tokens(redis)
        stats = redis.statistics()
        assert (stats.connections_stalled, stats.connects, stats.reconnects) == (1, 2, 1)


async def test_the_probe_has_its_own_connection(sleepy_redis: str) -> None:
    key = f"probe-{random.random()}"
    written: list[int] = []
    async with open_redis(sleepy_redis, connections=1, timeout=5) as redis:
        with trio.fail_after(10):
            await redis.probe_write(key, timeout=1)
            ttl = await redis.execute("PTTL", key)
            assert 0 < ttl <= 5000
            clients = await redis.execute("CLIENT", "LIST")
            assert clients.count("\n") >= 2, "the probe's connection is not the shared one"
            async with trio.open_nursery() as nursery:
                await nursery.start(stall, sleepy_redis, 1.5)

                async def writer() -> None:
                    written.append(await redis.execute("INCR", key + ":n"))

                for _ in range(10):
                    nursery.start_soon(writer)
                await trio.sleep(0.05)
                with pytest.raises(StoreUnavailable, match="probe") as info:
                    await redis.probe_write(key, timeout=0.3)
                assert info.value.reason is Unavailable.TIMEOUT
            await redis.probe_write(key, timeout=1)  # a fresh probe connection
        assert sorted(written) == list(range(1, 11))
        stats = redis.statistics()
        assert (stats.connects, stats.timeouts, stats.probes, stats.probe_failures) == (1, 0, 3, 1)
