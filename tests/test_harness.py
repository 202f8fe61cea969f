"""The integration harness: discovery, servers, store targets and the fault proxy.

Rules for this suite: every server listens on 127.0.0.1 (or is the marked
fakeredis emulator); blocking redis-py calls run in worker threads, never on
the Trio loop; every network wait is bounded by ``fail_after``; proxy
timings use the real clock with sub-second windows, since sockets don't
follow a mock clock.
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from trio_portfolio.testing import (
    ENV_URL,
    RedisServerInfo,
    RedisStartError,
    StoreTarget,
    TcpProxy,
    container_server_name,
    discover_servers,
    docker_engine_available,
    find_redis_binaries,
    in_thread,
    list_redis_binaries,
    open_tcp_proxy,
    run_redis_binary,
    run_redis_container,
    store_target_id,
    store_target_params,
)

PING = b"*1\r\n$4\r\nPING\r\n"


def client(url: str, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


# -- servers ---------------------------------------------------------------------------


async def test_server_answers_ping(redis_server: RedisServerInfo, key_prefix: str) -> None:
    def check() -> bytes | None:
        with client(redis_server.url) as c:
            assert c.ping()
            c.set(f"{key_prefix}:k", "v")
            value = c.get(f"{key_prefix}:k")
            c.delete(f"{key_prefix}:k")
            return value  # type: ignore[no-any-return]

    assert await in_thread(check) == b"v"


async def test_has_json_is_right(redis_server: RedisServerInfo, key_prefix: str) -> None:
    key = f"{key_prefix}:doc"

    def json_works() -> bool:
        with client(redis_server.url) as c:
            try:
                c.execute_command("JSON.SET", key, "$", '{"a":1}')
            except redis.ResponseError:
                return False
            reply = c.execute_command("JSON.GET", key, "$")
            c.delete(key)
        # fakeredis renders JSON with spaces after separators
        assert reply in (b'[{"a":1}]', b'[{"a": 1}]')
        return True

    assert await in_thread(json_works) is redis_server.has_json


async def test_store_target_layout_is_usable(store_target: StoreTarget, key_prefix: str) -> None:
    server, key = store_target.server, f"{key_prefix}:session"

    def roundtrip() -> object:
        with client(server.url) as c:
            if store_target.layout == "json":
                c.execute_command("JSON.SET", key, "$", '{"v":2}')
                reply = c.execute_command("JSON.GET", key, "$.v")
            else:
                c.hset(key, "v", "2")
                reply = c.hget(key, "v")
            c.delete(key)
            return reply

    assert store_target.layout == "hash" or server.has_json
    assert await in_thread(roundtrip) in (b"2", b"[2]")


def test_real_redis_is_real(real_redis: RedisServerInfo) -> None:
    assert not real_redis.emulated
    with client(real_redis.url) as c:
        assert c.info("server")["redis_version"] == real_redis.version


def test_discovery_is_cheap_and_covers_json() -> None:
    started = time.monotonic()
    specs = discover_servers(docker_timeout=0.5)
    assert time.monotonic() - started < 5
    names = [spec.name for spec in specs]
    assert len(set(names)) == len(names)
    assert any(spec.has_json for spec in specs), "the json layout must run somewhere"
    emulated = [spec for spec in specs if spec.emulated]
    if not any(spec.has_json for spec in specs if not spec.emulated):
        assert [spec.name for spec in emulated] == ["fakeredis-8.0"]
    ids = {store_target_id(*pair) for pair in store_target_params(specs)}
    assert ids >= {store_target_id(spec, "hash") for spec in specs}
    if emulated:
        assert "json-fakeredis-8.0(emulated)" in ids


def test_env_url_means_just_that_server(
    monkeypatch: pytest.MonkeyPatch, real_redis: RedisServerInfo
) -> None:
    monkeypatch.setenv(ENV_URL, real_redis.url)
    specs = discover_servers()
    assert [spec.name for spec in specs if not spec.emulated] == ["env"]
    assert specs[0].version == real_redis.version
    assert specs[0].has_json is real_redis.has_json
    assert any(spec.emulated for spec in specs) is not real_redis.has_json
    with specs[0].start() as info:
        assert (info.url, info.version, info.emulated) == (
            real_redis.url,
            real_redis.version,
            False,
        )


def test_docker_probe_fails_fast_without_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    started = time.monotonic()
    assert docker_engine_available(timeout=2.0) is False
    assert time.monotonic() - started < 1


def test_docker_probe_uses_the_sdk_when_the_engine_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pinged: list[bool] = []

    class Client:
        def ping(self) -> bool:
            pinged.append(True)
            return True

        def close(self) -> None:
            pass

    def broken_from_env(timeout: int) -> Client:
        raise RuntimeError("engine says no")

    sdk = types.ModuleType("docker")
    with tempfile.TemporaryDirectory() as short, socket.socket(socket.AF_UNIX) as engine:
        engine.bind(f"{short}/d.sock")
        engine.listen()
        monkeypatch.setenv("DOCKER_HOST", f"unix://{short}/d.sock")
        monkeypatch.setitem(sys.modules, "docker", sdk)
        sdk.from_env = lambda timeout: Client()  # type: ignore[attr-defined]
        assert docker_engine_available(timeout=1.0) is True
        assert pinged == [True]
        sdk.from_env = broken_from_env  # type: ignore[attr-defined]
        assert docker_engine_available(timeout=1.0) is False


def test_container_path_with_a_stand_in_for_testcontainers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Docker is not needed to check our side of the testcontainers API."""

    class StandInContainer:
        def __init__(self, image: str) -> None:
            assert image == "redis:8"
            self._server = run_redis_binary(find_redis_binaries()[0])

        def __enter__(self) -> StandInContainer:
            self._info = self._server.__enter__()
            return self

        def __exit__(self, *exc_info: Any) -> None:
            self._server.__exit__(*exc_info)

        def get_container_host_ip(self) -> str:
            return "127.0.0.1"

        def get_exposed_port(self, port: int) -> str:
            assert port == 6379
            return str(self._info.address[1])

    module = types.ModuleType("testcontainers.community.redis")
    module.RedisContainer = StandInContainer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "testcontainers.community.redis", module)
    with run_redis_container("redis:8") as info:
        assert (info.name, info.emulated) == ("docker-redis-8.x", False)
        with client(info.url) as c:
            assert c.info("server")["redis_version"] == info.version


