"""Admission (``trio_portfolio.admission``): one client must not be able to hurt the others.

Rules of this suite: the pure rules (buckets, addresses, counts) are
driven directly with explicit times; everything else runs a whole server
in-process on 127.0.0.1, port 0, against the harness's real redis-server,
and talks to it over real sockets.  Distinct clients are simulated with
``X-Forwarded-For`` through a trusted proxy ``127.0.0.1`` (so the
well-behaved client, which sends none, is ``127.0.0.1`` itself), or by
binding the client socket to ``127.0.0.2``.  Every wait is bounded.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from frontdoor_client import (
    forwarded,
    handshake,
    http,
    new_session_id,
    open_stream,
    raw_websocket,
)

from trio_portfolio.admission import (
    ConnectionCounts,
    SessionRateLimiter,
    address_key,
    client_address,
    parse_networks,
    session_cap_refusal,
)
from trio_portfolio.metrics import ERRORS
from trio_portfolio.redis_io import open_redis
from trio_portfolio.store import SessionKeys
from trio_portfolio.testing import RedisServerInfo
from trio_portfolio.testing.live_server import LiveServer, open_client, open_live_server
from trio_portfolio.testing.live_server import test_settings as server_settings

IO = 10.0
FAST = (0.01, 0.05)
PROXY = {"trusted_proxies": ("127.0.0.1/32",)}


@asynccontextmanager
async def live(redis: RedisServerInfo, **overrides: Any) -> AsyncIterator[LiveServer]:
    overrides.setdefault("metric_delay_seconds", FAST)
    async with open_live_server(server_settings(redis.url, **overrides)) as server:
        yield server


async def analyse_as_good_client(server: LiveServer) -> None:
    """A well-behaved client (127.0.0.1, no forwarding) opens a session and completes one."""
    async with open_client(server, new_session_id()) as client:
        assert (await client.recv(IO))["type"] == "session"
        await client.send("analyze", ticker="AAPL")
        frames = await client.recv_until(lambda f: f["type"] == "analysis_complete", IO)
        assert sum(f["type"] == "analysis_result" for f in frames) == 5


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait (bounded) until ``predicate()`` holds, polling."""
    with trio.fail_after(IO):
        for _ in itertools.count():
            if predicate():
                return
            await trio.sleep(0.01)


async def post_session(server: LiveServer, address: str | None = None) -> Any:
    headers = forwarded(address) if address else []
    return await http(server.port, "POST", "/session", headers=headers)


# -- the pure rules -------------------------------------------------------------------------


def test_bucket_allows_a_burst_then_the_rate() -> None:
    limiter = SessionRateLimiter(rate=2.0, burst=3, max_addresses=10)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [None, None, None]
    refused = limiter.take("a", 0.0)
    assert refused is not None
    assert (refused.status, refused.code) == (429, "session_rate_limited")
    assert refused.retry_after == pytest.approx(0.5)
    assert refused.headers() == [("retry-after", "1")]
    assert limiter.take("b", 0.0) is None  # another address is not affected
    assert limiter.take("a", 0.5) is None  # one token back after 1/rate
    assert limiter.take("a", 0.5) is not None
    # A refused attempt takes nothing: still one token at 1.0.
    assert limiter.take("a", 1.0) is None


def test_bucket_map_is_bounded_and_pruned() -> None:
    limiter = SessionRateLimiter(rate=1.0, burst=2, max_addresses=100)
    for i in range(1000):
        limiter.take(f"10.0.{i // 256}.{i % 256}", i * 0.001)  # 1000 addresses within 1 s
    assert len(limiter) == 100  # never more than max_addresses
    # Later, every one of them has refilled: the map drains as traffic goes on.
    for i in range(100):
        limiter.take("192.0.2.1", 100.0 + i)
    assert len(limiter) == 1


def test_client_address_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    trusted = parse_networks(["127.0.0.1/32", "10.0.0.0/8"])
    xff = [b"203.0.113.9, 198.51.100.7", b"10.1.2.3"]
    # Peer is a trusted proxy: walk right to left past trusted hops.
    assert client_address("127.0.0.1", xff, trusted) == "198.51.100.7"
    # Peer untrusted: its header is ignored.
    assert client_address("192.0.2.50", xff, trusted) == "192.0.2.50"
    assert client_address("127.0.0.1", xff, ()) == "127.0.0.1"
    # No header, or garbage: the proxy itself, or the last trusted hop.
    assert client_address("127.0.0.1", [], trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", [b"not-an-ip"], trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", [b"[2001:db8::1]:443"], trusted) == "2001:db8::1"
    assert client_address("::ffff:127.0.0.1", [b"192.0.2.1"], trusted) == "192.0.2.1"
    assert client_address(None, xff, trusted) is None


