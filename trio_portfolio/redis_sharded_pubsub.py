"""Sharded pub/sub on a Redis Cluster (SSUBSCRIBE, Redis >= 7): one subscriber per shard.

Classic ``PUBLISH`` on a cluster is broadcast to every node over the cluster
bus, so fan-out cost grows with the cluster.  ``SPUBLISH`` stays inside the
shard that serves the channel's slot (the session channels carry the
session's hash tag, so a session's scripts can ``SPUBLISH`` from inside
Lua), and a subscriber must ``SSUBSCRIBE`` on that shard.

:class:`ShardedPubSub` is a :class:`~trio_portfolio.redis_pubsub.PubSub` to
its callers (``subscribe``, ``unsubscribe``, ``connected``, async iteration,
``statistics``), so the session-events hub uses it unchanged.  Inside:

* a slot map, read through a :class:`~trio_portfolio.redis_cluster.ClusterClient`
  of its own (used only for ``CLUSTER SHARDS``);
* one self-healing sharded ``PubSub`` per master that serves a wanted
  channel, each a task in this object's nursery, and one forwarding task per
  shard into the single bounded message buffer (full: dropped and counted);
* a **rehoming** task: when a shard says a channel is served elsewhere (a
  ``MOVED`` reply to ``SSUBSCRIBE``, or an ``sunsubscribe`` Redis pushed
  after a failover or resharding), it refreshes the map (at most every
  ``_REHOME_PAUSE`` seconds) and moves every wanted channel whose owner
  changed to the owner's shard.

Shards are bounded by the cluster's masters (``max_nodes`` of the router).
Messages published while a channel moves are lost, as with any pub/sub
reconnect: events are hints, never the record (see
:mod:`trio_portfolio.session_events`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from trio_portfolio.redis_cluster import ClusterClient, key_slot, open_cluster
from trio_portfolio.redis_errors import StoreUnavailable
from trio_portfolio.redis_pubsub import Message, PubSub, PubSubStatistics
from trio_portfolio.redis_wire import ConnectionParams
from trio_portfolio.services import open_service_nursery

__all__ = ["ShardedPubSub", "open_sharded_pubsub"]

log = logging.getLogger(__name__)

_REHOME_PAUSE = 0.1  # seconds between two map refreshes caused by moved channels


class ShardedPubSub(PubSub):
    """SSUBSCRIBE across a cluster's shards; create with :func:`open_sharded_pubsub`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        router: ClusterClient,
        *,
        buffer: int,
        heartbeat: float,
    ) -> None:
        super().__init__(router.params, buffer=buffer, heartbeat=heartbeat)
        self._shard_nursery = nursery
        self._router = router
        self._shards: dict[str, PubSub] = {}
        self._home: dict[str, str] = {}
        self._buffer_size = buffer
        self._moved_event = trio.Event()
        self.rehomed = 0
        """Channels moved to another shard after a MOVED or a pushed sunsubscribe."""

    @property
    def shards(self) -> dict[str, PubSub]:
        """The per-master subscribers, by ``host:port`` (for tests and metrics)."""
        return dict(self._shards)

    def statistics(self) -> PubSubStatistics:
        """Every shard's counters summed; ``connected`` if every shard in use is."""
        shards = [s.statistics() for s in self._shards.values()]
        return PubSubStatistics(
            connected=self.connected,
            connects=sum(s.connects for s in shards),
            reconnects=sum(s.reconnects for s in shards),
            channels_wanted=len(self._home),
            channels_confirmed=sum(s.channels_confirmed for s in shards),
            messages_received=sum(s.messages_received for s in shards),
            dropped=self.dropped + sum(s.dropped for s in shards),
            messages_dropped_undecodable=sum(s.messages_dropped_undecodable for s in shards),
        )

    @property
    def connected(self) -> bool:
        """Whether every shard holding a wanted channel has its connection up."""
        homes = set(self._home.values())
        return all(self._shards[h].connected for h in homes if h in self._shards)

    @connected.setter
    def connected(self, value: bool) -> None:
        pass  # PubSub.__init__ assigns it; here it is derived from the shards

    async def _owner(self, channel: str) -> str:
        slot = key_slot(channel)
        owner = self._router.node_for_slot(slot)
        if owner is None:
            await self._router.refresh_slots()
            owner = self._router.node_for_slot(slot)
        if owner is None:
            raise StoreUnavailable(f"no master serves the slot of channel {channel!r}")
        return owner

    async def _shard(self, address: str) -> PubSub:
        shard = self._shards.get(address)
        if shard is None:
            host, _, port = address.rpartition(":")
            params = ConnectionParams(
                host=host,
                port=int(port),
                tls=self.params.tls,
                tls_verify=self.params.tls_verify,
                username=self.params.username,
                password=self.params.password,
            )
            shard = PubSub(
                params,
                buffer=self._buffer_size,
                heartbeat=self._heartbeat,
                sharded=True,
                on_moved=self._signal_moved,
            )
            self._shards[address] = shard
            await self._shard_nursery.start(shard.run)
            self._shard_nursery.start_soon(self._forward, shard)
        return shard

    async def subscribe(self, *channels: str, timeout: float = 5.0) -> None:
        """SSUBSCRIBE each channel on its shard and wait for the confirmations.

        Raises :class:`StoreUnavailable` if the map cannot be read or a shard
        does not confirm within ``timeout`` (the subscription stands anyway).
        """
        with trio.move_on_after(timeout):
            for channel in channels:
                owner = await self._owner(channel)
                self._home[channel] = owner
                shard = await self._shard(owner)
                await shard.subscribe(channel, timeout=timeout)
            return
        raise StoreUnavailable(f"the cluster did not confirm the subscription within {timeout:g} s")

    def unsubscribe(self, *channels: str) -> None:
        """Stop receiving ``channels`` on whichever shard holds them."""
        for channel in channels:
            home = self._home.pop(channel, None)
            if home is not None and home in self._shards:
                self._shards[home].unsubscribe(channel)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Rehome moved channels for as long as this task lives."""
        task_status.started()
        while True:
            await self._moved_event.wait()
            self._moved_event = trio.Event()
            with contextlib.suppress(StoreUnavailable):
                await self._router.refresh_slots()
            for channel, home in list(self._home.items()):
                try:
                    owner = await self._owner(channel)
                except StoreUnavailable:
                    continue
                if owner == home:
                    self._shards[home].want(channel)  # subscribed again where it was
                    continue
                self.rehomed += 1
                self._shards[home].unsubscribe(channel)
                self._home[channel] = owner
                (await self._shard(owner)).want(channel)
            await trio.sleep(_REHOME_PAUSE)

    def _signal_moved(self) -> None:
        self._moved_event.set()

    async def _forward(self, shard: PubSub) -> None:
        async for message in shard:
            try:
                self._send.send_nowait(Message(channel=message.channel, data=message.data))
            except trio.WouldBlock:
                self.dropped += 1


@asynccontextmanager
async def open_sharded_pubsub(
    seeds: str | Sequence[ConnectionParams], *, buffer: int = 1024, heartbeat: float = 5.0
) -> AsyncIterator[PubSub]:
    """A sharded subscriber whose tasks live in this block (classic on a Redis 6 cluster).

    ``seeds`` is a ``redis+cluster://`` URL or the seed nodes.  Where the
    cluster has no sharded pub/sub (Redis 6: no ``CLUSTER SHARDS``), the
    store publishes with ``PUBLISH``, which a cluster broadcasts, so one
    classic :class:`PubSub` on a seed is returned instead.
    """
    async with open_cluster(seeds, connections=1) as router:
        if not router.sharded_pubsub:
            classic = PubSub(router.params, buffer=buffer, heartbeat=heartbeat)
            async with open_service_nursery() as nursery:
                await nursery.start(classic.run)
                yield classic
            return
        async with open_service_nursery() as nursery:
            sharded = ShardedPubSub(nursery, router, buffer=buffer, heartbeat=heartbeat)
            await nursery.start(sharded.run)
            yield sharded
