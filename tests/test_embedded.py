"""The embedded redis-server: private socket, persistence, shutdown and errors.

Rules for this suite: servers are real redis-server binaries found by
:func:`list_redis_binaries` (or a tiny stand-in script where a misbehaving
server is the point); blocking redis-py calls run in worker threads; every
start and stop is bounded by ``fail_after``.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from trio_portfolio import embedded
from trio_portfolio.embedded import (
    PIDFILE_NAME,
    EmbeddedRedisError,
    RedisBinary,
    RestartPolicy,
    list_redis_binaries,
    run_embedded_redis,
)
from trio_portfolio.testing import in_thread

BINARIES = list_redis_binaries()  # every distinct version this machine has


def socket_path(url: str) -> Path:
    assert url.startswith("unix://")
    return Path(url.removeprefix("unix://"))


def read_pidfile(data_dir: Path) -> dict[str, Any]:
    owners: dict[str, Any] = json.loads((data_dir / PIDFILE_NAME).read_text())
    return owners


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("binary", BINARIES, ids=[b.name for b in BINARIES])
async def test_persists_across_restart_on_a_private_socket(
    binary: RedisBinary, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    start = functools.partial(run_embedded_redis, data_dir, binary=binary.path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(start)
            sock = socket_path(url)
            assert sock.parent == data_dir
            assert stat.S_IMODE(sock.stat().st_mode) == 0o700

            def write() -> tuple[int, str]:
                with redis.Redis.from_url(url) as client:
                    client.set("portfolio:k", "kept")
                    info = client.info("server")
                    return int(info["process_id"]), client.config_get("port")["port"]

            pid, port = await in_thread(write)
            assert port == "0", "the embedded server must not listen on TCP"
            nursery.cancel_scope.cancel()
    assert not pid_exists(pid)
    assert not sock.exists(), "a clean shutdown removes the socket"

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(start)

            def read() -> bytes | None:
                with redis.Redis.from_url(url) as client:
                    return client.get("portfolio:k")  # type: ignore[no-any-return]

            assert await in_thread(read) == b"kept"
            nursery.cancel_scope.cancel()


async def test_long_data_dir_gets_a_short_socket_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 60) / ("e" * 60)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            sock = socket_path(await nursery.start(run_embedded_redis, data_dir))
            assert not sock.is_relative_to(data_dir)
            assert len(os.fsencode(sock)) <= 100
            assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
            nursery.cancel_scope.cancel()
    assert not sock.parent.exists(), "the private socket dir is removed"
    assert any(p.name.startswith("appendonly") for p in data_dir.iterdir())


async def test_a_second_instance_on_the_same_dir_is_refused(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_embedded_redis, tmp_path)
            with pytest.raises(EmbeddedRedisError, match="in use"):
                await run_embedded_redis(tmp_path)
            nursery.cancel_scope.cancel()


async def test_a_killed_server_is_restarted_on_the_same_url(tmp_path: Path) -> None:
    """kill -9 of the redis-server: a new one serves the same URL and the same data."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(run_embedded_redis, tmp_path)

            def write() -> int:
                with redis.Redis.from_url(url) as client:
                    client.set("portfolio:k", "kept")
                    return int(client.info("server")["process_id"])

            first = await in_thread(write)
            assert read_pidfile(tmp_path)["redis_pid"] == first
            os.kill(first, signal.SIGKILL)

            def read() -> tuple[int, bytes | None]:
                deadline = time.monotonic() + 5
                while True:
                    try:
                        with redis.Redis.from_url(url) as client:
                            pid = int(client.info("server")["process_id"])
                            return pid, client.get("portfolio:k")
                    except (redis.ConnectionError, redis.BusyLoadingError):
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)

            second, value = await in_thread(read)
            assert second != first
            assert not pid_exists(first)
            assert value == b"kept", "the AOF is replayed by the new server"
            owners = read_pidfile(tmp_path)
            assert (owners["redis_pid"], owners["server_pid"]) == (second, os.getpid())
            nursery.cancel_scope.cancel()
    assert not pid_exists(second)
    assert not (tmp_path / PIDFILE_NAME).exists(), "a clean stop removes the pidfile"


