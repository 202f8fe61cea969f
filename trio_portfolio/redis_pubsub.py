"""Redis pub/sub on Trio: one subscriber connection that heals itself.

Theory of operation
===================

A RESP2 connection in subscribed mode can issue nothing but (un)subscribe
and PING, so pub/sub gets a connection of its own, separate from the
multiplexed command connections of :mod:`trio_portfolio.redis_io`.

The *wanted* set of channels is the source of truth.  :meth:`PubSub.subscribe`
and :meth:`PubSub.unsubscribe` only change that set and wake the **syncer**
task, which sends whatever SUBSCRIBE/UNSUBSCRIBE commands make the server's
set match.  The **reader** task parses replies: confirmations update the
*confirmed* set (``subscribe`` waits for its channels to be confirmed),
messages go into a bounded channel for the consumer, and PONGs prove the
connection alive.  A **heartbeat** PINGs every ``heartbeat`` seconds and
closes a connection that has said nothing for three periods, so a half-open
TCP connection is noticed.

When the connection breaks, the run loop reconnects with capped exponential
backoff and the syncer resubscribes every wanted channel: callers never need
to resubscribe.  Messages published while disconnected are lost; pub/sub is
used in this project only for prompt notification, never as the record
(Redis keys are), so a lost message delays a reaction but loses no state.

Backpressure: the message buffer is bounded; when the consumer falls behind,
new messages are dropped and counted in ``dropped`` rather than growing
memory without bound.

Robustness: no bytes Redis sends can end the reader.  A message whose
channel or payload is not valid UTF-8 is dropped and counted in
``messages_dropped_undecodable`` (hiredis consumes such a reply whole, so the
connection stays in step); a reply of an unexpected shape is ignored; bytes
that are not RESP at all drop the connection, which is then made again like
after any loss.  :meth:`PubSub.statistics` gathers the counters for metrics.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from trio_portfolio.redis_errors import CommandError, ReplyDecodeError, StoreUnavailable
from trio_portfolio.redis_wire import (
    ConnectionParams,
    encode_command,
    next_reply,
    open_connection,
)
from trio_portfolio.services import open_service_nursery

__all__ = ["Message", "PubSub", "PubSubStatistics", "open_pubsub"]

log = logging.getLogger(__name__)


@attrs.frozen
class Message:
    """One published message."""

    channel: str
    data: str


@attrs.frozen
class PubSubStatistics:
    """Counters of a :class:`PubSub` (since it opened), for metrics.

    ``connects`` counts every connection made, ``reconnects`` those after
    the first; ``dropped`` messages were dropped because the consumer fell
    behind, ``messages_dropped_undecodable`` because their bytes were not
    UTF-8.
    """

    connected: bool
    connects: int
    reconnects: int
    channels_wanted: int
    channels_confirmed: int
    messages_received: int
    dropped: int
    messages_dropped_undecodable: int


class PubSub:
    """A self-healing subscriber; create with :func:`open_pubsub`."""

    def __init__(
        self,
        params: ConnectionParams,
        *,
        buffer: int,
        heartbeat: float,
        sharded: bool = False,
        on_moved: Callable[[], None] | None = None,
    ) -> None:
        self.params = params
        self._sharded = sharded
        """SSUBSCRIBE/SUNSUBSCRIBE (one channel per command: each may be in another slot)."""
        self._on_moved = on_moved
        """Called (sharded) when Redis says a wanted channel is served elsewhere now."""
        self._heartbeat = heartbeat
        self._wanted: set[str] = set()
        self._sent: set[str] = set()
        self._confirmed: set[str] = set()
        self._wakeup = trio.Event()
        self._confirmations = trio.Event()
        self._send, self.messages = trio.open_memory_channel[Message](buffer)
        self.connected = False
        self._last_heard = 0.0
        self.connects = 0
        self.reconnects = 0
        """Connections made after the first one (each followed a loss)."""
        self.messages_received = 0
        self.dropped = 0
        """Messages dropped because the buffer was full (the consumer fell behind)."""
        self.messages_dropped_undecodable = 0
        """Replies dropped because they were not UTF-8 (a ``PUBLISH`` of arbitrary bytes)."""

    def statistics(self) -> PubSubStatistics:
        """A snapshot of the counters."""
        return PubSubStatistics(
            connected=self.connected,
            connects=self.connects,
            reconnects=self.reconnects,
            channels_wanted=len(self._wanted),
            channels_confirmed=len(self._confirmed),
            messages_received=self.messages_received,
            dropped=self.dropped,
            messages_dropped_undecodable=self.messages_dropped_undecodable,
        )

    async def subscribe(self, *channels: str, timeout: float = 5.0) -> None:
        """Subscribe to ``channels`` and wait until Redis confirms them.

        The subscription stands even if this raises: it is made (again) as
        soon as Redis is reachable.  Raises :class:`StoreUnavailable` when
        the confirmation does not come within ``timeout`` seconds.
        """
        await trio.lowlevel.checkpoint()
        self._wanted.update(channels)
        self._wakeup.set()
        with trio.move_on_after(timeout):
            while not self._confirmed.issuperset(channels):
                await self._confirmations.wait()
            return
        raise StoreUnavailable(f"Redis did not confirm the subscription within {timeout:g} s")

    def want(self, *channels: str) -> None:
        """Subscribe to ``channels`` without waiting for the confirmation."""
        self._wanted.update(channels)
        self._wakeup.set()

    def unsubscribe(self, *channels: str) -> None:
        """Stop receiving ``channels`` (the syncer tells Redis; nothing to wait for)."""
        self._wanted.difference_update(channels)
        # Forget the confirmations now: a subscribe() right after this must
        # wait for Redis to confirm anew, not trust the old subscription.
        self._confirmed.difference_update(channels)
        self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self.messages.__aiter__()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a subscriber connection up for as long as this task lives."""
        task_status.started()
        backoff = 0.05
        while True:
            try:
                stream, parser = await open_connection(self.params)
            except StoreUnavailable as exc:
                log.warning("pub/sub cannot connect, retrying in %.2fs: %s", backoff, exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            if self.connects:
                self.reconnects += 1
            self.connects += 1
            try:
                await self._serve(stream, parser)
            finally:
                self.connected = False
                self._sent.clear()
                self._confirmed.clear()
                self._signal_confirmations()
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            await trio.sleep(backoff)

    async def _serve(self, stream: trio.abc.Stream, parser: Any) -> None:
        """Run reader, syncer and heartbeat until the connection fails."""
        self.connected = True
        self._last_heard = trio.current_time()
        # The syncer and the heartbeat both write; a Trio stream allows one
        # sender at a time (a second raises BusyResourceError).
        send_lock = trio.StrictFIFOLock()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, stream, parser, nursery.cancel_scope)
                nursery.start_soon(self._syncer, stream, send_lock)
                nursery.start_soon(self._heartbeat_loop, stream, send_lock, nursery.cancel_scope)
        except* (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            StoreUnavailable,  # includes the parser's ProtocolError
        ) as group:
            log.warning("pub/sub connection lost: %s", group.exceptions[0])

    async def _syncer(self, stream: trio.abc.Stream, send_lock: trio.StrictFIFOLock) -> None:
        while True:
            self._wakeup = trio.Event()
            add = sorted(self._wanted - self._sent)
            remove = sorted(self._sent - self._wanted)
            payload = b""
            if self._sharded:
                payload += b"".join(encode_command(("SSUBSCRIBE", c)) for c in add)
                payload += b"".join(encode_command(("SUNSUBSCRIBE", c)) for c in remove)
            else:
                if add:
                    payload += encode_command(("SUBSCRIBE", *add))
                if remove:
                    payload += encode_command(("UNSUBSCRIBE", *remove))
            if payload:
                self._sent.update(add)
                self._sent.difference_update(remove)
                async with send_lock:
                    await stream.send_all(payload)
            await self._wakeup.wait()

    async def _heartbeat_loop(
        self, stream: trio.abc.Stream, send_lock: trio.StrictFIFOLock, scope: trio.CancelScope
    ) -> None:
        while True:
            await trio.sleep(self._heartbeat)
            if trio.current_time() - self._last_heard > 3 * self._heartbeat:
                log.warning(
                    "pub/sub connection silent for %.1fs, reconnecting", 3 * self._heartbeat
                )
                scope.cancel()
                return
            async with send_lock:
                await stream.send_all(encode_command(("PING",)))

    async def _reader(self, stream: trio.abc.Stream, parser: Any, scope: trio.CancelScope) -> None:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                log.warning("Redis closed the pub/sub connection")
                scope.cancel()
                return
            self._last_heard = trio.current_time()
            parser.feed(data)
            while (reply := next_reply(parser)) is not False:
                self._handle(reply)

    def _handle(self, reply: Any) -> None:
        """Act on one reply; total: whatever its shape, it never raises."""
        if isinstance(reply, ReplyDecodeError):
            # Only a message can carry bytes we did not send (channel names
            # are ours), so this was one: it is gone whole, the stream is in step.
            self.messages_dropped_undecodable += 1
            return
        if isinstance(reply, CommandError) and reply.code == "MOVED":
            self._moved()  # SSUBSCRIBE sent to a node that does not serve the slot
            return
        if not (isinstance(reply, list) and len(reply) >= 2 and isinstance(reply[1], str)):
            return  # PONG, an error reply, or a shape we never subscribed for
        kind, channel = reply[0], reply[1]
        if self._sharded and isinstance(kind, str) and kind[:1] == "s":
            kind = kind[1:]  # smessage, ssubscribe, sunsubscribe
            if kind == "unsubscribe" and channel in self._wanted:
                # Pushed by Redis (a failover or resharding moved the slot):
                # forget it was sent, so it is subscribed again where it lives.
                self._sent.discard(channel)
                self._confirmed.discard(channel)
                self._signal_confirmations()
                self._moved()
                return
        if kind == "message" and len(reply) == 3 and isinstance(reply[2], str):
            self.messages_received += 1
            try:
                self._send.send_nowait(Message(channel=channel, data=reply[2]))
            except trio.WouldBlock:
                self.dropped += 1
        elif kind == "subscribe":
            self._confirmed.add(channel)
            self._signal_confirmations()
        elif kind == "unsubscribe":
            self._confirmed.discard(channel)
            self._signal_confirmations()

    def _moved(self) -> None:
        if self._on_moved is not None:
            self._on_moved()
        else:
            self._wakeup.set()

    def _signal_confirmations(self) -> None:
        self._confirmations.set()
        self._confirmations = trio.Event()


@asynccontextmanager
async def open_pubsub(
    url: str, *, buffer: int = 1024, heartbeat: float = 5.0
) -> AsyncIterator[PubSub]:
    """A :class:`PubSub` whose connection lives in a nursery owned by this block.

    One node only; :func:`trio_portfolio.redis_connect.open_pubsub` also
    opens sharded pub/sub on a cluster.
    """
    params = ConnectionParams.from_url(url)
    pubsub = PubSub(params, buffer=buffer, heartbeat=heartbeat)
    async with open_service_nursery() as nursery:
        await nursery.start(pubsub.run)
        yield pubsub