def test_ipv6_clients_are_keyed_per_64() -> None:
    assert address_key("2001:db8:1:2:3:4:5:6") == address_key("2001:db8:1:2:ffff::1")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert ipaddress.ip_network(address_key("2001:db8:1:2::1")).prefixlen == 64
    assert address_key("192.0.2.1") == "192.0.2.1"


def test_connection_counts() -> None:
    counts = ConnectionCounts(limit=2)
    assert counts.open("a") is None
    assert counts.open("a") is None
    refused = counts.open("a")
    assert refused is not None
    assert refused.status == 429
    assert counts.open("b") is None
    counts.close("a")
    assert counts.open("a") is None
    for _ in range(2):
        counts.close("a")
    counts.close("b")
    assert len(counts) == 0  # entries exist only while connections do


def test_session_cap() -> None:
    assert session_cap_refusal(9, 10) is None
    refused = session_cap_refusal(10, 10)
    assert refused is not None
    assert refused.status == 503


# -- from outside --------------------------------------------------------------------------


async def test_post_session_flood_gets_429_and_another_client_still_works(
    real_redis: RedisServerInfo,
) -> None:
    async with live(real_redis, session_burst=5, sessions_per_second=1.0, **PROXY) as server:
        statuses = [(await post_session(server, "198.51.100.7")).status for _ in range(12)]
        assert statuses[:5] == [201] * 5
        assert statuses[5:] == [429] * 7
        refused = await post_session(server, "198.51.100.7")
        assert refused.status == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 2
        assert refused.json()["error"] == "session_rate_limited"
        # Another address, and the well-behaved local client, are unaffected.
        assert (await post_session(server, "198.51.100.8")).status == 201
        assert (await post_session(server)).status == 201
        await analyse_as_good_client(server)
        # After 1/rate, the flooder gets one more.
        await trio.sleep(1.05)
        assert (await post_session(server, "198.51.100.7")).status == 201


async def test_forwarded_for_is_ignored_without_a_trusted_proxy(
    real_redis: RedisServerInfo,
) -> None:
    async with live(real_redis, session_burst=2, sessions_per_second=0.01) as server:
        statuses = [(await post_session(server, f"198.51.100.{i}")).status for i in range(4)]
        assert statuses == [201, 201, 429, 429]  # all charged to 127.0.0.1


async def test_creating_connects_are_rate_limited_at_the_handshake(
    real_redis: RedisServerInfo,
) -> None:
    async with live(real_redis, session_burst=3, sessions_per_second=0.01, **PROXY) as server:
        flood = forwarded("203.0.113.5")
        ids = [new_session_id() for _ in range(5)]
        async with raw_websocket(
            server.port, f"/ws/{ids[0]}", subprotocols=["portfolio.v2"], headers=flood
        ) as first:
            assert (await first.recv_json())["type"] == "session"  # created
        statuses = [
            (await handshake(server.port, f"/ws/{i}", headers=flood)).status for i in ids[1:]
        ]
        assert statuses == [101, 101, 429, 429]
        refused = await handshake(server.port, f"/ws/{new_session_id()}", headers=flood)
        assert refused.status == 429
        assert "retry-after" in refused.headers
        assert refused.json()["error"] == "session_rate_limited"
        # Connecting to an existing session is not a creation.
        for _ in range(5):
            assert (await handshake(server.port, f"/ws/{ids[0]}", headers=flood)).status == 101
        await analyse_as_good_client(server)


async def test_global_session_cap_is_503(real_redis: RedisServerInfo) -> None:
    async with live(real_redis, max_sessions=3) as server:
        first = (await post_session(server)).json()["session_id"]
        async with raw_websocket(
            server.port, f"/ws/{new_session_id()}", subprotocols=["portfolio.v2"]
        ) as second:
            assert (await second.recv_json())["type"] == "session"
        assert (await post_session(server)).status == 201
        # Three live sessions now.
        full = await post_session(server)
        assert full.status == 503
        assert full.json()["error"] == "too_many_sessions"
        assert "retry-after" in full.headers
        refused = await handshake(server.port, f"/ws/{new_session_id()}")
        assert refused.status == 503
        assert refused.json()["error"] == "too_many_sessions"
        # An existing session is still reachable.
        async with open_client(server, first) as client:
            assert (await client.recv(IO))["session_id"] == first
        async with open_redis(real_redis.url) as redis:
            store = SessionKeys(server.settings.key_prefix)
            sizes = await redis.pipeline([("SCARD", key) for key in store.index_keys()])
            assert sum(sizes) == 3


