"""The cluster router against a real local Redis Cluster (3 masters, 3 replicas).

Started once per module from Debian's ``redis-server`` (>= 7.0) with
``redis-cli --cluster create``; skipped when neither is installed.  Tests
that change the topology (resharding a slot, failing a master over) put it
back or leave it whole, so the order of tests does not matter.  Every wait
is under ``fail_after``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis as sync_redis
import trio

from trio_portfolio.redis_cluster import (
    ClusterClient,
    command_keys,
    key_slot,
    parse_cluster_url,
)
from trio_portfolio.redis_connect import open_redis
from trio_portfolio.redis_io import (
    CommandError,
    RedisClient,
    Script,
    StoreUnavailable,
    Unavailable,
)
from trio_portfolio.store import open_store

SERVER = Path("/usr/bin/redis-server")
CLI = shutil.which("redis-cli", path="/usr/bin") or shutil.which("redis-cli")

SLOW = Script(
    """
local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) >= stop
return ARGV[2]
"""
)
ECHO_KEY = Script("return {KEYS[1], ARGV[1]}")


# -- a minimal local cluster (until the shared harness lands in main) ---------------------


@attrs.frozen
class LocalCluster:
    ports: tuple[int, ...]
    pids: tuple[int, ...]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self, port: int) -> sync_redis.Redis:
        return sync_redis.Redis(port=port, decode_responses=True, socket_timeout=5, protocol=2)

    def nodes(self) -> list[dict[str, Any]]:
        """CLUSTER NODES of the first answering node, parsed."""
        for port in self.ports:
            try:
                with self.client(port) as c:
                    text = str(c.execute_command("CLUSTER", "NODES"))
            except sync_redis.RedisError:
                continue
            rows: list[dict[str, Any]] = []
            for line in text.splitlines():
                f = line.split()
                rows.append(
                    {
                        "id": f[0],
                        "port": int(f[1].split("@")[0].rsplit(":", 1)[1]),
                        "master": "master" in f[2],
                        "fail": "fail" in f[2],
                        "master_id": f[3],
                        "slots": f[8:],
                    }
                )
            return rows
        raise RuntimeError("no cluster node answers")

    def owner_port(self, slot: int) -> int:
        with self.client(self.ports[0]) as c:
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise KeyError(slot)

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ok = True
                for port in self.ports:
                    with self.client(port) as c:
                        info = c.execute_command("CLUSTER", "INFO")
                        if "cluster_state:ok" not in info:
                            ok = False
                rows = self.nodes()
                if ok and sum(r["master"] for r in rows) == 3 and not any(r["fail"] for r in rows):
                    replicas = [r for r in rows if not r["master"]]
                    if len(replicas) == 3 and all(self._link_up(int(r["port"])) for r in replicas):
                        return
            except sync_redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError("cluster not ok in time")

    def _link_up(self, port: int) -> bool:
        with self.client(port) as c:
            return bool(c.info("replication").get("master_link_status") == "up")

    def replica_of(self, master_port: int) -> int:
        rows = self.nodes()
        master_id = next(r["id"] for r in rows if r["port"] == master_port)
        return next(int(r["port"]) for r in rows if r["master_id"] == master_id)

    def failover(self, replica_port: int, timeout: float = 30.0) -> None:
        with self.client(replica_port) as c:
            c.execute_command("CLUSTER", "FAILOVER")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.nodes()
            if any(r["port"] == replica_port and r["master"] for r in rows):
                break
            time.sleep(0.05)
        self.wait_ok(timeout)


def _free_pair() -> int:
    for _ in range(200):
        port = random.randrange(20000, 55000)
        ok = True
        for p in (port, port + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    if not SERVER.exists() or CLI is None:
        pytest.skip("needs /usr/bin/redis-server >= 7 and redis-cli")
    workdir = Path(tempfile.mkdtemp(prefix="portfolio-cluster-test-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = []
        for i in range(6):
            port = _free_pair()
            node = workdir / f"n{i}"
            node.mkdir()
            procs.append(
                subprocess.Popen(
                    [
                        os.fspath(SERVER), "--port", str(port), "--bind", "127.0.0.1",
                        "--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                        "--cluster-replica-validity-factor", "0",
                        "--save", "", "--appendonly", "no", "--dir", os.fspath(node),
                        "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
            ports.append(port)
        for port in ports:
            for _ in range(200):
                try:
                    with sync_redis.Redis(port=port, socket_timeout=1) as c:
                        c.ping()
                    break
                except sync_redis.RedisError:
                    time.sleep(0.02)
        subprocess.run(
            [CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        local = LocalCluster(tuple(ports), tuple(p.pid for p in procs))
        local.wait_ok()
        yield local
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


def keys_on_every_master(local: LocalCluster, prefix: str, per_master: int = 3) -> list[str]:
    """Keys with distinct hash tags, ``per_master`` on each of the three masters."""
    by_owner: dict[int, list[str]] = {}
    i = 0
    while len(by_owner) < 3 or min(len(v) for v in by_owner.values()) < per_master:
        key = f"{prefix}:{{tag{i}}}:k"
        by_owner.setdefault(local.owner_port(key_slot(key)), []).append(key)
        i += 1
    return [k for keys in by_owner.values() for k in keys[:per_master]]


def as_cluster(client: RedisClient) -> ClusterClient:
    assert isinstance(client, ClusterClient)
    return client


# -- pure parts ---------------------------------------------------------------------------


def test_command_keys_and_url_parsing() -> None:
    assert command_keys(("GET", "a")) == ["a"]
    assert command_keys(("EVALSHA", "sha", 2, "k1", "k2", "arg")) == ["k1", "k2"]
    assert command_keys(("MSET", "a", "1", "b", "2")) == ["a", "b"]
    assert command_keys(("DEL", "a", "b")) == ["a", "b"]
    assert command_keys(("PING",)) == []
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    seeds = parse_cluster_url("redis+cluster://u:p@h1:7000,h2:7001?ssl_cert_reqs=none")
    assert [(s.host, s.port, s.username, s.password) for s in seeds] == [
        ("h1", 7000, "u", "p"),
        ("h2", 7001, "u", "p"),
    ]
    tls = parse_cluster_url("rediss+cluster://h1:7000")
    assert tls[0].tls
    with pytest.raises(ValueError, match="database 0"):
        parse_cluster_url("redis+cluster://h1:7000/3")
    with pytest.raises(ValueError, match="host:port"):
        parse_cluster_url("redis+cluster://")


# -- routing ------------------------------------------------------------------------------


async def test_routes_by_key_and_refuses_cross_slot(cluster: LocalCluster) -> None:
    async with open_redis(cluster.url) as client:
        router = as_cluster(client)
        assert len(router.masters) == 3
        keys = keys_on_every_master(cluster, "route")
        for key in keys:
            assert await client.execute("SET", key, key) == "OK"
        for key in keys:
            assert await client.execute("GET", key) == key
            # The value is on the node the map says, and nowhere else.
            owner = cluster.owner_port(key_slot(key))
            assert router.node_for_slot(key_slot(key)) == f"127.0.0.1:{owner}"
        with pytest.raises(CommandError, match="CROSSSLOT") as info:
            await client.execute("DEL", keys[0], keys[-1])
        assert info.value.code == "CROSSSLOT"
        assert router.cluster_statistics().cross_slot_refused == 1
        assert router.cluster_statistics().moved == 0
        # Same hash tag, several keys: one slot, allowed.
        assert await client.execute("DEL", "route:{x}:a", "route:{x}:b") == 0


async def test_plain_url_to_a_cluster_node_is_detected(cluster: LocalCluster) -> None:
    async with open_redis(f"redis://127.0.0.1:{cluster.ports[0]}/0") as client:
        assert isinstance(client, ClusterClient)
        for key in keys_on_every_master(cluster, "detect", 1):
            assert await client.execute("SET", key, "1") == "OK"
        assert client.cluster_statistics().moved == 0


async def test_pipeline_across_nodes_keeps_order(cluster: LocalCluster) -> None:
    keys = keys_on_every_master(cluster, "pipe", 4)
    random.Random(5).shuffle(keys)
    async with open_redis(cluster.url) as client:
        commands = [("SET", k, f"v{i}") for i, k in enumerate(keys)]
        assert await client.pipeline(commands) == ["OK"] * len(keys)
        replies = await client.pipeline(
            [("GET", k) for k in keys] + [("HGET", keys[0], "f"), ("DEL", keys[0], keys[1])]
        )
        assert replies[: len(keys)] == [f"v{i}" for i in range(len(keys))]
        assert isinstance(replies[-2], CommandError)
        assert replies[-2].code == "WRONGTYPE"
        assert isinstance(replies[-1], CommandError)
        assert replies[-1].code == "CROSSSLOT"
        with pytest.raises(CommandError, match="MULTI"):
            await client.pipeline([("MULTI",), ("INCR", keys[0]), ("EXEC",)])
        nodes = as_cluster(client).cluster_statistics().nodes
        assert nodes >= 3


async def test_evalsha_many_across_nodes_and_noscript_reload(cluster: LocalCluster) -> None:
    keys = keys_on_every_master(cluster, "eval", 2)
    async with open_redis(cluster.url) as client:
        router = as_cluster(client)
        await client.load_scripts([ECHO_KEY])
        replies = await client.evalsha_many(ECHO_KEY, [([k], [str(i)]) for i, k in enumerate(keys)])
        assert replies == [[k, str(i)] for i, k in enumerate(keys)]
        for port in cluster.ports:
            with cluster.client(port) as c:
                c.execute_command("SCRIPT", "FLUSH")
        assert await client.evalsha(ECHO_KEY, [keys[0]], ["again"]) == [keys[0], "again"]
        replies = await client.evalsha_many(ECHO_KEY, [([k], ["x"]) for k in keys])
        assert replies == [[k, "x"] for k in keys]
        assert router.cluster_statistics().scripts_reloaded == 3


# -- redirects ----------------------------------------------------------------------------


def _migrate_slot(
    local: LocalCluster, slot: int, source: int, target: int, *, finish: bool
) -> None:
    """Move ``slot`` from ``source`` to ``target``: IMPORTING/MIGRATING, MIGRATE keys, NODE."""
    rows = local.nodes()
    ids = {int(r["port"]): str(r["id"]) for r in rows}
    with local.client(target) as t, local.client(source) as s:
        t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            s.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    if finish:
        _finish_migration(local, slot, target)


def _finish_migration(local: LocalCluster, slot: int, target: int) -> None:
    ids = {int(r["port"]): str(r["id"]) for r in local.nodes()}
    for port in local.ports:
        with local.client(port) as c, contextlib.suppress(sync_redis.ResponseError):
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])


async def test_moved_after_resharding_a_slot(cluster: LocalCluster) -> None:
    key = "moved:{reshard-me}:k"
    slot = key_slot(key)
    async with open_redis(cluster.url) as client:
        router = as_cluster(client)
        await client.execute("SET", key, "before")
        source = cluster.owner_port(slot)
        target = next(
            p
            for p in {cluster.owner_port(0), cluster.owner_port(16383), cluster.owner_port(8000)}
            if p != source
        )
        await trio.to_thread.run_sync(
            lambda: _migrate_slot(cluster, slot, source, target, finish=True)
        )
        with trio.fail_after(10):
            assert await client.execute("GET", key) == "before"
        stats = router.cluster_statistics()
        assert stats.moved == 1
        assert router.node_for_slot(slot) == f"127.0.0.1:{target}"
        assert await client.execute("SET", key, "after") == "OK"
        assert router.cluster_statistics().moved == 1, "the map was updated: no second MOVED"
        # Put it back.
        await trio.to_thread.run_sync(
            lambda: _migrate_slot(cluster, slot, target, source, finish=True)
        )
        assert await client.execute("GET", key) == "after"


async def test_ask_during_migration(cluster: LocalCluster) -> None:
    moved_key, staying_key = "ask:{mig}:moved", "ask:{mig}:staying"
    slot = key_slot(moved_key)
    assert key_slot(staying_key) == slot
    async with open_redis(cluster.url) as client:
        router = as_cluster(client)
        await client.execute("SET", moved_key, "m")
        source = cluster.owner_port(slot)
        target = next(
            p
            for p in {cluster.owner_port(0), cluster.owner_port(16383), cluster.owner_port(8000)}
            if p != source
        )
        # Migrating, the existing key moved to the target; a new key is created
        # on the target (the source answers ASK for keys it does not have).
        await trio.to_thread.run_sync(
            lambda: _migrate_slot(cluster, slot, source, target, finish=False)
        )
        try:
            with trio.fail_after(10):
                assert await client.execute("GET", moved_key) == "m"
                assert await client.execute("SET", staying_key, "s") == "OK"
                replies = await client.pipeline([("GET", moved_key), ("GET", staying_key)])
                assert replies == ["m", "s"]
            stats = router.cluster_statistics()
            assert stats.ask >= 3
            assert stats.moved == 0, "ASK must not change the map"
            assert router.node_for_slot(slot) == f"127.0.0.1:{source}"
        finally:
            await trio.to_thread.run_sync(lambda: _finish_migration(cluster, slot, target))
        with trio.fail_after(10):
            assert await client.execute("GET", staying_key) == "s"
        await trio.to_thread.run_sync(
            lambda: _migrate_slot(cluster, slot, target, source, finish=True)
        )


async def test_failover_then_noscript_reload_and_calls_continue(cluster: LocalCluster) -> None:
    key = "fo:{failover}:k"
    slot = key_slot(key)
    script = Script("redis.call('SET', KEYS[1], ARGV[1]) return redis.call('GET', KEYS[1])")
    async with open_redis(cluster.url, timeout=5) as client:
        router = as_cluster(client)
        await client.load_scripts([script])
        assert await client.evalsha(script, [key], ["one"]) == "one"
        master = cluster.owner_port(slot)
        replica = cluster.replica_of(master)
        started = trio.current_time()
        await trio.to_thread.run_sync(lambda: cluster.failover(replica))
        with trio.fail_after(15):
            assert await client.evalsha(script, [key], ["two"]) == "two"
        recovered = trio.current_time() - started
        stats = router.cluster_statistics()
        print(
            f"\ncluster failover: served by the new master {recovered:.2f} s after CLUSTER FAILOVER"
        )
        assert router.node_for_slot(slot) == f"127.0.0.1:{replica}"
        assert stats.moved >= 1
        assert stats.scripts_reloaded >= 1, "the promoted replica had no script: NOSCRIPT reload"
        # Fail back so the topology is as it was.
        await trio.to_thread.run_sync(lambda: cluster.failover(master))
        with trio.fail_after(15):
            assert await client.evalsha(script, [key], ["three"]) == "three"


# -- cancellation -------------------------------------------------------------------------


async def test_cancel_after_write_on_a_node_drops_the_reply(cluster: LocalCluster) -> None:
    key = "cancel:{c}:k"
    async with open_redis(cluster.url, connections=1) as client:
        await client.load_scripts([SLOW, ECHO_KEY])
        assert await client.evalsha(ECHO_KEY, [key], ["warm"]) == [key, "warm"]
        connects = client.statistics().connects
        with trio.move_on_after(0.05) as scope:
            await client.evalsha(SLOW, [key], [200, "slow"])
        assert scope.cancelled_caught
        with trio.fail_after(5):
            assert await client.evalsha(ECHO_KEY, [key], ["mine"]) == [key, "mine"]
        stats = client.statistics()
        assert stats.cancelled_in_flight == 1
        assert stats.connects == connects, "a cancellation must not cost the connection"
        assert stats.replies_discarded == 1


async def test_random_cancellation_storm_across_nodes(cluster: LocalCluster) -> None:
    """Callers on all three masters, one connection each, cancelled at random points."""
    rng = random.Random(99)
    keys = keys_on_every_master(cluster, "storm", 2)
    outcomes = {"ok": 0, "cancelled": 0}
    async with open_redis(cluster.url, connections=1) as client:
        await client.load_scripts([SLOW, ECHO_KEY])
        connects_before = client.statistics().connects

        async def caller(i: int) -> None:
            for j in range(20):
                token = f"{i}:{j}"
                key = keys[(i + j) % len(keys)]
                deadline = rng.choice([None, None, 0, 0.0001, 0.001, 0.003])
                with trio.move_on_after(deadline if deadline is not None else 60) as scope:
                    if j % 5 == 0:
                        reply = await client.evalsha(SLOW, [key], [1, token])
                        assert reply == token
                    elif j % 3 == 0:
                        got = await client.pipeline([("ECHO", token), ("SET", key, token)])
                        assert got == [token, "OK"], f"{token} got {got!r}"
                    else:
                        assert await client.evalsha(ECHO_KEY, [key], [token]) == [key, token]
                outcomes["cancelled" if scope.cancelled_caught else "ok"] += 1

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(60):
                    nursery.start_soon(caller, i)
            for n, key in enumerate(keys * 5):
                assert await client.evalsha(ECHO_KEY, [key], [f"after{n}"]) == [key, f"after{n}"]
        assert outcomes["ok"] > 300
        assert outcomes["cancelled"] > 50
        stats = client.statistics()
        assert stats.connects == connects_before, "a cancellation must not cost a connection"
        assert stats.cancelled_in_flight > 0


# -- the store on a cluster ---------------------------------------------------------------


async def test_store_operations_on_the_cluster_hash_layout(cluster: LocalCluster) -> None:
    async with open_redis(cluster.url) as client:
        store = await open_store(client, layout="hash", key_prefix=f"t{random.getrandbits(32):x}")
        sessions = [f"sess-{i}" for i in range(12)]
        owners = {cluster.owner_port(key_slot(store.keys.session(s))) for s in sessions}
        assert len(owners) == 3, "the sessions must span all three masters"
        for s in sessions:
            created = await store.create_if_missing(
                s, {"AAPL": 2.0}, {"AAPL": 10.0}, "2026-01-01T00:00:00Z"
            )
            assert created.portfolio_version == 1
        for s in sessions:
            got = await store.get(s)
            assert got is not None
            assert got.holdings == {"AAPL": 2.0}
        assert await store.touch(sessions[0], "2026-01-01T00:00:01Z")
        assert as_cluster(client).sharded_pubsub


async def test_unreachable_cluster_is_store_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with open_redis(f"redis+cluster://127.0.0.1:{port}", timeout=1) as client:
        with trio.fail_after(5), pytest.raises(StoreUnavailable) as info:
            await client.execute("GET", "x")
        assert info.value.reason in (Unavailable.CONNECT_FAILED, Unavailable.TIMEOUT)


# -- sharded fan-out ----------------------------------------------------------------------


async def test_store_events_use_sharded_pubsub_on_every_shard(cluster: LocalCluster) -> None:
    """Scripts SPUBLISH; the hub's subscriber SSUBSCRIBEs on each session's shard."""
    from trio_portfolio.redis_connect import open_pubsub
    from trio_portfolio.redis_sharded_pubsub import ShardedPubSub

    async with open_redis(cluster.url) as client, open_pubsub(cluster.url) as pubsub:
        assert isinstance(pubsub, ShardedPubSub)
        store = await open_store(client, layout="hash", key_prefix=f"t{random.getrandbits(32):x}")
        sessions = [f"ev-{i}" for i in range(9)]
        owners = {cluster.owner_port(key_slot(store.keys.session(s))) for s in sessions}
        assert len(owners) == 3
        with trio.fail_after(10):
            await pubsub.subscribe(*(store.events_channel(s) for s in sessions))
            assert len(pubsub.shards) == 3, "one subscriber connection per shard"
            for s in sessions:
                await store.create_if_missing(
                    s, {"AAPL": 1.0}, {"AAPL": 5.0}, "2026-01-01T00:00:00Z"
                )
                await store.set_holdings(s, {"AAPL": 3.0}, {"AAPL": 5.0}, "2026-01-01T00:00:01Z")
            heard = set()
            async for message in pubsub:
                heard.add(message.channel)
                if len(heard) == len(sessions):
                    break
        assert heard == {store.events_channel(s) for s in sessions}
        # Classic SUBSCRIBE would not hear SPUBLISH: prove the scripts SPUBLISHed.
        with cluster.client(cluster.ports[0]) as c:
            assert c.execute_command("PUBSUB", "SHARDNUMSUB", store.events_channel(sessions[0]))


async def test_sharded_subscription_follows_a_failover(cluster: LocalCluster) -> None:
    from trio_portfolio.redis_connect import open_pubsub
    from trio_portfolio.redis_sharded_pubsub import ShardedPubSub

    channel = "fan:{follow-me}:events"
    slot = key_slot(channel)
    async with open_redis(cluster.url) as client, open_pubsub(cluster.url) as pubsub:
        assert isinstance(pubsub, ShardedPubSub)
        with trio.fail_after(10):
            await pubsub.subscribe(channel)
        master = cluster.owner_port(slot)
        replica = cluster.replica_of(master)
        await trio.to_thread.run_sync(lambda: cluster.failover(replica))
        started = trio.current_time()
        with trio.fail_after(15):
            while True:
                await client.execute("SPUBLISH", channel, "after-failover")
                with trio.move_on_after(0.2):
                    async for message in pubsub:
                        if message.data == "after-failover":
                            break
                    break
        print(f"\nsharded pub/sub heard again {trio.current_time() - started:.2f} s after failover")
        assert pubsub.statistics().channels_wanted == 1
        assert pubsub.rehomed == 1, "the channel moved to the promoted replica's shard"
        await trio.to_thread.run_sync(lambda: cluster.failover(master))