async def test_no_binary_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(embedded, "list_redis_binaries", list)
    with pytest.raises(EmbeddedRedisError, match=r"No redis-server binary found: install"):
        await run_embedded_redis(tmp_path)
    with pytest.raises(EmbeddedRedisError, match="does not exist"):
        await run_embedded_redis(tmp_path, binary=tmp_path / "nope")
    not_a_program = write_script(tmp_path / "text", "just text\n")
    with pytest.raises(EmbeddedRedisError, match="cannot run"):
        await run_embedded_redis(tmp_path / "data", binary=not_a_program)


def write_script(path: Path, body: str) -> Path:
    path.write_text(body)
    path.chmod(0o755)
    return path


async def test_startup_failure_names_the_binary_and_its_output(tmp_path: Path) -> None:
    fake = write_script(tmp_path / "redis-server", "#!/bin/sh\necho 'FATAL: broken' >&2\nexit 3\n")
    with pytest.raises(EmbeddedRedisError, match=r"(?s)code 3.*redis-server.*FATAL: broken"):
        await run_embedded_redis(tmp_path / "data", binary=fake)


# Answers PING on the socket it is given but ignores SIGTERM, like a server
# stuck saving; writes its pid so the test can check it was killed.
STUBBORN = """#!{python}
import os, signal, socket, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
args = sys.argv[1:]
path, data = args[args.index("--unixsocket") + 1], args[args.index("--dir") + 1]
with open(os.path.join(data, "pid"), "w") as f:
    f.write(str(os.getpid()))
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
while True:
    conn, _ = server.accept()
    conn.recv(64)
    conn.sendall(b"+PONG\\r\\n")
    conn.close()
"""


async def test_a_server_ignoring_sigterm_is_killed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(embedded, "STOP_TIMEOUT", 0.3)
    fake = write_script(tmp_path / "stubborn", STUBBORN.format(python=sys.executable))
    data_dir = tmp_path / "data"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(run_embedded_redis, data_dir, binary=fake))
            pid = int((data_dir / "pid").read_text())
            started = time.monotonic()
            nursery.cancel_scope.cancel()
    assert time.monotonic() - started >= 0.3
    assert not pid_exists(pid)


# Answers PING for a moment, then exits 1: a redis-server that keeps crashing.
# Appends its pid to data/starts so the test can count the attempts.
FLAKY = """#!{python}
import os, socket, sys, time
args = sys.argv[1:]
path, data = args[args.index("--unixsocket") + 1], args[args.index("--dir") + 1]
with open(os.path.join(data, "starts"), "a") as f:
    f.write(str(os.getpid()) + "\\n")
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
server.settimeout(0.01)
deadline = time.monotonic() + {lifetime}
while time.monotonic() < deadline:
    try:
        conn, _ = server.accept()
    except socket.timeout:
        continue
    conn.recv(64)
    conn.sendall(b"+PONG\\r\\n")
    conn.close()
print("FATAL: crashed on purpose", flush=True)
sys.exit(1)
"""


def starts(data_dir: Path) -> int:
    path = data_dir / "starts"
    return len(path.read_text().split()) if path.exists() else 0


async def test_a_crash_loop_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    fake = write_script(tmp_path / "flaky", FLAKY.format(python=sys.executable, lifetime=0.1))
    data_dir = tmp_path / "data"
    policy = RestartPolicy(initial_backoff=0.01, max_backoff=0.02, max_quick_failures=3)

    async def run() -> None:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                start = functools.partial(run_embedded_redis, data_dir, binary=fake, restart=policy)
                await nursery.start(start)
                await trio.sleep_forever()

    with pytest.raises(ExceptionGroup) as failure:
        await run()
    pattern = r"(?s)crash-looping: 3 failures in a row.*exited unexpectedly with code 1.*FATAL"
    assert failure.group_contains(EmbeddedRedisError, match=pattern)
    assert starts(data_dir) == 3, "the first start and two restarts"


async def test_a_stable_run_resets_the_failure_count(tmp_path: Path) -> None:
    """Failures further apart than ``stable_after`` never add up to a crash loop."""
    fake = write_script(tmp_path / "flaky", FLAKY.format(python=sys.executable, lifetime=0.3))
    data_dir = tmp_path / "data"
    policy = RestartPolicy(initial_backoff=0.01, stable_after=0.2, max_quick_failures=1)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            start = functools.partial(run_embedded_redis, data_dir, binary=fake, restart=policy)
            await nursery.start(start)
            while starts(data_dir) < 4:  # noqa: ASYNC110  # another process's file
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()


