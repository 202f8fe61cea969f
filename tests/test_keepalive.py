"""Keep-alive, idle timeout, the bytes-bounded outbox and close code 1007, from outside.

Rules of this suite: a whole server runs in-process on 127.0.0.1, port 0,
against the harness's real redis-server, with short keep-alive settings.
The hostile peers here speak WebSocket *by hand* over a socket the test
owns (:class:`RawPeer`: the HTTP upgrade written out, frames built and parsed
byte by byte), so they can do what no library client does: never answer a
ping, stop reading, send a text frame that is not UTF-8.  Well-behaved
clients are trio-websocket's (which answer pings by themselves).  Every wait
is under ``fail_after``; the server's connection set and its metrics are
read to check that what the peer saw is what the server did.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed

from trio_portfolio.config import ConfigError, Settings, load_settings
from trio_portfolio.connection import CLOSE_TIMEOUT, Connection
from trio_portfolio.metrics import ERRORS, Refusal
from trio_portfolio.testing import (
    IO,
    LiveServer,
    RedisServerInfo,
    greet,
    is_type,
    live,
    new_session_id,
    open_client,
    services_of,
)

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


def parse_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take every complete (unmasked, server-sent) frame off the front of ``buffer``."""
    frames = []
    while len(buffer) >= 2:
        opcode, length, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
        if length == 126:
            if len(buffer) < 4:
                break
            (length,), offset = struct.unpack("!H", buffer[2:4]), 4
        elif length == 127:
            if len(buffer) < 10:
                break
            (length,), offset = struct.unpack("!Q", buffer[2:10]), 10
        if len(buffer) < offset + length:
            break
        frames.append((opcode, bytes(buffer[offset : offset + length])))
        del buffer[: offset + length]
    return frames


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 §5.2), payloads under 64 KiB."""
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_code(payload: bytes) -> int:
    return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005


@attrs.define
class RawPeer:
    """A WebSocket peer written by hand: it does only what the test says."""

    stream: trio.SocketStream
    buffer: bytearray = attrs.field(factory=bytearray)

    async def handshake(self, path: str, subprotocol: str | None = None) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            "Host: 127.0.0.1",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        await self.stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        with trio.fail_after(IO):
            while b"\r\n\r\n" not in self.buffer:
                chunk = await self.stream.receive_some(65536)
                assert chunk, "closed during the handshake"
                self.buffer += chunk
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.buffer = bytearray(rest)

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        await self.stream.send_all(client_frame(opcode, payload))

    async def read_to_eof(self, timeout: float = IO) -> list[tuple[int, bytes]]:
        """Every frame until the server closes the TCP connection."""
        with trio.fail_after(timeout):
            while True:
                try:
                    chunk = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""  # a reset after the server dropped us
                if not chunk:
                    return parse_frames(self.buffer)
                self.buffer += chunk


@asynccontextmanager
async def raw_peer(server: LiveServer, *, rcvbuf: int | None = None) -> AsyncIterator[RawPeer]:
    """A :class:`RawPeer` on a fresh TCP connection (``rcvbuf``: a small receive window)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    with trio.fail_after(IO):
        await sock.connect(("127.0.0.1", server.port))
    stream = trio.SocketStream(sock)
    async with stream:
        yield RawPeer(stream)


def refusals(server: LiveServer, refusal: Refusal) -> float:
    return services_of(server).metrics.value(ERRORS, refusal.value)


async def until(condition: object, timeout: float = IO) -> None:
    """Poll ``condition()`` every 10 ms until it is true."""
    assert callable(condition)
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - the server's state, not an event of ours
            await trio.sleep(0.01)


# -- the settings -------------------------------------------------------------------------


