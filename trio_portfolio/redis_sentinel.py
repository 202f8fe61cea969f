"""Redis behind Sentinel through the Trio adapter: a single-node client that follows the master.

Theory of operation
===================

A :class:`SentinelClient` *is* the single-node
:class:`~trio_portfolio.redis_io.RedisClient` (same multiplexed connections,
same cancellation and deadline rules), pointed at whichever server the
sentinels currently name as master:

* **Discovery**: ``SENTINEL get-master-addr-by-name <name>`` asked of each
  sentinel in turn; the answer is **confirmed with ``ROLE``** on the named
  server (a sentinel that has not yet seen a failover can name a demoted
  master).  Done before the first connection, and again whenever there is
  reason to doubt the master (below); concurrent doubts share one discovery,
  at most one per ``reconnect_backoff``.
* **Switching**: when discovery finds another master, the client's
  connection parameters change and every connection is *retired* (it takes
  no new request, finishes those already written, then closes), so new
  calls go to the new master and none is cut.
* **Reasons to doubt**: a ``+switch-master`` message for this master on a
  subscriber connection to a sentinel (kept by a task in the client's
  nursery, moving to the next sentinel when one is lost, PINGing to notice
  a half-open connection); a ``READONLY`` reply (the master was demoted: the
  adapter already retires connections then, and this client also
  rediscovers); a failed connect.

``READONLY`` means Redis refused the command, so :meth:`execute` and
:meth:`evalsha` send it again once, to the rediscovered master, within the
call's deadline: a failover costs such a caller latency, not an error.
Pipelines leave ``READONLY`` entries in place (their other entries ran).
While no master can be confirmed calls fail with :class:`StoreUnavailable`
(``connect_failed``), fast, like any outage.

What a failover can lose: replication is asynchronous, so writes the old
master acknowledged but had not yet sent to the promoted replica are gone.
For this project that means a stored analysis result (or a revaluation)
streamed to a client may be missing after a failover; the fenced scripts
keep the store consistent (the version checks still hold), they cannot
bring a lost write back.  ``--wait-replicas`` narrows the window: each
result's append and a ``WAIT`` go back to back on a dedicated connection to
the current master before the result is sent
(:mod:`trio_portfolio.store.replication`); ADR-005 gives its cost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from trio_portfolio.redis_errors import StoreUnavailable, Unavailable
from trio_portfolio.redis_io import RedisClient, Script
from trio_portfolio.redis_mux import Connection
from trio_portfolio.redis_wire import (
    STREAM_ERRORS,
    CommandArg,
    ConnectionParams,
    encode_command,
    open_connection,
    receive_reply,
)
from trio_portfolio.services import open_service_nursery

__all__ = [
    "SENTINEL_SCHEMES",
    "SentinelClient",
    "SentinelStatistics",
    "is_sentinel_url",
    "open_sentinel",
    "parse_sentinel_url",
]

log = logging.getLogger(__name__)

SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_HEARTBEAT = 2.0  # seconds between PINGs on the +switch-master subscription when silent


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` is a ``redis+sentinel://`` URL."""
    return url.startswith(SENTINEL_SCHEMES)


def parse_sentinel_url(url: str) -> tuple[list[ConnectionParams], str, ConnectionParams]:
    """``(sentinels, master_name, master_template)`` of a sentinel URL.

    ``redis[s]+sentinel://[user:pass@]host:port[,host:port...]/<master-name>[/db][?query]``:
    the credentials, TLS and db are the master's; sentinels are reached
    without credentials.  Raises :class:`ValueError` for a malformed URL.
    """
    if not is_sentinel_url(url):
        raise ValueError(f"a sentinel URL starts with redis+sentinel://: {url!r}")
    scheme, rest = url.split("+sentinel://", 1)
    rest, _, query = rest.partition("?")
    userinfo, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    name, _, db = path.partition("/")
    if not name:
        raise ValueError(f"a sentinel URL names the master: .../<master-name>: {url!r}")
    suffix = f"?{query}" if query else ""
    sentinels = [
        ConnectionParams.from_url(f"{scheme}://{host.strip()}/0{suffix}")
        for host in hosts.split(",")
        if host.strip()
    ]
    if not sentinels:
        raise ValueError(f"a sentinel URL needs at least one sentinel host:port: {url!r}")
    prefix = f"{userinfo}@" if userinfo else ""
    template = ConnectionParams.from_url(f"{scheme}://{prefix}localhost/{db or 0}{suffix}")
    return sentinels, name, template


@attrs.define
class SentinelStatistics:
    """Counters of a :class:`SentinelClient`'s master following.

    ``discoveries`` asked the sentinels (``discovery_failures`` found no
    confirmed master), ``switches`` moved to another master,
    ``switch_messages`` ``+switch-master`` messages heard for this master,
    ``read_only_retries`` calls sent again after READONLY.
    """

    discoveries: int = 0
    discovery_failures: int = 0
    switches: int = 0
    switch_messages: int = 0
    read_only_retries: int = 0
    master: str = ""