def test_restart_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="initial_backoff"):
        RestartPolicy(initial_backoff=0)
    with pytest.raises(ValueError, match="max_quick_failures"):
        RestartPolicy(max_quick_failures=0)


# -- the data directory -------------------------------------------------------------------------


async def test_the_data_dir_is_created_or_tightened_to_0700(tmp_path: Path) -> None:
    created = tmp_path / "new" / "data"
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    old_umask = os.umask(0)
    try:
        for data_dir in (created, existing):
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    await nursery.start(run_embedded_redis, data_dir)
                    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700, data_dir
                    nursery.cancel_scope.cancel()
    finally:
        os.umask(old_umask)


@pytest.mark.parametrize("binary", BINARIES, ids=[b.name for b in BINARIES])
@pytest.mark.parametrize(
    ("maxmemory", "policy", "expected"),
    [(None, None, ("268435456", "noeviction")), ("0", "allkeys-lru", ("0", "allkeys-lru"))],
    ids=["default", "unlimited-lru"],
)
async def test_maxmemory_and_policy_reach_the_server(
    binary: RedisBinary,
    tmp_path: Path,
    maxmemory: str | None,
    policy: str | None,
    expected: tuple[str, str],
) -> None:
    options: dict[str, Any] = {"binary": binary.path}
    if maxmemory is not None:
        options.update(maxmemory=maxmemory, maxmemory_policy=policy)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(functools.partial(run_embedded_redis, tmp_path, **options))

            def config() -> tuple[str, str]:
                with redis.Redis.from_url(url, decode_responses=True) as client:
                    got = client.config_get("maxmemory*")
                    return got["maxmemory"], got["maxmemory-policy"]

            assert await in_thread(config) == expected
            nursery.cancel_scope.cancel()


# -- owning the data directory: pidfile, orphans, strangers -------------------------------------

# Runs run_embedded_redis in a process of its own, which the tests SIGKILL.
HOLDER = """
import functools, sys, trio
from pathlib import Path
from trio_portfolio.embedded import run_embedded_redis
die = sys.argv[2] == "die"
trio.run(functools.partial(run_embedded_redis, Path(sys.argv[1]), die_with_parent=die))
"""