def test_container_names() -> None:
    assert container_server_name("redis:8") == "docker-redis-8.x"
    assert container_server_name("redis:7.2.4") == "docker-redis-7.2.4"
    assert (
        container_server_name("redis/redis-stack-server")
        == "docker-redis-redis-stack-server-latest"
    )


def test_binaries_are_real_and_distinct() -> None:
    binaries = list_redis_binaries()
    assert binaries, "the suite needs at least one redis-server (CI installs one)"
    assert [b.path for b in binaries] == find_redis_binaries()
    assert len({b.version for b in binaries}) == len(binaries)
    assert [b.version_info for b in binaries] == sorted(
        (b.version_info for b in binaries), reverse=True
    )
    for binary in binaries:
        assert binary.path.read_bytes()[:2] != b"#!"  # no pyenv shims
        assert binary.path.name == "redis-server"  # argv[0] picks redis's personality


def test_binary_server_is_stopped_and_cleaned_up() -> None:
    with run_redis_binary(find_redis_binaries()[-1]) as info:
        with client(info.url) as c:
            workdir = Path(c.config_get("dir")["dir"])
            assert c.config_get("save")["save"] == ""
        assert workdir.is_dir()
    assert not workdir.exists()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(info.address, timeout=1):
        pass


def test_binary_failure_reports_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: bad config' >&2\nexit 3\n")
    fake.chmod(0o755)
    with (
        pytest.raises(RedisStartError, match=r"(?s)code 3.*FATAL: bad config"),
        run_redis_binary(fake, name="broken"),
    ):
        pass


