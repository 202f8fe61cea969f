"""The Sentinel client against a real local setup: a master, a replica, three sentinels.

Started once per module from Debian's ``redis-server`` (>= 7.0, also run as
``--sentinel``); skipped when it is missing.  The failover test prints how
long calls answered ``store_unavailable`` (or READONLY-then-retried) before
the promoted replica served them.
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

import attrs
import pytest
import redis as sync_redis
import trio

from trio_portfolio.redis_connect import open_redis
from trio_portfolio.redis_io import StoreUnavailable
from trio_portfolio.redis_sentinel import SentinelClient, parse_sentinel_url
from trio_portfolio.store import open_store

SERVER = Path("/usr/bin/redis-server")
NAME = "portfolio"


@attrs.frozen
class LocalSentinel:
    data_ports: tuple[int, ...]
    sentinel_ports: tuple[int, ...]

    @property
    def url(self) -> str:
        return (
            "redis+sentinel://"
            + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
            + f"/{NAME}"
        )

    def master_port(self) -> int:
        with sync_redis.Redis(port=self.sentinel_ports[0], decode_responses=True) as c:
            return int(c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", NAME)[1])

    def ready(self) -> bool:
        for port in self.sentinel_ports:
            with sync_redis.Redis(port=port, decode_responses=True) as c:
                fields = c.execute_command("SENTINEL", "MASTER", NAME)
                pairs = (
                    zip(fields[::2], fields[1::2], strict=False) if isinstance(fields, list) else ()
                )
                info = fields if isinstance(fields, dict) else dict(pairs)
                if info.get("flags") != "master" or int(info["num-slaves"]) < 1:
                    return False
                if int(info["num-other-sentinels"]) != len(self.sentinel_ports) - 1:
                    return False
        master = self.master_port()
        replica = next(p for p in self.data_ports if p != master)
        with sync_redis.Redis(port=replica, decode_responses=True) as c:
            repl = c.info("replication")
        return bool(repl.get("master_link_status") == "up" and int(repl["master_port"]) == master)

    def wait_ready(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.ready():
                    return
            except (sync_redis.RedisError, KeyError, StopIteration):
                pass
            time.sleep(0.1)
        raise RuntimeError("sentinel setup not ready in time")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ping(port: int) -> None:
    for _ in range(300):
        try:
            with sync_redis.Redis(port=port, socket_timeout=1) as c:
                c.ping()
            return
        except sync_redis.RedisError:
            time.sleep(0.02)
    raise RuntimeError(f"port {port} never answered")


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LocalSentinel]:
    if not SERVER.exists():
        pytest.skip("needs /usr/bin/redis-server >= 7")
    workdir = Path(tempfile.mkdtemp(prefix="portfolio-sentinel-test-"))
    procs: list[subprocess.Popen[bytes]] = []
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
              "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]  # fmt: skip

    def start(args: list[str]) -> None:
        procs.append(
            subprocess.Popen(
                [os.fspath(SERVER), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )

    try:
        master, replica = _port(), _port()
        start(["--port", str(master), "--dir", os.fspath(workdir), *common])
        _wait_ping(master)
        start(["--port", str(replica), "--dir", os.fspath(workdir), *common,
               "--replicaof", "127.0.0.1", str(master)])  # fmt: skip
        _wait_ping(replica)
        sentinels = []
        for i in range(3):
            port = _port()
            conf = workdir / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                f"sentinel monitor {NAME} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {NAME} 1000\n"
                f"sentinel failover-timeout {NAME} 5000\n"
            )
            start([os.fspath(conf), "--sentinel"])
            sentinels.append(port)
        for port in sentinels:
            _wait_ping(port)
        setup = LocalSentinel((master, replica), tuple(sentinels))
        setup.wait_ready()
        yield setup
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def test_sentinel_url_parsing() -> None:
    sentinels, name, template = parse_sentinel_url(
        "redis+sentinel://u:pw@h1:26379,h2:26380/mymaster/2"
    )
    assert [(s.host, s.port, s.password) for s in sentinels] == [
        ("h1", 26379, None),
        ("h2", 26380, None),
    ]
    assert (name, template.db, template.username, template.password) == ("mymaster", 2, "u", "pw")
    with pytest.raises(ValueError, match="names the master"):
        parse_sentinel_url("redis+sentinel://h1:26379")


async def test_discovers_the_master_and_serves_the_store(sentinel: LocalSentinel) -> None:
    async with open_redis(sentinel.url) as client:
        assert isinstance(client, SentinelClient)
        assert client.params.port == sentinel.master_port()
        store = await open_store(client, layout="hash", key_prefix=f"t{random.getrandbits(32):x}")
        created = await store.create_if_missing(
            "s1", {"AAPL": 1.0}, {"AAPL": 2.0}, "2026-01-01T00:00:00Z"
        )
        assert created.portfolio_version == 1
        assert await client.wait_for_replicas(1, 1000) == 1


async def test_failover_calls_continue_after_a_brief_unavailability(
    sentinel: LocalSentinel,
) -> None:
    key = f"fo-{random.getrandbits(32):x}"
    async with open_redis(sentinel.url, timeout=2, reconnect_backoff=0.1) as client:
        assert isinstance(client, SentinelClient)
        old = client.params.port
        await client.execute("SET", key, "0")
        outcomes = {"ok": 0, "unavailable": 0}
        first_error: list[float] = []
        recovered: list[float] = []
        failover_done = trio.Event()

        async def writer() -> None:
            n = 0
            while not (failover_done.is_set() and recovered):
                n += 1
                try:
                    assert await client.execute("INCR", key) >= 1
                    outcomes["ok"] += 1
                    if first_error and not recovered and client.params.port != old:
                        recovered.append(trio.current_time())
                except StoreUnavailable:
                    outcomes["unavailable"] += 1
                    if not first_error:
                        first_error.append(trio.current_time())
                await trio.sleep(0.01)

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await trio.sleep(0.2)
                started = trio.current_time()
                with sync_redis.Redis(port=sentinel.sentinel_ports[0]) as c:
                    await trio.to_thread.run_sync(
                        lambda: c.execute_command("SENTINEL", "FAILOVER", NAME)
                    )
                for _ in range(600):
                    if client.params.port != old:
                        break
                    await trio.sleep(0.05)
                switched = trio.current_time() - started
                failover_done.set()
                if not first_error:
                    recovered.append(trio.current_time())
        stats = client.sentinel_statistics()
        window = (recovered[0] - first_error[0]) if first_error else 0.0
        print(
            f"\nsentinel failover: client on the new master {switched:.2f} s after SENTINEL "
            f"FAILOVER; calls unavailable for {window:.2f} s ({outcomes['unavailable']} failed, "
            f"{outcomes['ok']} ok, {stats.read_only_retries} READONLY retries, "
            f"{stats.switch_messages} +switch-master heard)"
        )
        assert client.params.port != old
        assert stats.switches >= 2
        assert await client.execute("INCR", key) > 1
        assert outcomes["ok"] > 0
    await trio.to_thread.run_sync(sentinel.wait_ready)
