"""SIGTERM ends the server in bounded time, whatever clients and Redis do.

Rules of this suite: the server runs as ``python -m trio_portfolio serve`` in
a subprocess on a free port, with its environment cleared of ``PORTFOLIO_*``
settings, talking to the harness's real redis-server *through the fault
proxy* (:class:`~trio_portfolio.testing.TcpProxy`) so the test can stall
Redis at will.  The hostile client speaks WebSocket by hand over a socket with
a tiny receive window and stops reading.  Every wait is under ``fail_after``;
a server left running by a failing test is killed.

The bound asserted is ``shutdown_timeout_seconds + CLOSE_TIMEOUT +
SHUTDOWN_MARGIN`` plus :data:`EXIT_SLACK` for the interpreter to tear down
(documented in README, "Shutdown").
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket

import trio

from trio_portfolio.connection import CLOSE_TIMEOUT
from trio_portfolio.server import SHUTDOWN_MARGIN
from trio_portfolio.testing import RedisServerInfo, open_tcp_proxy, unique_key_prefix
from trio_portfolio.testing.processes import server_process, wait_for_ready

EXIT_SLACK = 1.0
"""Seconds for the interpreter to unwind and exit once the service has ended."""

GRACE = 2.0


def masked_text(text: bytes) -> bytes:
    mask = os.urandom(4)
    assert len(text) < 126
    return (
        bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    )


async def non_reading_client(port: int, path: str) -> trio.SocketStream:
    """A v2 WebSocket on a socket with a tiny receive window, upgraded by hand."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: portfolio.v2\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(1)  # byte by byte: read nothing past the head
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream


async def test_sigterm_with_a_non_reading_client_and_a_stalled_redis(
    real_redis: RedisServerInfo,
) -> None:
    """The old hang: a shielded commit fails while the outbox is full and the writer gone."""
    async with open_tcp_proxy(*real_redis.address) as proxy:
        args = [
            "--redis-url",
            proxy.url,
            "--key-prefix",
            unique_key_prefix(),
            "--shutdown-timeout-seconds",
            str(GRACE),
            "--metric-delay-seconds",
            "1,1",
            "--messages-per-second",
            "1000",
            "--message-burst",
            "1000",
            "--log-format",
            "text",
        ]
        async with server_process(*args) as server:
            process, port, stderr = server.process, server.port, server.stderr
            await wait_for_ready(port, timeout=30)
            with trio.fail_after(10):
                stream = await non_reading_client(port, f"/ws/bounded-{secrets.token_hex(4)}")
            async with stream:
                # An analysis whose five commits come due in a second, then far more
                # frames than the outbox and the socket buffers hold: the writer
                # blocks on the client, the control loop on the full outbox.
                with trio.fail_after(10):
                    await stream.send_all(masked_text(b'{"action":"analyze","ticker":"AAPL"}'))
                    await trio.sleep(0.3)
                    await stream.send_all(masked_text(b'{"action":"get_portfolio"}') * 1000)
                # Redis stalls before the commits: they time out into error frames
                # that have nowhere to go.
                proxy.blackhole()
                await trio.sleep(1.2)
                assert process.poll() is None
                process.send_signal(signal.SIGTERM)
                signalled = trio.current_time()
                with trio.fail_after(30):
                    code = await process.wait()
                took = trio.current_time() - signalled
            proxy.blackhole(False)
        log = stderr.decode(errors="replace")
        assert code == 0, log
        bound = GRACE + CLOSE_TIMEOUT + SHUTDOWN_MARGIN + EXIT_SLACK
        assert took <= bound, f"exit took {took:.2f}s > {bound}s\n{log}"
        assert "SIGTERM" in log
