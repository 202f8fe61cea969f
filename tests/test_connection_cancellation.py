"""Cancellation at every await of a connection's life leaves the server consistent.

Rules of this suite: a whole server runs in-process on 127.0.0.1, port 0,
against the harness's real redis-server.  The clients here are deliberately
rude: they speak WebSocket with wsproto over a socket the test owns and
vanish without a close frame (a FIN, or a RST via ``SO_LINGER 0``) at chosen
or random moments: before the handshake, half-way through it, before the
first frame, right after ``analyze`` (while the snapshot is taken), while
metrics commit, after a switch.  Afterwards the server must be as if they
had never come: no connection or task left behind, no session watched, no
session left with a ``current_analysis`` of a gone connection, and a new
client served normally.  Every wait is under ``fail_after``.
"""

from __future__ import annotations

import collections
import logging
import random
import secrets
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, RejectConnection, Request, TextMessage

from trio_portfolio.testing import (
    IO,
    LiveServer,
    RedisServerInfo,
    greet,
    is_type,
    live,
    open_client,
    services_of,
)

RUDE_DELAYS = (0.0, 0.1)
"""Metric delays from none (a result commits right after the snapshot) to a tenth of a
second, so the moments a rude client picks fall on every stage of an analysis."""


POOLED = ("trio_portfolio.redis_io.", "trio_portfolio.redis_mux.")  # the adapter's connections
"""Tasks of the Redis client's pooled connections, which it opens lazily under load."""


def task_census() -> collections.Counter[str]:
    """How many tasks of each name run in this Trio run (the whole task tree).

    The Redis client's connection tasks are left out: its pool opens its
    second connection only when the first is busy, which is load, not a leak.
    """
    census: collections.Counter[str] = collections.Counter()
    root = trio.lowlevel.current_root_task()
    assert root is not None
    stack = [root]
    while stack:
        task = stack.pop()
        if not task.name.startswith(POOLED):
            census[task.name] += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return census