# -- the fault-injection proxy ------------------------------------------------------------


@pytest.fixture
async def proxy(real_redis: RedisServerInfo) -> AsyncIterator[TcpProxy]:
    async with open_tcp_proxy(*real_redis.address) as running:
        yield running


async def connect(proxy: TcpProxy) -> trio.SocketStream:
    with trio.fail_after(2):
        return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def ping(stream: trio.SocketStream) -> bytes:
    with trio.fail_after(2):
        await stream.send_all(PING)
        return await stream.receive_some(64)


async def closed_by_peer(stream: trio.SocketStream) -> bool:
    """Whether the peer closed: EOF, or a reset if it closed with our bytes unread."""
    with trio.fail_after(2):
        try:
            return await stream.receive_some(64) == b""
        except trio.BrokenResourceError:
            return True


async def test_proxy_forwards(proxy: TcpProxy) -> None:
    async with await connect(proxy) as stream:
        assert await ping(stream) == b"+PONG\r\n"
        assert (proxy.statistics().accepted, proxy.statistics().active) == (1, 1)
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"


async def test_cut_closes_current_connections(proxy: TcpProxy) -> None:
    first, second = await connect(proxy), await connect(proxy)
    async with first, second:
        assert await ping(first) == await ping(second) == b"+PONG\r\n"
        await proxy.cut()
        assert proxy.statistics().active == 0
        assert await closed_by_peer(first)
        assert await closed_by_peer(second)
    async with await connect(proxy) as again:
        assert await ping(again) == b"+PONG\r\n"


async def test_refuse_closes_new_connections_only(proxy: TcpProxy) -> None:
    async with await connect(proxy) as before:
        assert await ping(before) == b"+PONG\r\n"
        proxy.refuse(True)
        async with await connect(proxy) as refused:
            assert await closed_by_peer(refused)
        assert proxy.statistics().refused == 1
        assert await ping(before) == b"+PONG\r\n"
        proxy.refuse(False)
        async with await connect(proxy) as after:
            assert await ping(after) == b"+PONG\r\n"


async def test_blackhole_holds_traffic_then_releases_it(proxy: TcpProxy) -> None:
    async with await connect(proxy) as old:
        assert await ping(old) == b"+PONG\r\n"
        proxy.blackhole(True)
        async with await connect(proxy) as new:
            for stream in (old, new):
                await stream.send_all(PING)
            for stream in (old, new):
                with trio.move_on_after(0.2) as window:
                    await stream.receive_some(64)
                assert window.cancelled_caught, "a byte crossed the black hole"
            proxy.blackhole(False)
            for stream in (old, new):
                with trio.fail_after(2):
                    assert await stream.receive_some(64) == b"+PONG\r\n"


async def test_outages_as_a_redis_client_sees_them(proxy: TcpProxy) -> None:
    c = client(proxy.url, timeout=0.3)
    try:
        assert await in_thread(c.ping)
        await proxy.cut()
        assert await in_thread(c.ping), "redis-py reconnects an idle connection that was cut"
        proxy.refuse(True)
        await proxy.cut()
        with pytest.raises(redis.ConnectionError):
            await in_thread(c.ping)
        proxy.refuse(False)
        assert await in_thread(c.ping)
        proxy.blackhole(True)
        with pytest.raises(redis.TimeoutError):
            await in_thread(c.ping)
        proxy.blackhole(False)
    finally:
        await in_thread(c.close)


def test_server_address_needs_tcp() -> None:
    info = RedisServerInfo("x", "unix:///tmp/r.sock", "7.0.0", has_json=False, emulated=False)
    with pytest.raises(ValueError, match="not a TCP"):
        _ = info.address
    tcp = RedisServerInfo("x", "redis://127.0.0.1:6390/0", "7.0.0", has_json=False, emulated=False)
    assert tcp.address == ("127.0.0.1", 6390)
