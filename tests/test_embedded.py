"""The embedded redis-server: private socket, persistence, shutdown and errors.

Rules for this suite: servers are real redis-server binaries found by
:func:`list_redis_binaries` (or a tiny stand-in script where a misbehaving
server is the point); blocking redis-py calls run in worker threads; every
start and stop is bounded by ``fail_after``.
"""

from __future__ import annotations

import functools
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import redis
import trio

from trio_portfolio import embedded
from trio_portfolio.embedded import (
    EmbeddedRedisError,
    RedisBinary,
    list_redis_binaries,
    run_embedded_redis,
)
from trio_portfolio.testing import in_thread

BINARIES = list_redis_binaries()  # every distinct version this machine has


def socket_path(url: str) -> Path:
    assert url.startswith("unix://")
    return Path(url.removeprefix("unix://"))


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


async def test_an_unexpected_exit_fails_the_nursery(tmp_path: Path) -> None:
    async def run_and_kill_the_server() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                url = await nursery.start(run_embedded_redis, tmp_path)

                def pid() -> int:
                    with redis.Redis.from_url(url) as client:
                        return int(client.info("server")["process_id"])

                os.kill(await in_thread(pid), signal.SIGKILL)
                await trio.sleep_forever()

    with pytest.raises(ExceptionGroup) as failure:
        await run_and_kill_the_server()
    assert failure.group_contains(EmbeddedRedisError, match="exited unexpectedly with code -9")


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
