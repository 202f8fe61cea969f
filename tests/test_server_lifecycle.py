"""The server as a process: signals, graceful shutdown, the embedded Redis, the CLI.

Rules of this suite: the server runs as ``python -m trio_portfolio`` in a
subprocess (the same entry point as the ``trio-portfolio`` script) on a free
port of 127.0.0.1, with its environment cleared of ``PORTFOLIO_*`` settings
so that only the flags given here count.  Clients are real WebSockets over
sockets the test owns.  Every wait on the process or the network is under
``fail_after``; a server left running by a failing test is stopped
(SIGTERM, then SIGKILL) so that no embedded redis-server is orphaned.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from trio_portfolio.redis_io import open_redis
from trio_portfolio.store import open_store
from trio_portfolio.testing import (
    IO,
    Client,
    RedisServerInfo,
    connect_client,
    greet,
    is_type,
)
from trio_portfolio.testing.processes import (
    CLI,
    clean_env,
    redis_servers_in,
    server_process,
    wait_for_ready,
)


@asynccontextmanager
async def connect(port: int, session_id: str, *, v2: bool = True) -> AsyncIterator[Client]:
    """A WebSocket client (on a socket the harness owns), once the server is ready."""
    await wait_for_ready(port)
    async with connect_client(port, session_id, v2=v2, timeout=IO) as client:
        yield client


async def no_redis_servers_in(data_dir: Path, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while await trio.to_thread.run_sync(redis_servers_in, data_dir):  # noqa: ASYNC110
            await trio.sleep(0.05)


async def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [*CLI, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=clean_env() if env is None else env,
        )


# -- graceful shutdown ------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_shuts_down_gracefully(
    real_redis: RedisServerInfo, key_prefix: str, signum: signal.Signals
) -> None:
    session_id = "life-" + secrets.token_hex(4)
    args = ["--redis-url", real_redis.url, "--key-prefix", key_prefix]
    async with server_process(
        *args, "--metric-delay-seconds", "1,2", env=clean_env(PORTFOLIO_LOG_FORMAT="json")
    ) as server:
        async with connect(server.port, session_id) as client:
            await greet(client)
            await client.send("analyze", ticker="AAPL")
            started = await client.recv(IO)
            assert started["type"] == "analysis_started"
            await trio.sleep(0.1)
            server.process.send_signal(signum)
            frames, code = await client.recv_until_closed(IO)
            assert frames == [
                {
                    "type": "analysis_cancelled",
                    "analysis_id": started["analysis_id"],
                    "ticker": "AAPL",
                    "reason": "cancelled",
                }
            ]
            assert code == 1001
        with trio.fail_after(5):
            assert await server.process.wait() == 0
    # JSON lines, as asked for, and the shutdown is logged.
    records = [json.loads(line) for line in server.log_lines()]
    assert records
    assert any(signum.name in json.dumps(r) for r in records), records
    # Nothing half-stored: the analysis is no longer current, and it stored nothing.
    async with open_redis(real_redis.url) as redis:
        store = await open_store(redis, key_prefix=key_prefix)
        portfolio = await store.get(session_id)
    assert portfolio is not None
    assert portfolio.current_analysis is None
    assert portfolio.analysis_results == ()


async def test_shutdown_with_idle_and_v1_clients(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    """Every kind of connection gets its 1001, and the process still exits 0 promptly."""
    args = ["--redis-url", real_redis.url, "--key-prefix", key_prefix]
    async with server_process(*args, "--metric-delay-seconds", "0.5,1", env=clean_env()) as server:
        async with (
            connect(server.port, "idle-v2") as idle,
            connect(server.port, "busy-v1", v2=False) as busy,
        ):
            await greet(idle)
            await busy.send("analyze", ticker="MSFT")
            await trio.sleep(0.2)
            server.process.send_signal(signal.SIGTERM)
            idle_frames, idle_code = await idle.recv_until_closed(IO)
            busy_frames, busy_code = await busy.recv_until_closed(IO)
        assert (idle_frames, idle_code) == ([], 1001)
        assert busy_code == 1001
        assert {f["type"] for f in busy_frames} <= {"analysis_result"}  # v1: no events
        with trio.fail_after(5):
            assert await server.process.wait() == 0


# -- the embedded Redis -----------------------------------------------------------------------


async def test_embedded_redis_persists_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    session_id = "embedded-" + secrets.token_hex(4)
    args = ["--data-dir", str(data_dir), "--metric-delay-seconds", "0.02,0.1"]
    async with server_process(*args, env=clean_env()) as server:
        async with connect(server.port, session_id) as client:
            greeting = await greet(client)
            assert greeting["portfolio"]["analysis_results"] == []
            await client.send("analyze", ticker="GOOGL")
            frames = await client.recv_until(is_type("analysis_complete"), timeout=IO)
            results = [f for f in frames if f["type"] == "analysis_result"]
            assert len(results) == 5
            await client.send("set_holdings", holdings={"GOOGL": 3, "AMZN": 4})
            before = (await client.recv_until(is_type("portfolio"), timeout=IO))[-1]
        assert len(redis_servers_in(data_dir)) == 1, "no embedded redis-server seen"
        assert await server.stop() == 0
    await no_redis_servers_in(data_dir)
    assert any(p.name.startswith("appendonly") for p in data_dir.iterdir())

    async with server_process(*args, env=clean_env()) as server:
        async with connect(server.port, session_id) as client:
            after = (await greet(client))["portfolio"]
        assert await server.stop() == 0
    await no_redis_servers_in(data_dir)
    assert after["holdings"] == {"GOOGL": 3.0, "AMZN": 4.0}
    assert after["portfolio_version"] == before["portfolio_version"]
    # The same five results (stored in commit order, which may differ from the order sent).
    assert sorted(after["analysis_results"], key=lambda r: r["metric"]) == sorted(
        results, key=lambda r: r["metric"]
    )


# -- the CLI ------------------------------------------------------------------------------------


async def test_demo_against_a_running_server(real_redis: RedisServerInfo, key_prefix: str) -> None:
    args = ["--redis-url", real_redis.url, "--key-prefix", key_prefix]
    async with server_process(
        *args, "--metric-delay-seconds", "0.1,0.3", env=clean_env()
    ) as server:
        await wait_for_ready(server.port)
        url = f"ws://127.0.0.1:{server.port}/ws/demo-{secrets.token_hex(4)}"
        done = await run_cli("demo", url, "--timeout", "30")
        output = done.stdout.decode()
        assert done.returncode == 0, output + done.stderr.decode()
        assert await server.stop() == 0
    lines = output.splitlines()
    switch = lines.index(">>> Switching: analyze GOOGL (cancel-on-switch)")
    aapl_results = [i for i, line in enumerate(lines) if re.match(r"\s+<-\s+AAPL \|", line)]
    googl_results = [i for i, line in enumerate(lines) if re.match(r"\s+<-\s+GOOGL \|", line)]
    first_googl = next(i for i, line in enumerate(lines) if "'ticker': 'GOOGL'" in line)
    assert len(aapl_results) >= 2
    assert aapl_results[1] < switch < first_googl
    assert all(i < first_googl for i in aapl_results), output
    assert len(googl_results) == 5
    assert first_googl < googl_results[0]
    assert "'reason': 'switched'" in output
    assert "no AAPL results after the switch" in output


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["serve", "demo", "config"]),
        (["serve"], ["--redis-url", "--port", "--data-dir", "--metric-delay-seconds"]),
        (["demo"], ["url", "--timeout"]),
        (["config"], ["--redis-url", "--config"]),
    ],
    ids=["top", "serve", "demo", "config"],
)
async def test_help(command: list[str], expected: list[str]) -> None:
    done = await run_cli(*command, "--help")
    assert done.returncode == 0
    text = done.stdout.decode()
    assert text.startswith(f"usage: trio-portfolio {' '.join(command)}".rstrip())
    for word in expected:
        assert word in text


async def test_config_masks_the_redis_password() -> None:
    done = await run_cli(
        "config", "--redis-url", "redis://alice:s3cr3t-pw@db.example:6380/2", "--port", "9001"
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert 'redis_url = "redis://alice:***@db.example:6380/2"' in text
    assert "port = 9001" in text
    assert "s3cr3t" not in text + done.stderr.decode()
    # From the environment as well, and as a ?password= query parameter.
    env = clean_env(PORTFOLIO_REDIS_URL="redis://db.example/0?password=hunter2&db=1")
    done = await run_cli("config", env=env)
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert "hunter2" not in text + done.stderr.decode()
    assert "password=***" in text


async def test_config_reports_a_bad_setting_by_name() -> None:
    done = await run_cli("config", "--port", "70000")
    assert done.returncode != 0
    assert "--port" in done.stderr.decode()
