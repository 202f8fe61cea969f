"""Write, then ``WAIT`` for replicas, on a connection of its own (``--wait-replicas``).

Why a connection of its own
===========================

Redis replicates asynchronously: a master answers a write before any
replica has it, so a failover can lose writes the old master had already
acknowledged (docs/adr/005-replication-wait.md).  ``WAIT n ms`` narrows
that window: it blocks until ``n`` replicas acknowledged every write made
*on the same client connection* before it, or ``ms`` passed, and answers
how many did.  Two facts decide where it can run:

* it covers the writes of its own connection only, so it must follow the
  write on the connection that sent the write;
* it blocks that connection for up to ``ms``, so on the adapter's shared,
  multiplexed connections it would stall every other caller's reply queued
  behind it.

So the fenced append and its ``WAIT`` go together, back to back in one
write, on a *dedicated* connection taken from a small pool per master
(:class:`ReplicaWait`, at most ``connections`` per node; callers beyond
that queue for one).  One caller at a time uses a pooled connection,
request/response, as :class:`~trio_portfolio.redis_io.RedisClient`'s probe
connection does: any failure or cancellation mid-call closes it (its
replies may still be on the way), so no caller ever reads another's reply.
On a Redis Cluster the pool is the one of the master that owns the
session's slot (``node_for_slot`` of the router's map); through Sentinel
it is the current master's.

What is answered
================

:meth:`ReplicaWait.evalsha` answers the script's reply, exactly as
:meth:`~trio_portfolio.redis_io.RedisClient.evalsha` would, and counts
what ``WAIT`` said (:meth:`ReplicaWait.statistics`):

* ``acknowledged`` - at least ``replicas`` replicas have the write;
* ``short`` - fewer within ``timeout_ms``.  The write *is* stored on the
  master and the caller goes on (the result is sent): refusing it would
  make the client believe a stored result was lost, and a replay after a
  reconnect would stream it anyway.  The counter (and its metric) is the
  signal that the failover window is open again (a replica down or lagging);
* ``unconfirmed`` - the node redirected the write (``MOVED``/``ASK`` after
  a resharding, ``READONLY`` after a failover) or refused ``WAIT``.  The
  script is then run through the router, which follows the redirect (and
  updates its map, so the next write goes straight to the right master),
  without a ``WAIT``.

Errors are those of :meth:`~trio_portfolio.redis_io.RedisClient.evalsha`:
:class:`~trio_portfolio.redis_io.StoreUnavailable` (with
``maybe_executed`` when the connection broke or timed out after the
request was written; the deadline is the client's timeout plus
``timeout_ms``) and :data:`~trio_portfolio.redis_io.CommandError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from redis.crc import key_slot

from trio_portfolio.redis_cluster import ClusterClient
from trio_portfolio.redis_errors import NoScript
from trio_portfolio.redis_io import (
    CommandArg,
    CommandError,
    RedisAdapterError,
    RedisClient,
    Script,
    StoreUnavailable,
    Unavailable,
)
from trio_portfolio.redis_wire import (
    STREAM_ERRORS,
    ConnectionParams,
    encode_command,
    open_connection,
    receive_reply,
)

__all__ = [
    "MAX_NODES",
    "ReplicaWait",
    "ReplicaWaitStatistics",
    "open_replica_wait",
]

MAX_NODES = 64
"""Node pools kept at most; beyond, pools nobody is using are closed (old masters)."""

_REDIRECTS = ("MOVED", "ASK")


@attrs.define
class ReplicaWaitStatistics:
    """Counters of :class:`ReplicaWait` (see the module docstring for their meaning)."""

    waits: int = 0
    acknowledged: int = 0
    short: int = 0
    unconfirmed: int = 0
    connections_open: int = 0


class _NodePool:
    """At most ``size`` dedicated connections to one node, each used by one caller at a time."""

    def __init__(self, params: ConnectionParams, size: int) -> None:
        self.params = params
        self.size = size
        self.slots = trio.Semaphore(size)
        self.idle: list[tuple[trio.abc.Stream, Any]] = []

    @property
    def in_use(self) -> bool:
        return self.slots.value < self.size


class ReplicaWait:
    """Run a script and ``WAIT replicas timeout_ms`` after it on a dedicated connection.

    Create with :func:`open_replica_wait` (which closes the pooled
    connections on exit).  Safe to use from many tasks at once; holds no
    task of its own.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        replicas: int,
        timeout_ms: int,
        connections: int = 4,
    ) -> None:
        """Nothing is connected yet (each node's pool opens on first use).

        Raises:
          ValueError: if ``replicas`` or ``connections`` is below 1, or
            ``timeout_ms`` below 1 (``WAIT 0`` would block forever).
        """
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        if timeout_ms < 1:
            raise ValueError("timeout_ms must be at least 1 (WAIT with 0 never returns)")
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.redis = redis
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.connections = connections
        self._pools: dict[ConnectionParams, _NodePool] = {}
        self._stats = ReplicaWaitStatistics()

    def statistics(self) -> ReplicaWaitStatistics:
        """A snapshot of the counters."""
        return attrs.evolve(self._stats)

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[CommandArg]) -> Any:
        """The reply of ``script`` on ``keys``, once written and waited for (see the module).

        Raises:
          StoreUnavailable, CommandError: as ``RedisClient.evalsha``.
        """
        seconds = self.redis.timeout + self.timeout_ms / 1000
        params = await self._target(keys[0], seconds)
        if params is None:
            return await self._unconfirmed(script, keys, args)
        run = ("EVALSHA", script.sha, len(keys), *keys, *args)
        wait = ("WAIT", self.replicas, self.timeout_ms)
        reply, acked = await self._call(params, [run, wait], seconds)
        if isinstance(reply, NoScript):
            _, reply, acked = await self._call(
                params, [("SCRIPT", "LOAD", script.source), run, wait], seconds
            )
        if _redirected(reply):
            return await self._unconfirmed(script, keys, args)
        if isinstance(reply, RedisAdapterError):
            raise reply
        self._stats.waits += 1
        if isinstance(acked, int) and acked >= self.replicas:
            self._stats.acknowledged += 1
        elif isinstance(acked, int):
            self._stats.short += 1
        else:
            self._stats.unconfirmed += 1
        return reply

    async def _unconfirmed(
        self, script: Script, keys: Sequence[str], args: Sequence[CommandArg]
    ) -> Any:
        """Through the router (which follows redirects), without a WAIT."""
        self._stats.unconfirmed += 1
        return await self.redis.evalsha(script, keys, args)

    async def _target(self, key: str, seconds: float) -> ConnectionParams | None:
        """Where ``key``'s master is: the cluster node owning its slot, else the client's."""
        if not isinstance(self.redis, ClusterClient):
            return self.redis.params
        slot = key_slot(key.encode())
        address = self.redis.node_for_slot(slot)
        if address is None:
            await self.redis.refresh_slots(timeout=seconds)
            address = self.redis.node_for_slot(slot)
        return None if address is None else self.redis.node_client(address).params

    async def _pool(self, params: ConnectionParams) -> _NodePool:
        pool = self._pools.get(params)
        if pool is None:
            if len(self._pools) >= MAX_NODES:
                for old, other in list(self._pools.items()):
                    if not other.in_use:
                        await self._forget(old)
            pool = self._pools[params] = _NodePool(params, self.connections)
        return pool

    async def _forget(self, params: ConnectionParams) -> None:
        """Drop a node's pool, closing its idle connections (immediate: no I/O awaited)."""
        pool = self._pools.pop(params)
        idle, pool.idle = pool.idle, []
        with trio.CancelScope(shield=True):
            for stream, _ in idle:
                self._stats.connections_open -= 1
                await trio.aclose_forcefully(stream)

    async def _call(
        self, params: ConnectionParams, commands: list[tuple[CommandArg, ...]], seconds: float
    ) -> list[Any]:
        """``commands`` written at once on one pooled connection; their replies (errors as values).

        Raises:
          StoreUnavailable: no connection, or it broke or timed out (then
            ``maybe_executed``: the script may have run).
        """
        pool = await self._pool(params)
        written = False
        with trio.move_on_after(seconds) as scope:
            async with pool.slots:
                if pool.idle:
                    conn = pool.idle.pop()
                else:
                    conn = await open_connection(pool.params)
                    self._stats.connections_open += 1
                kept = False
                try:
                    stream, parser = conn
                    written = True
                    await stream.send_all(b"".join(encode_command(c) for c in commands))
                    replies = [await receive_reply(stream, parser) for _ in commands]
                    kept = True
                except STREAM_ERRORS as exc:
                    raise StoreUnavailable(
                        f"lost the write-and-WAIT connection to {params.describe()}: {exc}",
                        reason=Unavailable.CONNECTION_LOST,
                        maybe_executed=True,
                    ) from exc
                except StoreUnavailable as exc:
                    exc.maybe_executed = True
                    raise
                finally:
                    if kept:
                        pool.idle.append(conn)
                    else:
                        self._stats.connections_open -= 1
                        with trio.CancelScope(shield=True):
                            await trio.aclose_forcefully(conn[0])
                return replies
        assert scope.cancelled_caught
        raise StoreUnavailable(
            f"write-and-WAIT on {params.describe()} did not answer within {seconds:.3f}s",
            reason=Unavailable.TIMEOUT,
            maybe_executed=written,
        )

    async def aclose(self) -> None:
        """Close every idle pooled connection (those in use close when their call ends)."""
        for params in list(self._pools):
            await self._forget(params)


def _redirected(reply: Any) -> bool:
    """A reply that says "not on this node": MOVED, ASK, or READONLY (a demoted master)."""
    if isinstance(reply, StoreUnavailable):
        return reply.reason is Unavailable.READ_ONLY
    return isinstance(reply, CommandError) and reply.code in _REDIRECTS


@asynccontextmanager
async def open_replica_wait(
    redis: RedisClient, *, replicas: int, timeout_ms: int, connections: int = 4
) -> AsyncIterator[ReplicaWait | None]:
    """A :class:`ReplicaWait` for ``redis`` (``None`` when ``replicas`` is 0: off); closed on exit.

    Raises:
      ValueError: as :class:`ReplicaWait` (for ``replicas`` > 0).
    """
    if replicas == 0:
        yield None
        return
    waiter = ReplicaWait(redis, replicas=replicas, timeout_ms=timeout_ms, connections=connections)
    try:
        yield waiter
    finally:
        await waiter.aclose()
