"""The supervised embedded Redis, seen from outside a running ``trio-portfolio serve``.

Rules of this suite: the server runs as ``python -m trio_portfolio serve`` in
a subprocess with no ``--redis-url`` (so it starts its embedded Redis), on a
free port of 127.0.0.1, its environment cleared of ``PORTFOLIO_*``; faults are
real signals to real processes (``kill -9`` of the server or of its
redis-server, found through the pidfile); clients are real WebSockets.  Every
wait is under ``fail_after``; a server left running is stopped (SIGTERM, then
SIGKILL) and the test checks that no redis-server of its data dir is left.
The settings tests at the end are pure.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from trio_portfolio.config import ConfigError, MaxmemoryPolicy, Settings, load_settings
from trio_portfolio.embedded import PIDFILE_NAME
from trio_portfolio.testing.live_server import connect_client
from trio_portfolio.testing.processes import (
    is_gone,
    redis_servers_in,
    server_process,
    wait_for_ready,
)

IO = 10.0
#: Fast metrics, no market ticks in the way, and text logs (the assertions read them).
FAST = [
    *("--metric-delay-seconds", "0.02,0.1", "--market-update-interval-seconds", "3600"),
    *("--log-format", "text"),
]


def owners(data_dir: Path) -> dict[str, Any]:
    found: dict[str, Any] = json.loads((data_dir / PIDFILE_NAME).read_text())
    return found


async def analyse_once(port: int, session_id: str) -> dict[str, Any]:
    """Connect, analyse AAPL to completion; the greeting's portfolio."""
    async with connect_client(port, session_id, v2=True, timeout=IO) as client:
        greeting = await client.recv(IO)
        assert greeting["type"] == "session"
        await client.send("analyze", ticker="AAPL")
        frames = await client.recv_until(lambda f: f["type"] == "analysis_complete", timeout=IO)
        assert sum(f["type"] == "analysis_result" for f in frames) == 5, frames
        portfolio: dict[str, Any] = greeting["portfolio"]
        return portfolio


async def test_a_sigkilled_server_starts_again_on_the_same_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    session_id = "sigkill-" + secrets.token_hex(4)
    args = ["--data-dir", str(data_dir), *FAST]
    async with server_process(*args) as server:
        await wait_for_ready(server.port)
        await analyse_once(server.port, session_id)
        old_redis = owners(data_dir)["redis_pid"]
        assert redis_servers_in(data_dir) == [old_redis]
        server.process.kill()
        with trio.fail_after(5):
            assert await server.process.wait() == -signal.SIGKILL

    async with server_process(*args) as server:
        await wait_for_ready(server.port)
        assert is_gone(old_redis), "the old redis-server did not outlive its server"
        assert owners(data_dir)["server_pid"] == server.process.pid
        greeting = await analyse_once(server.port, session_id)
        assert len(greeting["analysis_results"]) == 5, "the data survived the SIGKILL"
        with trio.fail_after(10):
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
    assert redis_servers_in(data_dir) == []
    assert not (data_dir / PIDFILE_NAME).exists()


async def test_a_killed_embedded_redis_is_restarted_while_the_server_runs(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    session_id = "restart-" + secrets.token_hex(4)
    args = ["--data-dir", str(data_dir), *FAST]
    args += ["--embedded-maxmemory", "64mb", "--embedded-maxmemory-policy", "volatile-ttl"]
    async with server_process(*args) as server:
        await wait_for_ready(server.port)
        await analyse_once(server.port, session_id)
        before = owners(data_dir)
        os.kill(before["redis_pid"], signal.SIGKILL)

        down = await wait_for_ready(server.port, want=503, timeout=5)
        recovered = await wait_for_ready(server.port, want=200, timeout=10)
        print(f"/ready: 503 after {down:.3f}s, 200 again {recovered:.3f}s later")
        assert recovered < 5
        assert server.process.poll() is None, "the server kept running"
        greeting = await analyse_once(server.port, session_id)
        assert len(greeting["analysis_results"]) == 5

        after = owners(data_dir)
        assert after["redis_pid"] != before["redis_pid"]
        assert after["socket"] == before["socket"], "the URL stays the same"

        def config() -> dict[str, str]:
            with redis.Redis(unix_socket_path=after["socket"], decode_responses=True) as client:
                found: dict[str, str] = client.config_get("maxmemory*")
                return found

        got = await trio.to_thread.run_sync(config)
        assert got["maxmemory"] == str(64 * 1024**2)
        assert got["maxmemory-policy"] == "volatile-ttl"
        assert "restarted as pid" in server.log()
    assert redis_servers_in(data_dir) == []


def corrupt_the_aof(data_dir: Path) -> None:
    """Make every later start of redis-server refuse the data (a crash loop)."""
    manifests = list(data_dir.glob("appendonlydir/*.manifest"))
    for path in manifests or [data_dir / "appendonly.aof"]:
        path.write_text("this is not an append-only file\n")


async def test_a_crash_loop_ends_the_server_with_a_clear_message(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with server_process("--data-dir", str(data_dir), *FAST) as server:
        await wait_for_ready(server.port)
        pid = owners(data_dir)["redis_pid"]
        corrupt_the_aof(data_dir)
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        with trio.fail_after(30):
            code = await server.process.wait()
        took = time.monotonic() - started
    assert code != 0
    assert "crash-looping: 5 failures in a row" in server.log()
    print(f"gave up after {took:.1f}s")
    assert redis_servers_in(data_dir) == []


# -- the settings -------------------------------------------------------------------------------


def test_embedded_memory_defaults() -> None:
    settings = Settings()
    assert settings.embedded_maxmemory == "256mb"
    assert settings.embedded_maxmemory_policy is MaxmemoryPolicy.NOEVICTION


@pytest.mark.parametrize(
    ("raw", "value"),
    [("0", "0"), ("1mb", "1mb"), ("2GB", "2gb"), ("1000000", "1000000"), (" 512m ", "512m")],
)
def test_embedded_maxmemory_accepts_redis_sizes(raw: str, value: str) -> None:
    settings = load_settings({}, {"PORTFOLIO_EMBEDDED_MAXMEMORY": raw}, None)
    assert settings.embedded_maxmemory == value


@pytest.mark.parametrize("raw", ["", "abc", "-1", "1.5gb", "12x", "100kb", "999999", "1tb"])
def test_embedded_maxmemory_refuses_other_values(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"^--embedded-maxmemory: expected 0 \(no cap\) or"):
        load_settings({"embedded_maxmemory": raw}, {}, None)


def test_embedded_memory_settings_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "portfolio.toml"
    path.write_text('embedded_maxmemory = 0\nembedded_maxmemory_policy = "allkeys-lru"\n')
    settings = load_settings({}, {}, path)
    assert settings.embedded_maxmemory == "0"
    assert settings.embedded_maxmemory_policy is MaxmemoryPolicy.ALLKEYS_LRU
    path.write_text("embedded_maxmemory = true\n")
    with pytest.raises(ConfigError, match="embedded_maxmemory: expected"):
        load_settings({}, {}, path)


def test_embedded_maxmemory_policy_is_one_of_redis_policies() -> None:
    with pytest.raises(ConfigError, match="PORTFOLIO_EMBEDDED_MAXMEMORY_POLICY: expected one of"):
        load_settings({}, {"PORTFOLIO_EMBEDDED_MAXMEMORY_POLICY": "lru"}, None)
    with pytest.raises(ConfigError, match="embedded_maxmemory: expected"):
        Settings(embedded_maxmemory="1k")  # type: ignore[arg-type]
