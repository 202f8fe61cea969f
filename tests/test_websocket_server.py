"""The server's WebSocket (trio_portfolio/websocket.py) and the connection's queue.

A whole server runs in-process against the harness's real redis-server;
peers speak WebSocket by hand over a socket the test owns (so they can
fragment a message, send one right behind the upgrade, or send too much),
or are trio-websocket clients.  What an idle connection costs is checked
by counting the server's tasks (a count, not a timing): every task added
per connection is memory held by every idle client.
"""

from __future__ import annotations

import base64
import collections
import os
import struct

import pytest
import trio
from trio_websocket import open_websocket_url
from wsproto import ConnectionType
from wsproto.connection import Connection as FrameConnection
from wsproto.events import TextMessage

from trio_portfolio.connection import _Queue
from trio_portfolio.testing import IO, LiveServer, RedisServerInfo, live, new_session_id
from trio_portfolio.websocket import text_frame

OP_CONT, OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x8, 0x9, 0xA


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 §5.2)."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(buffer: bytes) -> list[tuple[int, bytes]]:
    """Unmasked server frames in ``buffer`` (whole ones only)."""
    frames, at = [], 0
    while at + 2 <= len(buffer):
        opcode, size = buffer[at] & 0x0F, buffer[at + 1] & 0x7F
        at += 2
        if size == 126:
            (size,) = struct.unpack("!H", buffer[at : at + 2])
            at += 2
        elif size == 127:
            (size,) = struct.unpack("!Q", buffer[at : at + 8])
            at += 8
        if at + size > len(buffer):
            break
        frames.append((opcode, buffer[at : at + size]))
        at += size
    return frames


