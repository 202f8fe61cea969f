"""The Trio Redis adapter against a real redis-server.

Rules of this suite: localhost only, a real server from the harness
(``real_redis``), ``fail_after`` around anything that could hang, keys under
the per-test ``key_prefix``.  Cancellation has its own file,
``test_redis_cancellation.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from trio_portfolio.embedded import run_embedded_redis
from trio_portfolio.redis_io import (
    CommandError,
    ConnectionParams,
    ReplyError,
    Script,
    StoreUnavailable,
    Unavailable,
    open_redis,
)
from trio_portfolio.redis_pubsub import open_pubsub
from trio_portfolio.testing import RedisServerInfo, open_tcp_proxy
from trio_portfolio.testing.redis_clients import subscribed


async def test_commands_replies_and_errors(real_redis: RedisServerInfo, key_prefix: str) -> None:
    async with open_redis(real_redis.url) as redis:
        assert await redis.execute("SET", f"{key_prefix}:k", "välue") == "OK"
        assert await redis.execute("GET", f"{key_prefix}:k") == "välue"
        assert await redis.execute("INCRBY", f"{key_prefix}:n", 5) == 5
        assert await redis.execute("GET", f"{key_prefix}:missing") is None
        with pytest.raises(CommandError, match="WRONGTYPE") as info:
            await redis.execute("HGET", f"{key_prefix}:k", "f")
        assert info.value.code == "WRONGTYPE"
        with pytest.raises(CommandError, match="wrong number of arguments"):
            await redis.execute("SET", f"{key_prefix}:k")
        stats = redis.statistics()
        assert (stats.command_errors, stats.errors_unavailable) == (2, 0)


async def test_pipeline_returns_errors_in_place(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    async with open_redis(real_redis.url) as redis:
        k = f"{key_prefix}:p"
        replies = await redis.pipeline([("SET", k, "1"), ("HGET", k, "x"), ("INCR", k)])
        assert replies[0] == "OK"
        assert isinstance(replies[1], CommandError)
        assert replies[1].code == "WRONGTYPE"
        assert ReplyError is CommandError, "the old name stays an alias for now"
        assert replies[2] == 2
        assert await redis.pipeline([]) == []


async def test_multi_exec_inside_a_pipeline_is_a_transaction(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    async with open_redis(real_redis.url) as redis:
        k = f"{key_prefix}:t"
        replies = await redis.pipeline([("MULTI",), ("INCR", k), ("INCR", k), ("EXEC",)])
        assert replies == ["OK", "QUEUED", "QUEUED", [1, 2]]


async def test_evalsha_reloads_after_script_flush(real_redis: RedisServerInfo) -> None:
    script = Script("return {KEYS[1], ARGV[1], 'flush-test'}")
    async with open_redis(real_redis.url) as redis:
        await redis.load_scripts([script])
        assert await redis.evalsha(script, ["a"], ["b"]) == ["a", "b", "flush-test"]
        await redis.execute("SCRIPT", "FLUSH")
        assert await redis.evalsha(script, ["c"], ["d"]) == ["c", "d", "flush-test"]
        await redis.execute("SCRIPT", "FLUSH")
        replies = await redis.evalsha_many(script, [(["x"], ["1"]), (["y"], ["2"])])
        assert replies == [["x", "1", "flush-test"], ["y", "2", "flush-test"]]


async def test_many_tasks_share_few_connections(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    async with open_redis(real_redis.url, connections=2) as redis:
        results: dict[int, str] = {}

        async def worker(i: int) -> None:
            for j in range(20):
                token = f"{i}-{j}"
                assert await redis.execute("ECHO", token) == token
            results[i] = "ok"

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(worker, i)
        assert len(results) == 200
        stats = redis.statistics()
        assert stats.connects <= 2
        assert stats.commands >= 4000


def test_urls_are_parsed_with_credentials_db_tls_and_unix() -> None:
    p = ConnectionParams.from_url("redis://alice:s3cret@db.example:6380/4")
    assert (p.host, p.port, p.username, p.password, p.db, p.tls) == (
        "db.example",
        6380,
        "alice",
        "s3cret",
        4,
        False,
    )
    assert "s3cret" not in p.describe()
    assert ConnectionParams.from_url("rediss://h:1/0").tls
    assert not ConnectionParams.from_url("rediss://h:1/0?ssl_cert_reqs=none").tls_verify
    u = ConnectionParams.from_url("unix:///tmp/r.sock?db=2")
    assert (u.path, u.db) == ("/tmp/r.sock", 2)
    assert p.handshake() == [("AUTH", "alice", "s3cret"), ("SELECT", 4)]
    with pytest.raises(ValueError, match="redis://"):
        ConnectionParams.from_url("http://localhost:6379")


async def test_username_password_and_db_are_used(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    user = f"{key_prefix}-user"
    host_port = real_redis.url.split("//", 1)[1].split("/", 1)[0]
    async with open_redis(real_redis.url) as admin:
        await admin.execute("ACL", "SETUSER", user, "on", ">pw-1", "~*", "&*", "+@all")
        try:
            async with open_redis(f"redis://{user}:pw-1@{host_port}/3") as redis:
                assert await redis.execute("ACL", "WHOAMI") == user
                await redis.execute("SET", f"{key_prefix}:db3", "x")
            assert await admin.execute("EXISTS", f"{key_prefix}:db3") == 0
            async with open_redis(f"redis://{user}:wrong@{host_port}/0") as redis:
                with pytest.raises(StoreUnavailable, match="AUTH") as info:
                    await redis.ping()
                assert info.value.reason is Unavailable.AUTH_FAILED
        finally:
            await admin.execute("ACL", "DELUSER", user)
            await admin.pipeline([("SELECT", 3), ("DEL", f"{key_prefix}:db3"), ("SELECT", 0)])


async def test_unreachable_store_raises_store_unavailable_fast() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        async with open_redis(f"redis://127.0.0.1:{port}/0", reconnect_backoff=10) as redis:
            with pytest.raises(StoreUnavailable, match="cannot connect") as info:
                await redis.ping()
            assert info.value.reason is Unavailable.CONNECT_FAILED
            assert str(port) not in info.value.explanation
            with trio.fail_after(0.5):  # within the backoff: no new connect attempt
                with pytest.raises(StoreUnavailable):
                    await redis.ping()
            assert redis.statistics().connect_failures == 1


async def test_reconnects_after_connection_loss(real_redis: RedisServerInfo) -> None:
    async with open_redis(real_redis.url, connections=1) as redis:
        my_id = await redis.execute("CLIENT", "ID")
        async with open_redis(real_redis.url) as admin:
            await admin.execute("CLIENT", "KILL", "ID", my_id)
        with trio.fail_after(5):
            while True:
                try:
                    assert await redis.execute("ECHO", "back") == "back"
                    break
                except StoreUnavailable:
                    await trio.sleep(0.01)
        assert await redis.execute("CLIENT", "ID") != my_id
        assert redis.statistics().connects == 2


async def test_a_stalled_connection_is_dropped_and_the_next_call_recovers(
    real_redis: RedisServerInfo,
) -> None:
    """The caller's deadline fails its call; the watchdog's stall timeout drops the connection."""
    async with (
        open_tcp_proxy(*real_redis.address) as proxy,
        open_redis(proxy.url, connections=1, timeout=0.3, stall_timeout=0.6) as redis,
    ):
        assert await redis.execute("ECHO", "a") == "a"
        proxy.blackhole(True)
        with trio.fail_after(2), pytest.raises(StoreUnavailable, match="did not answer") as info:
            await redis.execute("ECHO", "lost")
        assert info.value.reason is Unavailable.TIMEOUT
        assert info.value.maybe_executed
        assert redis.statistics().connects == 1, "a timeout alone must not cost the connection"
        await trio.sleep(0.5)  # past the stall timeout: nothing came back
        proxy.blackhole(False)
        with trio.fail_after(2):
            assert await redis.execute("ECHO", "b") == "b"
        stats = redis.statistics()
        assert (stats.timeouts, stats.connections_stalled) == (1, 1)
        assert (stats.connects, stats.reconnects) == (2, 1)


async def test_pubsub_delivers_and_resubscribes_after_loss(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    channel = f"{key_prefix}:events"
    async with subscribed(real_redis.url, channel) as (redis, pubsub):
        with trio.fail_after(5):
            assert await redis.execute("PUBLISH", channel, "one") == 1
            message = await pubsub.messages.receive()
            assert (message.channel, message.data) == (channel, "one")
            await redis.execute("CLIENT", "KILL", "TYPE", "pubsub")
            while pubsub.reconnects < 1:  # noqa: ASYNC110 - polls the reconnect counter
                await trio.sleep(0.01)
            await pubsub.subscribe(channel)  # waits for the automatic resubscription
            await redis.execute("PUBLISH", channel, "two")
            assert (await pubsub.messages.receive()).data == "two"
            pubsub.unsubscribe(channel)
            while await redis.execute("PUBSUB", "NUMSUB", channel) != [channel, 0]:  # noqa: ASYNC110
                await trio.sleep(0.01)
        stats = pubsub.statistics()
        assert (stats.connects, stats.reconnects, stats.messages_received) == (2, 1, 2)


async def test_unix_socket_url(tmp_path: Path) -> None:
    """``unix://`` reaches a real redis-server (the embedded one listens only there)."""
    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_embedded_redis, tmp_path / "data")
        assert url.startswith("unix://")
        async with open_redis(f"{url}?db=2") as redis:
            assert await redis.execute("SET", "k", "v") == "OK"
            assert await redis.execute("CLIENT", "INFO") is not None
            assert "db=2" in await redis.execute("CLIENT", "INFO")
        nursery.cancel_scope.cancel()


async def test_pubsub_heartbeat_and_subscription_churn_share_the_socket(
    real_redis: RedisServerInfo,
) -> None:
    """Heartbeat PINGs and (un)subscribes both write: they must take turns, not crash."""
    channels = [f"churn-{i}" for i in range(200)]
    async with open_pubsub(real_redis.url, heartbeat=0.001) as pubsub:
        with trio.move_on_after(1.0):
            while True:
                await pubsub.subscribe(*channels, timeout=5)
                pubsub.unsubscribe(*channels)
        assert pubsub.connected
