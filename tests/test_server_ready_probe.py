"""``/ready`` asks whether the store accepts a write, and says why not without details.

A store that answers reads but refuses writes (a demoted master after a
failover, or one out of memory) is not ready: ``/ready`` turns 503 with a
reason naming the condition, never an address or OS error text, and turns
200 again when the condition ends.  The check is a ``SET`` with a short
expiry made by ``RedisClient.probe_write`` on a connection of its own.  A
private redis-server (the test reconfigures it), a whole server in-process,
real sockets; ``fail_after`` on every wait.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio

from trio_portfolio.embedded import list_redis_binaries
from trio_portfolio.redis_io import open_redis
from trio_portfolio.testing import RedisServerInfo, run_redis_binary
from trio_portfolio.testing.live_server import (
    LiveServer,
    http_request,
    open_live_server,
    test_settings,
)


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServerInfo]:
    binaries = list_redis_binaries()
    if not binaries:
        pytest.skip("no redis-server binary")
    with run_redis_binary(binaries[0].path) as info:
        yield info


async def wait_for_ready(server: LiveServer, status: int, within: float = 5) -> Any:
    with trio.fail_after(within):
        while True:
            reply = await http_request(server, "GET", "/ready")
            if reply.status == status:
                return reply.json()
            await trio.sleep(0.05)


async def test_ready_requires_a_writable_store(private_redis: RedisServerInfo) -> None:
    port = str(private_redis.address[1])
    async with (
        open_live_server(test_settings(private_redis.url)) as server,
        open_redis(private_redis.url) as admin,
    ):
        await wait_for_ready(server, 200, within=10)

        await admin.execute("REPLICAOF", "127.0.0.1", 1)
        try:
            body = await wait_for_ready(server, 503)
        finally:
            await admin.execute("REPLICAOF", "NO", "ONE")
        assert body["status"] == "not_ready"
        assert body["reason"] == "redis unavailable (read-only replica)"
        assert str(body["error_id"]).startswith("e-")  # the raw reply is logged under it
        await wait_for_ready(server, 200)

        await admin.execute("CONFIG", "SET", "maxmemory", 1)
        try:
            body = await wait_for_ready(server, 503)
        finally:
            await admin.execute("CONFIG", "SET", "maxmemory", 0)
        assert body["reason"] == "redis unavailable (out of memory)"
        assert port not in body["reason"]
        await wait_for_ready(server, 200)
