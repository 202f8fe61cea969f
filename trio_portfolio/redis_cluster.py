"""Redis Cluster through the Trio adapter: a slot router over one client per node.

Theory of operation
===================

A :class:`ClusterClient` is a :class:`~trio_portfolio.redis_io.RedisClient`
to its callers (the store and the market use it unchanged) and, inside, a
*router* over one ordinary multiplexed ``RedisClient`` per master.  Every
guarantee of the single-node client (positional reply matching, abandoned
requests, per-caller deadlines, the stall watchdog) therefore holds on each
node's connections as it is: the router adds no connection of its own and
never reads a reply itself, so a cancelled call cannot leave a reply for
the next caller on any node.

Routing.  The router keeps a slot map (16384 entries, each the ``host:port``
of the master serving it) read with ``CLUSTER SHARDS`` (Redis >= 7), or
``CLUSTER SLOTS`` where SHARDS is unknown.  A command's keys are found by
its name (:func:`command_keys`; ``EVALSHA``/``EVAL`` by their ``numkeys``)
and hashed with redis-py's ``redis.crc.key_slot``; a command whose keys
hash to more than one slot is refused before anything is sent
(:class:`CommandError` with code ``CROSSSLOT``).  A keyless command (PING,
ECHO, INFO...) goes to one master.

Redirects, per command (also inside pipelines):

* ``MOVED slot host:port``: the map entry is updated and the command sent
  there; the second MOVED for the same command also schedules a full map
  refresh.  At most ``_MAX_REDIRECTS`` redirects, then
  :class:`StoreUnavailable` (``cluster_down``).
* ``ASK slot host:port``: ``ASKING`` and the command are written back to
  back as *one* request on one connection of the target (the one-shot
  ASKING flag cannot be consumed by another caller's command), the map is
  left alone.
* ``TRYAGAIN`` (a multi-key command during a migration): sent again after a
  short pause, doubling, while the call's deadline allows.
* ``CLUSTERDOWN``/``MASTERDOWN``: :class:`StoreUnavailable` (the error
  vocabulary maps them already); the map is marked stale.
* A node that cannot be reached fails its commands with
  :class:`StoreUnavailable` and marks the map stale: the next call refreshes
  it first (at most once per ``reconnect_backoff``), so once the cluster
  promotes a replica, calls go there without a restart.

Pipelines are split by node, the node groups sent concurrently (a nursery
per call, so every task has an owner and ends with the call), and the
replies put back in the caller's order; redirected entries are sent again
to their new node.  ``MULTI``/``EXEC`` is refused in a cluster pipeline
(use a Lua script, as the store does).  A pipeline raises
:class:`StoreUnavailable` only when every entry failed on its connection;
otherwise a node that failed leaves :class:`StoreUnavailable` *instances*
in its entries and the other nodes' replies stand.

Scripts are loaded on every master (``SCRIPT LOAD`` is not replicated); a
``NOSCRIPT`` (a replica promoted by a failover, a restarted node) loads the
script on that node and sends the call again, counted in
``scripts_reloaded``.

The call's ``timeout`` is one deadline for the whole call, redirects and
pauses included; each node call gets what is left of it.

Limits: at most ``max_nodes`` node clients (default 64; a map naming more
masters than that is refused with :class:`StoreUnavailable`); clients of
nodes that left the map are retired (their connections finish what was
written, then close).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import redis.crc
import trio

from trio_portfolio.redis_errors import (
    CommandError,
    NoScript,
    RedisAdapterError,
    StoreUnavailable,
    Unavailable,
)
from trio_portfolio.redis_io import RedisClient, RedisStatistics, Script
from trio_portfolio.redis_wire import (
    CommandArg,
    ConnectionParams,
    encode_command,
    open_connection,
    receive_reply,
)
from trio_portfolio.services import open_service_nursery

__all__ = [
    "CLUSTER_SCHEMES",
    "SLOTS",
    "ClusterClient",
    "ClusterStatistics",
    "command_keys",
    "detect_cluster",
    "is_cluster_url",
    "key_slot",
    "open_cluster",
    "parse_cluster_url",
]

SLOTS = 16384
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
_MAX_REDIRECTS = 5
_TRYAGAIN_FIRST_PAUSE = 0.01
_TRYAGAIN_MAX_PAUSE = 0.2

# Commands without keys: sent to any one master.
_KEYLESS = frozenset(
    {
        "ACL", "ASKING", "AUTH", "BGSAVE", "CLIENT", "CLUSTER", "COMMAND", "CONFIG",
        "DBSIZE", "DEBUG", "ECHO", "FLUSHALL", "FLUSHDB", "FUNCTION", "HELLO", "INFO",
        "KEYS", "LASTSAVE", "LATENCY", "MEMORY", "PING", "PUBLISH", "RANDOMKEY",
        "READONLY", "READWRITE", "ROLE", "SAVE", "SCAN", "SCRIPT", "SELECT", "SLOWLOG",
        "TIME", "WAIT",
    }
)  # fmt: skip
# Commands whose every argument is a key.
_ALL_KEYS = frozenset(
    {"DEL", "EXISTS", "MGET", "PFCOUNT", "SDIFF", "SINTER", "SUNION", "TOUCH", "UNLINK", "WATCH"}
)
_EVALS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
_REDIRECT = re.compile(r"^(MOVED|ASK) (\d+) (\S+)$")


def key_slot(key: CommandArg) -> int:
    """The hash slot of ``key`` (redis-py's CRC16, hash tags honoured)."""
    raw = key if isinstance(key, bytes) else str(key).encode()
    return int(redis.crc.key_slot(raw))


def command_keys(args: Sequence[CommandArg]) -> list[CommandArg]:
    """The keys of one command, by its name (the router's only knowledge of commands).

    ``EVAL``/``EVALSHA``/``FCALL``: the ``numkeys`` keys; ``MSET``: every
    other argument; ``DEL``, ``EXISTS``, ``MGET``...: every argument;
    ``SPUBLISH``/``SSUBSCRIBE``: the channel (it is routed like a key);
    known keyless commands: none; anything else: the first argument.
    Raises :class:`CommandError` for an ``EVALSHA`` whose ``numkeys`` is
    not a number.
    """
    if not args:
        return []
    name = str(args[0]).upper() if not isinstance(args[0], bytes) else args[0].decode().upper()
    if name in _KEYLESS or len(args) < 2:
        return []
    if name in _EVALS:
        try:
            count = int(args[2])
        except (IndexError, ValueError, TypeError):
            raise CommandError(f"{name} without a valid numkeys", code="ERR") from None
        return list(args[3 : 3 + count])
    if name in ("MSET", "MSETNX"):
        return list(args[1::2])
    if name in _ALL_KEYS:
        return list(args[1:])
    return [args[1]]


def command_slot(args: Sequence[CommandArg]) -> int | None:
    """The one slot a command's keys hash to; ``None`` for a keyless command.

    Raises :class:`CommandError` (code ``CROSSSLOT``) when its keys span
    slots: that is refused before anything is sent.
    """
    slots = {key_slot(key) for key in command_keys(args)}
    if len(slots) > 1:
        raise CommandError(
            f"CROSSSLOT keys of {str(args[0])!r} hash to {len(slots)} different slots; "
            "on a cluster every key of one command must share a hash tag",
            code="CROSSSLOT",
        )
    return slots.pop() if slots else None


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` asks for cluster mode explicitly (``redis+cluster://``)."""
    return url.startswith(CLUSTER_SCHEMES)


def parse_cluster_url(url: str) -> list[ConnectionParams]:
    """The seed nodes of ``redis[s]+cluster://[user:pass@]host:port[,host:port...][?query]``.

    Every seed gets the same credentials and TLS options.  Raises
    :class:`ValueError` for another scheme, no host, or a database other
    than 0 (a cluster has only database 0).
    """
    if not is_cluster_url(url):
        raise ValueError(f"a cluster URL starts with redis+cluster://: {url!r}")
    scheme, rest = url.split("+cluster://", 1)
    userinfo, _, hosts_and_rest = rest.rpartition("@")
    split_at = min((i for i in (hosts_and_rest.find("/"), hosts_and_rest.find("?")) if i >= 0),
                   default=len(hosts_and_rest))  # fmt: skip
    hosts, tail = hosts_and_rest[:split_at], hosts_and_rest[split_at:]
    seeds: list[ConnectionParams] = []
    for host in (h.strip() for h in hosts.split(",")):
        if not host:
            continue
        prefix = f"{userinfo}@" if userinfo else ""
        params = ConnectionParams.from_url(f"{scheme}://{prefix}{host}{tail}")
        if params.db != 0:
            raise ValueError(f"a Redis Cluster has only database 0: {url!r}")
        seeds.append(params)
    if not seeds:
        raise ValueError(f"a cluster URL needs at least one host:port: {url!r}")
    return seeds


async def detect_cluster(params: ConnectionParams, *, timeout: float) -> bool:
    """Whether the node at ``params`` runs in cluster mode (``INFO cluster``).

    On a connection of its own, closed afterwards.  Never raises for the
    store being down or odd: anything but ``cluster_enabled:1`` within
    ``timeout`` means "not a cluster" (the single-node client then reports
    the outage on its first call).
    """
    with trio.move_on_after(timeout):
        try:
            stream, parser = await open_connection(params)
        except StoreUnavailable:
            return False
        try:
            await stream.send_all(encode_command(("INFO", "cluster")))
            reply = await receive_reply(stream, parser)
        except (StoreUnavailable, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
        return isinstance(reply, str) and "cluster_enabled:1" in reply
    return False


@attrs.define
class ClusterStatistics:
    """The router's own counters (node clients' counters are in ``statistics()``).

    ``moved``/``ask``/``try_again`` redirects followed, ``refreshes`` of the
    slot map (``refresh_failures`` found no node answering),
    ``scripts_reloaded`` after NOSCRIPT, ``cross_slot_refused`` commands
    refused before sending; ``nodes`` (node clients) and ``masters`` (in
    the map) are gauges.
    """

    moved: int = 0
    ask: int = 0
    try_again: int = 0
    refreshes: int = 0
    refresh_failures: int = 0
    scripts_reloaded: int = 0
    cross_slot_refused: int = 0
    nodes: int = 0
    masters: int = 0


_PENDING: Any = object()


class _Entry:
    """One command of a call, through its redirects."""

    __slots__ = ("args", "ask", "redirects", "slot")

    def __init__(self, args: Sequence[CommandArg], slot: int | None) -> None:
        self.args = args
        self.slot = slot
        self.ask: str | None = None
        self.redirects = 0


class ClusterClient(RedisClient):
    """A :class:`RedisClient` for a Redis Cluster: create with :func:`open_cluster`/``open_redis``.

    Same methods, same errors, same cancellation guarantees as the
    single-node client (see the module docstring for what routing adds).
    The inherited single-node machinery is not used: every command goes to
    a node client.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        seeds: Sequence[ConnectionParams],
        *,
        timeout: float,
        connections: int,
        reconnect_backoff: float,
        stall_timeout: float | None = None,
        on_latency: Callable[[float], None] | None = None,
        max_nodes: int = 64,
    ) -> None:
        if not seeds:
            raise ValueError("a cluster client needs at least one seed node")
        if max_nodes < 1:
            raise ValueError("max_nodes must be at least 1")
        super().__init__(
            nursery,
            seeds[0],
            timeout=timeout,
            connections=connections,
            reconnect_backoff=reconnect_backoff,
            stall_timeout=stall_timeout,
            on_latency=on_latency,
        )
        self._cluster_nursery = nursery
        self._seeds = list(seeds)
        self._connections = connections
        self._stall = stall_timeout
        self._backoff = reconnect_backoff
        self._max_nodes = max_nodes
        self._nodes: dict[str, RedisClient] = {}
        self._owner: list[str | None] = [None] * SLOTS
        self._masters: list[str] = []
        self._generation = 0
        self._stale = True
        self._refreshed_at = -math.inf
        self._refresh_lock = trio.Lock()
        self.cluster_stats = ClusterStatistics()
        self.sharded_pubsub = True
        """Whether session events use SPUBLISH/SSUBSCRIBE (Redis >= 7: CLUSTER SHARDS works)."""

    # -- the map ---------------------------------------------------------------------------

    def _address(self, params: ConnectionParams) -> str:
        return f"{params.host}:{params.port}"

    def _node(self, address: str) -> RedisClient:
        """The client of ``address``, made on first use (connections are lazy)."""
        client = self._nodes.get(address)
        if client is None:
            host, _, port = address.rpartition(":")
            params = attrs.evolve(self._seeds[0], host=host, port=int(port))
            client = RedisClient(
                self._cluster_nursery,
                params,
                timeout=self.timeout,
                connections=self._connections,
                reconnect_backoff=self._backoff,
                stall_timeout=self._stall,
            )
            self._nodes[address] = client
        return client

    @property
    def masters(self) -> list[str]:
        """``host:port`` of every master in the slot map, as last read."""
        return list(self._masters)

    def node_for_slot(self, slot: int) -> str | None:
        """``host:port`` of the master serving ``slot``, as the map says now."""
        return self._owner[slot]

    def node_client(self, address: str) -> RedisClient:
        """The single-node client the router uses for ``address`` (for tests and tools)."""
        return self._node(address)

    async def refresh_slots(self, *, timeout: float | None = None) -> None:
        """Read the slot map again (``CLUSTER SHARDS``, else ``CLUSTER SLOTS``).

        Concurrent callers share one refresh.  Asks the known masters first,
        then every seed.  Raises :class:`StoreUnavailable` if no node answers
        with a map within ``timeout`` (default: the client's).
        """
        seen = self._generation
        seconds = self.timeout if timeout is None else timeout
        with trio.move_on_after(seconds):
            async with self._refresh_lock:
                if self._generation != seen:
                    return  # another caller refreshed while this one waited
                await self._refresh_now(seconds)
                return
        self.cluster_stats.refresh_failures += 1
        raise StoreUnavailable(
            f"no cluster node answered with a slot map within {seconds:g} s",
            reason=Unavailable.TIMEOUT,
        )

    async def _refresh_now(self, seconds: float) -> None:
        candidates = list(dict.fromkeys([*self._masters, *map(self._address, self._seeds)]))
        last: Exception | None = None
        for address in candidates:
            client = self._node(address)
            try:
                owner = await self._read_map(client, seconds)
            except (StoreUnavailable, CommandError) as exc:
                last = exc
                continue
            self._install(owner)
            return
        self.cluster_stats.refresh_failures += 1
        self._refreshed_at = trio.current_time()
        raise StoreUnavailable(
            f"no cluster node answered with a slot map (last: {last})",
            reason=Unavailable.CONNECT_FAILED,
        )

    async def _read_map(self, client: RedisClient, seconds: float) -> list[str | None]:
        tls = client.params.tls
        try:
            shards = await client.execute("CLUSTER", "SHARDS", timeout=seconds)
        except CommandError as exc:
            if isinstance(exc, NoScript) or "unknown" not in str(exc).lower():
                raise
            self.sharded_pubsub = False  # Redis 6: no SHARDS, no sharded pub/sub
            return _parse_slots(await client.execute("CLUSTER", "SLOTS", timeout=seconds))
        return _parse_shards(shards, tls=tls)

    def _install(self, owner: list[str | None]) -> None:
        masters = sorted({a for a in owner if a is not None})
        if len(masters) > self._max_nodes:
            raise StoreUnavailable(
                f"the cluster names {len(masters)} masters, over max_nodes={self._max_nodes}",
                reason=Unavailable.CLUSTER_DOWN,
            )
        self._owner = owner
        self._masters = masters
        self._generation += 1
        self._stale = False
        self._refreshed_at = trio.current_time()
        self.cluster_stats.refreshes += 1
        keep = set(masters) | {self._address(s) for s in self._seeds}
        if len(self._nodes) > self._max_nodes:
            for address in [a for a in self._nodes if a not in keep]:
                self._nodes.pop(address).retire()

    async def _ensure_map(self, deadline: float) -> None:
        """Refresh first when the map is stale (rate-limited) or empty."""
        if not self._masters or (
            self._stale and trio.current_time() >= self._refreshed_at + self._backoff
        ):
            try:
                await self.refresh_slots(timeout=max(deadline - trio.current_time(), 0.001))
            except StoreUnavailable:
                if not self._masters:
                    raise
                # Keep routing by the old map; its nodes answer or fail on their own.

    # -- calls -------------------------------------------------------------------------

    async def execute(self, *args: CommandArg, timeout: float | None = None) -> Any:
        """Run one command on the node serving its keys; its reply.

        Raises :class:`StoreUnavailable` or :class:`CommandError` (also
        ``CROSSSLOT`` for keys in several slots, before anything is sent).
        """
        (reply,) = await self._routed([args], {}, timeout, whole_failure_raises=True)
        if isinstance(reply, RedisAdapterError):
            raise reply
        return reply

    async def pipeline(
        self, commands: Sequence[Sequence[CommandArg]], *, timeout: float | None = None
    ) -> list[Any]:
        """``commands`` split by node, sent concurrently; replies (or errors) in order.

        Entries as for :meth:`RedisClient.pipeline`; a cross-slot command's
        entry is a ``CROSSSLOT`` :class:`CommandError`.  Raises
        :class:`CommandError` for ``MULTI`` (no transactions across a
        split pipeline) and :class:`StoreUnavailable` if every entry failed
        on its connection.
        """
        if not commands:
            return []
        for command in commands:
            if command and str(command[0]).upper() in ("MULTI", "EXEC"):
                raise CommandError(
                    "MULTI/EXEC in a cluster pipeline is not supported: use a Lua script",
                    code="ERR",
                )
        return await self._routed(commands, {}, timeout, whole_failure_raises=True)

    async def load_scripts(
        self, scripts: Sequence[Script], *, timeout: float | None = None
    ) -> None:
        """``SCRIPT LOAD`` every script on every master (not replicated by Redis).

        Raises :class:`StoreUnavailable` (a master down) or :class:`CommandError`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        seconds = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + seconds
        await self._ensure_map(deadline)
        errors: list[RedisAdapterError] = []

        async def load(address: str) -> None:
            try:
                await self._node(address).load_scripts(
                    scripts, timeout=max(deadline - trio.current_time(), 0.001)
                )
            except RedisAdapterError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for address in self._masters:
                nursery.start_soon(load, address)
        if errors:
            raise errors[0]

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[CommandArg] = (),
        args: Sequence[CommandArg] = (),
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run ``script`` on the node serving ``keys``; NOSCRIPT loads it there and runs it again.

        Raises :class:`StoreUnavailable` or :class:`CommandError`.
        """
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        (reply,) = await self._routed(
            [command], {script.sha: script}, timeout, whole_failure_raises=True
        )
        if isinstance(reply, RedisAdapterError):
            raise reply
        return reply

    async def evalsha_many(
        self,
        script: Script,
        calls: Sequence[tuple[Sequence[CommandArg], Sequence[CommandArg]]],
        *,
        timeout: float | None = None,
    ) -> list[Any]:
        """Run ``script`` once per ``(keys, args)``, split by node; replies (or errors) in order."""
        if not calls:
            return []
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
        return await self._routed(
            commands, {script.sha: script}, timeout, whole_failure_raises=True
        )

    async def probe_write(self, key: str, *, timeout: float | None = None) -> None:
        """``SET key 1 PX 5000`` on the dedicated probe connection of the node serving ``key``.

        Follows MOVED.  Raises :class:`StoreUnavailable` or :class:`CommandError`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        seconds = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + seconds
        slot = key_slot(key)
        self.stats.probes += 1
        for _ in range(_MAX_REDIRECTS):
            await self._ensure_map(deadline)
            address = self._owner[slot]
            if address is None:
                self._stale = True
                self.stats.probe_failures += 1
                raise _no_master(slot)
            try:
                await self._node(address).probe_write(
                    key, timeout=max(deadline - trio.current_time(), 0.001)
                )
                return
            except CommandError as exc:
                redirect = _REDIRECT.match(str(exc))
                if redirect is None or redirect.group(1) != "MOVED":
                    self.stats.probe_failures += 1
                    raise
                self.cluster_stats.moved += 1
                self._owner[slot] = redirect.group(3)
                self._stale = True
            except StoreUnavailable:
                self._stale = True
                self.stats.probe_failures += 1
                raise
        self.stats.probe_failures += 1
        raise _too_many_redirects(slot)

    def statistics(self) -> RedisStatistics:
        """Every node client's counters summed (the router's own: :meth:`cluster_statistics`)."""
        total = RedisStatistics(probes=self.stats.probes, probe_failures=self.stats.probe_failures)
        for client in self._nodes.values():
            stats = client.statistics()
            for field in attrs.fields(RedisStatistics):
                if field.name not in ("probes", "probe_failures"):
                    setattr(
                        total, field.name, getattr(total, field.name) + getattr(stats, field.name)
                    )
        return total

    def cluster_statistics(self) -> ClusterStatistics:
        """A snapshot of the router's counters."""
        self.cluster_stats.nodes = len(self._nodes)
        self.cluster_stats.masters = len(self._masters)
        return attrs.evolve(self.cluster_stats)

    async def aclose(self) -> None:
        """Close every node's probe connection (the multiplexed ones close with the nursery)."""
        for client in list(self._nodes.values()):
            await client.aclose()
        await super().aclose()

    # -- the router --------------------------------------------------------------------

    async def _routed(
        self,
        commands: Sequence[Sequence[CommandArg]],
        scripts: dict[str, Script],
        timeout: float | None,
        *,
        whole_failure_raises: bool,
    ) -> list[Any]:
        await trio.lowlevel.checkpoint_if_cancelled()
        seconds = self.timeout if timeout is None else timeout
        started = trio.current_time()
        deadline = started + seconds
        results: list[Any] = [_PENDING] * len(commands)
        entries: dict[int, _Entry] = {}
        for i, command in enumerate(commands):
            try:
                entries[i] = _Entry(command, command_slot(command))
            except CommandError as exc:
                self.cluster_stats.cross_slot_refused += 1
                results[i] = exc
        connection_failures = 0
        pause = _TRYAGAIN_FIRST_PAUSE
        while entries:
            await self._ensure_map(deadline)
            groups: dict[str, list[int]] = {}
            for i, entry in entries.items():
                address = entry.ask or self._route(entry.slot)
                if address is None:
                    self._stale = True
                    results[i] = _no_master(entry.slot)
                    continue
                groups.setdefault(address, []).append(i)
            for i in [i for i in entries if results[i] is not _PENDING]:
                del entries[i]
            replies: dict[int, Any] = {}
            failures: dict[str, StoreUnavailable] = {}

            if len(groups) == 1:
                ((address, indices),) = groups.items()
                await self._send(address, indices, entries, deadline, seconds, replies, failures)
            else:
                async with trio.open_nursery() as nursery:
                    for address, indices in groups.items():
                        nursery.start_soon(
                            self._send,
                            address,
                            indices,
                            entries,
                            deadline,
                            seconds,
                            replies,
                            failures,
                        )
            reload: dict[str, set[str]] = {}
            retry_after_pause = False
            for address, indices in groups.items():
                for i in indices:
                    entry = entries[i]
                    if address in failures:
                        connection_failures += 1
                        results[i] = _copy(failures[address])
                        continue
                    entry.ask = None
                    reply = replies[i]
                    outcome = self._judge(entry, reply, address, scripts, reload)
                    if outcome == "done":
                        results[i] = reply
                    elif outcome == "pause":
                        if deadline - trio.current_time() <= pause:
                            results[i] = reply
                        else:
                            retry_after_pause = True
                    elif outcome == "give_up":
                        results[i] = _too_many_redirects(entry.slot)
            for i in [i for i in entries if results[i] is not _PENDING]:
                del entries[i]
            if reload:
                await self._reload(reload, scripts, deadline)
            if entries and retry_after_pause:
                await trio.sleep(pause)
                pause = min(pause * 2, _TRYAGAIN_MAX_PAUSE)
        if whole_failure_raises and connection_failures == len(commands):
            error = next(r for r in results if isinstance(r, StoreUnavailable))
            self.stats.errors_unavailable += 1
            raise error
        if self.on_latency is not None:
            self.on_latency(trio.current_time() - started)
        return results

    async def _send(
        self,
        address: str,
        indices: list[int],
        entries: dict[int, _Entry],
        deadline: float,
        seconds: float,
        replies: dict[int, Any],
        failures: dict[str, StoreUnavailable],
    ) -> None:
        """One node's share of a call, as one pipeline; never raises StoreUnavailable.

        An ASK'd entry is preceded by ``ASKING`` in the same pipeline: one
        request, written contiguously on one connection.
        """
        batch: list[Sequence[CommandArg]] = []
        for i in indices:
            if entries[i].ask is not None:
                batch.append(("ASKING",))
            batch.append(entries[i].args)
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            failures[address] = _timed_out(seconds)
            return
        try:
            got = await self._node(address).pipeline(batch, timeout=remaining)
        except StoreUnavailable as exc:
            if exc.reason is not Unavailable.TIMEOUT:
                self._stale = True
            failures[address] = exc
            return
        position = 0
        for i in indices:
            if entries[i].ask is not None:
                position += 1  # ASKING's "OK"
            replies[i] = got[position]
            position += 1

    def _route(self, slot: int | None) -> str | None:
        if slot is None:
            return random.choice(self._masters) if self._masters else None
        return self._owner[slot]

    def _judge(
        self,
        entry: _Entry,
        reply: Any,
        address: str,
        scripts: dict[str, Script],
        reload: dict[str, set[str]],
    ) -> str:
        """What to do with one reply: ``done``, ``retry``, ``pause`` or ``give_up``."""
        if isinstance(reply, NoScript) and str(entry.args[1]) in scripts:
            if entry.redirects >= _MAX_REDIRECTS:
                return "done"
            entry.redirects += 1
            reload.setdefault(address, set()).add(str(entry.args[1]))
            return "retry"
        if isinstance(reply, StoreUnavailable):
            if reply.reason is Unavailable.TRY_AGAIN:
                self.cluster_stats.try_again += 1
                return "pause"
            if reply.reason in (Unavailable.CLUSTER_DOWN, Unavailable.MASTER_DOWN):
                self._stale = True
            return "done"
        if not isinstance(reply, CommandError) or reply.code not in ("MOVED", "ASK"):
            return "done"
        redirect = _REDIRECT.match(str(reply))
        if redirect is None:
            return "done"
        entry.redirects += 1
        if entry.redirects > _MAX_REDIRECTS:
            self._stale = True
            return "give_up"
        kind, slot, target = redirect.group(1), int(redirect.group(2)), redirect.group(3)
        if kind == "ASK":
            self.cluster_stats.ask += 1
            entry.ask = target
        else:
            self.cluster_stats.moved += 1
            self._owner[slot] = target
            if target not in self._masters:
                self._masters.append(target)
            if entry.redirects >= 2:
                self._stale = True  # a repeated MOVED: the whole map may be old
                self._refreshed_at = -math.inf
        return "retry"

    async def _reload(
        self, reload: dict[str, set[str]], scripts: dict[str, Script], deadline: float
    ) -> None:
        """Load the NOSCRIPT'd scripts on their nodes; failures show on the retried calls."""
        for address, shas in reload.items():
            self.cluster_stats.scripts_reloaded += len(shas)
            # A failure here shows on the retried EVALSHA, which reports it.
            with contextlib.suppress(RedisAdapterError):
                await self._node(address).load_scripts(
                    [scripts[sha] for sha in sorted(shas)],
                    timeout=max(deadline - trio.current_time(), 0.001),
                )


def _parse_shards(reply: Any, *, tls: bool) -> list[str | None]:
    """The slot map from a RESP2 ``CLUSTER SHARDS`` reply (flat key/value lists)."""
    owner: list[str | None] = [None] * SLOTS
    for shard in reply if isinstance(reply, list) else []:
        fields = dict(zip(shard[::2], shard[1::2], strict=False))
        master: str | None = None
        for node in fields.get("nodes") or []:
            info = dict(zip(node[::2], node[1::2], strict=False))
            port = info.get("tls-port" if tls else "port") or info.get("port")
            host = info.get("endpoint") or info.get("ip")
            if host in (None, "", "?"):
                host = info.get("ip")
            if info.get("role") == "master" and info.get("health") == "online" and port:
                master = f"{host}:{int(port)}"
        ranges = fields.get("slots") or []
        if master is None:
            continue
        for start, end in zip(ranges[::2], ranges[1::2], strict=False):
            for slot in range(int(start), int(end) + 1):
                owner[slot] = master
    return owner


def _parse_slots(reply: Any) -> list[str | None]:
    """The slot map from a ``CLUSTER SLOTS`` reply (Redis 6)."""
    owner: list[str | None] = [None] * SLOTS
    for entry in reply if isinstance(reply, list) else []:
        start, end, master = int(entry[0]), int(entry[1]), entry[2]
        address = f"{master[0]}:{int(master[1])}"
        for slot in range(start, end + 1):
            owner[slot] = address
    return owner


def _no_master(slot: int | None) -> StoreUnavailable:
    return StoreUnavailable(
        f"no master serves slot {slot} in the cluster's map", reason=Unavailable.CLUSTER_DOWN
    )


def _too_many_redirects(slot: int | None) -> StoreUnavailable:
    return StoreUnavailable(
        f"slot {slot} redirected more than {_MAX_REDIRECTS} times", reason=Unavailable.CLUSTER_DOWN
    )


def _timed_out(seconds: float) -> StoreUnavailable:
    return StoreUnavailable(
        f"the cluster did not answer within {seconds:g} s",
        reason=Unavailable.TIMEOUT,
        maybe_executed=True,
    )


def _copy(error: StoreUnavailable) -> StoreUnavailable:
    return StoreUnavailable(str(error), reason=error.reason, maybe_executed=error.maybe_executed)


@asynccontextmanager
async def open_cluster(
    seeds: Sequence[ConnectionParams] | str,
    *,
    timeout: float = 5.0,
    connections: int = 2,
    reconnect_backoff: float = 0.5,
    stall_timeout: float | None = None,
    on_latency: Callable[[float], None] | None = None,
    max_nodes: int = 64,
) -> AsyncIterator[ClusterClient]:
    """A :class:`ClusterClient` whose node connections live in a nursery owned by this block.

    ``seeds`` is a ``redis+cluster://`` URL or the seed nodes' parameters.
    The slot map is read once here if a seed answers within ``timeout``
    (that also tells whether sharded pub/sub exists); otherwise on the
    first call, so this succeeds while the cluster is down.  Raises
    :class:`ValueError` for a bad URL or setting.
    """
    params = parse_cluster_url(seeds) if isinstance(seeds, str) else list(seeds)
    async with open_service_nursery() as nursery:
        client = ClusterClient(
            nursery,
            params,
            timeout=timeout,
            connections=connections,
            reconnect_backoff=reconnect_backoff,
            stall_timeout=stall_timeout,
            on_latency=on_latency,
            max_nodes=max_nodes,
        )
        try:
            # Lazy, like a single-node client: the first call reports an outage.
            with contextlib.suppress(StoreUnavailable):
                await client.refresh_slots()
            yield client
        finally:
            await client.aclose()
