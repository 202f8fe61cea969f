"""The multi-process harness: a local Redis Cluster and a Sentinel setup.

The session fixtures ``redis_cluster`` and ``redis_sentinel`` are shared
with every later suite, so a test that fails over restores the shape it
found.  Blocking redis-py calls run in worker threads (``in_thread``); the
harness's async waiters do so themselves.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio
from redis.crc import key_slot
from redis.exceptions import MovedError

from trio_portfolio.testing import (
    CLUSTER_SLOTS,
    RedisCluster,
    RedisNode,
    RedisSentinelSetup,
    cluster_failover,
    in_thread,
    open_redis_cluster,
    open_redis_sentinel,
    sentinel_failover,
    wait_for_cluster_ok,
    wait_for_sentinel_master,
)


def child_redis_pids() -> set[int]:
    """Pids of this process's living children that are Redis servers (from /proc)."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == os.getpid() and state != "Z" and ("redis" in comm or "valkey" in comm):
            found.add(int(entry.name))
    return found


def refuses(node: RedisNode) -> bool:
    try:
        socket.create_connection(node.address, timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def key_on(cluster: RedisCluster, master: RedisNode, prefix: str) -> str:
    """A key whose slot ``master`` serves."""
    view = next(v for v in cluster.view(master) if "myself" in v.flags)
    for i in range(100_000):
        key = f"{prefix}:{i}"
        if any(start <= key_slot(key.encode()) <= end for start, end in view.slots):
            return key
    raise AssertionError("no key found for the master's slots")


# -- the cluster ---------------------------------------------------------------------------


async def test_cluster_is_ok_with_three_masters_and_three_replicas(
    redis_cluster: RedisCluster,
) -> None:
    cluster = redis_cluster
    assert len(cluster.nodes) == 6
    for node in cluster.nodes:
        info = await in_thread(lambda node=node: cluster.cluster_info(node))
        assert info["cluster_state"] == "ok"
        assert (info["cluster_size"], info["cluster_known_nodes"]) == ("3", "6")
        assert info["cluster_slots_assigned"] == info["cluster_slots_ok"] == str(CLUSTER_SLOTS)
    views = await in_thread(lambda: cluster.view(cluster.nodes[0]))
    masters = [v for v in views if v.role == "master"]
    replicas = [v for v in views if v.role == "replica"]
    assert (len(masters), len(replicas)) == (3, 3)
    # Slots: every one served, by exactly one master.
    served = sorted(slot for m in masters for start, end in m.slots for slot in (start, end))
    assert (served[0], served[-1]) == (0, CLUSTER_SLOTS - 1)
    assert sum(m.slot_count for m in masters) == CLUSTER_SLOTS
    # One replica per master.
    assert sorted(r.master_id or "" for r in replicas) == sorted(m.node_id for m in masters)
    assert cluster.url.startswith("redis+cluster://127.0.0.1:")
    assert cluster.url.count(",") == 5
    assert all(node.port + 10000 <= 65535 for node in cluster.nodes)  # the bus port exists


async def test_cluster_routes_keys_like_a_real_cluster(
    redis_cluster: RedisCluster, key_prefix: str
) -> None:
    cluster = redis_cluster

    def check() -> None:
        masters = cluster.masters()
        key = key_on(cluster, masters[0], key_prefix)
        with masters[0].client() as owner:
            assert owner.set(key, "v")
        moved_to = rf"^{key_slot(key.encode())} 127\.0\.0\.1:{masters[0].port}$"
        with masters[1].client() as other, pytest.raises(MovedError, match=moved_to):
            other.get(key)
        with masters[0].client() as owner:
            owner.delete(key)

    await in_thread(check)


async def test_cluster_failover_promotes_the_replica(
    redis_cluster: RedisCluster, key_prefix: str
) -> None:
    cluster = redis_cluster
    replica = (await in_thread(cluster.replicas))[0]
    master = await in_thread(lambda: cluster.master_of(replica))
    key = await in_thread(lambda: key_on(cluster, master, key_prefix))

    def write() -> None:
        with master.client() as client:
            client.set(key, "before-failover")
            assert client.wait(1, 2000) == 1  # on the replica before we fail over

    await in_thread(write)
    try:
        with trio.fail_after(30):
            await cluster_failover(cluster, replica)
        assert replica in await in_thread(cluster.masters)
        assert master in await in_thread(cluster.replicas)
        assert await in_thread(lambda: cluster.master_of(master)) == replica
        with replica.client() as client:
            assert await in_thread(lambda: client.get(key)) == "before-failover"
    finally:
        # Leave the session's cluster as it was found: fail back.
        with trio.fail_after(30):
            if replica in await in_thread(cluster.masters):
                await cluster_failover(cluster, master)
            await wait_for_cluster_ok(cluster)
        with master.client() as client:
            await in_thread(lambda: client.delete(key))
    assert master in await in_thread(cluster.masters)


async def test_failover_of_a_master_is_refused(redis_cluster: RedisCluster) -> None:
    master = (await in_thread(redis_cluster.masters))[0]
    with pytest.raises(ValueError, match="is a master, not a replica"):
        await cluster_failover(redis_cluster, master, timeout=5)


# -- sentinel ---------------------------------------------------------------------------


async def test_sentinels_name_the_master(
    redis_sentinel: RedisSentinelSetup, key_prefix: str
) -> None:
    setup = redis_sentinel
    master = await wait_for_sentinel_master(setup)
    assert (len(setup.sentinels), len(setup.servers)) == (3, 2)
    for sentinel in setup.sentinels:
        assert await in_thread(lambda s=sentinel: setup.master_address(s)) == master
    primary = await in_thread(setup.master)
    replica = next(node for node in setup.servers if node != primary)
    assert await in_thread(lambda: setup.role(primary)) == "master"
    assert await in_thread(lambda: setup.role(replica)) == "slave"

    def replicated() -> str | None:
        with primary.client() as client:
            client.set(f"{key_prefix}:k", "v")
            assert client.wait(1, 2000) == 1
        with replica.client() as client:
            return client.get(f"{key_prefix}:k")  # type: ignore[no-any-return]

    assert await in_thread(replicated) == "v"
    assert setup.url.endswith(f"/{setup.master_name}")
    assert setup.url.startswith("redis+sentinel://127.0.0.1:")

    def unknown_name() -> object:
        with setup.sentinels[0].client() as client:
            return client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "no-such")

    assert await in_thread(unknown_name) is None