async def test_connections_per_address_are_capped_at_the_handshake(
    real_redis: RedisServerInfo,
) -> None:
    async with (
        live(real_redis, max_connections_per_address=3, **PROXY) as server,
        AsyncExitStack() as held,
    ):
        session_id = new_session_id()
        for _ in range(3):
            await held.enter_async_context(
                _held_websocket(server.port, session_id, forwarded("192.0.2.77"))
            )
        refused = await handshake(server.port, f"/ws/{session_id}", headers=forwarded("192.0.2.77"))
        assert refused.status == 429
        assert refused.json()["error"] == "too_many_connections_per_address"
        other = await handshake(server.port, f"/ws/{session_id}", headers=forwarded("192.0.2.78"))
        assert other.status == 101
        await analyse_as_good_client(server)
    # (the held sockets are closed: the count goes back down, see below)


async def test_a_flood_from_another_loopback_address_leaves_127_0_0_1_alone(
    real_redis: RedisServerInfo,
) -> None:
    """No proxy: the client address is the socket's (bound to 127.0.0.2)."""
    async with live(real_redis, session_burst=4, sessions_per_second=0.01) as server:
        replies = [
            await http(server.port, "POST", "/session", source="127.0.0.2") for _ in range(8)
        ]
        assert [r.status for r in replies] == [201] * 4 + [429] * 4
        flood = [
            (await handshake(server.port, f"/ws/{new_session_id()}", source="127.0.0.2")).status
            for _ in range(3)
        ]
        assert flood == [429] * 3
        assert (await post_session(server)).status == 201
        await analyse_as_good_client(server)


async def test_connection_counts_are_released_when_clients_leave(
    real_redis: RedisServerInfo,
) -> None:
    async with live(real_redis, max_connections_per_address=2, **PROXY) as server:
        session_id = new_session_id()
        for _ in range(3):  # each round holds two and is refused a third, then lets go
            async with (
                _held_websocket(server.port, session_id, forwarded("192.0.2.1")),
                _held_websocket(server.port, session_id, forwarded("192.0.2.1")),
            ):
                status = (
                    await handshake(
                        server.port, f"/ws/{session_id}", headers=forwarded("192.0.2.1")
                    )
                ).status
                assert status == 429
            await eventually(lambda: not server.info.server.address_connections.count("192.0.2.1"))


async def test_idle_tcp_connections_count_against_max_connections(
    real_redis: RedisServerInfo,
) -> None:
    async with live(real_redis, max_connections=3) as server, AsyncExitStack() as held:
        for _ in range(3):
            await held.enter_async_context(await open_stream(server.port))  # never send a byte
        await eventually(lambda: server.info.server.tcp_connections >= 3)
        full = await http(server.port, "GET", "/health")
        assert full.status == 503
        assert full.json()["error"] == "service_unavailable"
        refused = await handshake(server.port, f"/ws/{new_session_id()}")
        assert refused.status == 503
        await held.aclose()
        await eventually(lambda: server.info.server.tcp_connections == 0)
        assert (await http(server.port, "GET", "/health")).status == 200
        await analyse_as_good_client(server)


@asynccontextmanager
async def _held_websocket(
    port: int, session_id: str, headers: list[tuple[str, str]]
) -> AsyncIterator[None]:
    """An accepted WebSocket kept open for the block."""
    async with raw_websocket(port, f"/ws/{session_id}", headers=headers):
        yield


async def test_flood_figures(real_redis: RedisServerInfo) -> None:
    """The figures README quotes: a one-address flood at default limits, refusals by reason.

    Run with ``-s`` to see them.  Defaults: bursts of 100 new sessions, then 10/s.
    """
    async with live(real_redis, **PROXY) as server:
        flood = forwarded("198.51.100.99")
        start = trio.current_time()
        posts = [(await post_session(server, "198.51.100.99")).status for _ in range(1000)]
        post_seconds = trio.current_time() - start
        start = trio.current_time()
        connects = [
            (await handshake(server.port, f"/ws/{new_session_id()}", headers=flood)).status
            for _ in range(500)
        ]
        connect_seconds = trio.current_time() - start
        start = trio.current_time()
        await analyse_as_good_client(server)
        good_seconds = trio.current_time() - start
        metrics = server.info.server.metrics
        refused = {code: int(metrics.value(ERRORS, code)) for code in ERRORS.label_values}
        nonzero = {code: count for code, count in refused.items() if count}
    granted = posts.count(201)
    print(
        f"\n1000 POST /session from one address in {post_seconds:.1f} s: "
        f"{granted} x 201, {posts.count(429)} x 429"
        f"\n500 creating connects from it in {connect_seconds:.1f} s: "
        f"{connects.count(101)} x 101, {connects.count(429)} x 429"
        f"\nmeanwhile another client's session + full analysis: {good_seconds:.2f} s"
        f"\nrefusals by reason: {nonzero}"
    )
    # The burst, plus what the rate refilled meanwhile (10/s), and not much more.
    assert 100 <= granted <= 100 + 10 * post_seconds + 2
    assert set(posts) == {201, 429}
    assert connects.count(101) <= 10 * (post_seconds + connect_seconds) + 2