@attrs.define
class RudeClient:
    """A WebSocket client that can drop its socket at any point, without a close frame."""

    stream: trio.SocketStream
    ws: WSConnection = attrs.field(factory=lambda: WSConnection(ConnectionType.CLIENT))
    frames: list[dict[str, Any]] = attrs.field(factory=list)
    accepted: bool = False
    changed: trio.Event = attrs.field(factory=trio.Event)
    """Set (and replaced) whenever ``pump`` learns something."""

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def send_event(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send(self, action: str, **fields: Any) -> None:
        text = orjson.dumps({"action": action, **fields}).decode()
        await self.send_event(TextMessage(data=text))

    async def pump(self) -> None:
        """Read frames until the socket ends (run it in a task; cancel it to stop)."""
        while True:
            try:
                data = await self.stream.receive_some()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                data = b""  # we dropped it (or the server reset it)
            if not data:
                self._notify()
                return
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    self.accepted = True
                elif isinstance(event, RejectConnection):
                    raise AssertionError(f"handshake rejected: {event.status_code}")
                elif isinstance(event, TextMessage):
                    self.frames.append(orjson.loads(event.data))
            self._notify()

    async def wait_until(self, done: Callable[[], bool]) -> None:
        """Until ``done()`` is true (``pump`` must be running)."""
        with trio.fail_after(IO):
            while not done():
                await self.changed.wait()

    async def wait_for(self, count: int) -> None:
        """Until ``count`` frames have arrived (``pump`` must be running)."""
        await self.wait_until(lambda: len(self.frames) >= count)

    def vanish(self, *, reset: bool) -> None:
        """Drop the socket: a RST if ``reset``, else a FIN; never a close frame."""
        if reset:
            self.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        self.stream.socket.close()


@asynccontextmanager
async def rude_client(server: LiveServer) -> AsyncIterator[RudeClient]:
    with trio.fail_after(IO):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    client = RudeClient(stream)
    try:
        yield client
    finally:
        client.vanish(reset=False)  # idempotent: a socket closed already stays closed


def handshake(server: LiveServer, session_id: str, *, v2: bool) -> Request:
    return Request(
        host=f"127.0.0.1:{server.port}",
        target=f"/ws/{session_id}",
        subprotocols=["portfolio.v2"] if v2 else [],
    )


STAGES = (
    "connected",  # TCP only
    "half-handshake",  # part of the upgrade request
    "handshake-sent",  # whole request, response not awaited
    "accepted",  # the handshake answered; nothing sent
    "analyze-sent",  # at once after analyze: the snapshot may be in flight
    "during-analysis",  # a random moment while the metrics commit
    "after-switch",  # analyze, then another, then a random moment
    "after-set-holdings",  # analyze, set_holdings (a restart), random moment
    "after-cancel",  # analyze, cancel, at once
)


async def rude_visit(
    server: LiveServer, session_id: str, stage: str, rng: random.Random, v2: bool
) -> None:
    """One rude client: go as far as ``stage`` of a connection's life, then vanish."""
    reset = rng.random() < 0.5
    async with rude_client(server) as client, trio.open_nursery() as nursery:
        request = client.ws.send(handshake(server, session_id, v2=v2))
        if stage == "connected":
            client.vanish(reset=reset)
            return
        if stage == "half-handshake":
            await client.stream.send_all(request[: rng.randrange(1, len(request))])
            client.vanish(reset=reset)
            return
        await client.stream.send_all(request)
        if stage == "handshake-sent":
            await trio.sleep(rng.uniform(0, 0.01))
            client.vanish(reset=reset)
            return
        nursery.start_soon(client.pump)
        await client.wait_until(lambda: client.accepted)
        if v2:
            await client.wait_for(1)  # the session frame
        if stage == "accepted":
            pass
        elif stage == "analyze-sent":
            await client.send("analyze", ticker="AAPL")
        elif stage == "during-analysis":
            await client.send("analyze", ticker=rng.choice(["AAPL", "GOOGL", "MSFT"]))
            await trio.sleep(rng.uniform(0, 0.15))
        elif stage == "after-switch":
            await client.send("analyze", ticker="AAPL")
            await trio.sleep(rng.uniform(0, 0.05))
            await client.send("analyze", ticker="MSFT")
            await trio.sleep(rng.uniform(0, 0.1))
        elif stage == "after-set-holdings" and v2:
            await client.send("analyze", ticker="GOOGL")
            await trio.sleep(rng.uniform(0, 0.05))
            holdings = {"AAPL": rng.randint(1, 100), "GOOGL": 50, "MSFT": 75}
            await client.send("set_holdings", holdings=holdings)
            await trio.sleep(rng.uniform(0, 0.1))
        else:
            await client.send("analyze", ticker="MSFT")
            await trio.sleep(rng.uniform(0, 0.02))
            await client.send("cancel")
        nursery.cancel_scope.cancel()
        client.vanish(reset=reset)


async def assert_server_clean(
    server: LiveServer, session_ids: list[str], baseline: collections.Counter[str]
) -> None:
    """No connection, watcher or task left behind; no session fenced by a gone connection."""
    services = services_of(server)
    with trio.fail_after(IO):
        while server.info.server.connections or services.events.sessions_watched:  # noqa: ASYNC110
            await trio.sleep(0.02)
    with trio.move_on_after(IO):
        while task_census() != baseline:  # noqa: ASYNC110 - polls the task tree
            await trio.sleep(0.02)
    leaked = task_census() - baseline
    assert not leaked, f"tasks left behind: {dict(leaked)}"
    dangling = {}
    for session_id in session_ids:
        portfolio = await services.store.get(session_id)
        if portfolio is not None and portfolio.current_analysis is not None:
            dangling[session_id] = portfolio.current_analysis
    assert not dangling, f"sessions still fenced by gone connections: {dangling}"


async def assert_serves_normally(server: LiveServer) -> None:
    session_id = "after-" + secrets.token_hex(4)
    async with open_client(server, session_id) as client:
        await greet(client)
        await client.send("analyze", ticker="AAPL")
        frames = await client.recv_until(is_type("analysis_complete"), timeout=IO)
        assert [f["type"] for f in frames] == ["analysis_started"] + ["analysis_result"] * 5 + [
            "analysis_complete"
        ]
    async with open_client(server, session_id, v2=False) as client:
        await client.send("analyze", ticker="MSFT")
        results = [await client.recv(IO) for _ in range(5)]
        assert {r["ticker"] for r in results} == {"MSFT"}


async def baseline_of(server: LiveServer) -> collections.Counter[str]:
    """The task census of a server that has served one client and is idle again."""
    await assert_serves_normally(server)
    with trio.fail_after(IO):
        while server.info.server.connections:  # noqa: ASYNC110 - polls the server's state
            await trio.sleep(0.02)
    await trio.sleep(0.1)
    return task_census()


@pytest.mark.parametrize("stage", STAGES)
async def test_vanishing_at_each_stage(real_redis: RedisServerInfo, stage: str) -> None:
    """Twelve clients (v1 and v2, three per session) vanish at ``stage``."""
    rng = random.Random(stage)
    async with live(real_redis, metric_delay_seconds=RUDE_DELAYS) as server:
        baseline = await baseline_of(server)
        session_ids = [f"stage-{secrets.token_hex(4)}" for _ in range(3)]
        async with trio.open_nursery() as nursery:
            for i in range(12):
                v2 = i % 4 != 3
                nursery.start_soon(rude_visit, server, session_ids[i % 3], stage, rng, v2)
        await assert_server_clean(server, session_ids, baseline)
        await assert_serves_normally(server)


async def test_vanishing_after_each_frame(real_redis: RedisServerInfo) -> None:
    """Drop the socket after the k-th frame of an analysis, for every k."""
    async with live(real_redis, metric_delay_seconds=(0.02, 0.1)) as server:
        baseline = await baseline_of(server)
        session_ids = []
        for k in range(1, 8):  # session, started, five results (complete is the 8th)
            for reset in (False, True):
                session_id = f"frame-{k}-{int(reset)}-{secrets.token_hex(3)}"
                session_ids.append(session_id)
                async with rude_client(server) as client, trio.open_nursery() as nursery:
                    await client.send_event(handshake(server, session_id, v2=True))
                    nursery.start_soon(client.pump)
                    await client.wait_for(1)
                    await client.send("analyze", ticker="GOOGL")
                    await client.wait_for(k)
                    nursery.cancel_scope.cancel()
                    client.vanish(reset=reset)
        await assert_server_clean(server, session_ids, baseline)
        await assert_serves_normally(server)


async def test_many_rude_clients_at_random_moments(real_redis: RedisServerInfo) -> None:
    """Hundreds of clients, a few sharing each session, vanishing at random stages."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    async with live(real_redis, metric_delay_seconds=RUDE_DELAYS) as server:
        baseline = await baseline_of(server)
        session_ids = [f"rude-{secrets.token_hex(4)}" for _ in range(20)]
        limiter = trio.CapacityLimiter(40)
        visits = collections.Counter[str]()

        async def visit(session_id: str, stage: str, child: random.Random, v2: bool) -> None:
            async with limiter:
                await rude_visit(server, session_id, stage, child, v2)
                visits[stage] += 1

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(400):
                    nursery.start_soon(
                        visit,
                        rng.choice(session_ids),
                        rng.choice(STAGES),
                        random.Random(rng.randrange(2**32)),
                        rng.random() < 0.7,
                    )
        assert sum(visits.values()) == 400, f"seed {seed}"
        await assert_server_clean(server, session_ids, baseline)
        await assert_serves_normally(server)


async def test_vanishing_during_the_handshake_logs_no_error(
    real_redis: RedisServerInfo, caplog: pytest.LogCaptureFixture
) -> None:
    """A client gone before the server accepts its handshake is routine, not an error."""
    async with live(real_redis, metric_delay_seconds=RUDE_DELAYS) as server:
        for _ in range(20):
            async with rude_client(server) as client:
                await client.send_event(handshake(server, "gone-" + secrets.token_hex(3), v2=True))
                client.vanish(reset=True)
        with trio.fail_after(IO):
            while server.info.server.connections:  # noqa: ASYNC110 - polls the server's state
                await trio.sleep(0.02)
        await trio.sleep(0.2)
        await assert_serves_normally(server)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