# -- lifecycle: a private cluster and sentinel setup, in parallel ------------------------------


async def test_teardown_leaves_no_process_behind() -> None:
    """Both started at once through the async context managers, then stopped."""
    before = child_redis_pids()
    clusters: list[RedisCluster] = []
    setups: list[RedisSentinelSetup] = []
    ready = trio.Semaphore(0)
    done = trio.Event()

    async def cluster() -> None:
        async with open_redis_cluster() as running:
            clusters.append(running)
            await wait_for_cluster_ok(running)
            ready.release()
            await done.wait()

    async def sentinel() -> None:
        async with open_redis_sentinel() as running:
            setups.append(running)
            old = await in_thread(running.master)
            new = await sentinel_failover(running)
            assert new != old.address
            assert await in_thread(lambda: running.role(running.master())) == "master"
            ready.release()
            await done.wait()

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cluster)
            nursery.start_soon(sentinel)
            await ready.acquire()
            await ready.acquire()
            every = (*clusters[0].nodes, *setups[0].servers, *setups[0].sentinels)
            assert child_redis_pids() - before == {node.pid for node in every}
            assert len(every) == 6 + 2 + 3
            done.set()
    assert child_redis_pids() - before == set()
    for node in every:
        with pytest.raises(ProcessLookupError):
            os.kill(node.pid, 0)
        assert refuses(node)
    assert not clusters[0].workdir.exists()
    assert not setups[0].workdir.exists()


async def test_cancelled_while_starting_stops_what_was_started() -> None:
    """A cancellation during the (shielded) start stops the cluster once it is owned."""
    before = child_redis_pids()
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(len(child_redis_pids() - before))
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        with trio.move_on_after(0.2) as scope:
            async with open_redis_cluster(masters=1, replicas_per_master=1):
                raise AssertionError("the body must not run: the start outlasted the deadline")
        nursery.cancel_scope.cancel()
    assert scope.cancelled_caught
    assert max(seen) == 2, "both nodes were started"
    assert child_redis_pids() - before == set()