def test_keepalive_and_outbox_settings(tmp_path: Path) -> None:
    defaults = Settings()
    assert defaults.ping_interval_seconds == 20.0
    assert defaults.ping_timeout_seconds == 20.0
    assert defaults.idle_timeout_seconds == 0.0  # off: v1 clients that only wait stay
    assert defaults.outbox_max_bytes == 1 << 20
    toml = tmp_path / "portfolio.toml"
    toml.write_text("ping_interval_seconds = 0\nidle_timeout_seconds = 60\n", encoding="utf-8")
    env = {"PORTFOLIO_OUTBOX_MAX_BYTES": "4096", "PORTFOLIO_PING_TIMEOUT_SECONDS": "2.5"}
    loaded = load_settings({}, env, toml)
    assert (loaded.ping_interval_seconds, loaded.idle_timeout_seconds) == (0.0, 60.0)
    assert (loaded.outbox_max_bytes, loaded.ping_timeout_seconds) == (4096, 2.5)
    for env, message in [
        ({"PORTFOLIO_PING_INTERVAL_SECONDS": "-1"}, "expected a number >= 0, got '-1'"),
        ({"PORTFOLIO_PING_TIMEOUT_SECONDS": "0"}, "expected a number > 0, got '0'"),
        ({"PORTFOLIO_IDLE_TIMEOUT_SECONDS": "soon"}, "expected a number >= 0, got 'soon'"),
        ({"PORTFOLIO_OUTBOX_MAX_BYTES": "1.5"}, "expected an integer > 0, got '1.5'"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_settings({}, env, None)
        assert str(info.value).startswith(next(iter(env))), info.value
        assert message in str(info.value)


# -- keep-alive ---------------------------------------------------------------------------


async def test_a_peer_that_never_answers_pings_is_closed_in_time(
    real_redis: RedisServerInfo,
) -> None:
    interval, timeout = 0.5, 1.0
    async with live(real_redis, ping_interval_seconds=interval, ping_timeout_seconds=timeout) as s:
        connections = s.info.server.connections
        async with raw_peer(s) as peer:
            await peer.handshake(f"/ws/{new_session_id('mute')}")  # v1: no greeting
            opened = trio.current_time()
            await until(lambda: len(connections) == 1)
            # The peer neither reads nor answers: only the server's own clock can end it.
            await until(lambda: not connections, timeout=interval + timeout + 5)
            elapsed = trio.current_time() - opened
            frames = await peer.read_to_eof()
        assert interval + timeout - 0.1 <= elapsed <= interval + timeout + CLOSE_TIMEOUT + 0.5
        opcodes = [opcode for opcode, _ in frames]
        assert opcodes.count(OP_PING) == 1, opcodes  # at most one ping in flight
        assert opcodes[-1] == OP_CLOSE
        assert close_code(frames[-1][1]) == 1011
        assert refusals(s, Refusal.PING_TIMEOUT) == 1


async def test_idle_v1_connections_that_answer_pings_are_kept(real_redis: RedisServerInfo) -> None:
    """300 v1 clients that only wait, across six ping intervals, idle timeout off."""
    interval = 0.5
    async with (
        live(
            real_redis,
            ping_interval_seconds=interval,
            ping_timeout_seconds=2.0,
            session_burst=1000,  # 301 new sessions from one address, past the default burst
        ) as s,
        contextlib.AsyncExitStack() as stack,
        raw_peer(s) as counter,
    ):
        clients = [
            await stack.enter_async_context(open_client(s, new_session_id("idle"), v2=False))
            for _ in range(300)
        ]
        # One hand-written peer that answers every ping and counts them.
        await counter.handshake(f"/ws/{new_session_id('count')}")
        pings = 0
        with trio.move_on_after(6 * interval):
            while True:
                chunk = await counter.stream.receive_some(65536)
                assert chunk, "the server closed a peer that answers its pings"
                counter.buffer += chunk
                for opcode, payload in parse_frames(counter.buffer):
                    assert opcode == OP_PING, opcode
                    pings += 1
                    await counter.send_frame(OP_PONG, payload)
        assert pings >= 4
        assert len(s.info.server.connections) == 301
        assert all(client.ws.closed is None for client in clients)
        assert refusals(s, Refusal.PING_TIMEOUT) == 0
        # Still served, not merely open.
        await clients[0].send_raw(orjson.dumps({"action": "cancel"}).decode())
        await clients[0].expect_quiet(0.2)
        assert clients[0].ws.closed is None
        # The server closes first: a trio-websocket client that closed first could
        # fail on a ping crossing its close frame (trio-websocket issue #184).
        for connection in list(s.info.server.connections):
            connection.shutdown()
        await until(lambda: not s.info.server.connections)


async def test_idle_timeout_closes_a_client_that_sends_nothing(real_redis: RedisServerInfo) -> None:
    idle = 1.0
    # Pings (answered by both clients) still arrive before the idle close, so a pong is
    # shown not to count as activity; 0.45 s apart, a ping rarely meets a client's own
    # closing handshake at the end (trio-websocket clients crash answering one then, #184).
    async with live(real_redis, idle_timeout_seconds=idle, ping_interval_seconds=0.45) as s:
        async with (
            open_client(s, new_session_id("quiet")) as quiet,
            open_client(s, new_session_id("chatty")) as chatty,
        ):
            await greet(quiet)
            await greet(chatty)
            opened = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def chat() -> None:
                    for _ in range(7):  # 2.8 s of a frame every 0.4 s
                        await chatty.send("get_portfolio")
                        await chatty.recv_until(is_type("portfolio"))
                        await trio.sleep(0.4)

                nursery.start_soon(chat)
                with pytest.raises(ConnectionClosed) as closed:
                    await quiet.recv(IO)
                elapsed = trio.current_time() - opened
            reason = closed.value.reason
            assert reason is not None
            assert (reason.code, reason.reason) == (1000, "idle timeout")
            assert idle - 0.1 <= elapsed <= idle + 1.0
            assert chatty.ws.closed is None  # frames are activity; pongs are not
        assert refusals(s, Refusal.IDLE_TIMEOUT) == 1


# -- protocol hygiene -----------------------------------------------------------------------


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(real_redis: RedisServerInfo) -> None:
    async with live(real_redis) as s:
        async with raw_peer(s) as peer:
            await peer.handshake(f"/ws/{new_session_id('utf8')}")
            await until(lambda: len(s.info.server.connections) == 1)
            await peer.send_frame(OP_TEXT, b'{"action": "\xff\xfe"}')
            frames = await peer.read_to_eof()
        assert [opcode for opcode, _ in frames] == [OP_CLOSE], frames
        assert close_code(frames[0][1]) == 1007
        await until(lambda: not s.info.server.connections)
        assert refusals(s, Refusal.INVALID_UTF8) == 1
        # A well-formed client is still served.
        async with open_client(s, new_session_id("after")) as client:
            await greet(client)


# -- the bytes-bounded outbox ---------------------------------------------------------------


async def test_a_client_that_stops_reading_is_closed_at_the_byte_budget(
    real_redis: RedisServerInfo,
) -> None:
    """Large ``portfolio`` frames to a client that stopped reading: 1008 at the budget."""
    budget = 256 * 1024
    session_id = new_session_id("slow")
    async with live(
        real_redis,
        outbox_max_bytes=budget,
        metric_delay_seconds=(0.0, 0.0),
        messages_per_second=1000.0,
        message_burst=1000,
    ) as s:
        # 500 stored results make every portfolio frame about 100 KB.
        async with open_client(s, session_id) as client:
            await greet(client)
            for _ in range(100):
                await client.send("analyze", ticker="AAPL")
                await client.recv_until(is_type("analysis_complete"))
            await client.send("get_portfolio")
            frame = (await client.recv_until(is_type("portfolio")))[-1]
            size = len(orjson.dumps(frame))
            assert len(frame["analysis_results"]) == 500
        assert 60_000 < size < budget
        # A reader gets a portfolio frame larger than the whole budget all the same.
        async with (
            live(real_redis, outbox_max_bytes=size // 2, key_prefix=s.settings.key_prefix) as t,
            open_client(t, session_id) as client,
        ):
            assert len((await greet(client))["portfolio"]["analysis_results"]) == 500

        async with raw_peer(s, rcvbuf=4096) as peer:
            await peer.handshake(f"/ws/{session_id}", subprotocol="portfolio.v2")
            await until(lambda: len(s.info.server.connections) == 1)
            (connection,) = s.info.server.connections
            assert isinstance(connection, Connection)
            request = client_frame(OP_TEXT, b'{"action": "get_portfolio"}')
            with trio.fail_after(IO):
                while not refusals(s, Refusal.SLOW_CLIENT):
                    await peer.stream.send_all(request * 10)
                    await trio.sleep(0.01)
            assert connection.outbox_bytes_peak <= budget
            frames = await peer.read_to_eof()
        opcodes = [opcode for opcode, _ in frames]
        assert opcodes[-1] == OP_CLOSE, opcodes[-3:]
        assert close_code(frames[-1][1]) == 1008
        assert connection.outbox_bytes_peak <= budget
        assert refusals(s, Refusal.SLOW_CLIENT) == 1
        # The portfolios that did arrive are whole; nothing after the close.
        texts = [orjson.loads(payload) for opcode, payload in frames if opcode == OP_TEXT]
        assert texts[0]["type"] == "session"
        assert all(f["type"] == "portfolio" for f in texts[1:])
        await until(lambda: not s.info.server.connections)