async def start_holder(data_dir: Path, *, die_with_parent: bool) -> tuple[trio.Process, int]:
    """A process serving ``data_dir`` with its embedded Redis; returns it and the Redis pid."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", HOLDER, str(data_dir), "die" if die_with_parent else "live"],
        stdin=subprocess.DEVNULL,
    )
    with trio.fail_after(15):
        while True:
            try:
                owners = read_pidfile(data_dir)
            except (OSError, ValueError):
                owners = {}
            if owners.get("server_pid") == process.pid and (data_dir / "redis.sock").exists():
                return process, int(owners["redis_pid"])
            assert process.poll() is None, "the holder died"
            await trio.sleep(0.05)


async def wait_gone(pid: int, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while pid_exists(pid) and not is_zombie(pid):  # noqa: ASYNC110  # not our child
            await trio.sleep(0.05)


async def wait_lock_free(data_dir: Path, timeout: float) -> None:
    """Poll the data directory's lock until it can be taken (then let it go again)."""
    with trio.fail_after(timeout):
        while True:
            fd = os.open(data_dir / ".embedded-redis.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
            await trio.sleep(0.05)


def is_zombie(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rpartition(")")[2].split()[0] == "Z"


async def kill_holder(process: trio.Process) -> None:
    process.kill()
    with trio.fail_after(5):
        await process.wait()


async def test_an_orphan_is_reclaimed_but_a_live_owner_is_not(tmp_path: Path) -> None:
    """Without the death signal, a SIGKILLed owner leaves its redis-server running."""
    data_dir = tmp_path / "data"
    holder, orphan = await start_holder(data_dir, die_with_parent=False)
    try:
        with pytest.raises(EmbeddedRedisError, match=rf"running server pid {holder.pid}"):
            await run_embedded_redis(data_dir)
        assert pid_exists(orphan)
        url = f"unix://{data_dir / 'redis.sock'}"

        def write() -> None:
            with redis.Redis.from_url(url) as client:
                client.set("portfolio:k", "kept")

        await in_thread(write)
    finally:
        await kill_holder(holder)
    await trio.sleep(0.5)
    assert pid_exists(orphan), "the orphan outlived its server"
    assert not is_zombie(orphan)

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(run_embedded_redis, data_dir)
            assert not pid_exists(orphan) or is_zombie(orphan), "the orphan was stopped"

            def read() -> tuple[bytes | None, int]:
                with redis.Redis.from_url(url) as client:
                    return client.get("portfolio:k"), int(client.info("server")["process_id"])

            value, pid = await in_thread(read)
            assert value == b"kept"
            assert pid != orphan
            nursery.cancel_scope.cancel()


async def test_the_redis_server_dies_with_its_parent(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    holder, child = await start_holder(data_dir, die_with_parent=True)
    await kill_holder(holder)
    await wait_gone(child, timeout=5)
    await wait_lock_free(data_dir, timeout=10)  # the last fd closes a moment after exit
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_embedded_redis, data_dir)
            nursery.cancel_scope.cancel()


async def test_the_server_is_forked_by_the_trio_thread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """PR_SET_PDEATHSIG fires when the *forking thread* exits: a worker thread would
    be retired by Trio's thread cache and take the redis-server with it."""
    threads: list[threading.Thread] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        threads.append(threading.current_thread())
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(embedded.subprocess, "Popen", popen)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_embedded_redis, tmp_path)
            nursery.cancel_scope.cancel()
    assert threads == [threading.current_thread()]


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


def write_pidfile_naming(data_dir: Path, pid: int, socket: Path) -> None:
    """A pidfile whose server is gone and whose redis-server is ``pid``, start time and all."""
    data_dir.mkdir(parents=True, exist_ok=True)
    owners = {
        "server_pid": dead_pid(),
        "server_started": None,
        "redis_pid": pid,
        "redis_started": start_time(pid),
        "socket": str(socket),
        "binary": str(BINARIES[0].path),
    }
    (data_dir / PIDFILE_NAME).write_text(json.dumps(owners))


LOCKER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


async def test_a_redis_server_of_another_data_dir_is_never_killed(tmp_path: Path) -> None:
    """Named redis-server, pid and start time matching the pidfile: still not ours."""
    other = tmp_path / "other"
    other.mkdir()
    command = [str(BINARIES[0].path), "--port", "0", "--unixsocket", str(other / "r.sock")]
    command += ["--dir", str(other), "--save", "", "--logfile", ""]
    stranger = subprocess.Popen(command, stdout=subprocess.DEVNULL)  # noqa: ASYNC220  # instant
    locker: subprocess.Popen[bytes] | None = None
    try:
        with trio.fail_after(10):
            while not (other / "r.sock").exists():  # noqa: ASYNC110  # another process's file
                await trio.sleep(0.05)
        data_dir = tmp_path / "data"

        # The lock is free: the stranger is left alone and we start beside it.
        write_pidfile_naming(data_dir, stranger.pid, data_dir / "redis.sock")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(run_embedded_redis, data_dir)
                nursery.cancel_scope.cancel()
        assert stranger.poll() is None

        # The lock is held by some other process: refused, nobody is signalled.
        write_pidfile_naming(data_dir, stranger.pid, data_dir / "redis.sock")
        locker = subprocess.Popen(  # noqa: ASYNC220  # instant
            [sys.executable, "-c", LOCKER, str(data_dir / ".embedded-redis.lock")],
            stdout=subprocess.PIPE,
        )
        assert locker.stdout is not None
        assert await in_thread(locker.stdout.readline) == b"locked\n"
        with pytest.raises(EmbeddedRedisError, match="no longer its redis-server"):
            await run_embedded_redis(data_dir)
        assert stranger.poll() is None, "the stranger was not signalled"
        assert locker.poll() is None
    finally:
        for process in (stranger, locker):
            if process is not None:
                process.kill()
                process.wait()
                if process.stdout is not None:
                    process.stdout.close()


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"server_pid": "x"}'])
async def test_an_unreadable_pidfile_is_replaced(tmp_path: Path, content: str) -> None:
    (tmp_path / PIDFILE_NAME).write_text(content)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_embedded_redis, tmp_path)
            assert read_pidfile(tmp_path)["server_pid"] == os.getpid()
            nursery.cancel_scope.cancel()