class SentinelClient(RedisClient):
    """A :class:`RedisClient` that follows the master Sentinel names; see the module docstring."""

    def __init__(
        self,
        nursery: trio.Nursery,
        sentinels: Sequence[ConnectionParams],
        master_name: str,
        template: ConnectionParams,
        *,
        timeout: float,
        connections: int,
        reconnect_backoff: float,
        stall_timeout: float | None = None,
        on_latency: Callable[[float], None] | None = None,
    ) -> None:
        if not sentinels:
            raise ValueError("a sentinel client needs at least one sentinel")
        super().__init__(
            nursery,
            template,
            timeout=timeout,
            connections=connections,
            reconnect_backoff=reconnect_backoff,
            stall_timeout=stall_timeout,
            on_latency=on_latency,
        )
        self.sentinels = list(sentinels)
        self.master_name = master_name
        self._template = template
        self._known = False
        self._doubt = True
        self._discovered_at = -math.inf
        self._discovery_lock = trio.Lock()
        self._backoff_seconds = reconnect_backoff
        self.sentinel_stats = SentinelStatistics()

    def sentinel_statistics(self) -> SentinelStatistics:
        """A snapshot of the master-following counters."""
        return attrs.evolve(self.sentinel_stats)

    # -- discovery ---------------------------------------------------------------------

    def doubt_master(self) -> None:
        """Rediscover the master before the next connection (and now, if a follower runs)."""
        self._doubt = True

    async def discover(self, *, timeout: float | None = None) -> tuple[str, int]:
        """Ask the sentinels for the master, confirm it with ROLE, switch to it if it moved.

        Concurrent callers share one discovery.  Raises :class:`StoreUnavailable`
        (``connect_failed``) if no sentinel names a master that confirms.
        """
        seconds = self.timeout if timeout is None else timeout
        seen = self.sentinel_stats.discoveries
        with trio.move_on_after(seconds):
            async with self._discovery_lock:
                if self.sentinel_stats.discoveries != seen and self._known and not self._doubt:
                    return self.params.host, self.params.port
                return await self._discover_now()
        self.sentinel_stats.discovery_failures += 1
        raise StoreUnavailable(
            f"no sentinel confirmed a master for {self.master_name!r} within {seconds:g} s",
            reason=Unavailable.TIMEOUT,
        )

    async def _discover_now(self) -> tuple[str, int]:
        self.sentinel_stats.discoveries += 1
        self._discovered_at = trio.current_time()
        last = "no sentinel answered"
        for sentinel in self.sentinels:
            try:
                reply = await _ask(
                    sentinel, ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
                )
            except StoreUnavailable as exc:
                last = str(exc)
                continue
            if not (isinstance(reply, list) and len(reply) == 2):
                last = f"sentinel {sentinel.describe()} does not know {self.master_name!r}"
                continue
            candidate = attrs.evolve(self._template, host=str(reply[0]), port=int(reply[1]))
            try:
                role = await _ask(candidate, ("ROLE",))
            except StoreUnavailable as exc:
                last = f"named master {candidate.describe()} unreachable: {exc}"
                continue
            if not (isinstance(role, list) and role and role[0] == "master"):
                last = f"named master {candidate.describe()} says it is {role!r:.40}"
                continue
            self._switch(candidate)
            return candidate.host, candidate.port
        self.sentinel_stats.discovery_failures += 1
        raise StoreUnavailable(
            f"no confirmed master for {self.master_name!r}: {last}",
            reason=Unavailable.CONNECT_FAILED,
        )

    def _switch(self, params: ConnectionParams) -> None:
        self._doubt = False
        moved = not self._known or (params.host, params.port) != (
            self.params.host,
            self.params.port,
        )
        self._known = True
        self.sentinel_stats.master = f"{params.host}:{params.port}"
        if not moved:
            return
        if self.sentinel_stats.switches or self.stats.connects:
            log.warning("sentinel: master %r is now %s", self.master_name, params.describe())
        self.sentinel_stats.switches += 1
        self.params = params
        self._probe.retarget(params)
        self._failed_until = -math.inf
        self.retire()

    async def _connection(self) -> Connection:
        if not self._known or (
            self._doubt and trio.current_time() >= self._discovered_at + self._backoff_seconds
        ):
            try:
                await self.discover()
            except StoreUnavailable:
                if not self._known:
                    raise
        try:
            return await super()._connection()
        except StoreUnavailable:
            self._doubt = True
            raise

    def _retire_after_read_only(self) -> None:
        super()._retire_after_read_only()
        self._doubt = True

    async def _after_read_only(self, deadline: float) -> bool:
        """Rediscover after READONLY; whether a retry is worth it (a master moved, time left)."""
        self.sentinel_stats.read_only_retries += 1
        before = (self.params.host, self.params.port)
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            return False
        self._discovered_at = -math.inf
        try:
            await self.discover(timeout=remaining)
        except StoreUnavailable:
            return False
        return (self.params.host, self.params.port) != before

    # -- calls that survive READONLY -------------------------------------------------------

    async def execute(self, *args: CommandArg, timeout: float | None = None) -> Any:
        """As :meth:`RedisClient.execute`; a READONLY reply is sent again to the new master once."""
        seconds = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + seconds
        try:
            return await super().execute(*args, timeout=seconds)
        except StoreUnavailable as exc:
            if exc.reason is not Unavailable.READ_ONLY or not await self._after_read_only(deadline):
                raise
        return await super().execute(*args, timeout=max(deadline - trio.current_time(), 0.001))

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[CommandArg] = (),
        args: Sequence[CommandArg] = (),
        *,
        timeout: float | None = None,
    ) -> Any:
        """As :meth:`RedisClient.evalsha` (which calls :meth:`execute`, so READONLY is retried)."""
        return await super().evalsha(script, keys, args, timeout=timeout)

    # -- following +switch-master ----------------------------------------------------------

    async def follow_switches(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Subscribe to ``+switch-master`` on one sentinel after another, forever.

        A message naming this master triggers discovery (confirmed with ROLE,
        never trusted blindly).  Any loss moves to the next sentinel after a
        capped backoff; a (re)subscription also rediscovers, since a switch
        may have been missed meanwhile.
        """
        task_status.started()
        index = 0
        backoff = 0.05
        while True:
            sentinel = self.sentinels[index % len(self.sentinels)]
            index += 1
            try:
                stream, parser = await open_connection(sentinel)
            except StoreUnavailable:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            try:
                await stream.send_all(encode_command(("SUBSCRIBE", "+switch-master")))
                backoff = 0.05
                await self._listen(stream, parser)
            except (StoreUnavailable, *STREAM_ERRORS) as exc:
                log.info("sentinel subscription to %s lost: %s", sentinel.describe(), exc)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            await trio.sleep(backoff)

    async def _listen(self, stream: trio.abc.Stream, parser: Any) -> None:
        awaiting_pong = False
        subscribed = False
        while True:
            with trio.move_on_after(_HEARTBEAT) as scope:
                reply = await receive_reply(stream, parser)
            if scope.cancelled_caught:
                if awaiting_pong:
                    return  # silent for two periods: half-open, move on
                await stream.send_all(encode_command(("PING",)))
                awaiting_pong = True
                continue
            awaiting_pong = False
            if not isinstance(reply, list) or len(reply) < 2:
                continue
            if reply[0] == "subscribe" and not subscribed:
                subscribed = True
                await self._rediscover_quietly()
            elif (
                reply[0] == "message"
                and len(reply) == 3
                and isinstance(reply[2], str)
                and reply[2].split(" ", 1)[0] == self.master_name
            ):
                self.sentinel_stats.switch_messages += 1
                self._doubt = True
                await self._rediscover_quietly()

    async def _rediscover_quietly(self) -> None:
        self._doubt = True
        try:
            await self.discover()
        except StoreUnavailable as exc:
            log.warning("sentinel: rediscovery of %r failed: %s", self.master_name, exc)


async def _ask(params: ConnectionParams, command: tuple[CommandArg, ...]) -> Any:
    """One command on a connection of its own (closed after); errors as values."""
    stream, parser = await open_connection(params)
    try:
        await stream.send_all(encode_command(command))
        return await receive_reply(stream, parser)
    except STREAM_ERRORS as exc:
        raise StoreUnavailable(
            f"lost the connection to {params.describe()}: {exc}",
            reason=Unavailable.CONNECTION_LOST,
        ) from exc
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def open_sentinel(
    url: str,
    *,
    timeout: float = 5.0,
    connections: int = 2,
    reconnect_backoff: float = 0.5,
    stall_timeout: float | None = None,
    on_latency: Callable[[float], None] | None = None,
) -> AsyncIterator[SentinelClient]:
    """A :class:`SentinelClient` whose connections and follower task live in this block's nursery.

    Discovery is tried once here (bounded by ``timeout``) and otherwise on
    the first call, so this succeeds while the sentinels are down.  Raises
    :class:`ValueError` for a bad URL.
    """
    sentinels, name, template = parse_sentinel_url(url)
    async with open_service_nursery() as nursery:
        client = SentinelClient(
            nursery,
            sentinels,
            name,
            template,
            timeout=timeout,
            connections=connections,
            reconnect_backoff=reconnect_backoff,
            stall_timeout=stall_timeout,
            on_latency=on_latency,
        )
        try:
            try:
                await client.discover()
            except StoreUnavailable as exc:
                log.warning("sentinel: no master yet for %r: %s", name, exc)
            await nursery.start(client.follow_switches)
            yield client
        finally:
            await client.aclose()