def upgrade(path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def talk(server: LiveServer, data: bytes, *, until_frames: int) -> list[tuple[int, bytes]]:
    """Send the upgrade plus ``data`` at once, read until ``until_frames`` frames or EOF."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(upgrade(f"/ws/{new_session_id('raw')}") + data)
        buffer = b""
        with trio.fail_after(IO):
            while True:
                chunk = await stream.receive_some(65536)
                buffer += chunk
                head, _, rest = buffer.partition(b"\r\n\r\n")
                if not chunk or (rest and len(server_frames(rest)) >= until_frames):
                    break
        assert head.startswith(b"HTTP/1.1 101"), head
        return server_frames(rest)


# -- the queue --------------------------------------------------------------------------------


async def test_the_queue_is_bounded_ordered_and_cancel_safe() -> None:
    queue: _Queue[int] = _Queue(2)
    queue.send_nowait(1)
    await queue.send(2)
    with pytest.raises(trio.WouldBlock):
        queue.send_nowait(3)
    got: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(queue.send, 3)  # waits for room
        await trio.testing.wait_all_tasks_blocked()
        assert len(queue) == 2
        got.append(await queue.receive())
        await trio.testing.wait_all_tasks_blocked()
        assert len(queue) == 2  # the waiting sender got the room
    got += [queue.receive_nowait(), queue.receive_nowait()]
    assert got == [1, 2, 3]
    with pytest.raises(trio.WouldBlock):
        queue.receive_nowait()
    # A cancelled receive takes nothing; the next one gets the item.
    with trio.move_on_after(0.01) as scope:
        await queue.receive()
    assert scope.cancelled_caught
    queue.send_nowait(4)
    assert await queue.receive() == 4
    # A cancelled send queues nothing.
    queue.send_nowait(5)
    queue.send_nowait(6)
    with trio.move_on_after(0.01):
        await queue.send(7)
    assert [queue.receive_nowait(), queue.receive_nowait()] == [5, 6]


async def test_closing_the_queue_wakes_the_receiver_and_waiting_senders() -> None:
    queue: _Queue[int] = _Queue(1)
    queue.send_nowait(1)
    errors: list[type[BaseException]] = []

    async def blocked_send() -> None:
        try:
            await queue.send(2)
        except trio.ClosedResourceError as exc:
            errors.append(type(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_send)
        await trio.testing.wait_all_tasks_blocked()
        queue.close()
    assert errors == [trio.ClosedResourceError]
    assert await queue.receive() == 1  # what was queued is still delivered
    with pytest.raises(trio.EndOfChannel):
        await queue.receive()
    with pytest.raises(trio.ClosedResourceError):
        queue.send_nowait(3)
    empty: _Queue[int] = _Queue(1)
    async with trio.open_nursery() as nursery:

        async def receive() -> None:
            with pytest.raises(trio.EndOfChannel):
                await empty.receive()

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        empty.close()


# -- the WebSocket ----------------------------------------------------------------------------


async def test_fragments_pings_and_frames_right_behind_the_upgrade(
    real_redis: RedisServerInfo,
) -> None:
    """A ping and a fragmented ``get_portfolio`` sent with the upgrade, in one write."""
    data = client_frame(OP_PING, b"hi")
    data += client_frame(OP_TEXT, b'{"type": "get_', fin=False)
    data += client_frame(OP_CONT, b'portfolio"}')
    async with live(real_redis) as server:
        frames = await talk(server, data, until_frames=2)
    assert frames[0] == (OP_PONG, b"hi")
    assert frames[1][0] == OP_TEXT
    assert b"portfolio" in frames[1][1]


async def test_a_message_over_the_limit_closes_with_1009(real_redis: RedisServerInfo) -> None:
    async with live(real_redis, max_message_bytes=1024) as server:
        frames = await talk(server, client_frame(OP_TEXT, b"x" * 2000), until_frames=1)
    assert frames[-1][0] == OP_CLOSE
    assert struct.unpack("!H", frames[-1][1][:2])[0] == 1009


async def test_a_peer_close_is_answered_with_its_code(real_redis: RedisServerInfo) -> None:
    async with live(real_redis) as server:
        close = client_frame(OP_CLOSE, struct.pack("!H", 4000) + b"bye")
        frames = await talk(server, close, until_frames=1)
        with trio.fail_after(IO):
            while server.info.server.connections:  # noqa: ASYNC110 - the server's state
                await trio.sleep(0.01)
    assert frames == [(OP_CLOSE, struct.pack("!H", 4000) + b"bye")]


async def test_an_idle_v1_connection_costs_three_tasks(real_redis: RedisServerInfo) -> None:
    """Handler (control loop), reader and writer: no task of a WebSocket library, no forwarder."""

    def tasks() -> collections.Counter[str]:
        names: collections.Counter[str] = collections.Counter()
        todo = [trio.lowlevel.current_root_task()]
        while todo:
            task = todo.pop()
            assert task is not None
            names[task.name] += 1
            todo += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
        return names

    connections = 20
    async with live(real_redis) as server, trio.open_nursery() as nursery:
        stop = trio.Event()

        async def hold(index: int) -> None:
            url = f"ws://127.0.0.1:{server.port}/ws/{new_session_id(f'idle{index}')}"
            async with open_websocket_url(url):  # each client: this task and its reader
                await stop.wait()

        async def settle(count: int) -> None:
            with trio.fail_after(IO):
                while len(server.info.server.connections) < count:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            await trio.sleep(0.2)  # greetings done: nothing transient left

        nursery.start_soon(hold, -1)  # the first one also starts the server's lazy parts
        await settle(1)
        before = tasks()
        for index in range(connections):
            nursery.start_soon(hold, index)
        await settle(1 + connections)
        grown = tasks() - before
        per_connection = {name for name, count in grown.items() if count >= connections}
        server_side = {name for name in per_connection if "test_websocket_server" not in name}
        server_side.discard("trio_websocket._impl.WebSocketConnection._reader_task")  # clients'
        assert server_side == {
            "trio_portfolio.server.Server.handle_tcp",
            "trio_portfolio.connection.Connection._reader",
            "trio_portfolio.connection.Connection._writer",
        }
        assert all(grown[name] == connections for name in server_side), grown
        assert grown["trio_websocket._impl.WebSocketConnection._reader_task"] == connections
        stop.set()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_text_frames_are_what_wsproto_makes(size: int) -> None:
    """The writer's own frame encoder against wsproto's, at every length boundary."""
    frames = FrameConnection(ConnectionType.SERVER)
    message = ("é" * size)[: max(0, size // 2)] + "x" * (size - size // 2)
    assert text_frame(message) == frames.send(TextMessage(data=message))
    assert text_frame(message) == frames.send(TextMessage(data=message))  # state unchanged
