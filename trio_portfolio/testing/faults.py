"""Fault injection: a TCP proxy that can cut, refuse or black-hole connections.

Put :class:`TcpProxy` between a client and a TCP server (usually Redis) to
test what happens on outages: :meth:`TcpProxy.cut` closes every current
connection, :meth:`TcpProxy.refuse` closes new ones at once, and
:meth:`TcpProxy.blackhole` holds all traffic (for timeout tests) and
releases it intact when cleared.  Every task lives in a nursery the proxy
owns; :func:`open_tcp_proxy` scopes it to an ``async with`` block.

:func:`hold_before` pauses an async method at its door, so that a test can
make two operations race at exactly the step it wants to check.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from trio_portfolio.services import open_service_nursery

__all__ = ["BUSY_SCRIPT", "ProxyStatistics", "TcpProxy", "hold_before", "open_tcp_proxy"]

BUSY_SCRIPT = """
local os_lib = rawget(_G, 'os')
local function now_us()
  if os_lib and os_lib.clock then return os_lib.clock() * 1000000 end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local stop = now_us() + tonumber(ARGV[1]) * 1000
repeat until now_us() >= stop
return ARGV[2]
"""
"""Lua that keeps Redis busy for ``ARGV[1]`` milliseconds, then returns ``ARGV[2]``.

A stall like ``DEBUG SLEEP`` (which Redis 7 refuses unless started with
``enable-debug-command``): every other client waits.  Redis 8 and Valkey
freeze ``TIME`` inside a script (a loop on it never ends there), so the
clock is ``os.clock()`` (CPU time, Redis >= 7.2 and Valkey) where it exists,
and ``TIME`` only on the older servers that have no ``os`` library.  Keep
``ARGV[1]`` below the server's busy-script limit (5 s by default).
"""


@attrs.frozen
class ProxyStatistics:
    """Counters of a :class:`TcpProxy`."""

    accepted: int  # connections accepted, including refused ones
    refused: int  # closed at once because refuse() was set
    active: int  # currently open


@attrs.define(eq=False)
class _Link:
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class TcpProxy:
    """A TCP proxy on 127.0.0.1 with switches for outages.

    * :meth:`cut` closes every current connection (both sides see EOF), as
      a server restart would.
    * :meth:`refuse` closes new connections as soon as they are accepted,
      for as long as it is set; open ones are untouched (combine with
      :meth:`cut` for a full outage).
    * :meth:`blackhole` holds all traffic, on current and new connections:
      no byte crosses the proxy while it is set, so clients time out.  Bytes
      are held, not dropped, so clearing it resumes every stream intact.

    Each connection is served by a task in the proxy's nursery; a connection
    ends (both sides closed) when either side closes or fails.  Use it from
    the Trio thread that runs it.
    """

    target_host: str
    target_port: int
    _port: int | None = attrs.field(default=None, init=False)
    _refusing: bool = attrs.field(default=False, init=False)
    _flowing: trio.Event = attrs.field(factory=trio.Event, init=False)
    _links: set[_Link] = attrs.field(factory=set, init=False)
    _accepted: int = attrs.field(default=0, init=False)
    _refused: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._flowing.set()

    @property
    def port(self) -> int:
        """The listening port (after :meth:`run` reported started)."""
        if self._port is None:
            raise RuntimeError("the proxy is not running")
        return self._port

    @property
    def url(self) -> str:
        """A Redis URL that goes through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def statistics(self) -> ProxyStatistics:
        """Connection counters, for assertions."""
        return ProxyStatistics(self._accepted, self._refused, len(self._links))

    def refuse(self, on: bool = True) -> None:
        """Close new connections on accept while ``on``."""
        self._refusing = on

    def blackhole(self, on: bool = True) -> None:
        """Hold all traffic while ``on``; release it when cleared."""
        if on and self._flowing.is_set():
            self._flowing = trio.Event()
        elif not on:
            self._flowing.set()

    async def cut(self) -> None:
        """Close all current connections; returns once they are closed."""
        links = list(self._links)
        for link in links:
            link.cancel_scope.cancel()
        for link in links:
            await link.done.wait()
        await trio.lowlevel.checkpoint()

    async def _wait_flowing(self) -> None:
        while not self._flowing.is_set():
            await self._flowing.wait()

    async def run(
        self, *, task_status: trio.TaskStatus[TcpProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on 127.0.0.1:0 and proxy until cancelled; reports itself when listening."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listeners[0] as listener, trio.open_nursery() as nursery:
            self._port = int(listener.socket.getsockname()[1])
            task_status.started(self)
            while True:
                client = await listener.accept()
                self._accepted += 1
                if self._refusing:
                    self._refused += 1
                    await trio.aclose_forcefully(client)
                    continue
                link = _Link()
                self._links.add(link)
                nursery.start_soon(self._serve, client, link)

    async def _serve(self, client: trio.SocketStream, link: _Link) -> None:
        try:
            with link.cancel_scope:
                async with client:
                    await self._wait_flowing()
                    try:
                        upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
                    except OSError:
                        return  # the target is down: the client just sees EOF
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                        nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
        finally:
            self._links.discard(link)
            link.done.set()

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, pair_scope: trio.CancelScope
    ) -> None:
        """Copy one direction; when it ends (EOF or error), end the whole connection."""
        try:
            while data := await source.receive_some(65536):
                await self._wait_flowing()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        pair_scope.cancel()


@asynccontextmanager
async def open_tcp_proxy(target_host: str, target_port: int) -> AsyncIterator[TcpProxy]:
    """A running :class:`TcpProxy` to ``target_host:target_port``; stopped on exit."""
    async with open_service_nursery() as nursery:
        yield await nursery.start(TcpProxy(target_host, target_port).run)


def hold_before(target: Any, name: str, reached: trio.Event, release: trio.Event) -> None:
    """Make ``target.name`` (an async method) wait for ``release`` once ``reached`` is set.

    Every later call waits too (each sets ``reached`` and waits on the same
    ``release``); the method is replaced on ``target`` itself, so the patch
    dies with the object.
    """
    original: Callable[..., Awaitable[Any]] = getattr(target, name)

    @functools.wraps(original)
    async def held(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        await release.wait()
        return await original(*args, **kwargs)

    setattr(target, name, held)
