"""The accept loop under file-descriptor pressure (``trio_portfolio.listener``), from outside.

Rules of this suite: the server is ``python -m trio_portfolio serve`` in a
subprocess on the harness's real Redis, started with a low
``RLIMIT_NOFILE`` (set in the child before exec), so running out of
descriptors is real; the test floods it with plain TCP connections from its
own process, whose limit is higher.  CPU use of the server is read from
``/proc``.  Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_portfolio.testing import RedisServerInfo, free_port, unique_key_prefix
from trio_portfolio.testing.processes import CLI, popen_until_healthy

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
        status: int = reply.status
        return status


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, clock ticks


@contextlib.contextmanager
def _server(redis_url: str, log_path: Path, nofile: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """The server with ``RLIMIT_NOFILE`` = ``nofile`` (soft, hard); yields (port, pid)."""
    port = free_port()
    command = [
        *(*CLI, "serve", "--port", str(port)),
        "--redis-url",
        redis_url,
        "--key-prefix",
        unique_key_prefix(),
        "--log-format",
        "text",
        "--market-update-interval-seconds",
        "3600",
    ]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    base = f"http://127.0.0.1:{port}"
    with popen_until_healthy(command, base, log_path, ROOT, START_TIMEOUT, limit) as proc:
        yield port, proc.pid
        assert proc.poll() is None, f"server died:\n{log_path.read_text()}"


def test_soft_limit_is_raised_to_the_hard_limit(
    real_redis: RedisServerInfo, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    with _server(real_redis.url, log_path, (64, 4096)) as (_, pid):
        limits = Path(f"/proc/{pid}/limits").read_text()
        line = next(li for li in limits.splitlines() if li.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    assert "open-file limit raised from 64 to 4096" in log_path.read_text()


def test_out_of_descriptors_backs_off_and_recovers(
    real_redis: RedisServerInfo, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    flood: list[socket.socket] = []
    with _server(real_redis.url, log_path, (80, 80)) as (port, pid):
        try:
            for _ in range(150):  # well past what the server can hold
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                flood.append(sock)
            deadline = time.monotonic() + 10
            while "cannot accept connections" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            cpu_before = _cpu_seconds(pid)
            time.sleep(2.0)
            busy = _cpu_seconds(pid) - cpu_before
            assert busy < 0.5, f"the listener spins: {busy:.2f} s CPU in 2 s"
        finally:
            for sock in flood:
                sock.close()
        deadline = time.monotonic() + 15
        while True:  # the backlog drains; then ordinary clients are served again
            with contextlib.suppress(OSError):
                if _health(port) == 200 and "accepting connections again" in log_path.read_text():
                    break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
    text = log_path.read_text()
    print(text[-3000:])
    assert text.count("cannot accept connections") <= 3, "one line per burst, not per attempt"
    assert "Traceback" not in text
