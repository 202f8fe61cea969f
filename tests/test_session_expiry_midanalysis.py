"""A session that vanishes mid-analysis: the client is told ``session_expired`` once.

The session's keys are deleted in Redis, over a connection of the test's own,
while an analysis runs (as a TTL expiry or an operator's ``DEL`` would do).
The analysis must end as *the session is gone*, never as ``switched``: v2
gets ``analysis_cancelled`` with the contract's ``cancelled`` reason, then
exactly one ``error`` ``session_expired`` and a fresh ``session``; v1 gets the
one ``error``.  The connection stays usable and the fresh session holds
nothing of the vanished one's analysis.  See docs/protocol.md ("Error codes").

Rules of this suite: whole servers in-process on 127.0.0.1, port 0, against
the harness's real redis-server; real WebSocket clients; every wait bounded.
"""

from __future__ import annotations

import re
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio

from trio_portfolio.config import RedisLayout
from trio_portfolio.redis_io import open_redis
from trio_portfolio.testing import (
    IO,
    RedisServerInfo,
    StoreTarget,
    greet,
    live,
    new_session_id,
    next_frame,
    services_of,
)
from trio_portfolio.testing.live_server import (
    LiveServer,
    http_request,
    open_client,
)

Frame = dict[str, Any]
DEFAULT_HOLDINGS = {"AAPL": 100.0, "GOOGL": 50.0, "MSFT": 75.0}


def expiry_server(
    redis: RedisServerInfo, **overrides: Any
) -> AbstractAsyncContextManager[LiveServer]:
    """A server whose metrics take long enough for a deletion to land mid-analysis."""
    overrides.setdefault("metric_delay_seconds", (0.3, 0.8))
    return live(redis, **overrides)


async def delete_session_keys(server: LiveServer, redis_url: str, session_id: str) -> int:
    """``DEL`` every key of ``session_id`` (found by the documented key naming)."""
    pattern = f"{server.settings.key_prefix}:session:{{{session_id}}}*"
    async with open_redis(redis_url) as redis:
        keys = await redis.execute("KEYS", pattern)
        assert keys, f"no keys match {pattern}"
        deleted: int = await redis.execute("DEL", *keys)
    return deleted


async def counter(server: LiveServer, series: str) -> float:
    """The value of one ``/metrics`` series (0 when absent)."""
    text = (await http_request(server, "GET", "/metrics")).body.decode()
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def expiry_errors(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f["type"] == "error" and f["code"] == "session_expired"]


async def test_v2_session_deleted_mid_analysis_is_session_expired_not_switched(
    store_target: StoreTarget,
) -> None:
    redis_url = store_target.server.url
    session_id = new_session_id("x")
    async with (
        expiry_server(store_target.server, redis_layout=RedisLayout(store_target.layout)) as server,
        open_client(server, session_id) as client,
    ):
        await greet(client)
        await client.send("analyze", ticker="AAPL")
        started = await next_frame(client, "analysis_started")
        assert await delete_session_keys(server, redis_url, session_id) >= 1

        ended = await client.recv_until(lambda f: f["type"] == "session", timeout=IO)
        kinds = [f["type"] for f in ended]
        # Nothing was due before the deletion (metrics take >= 0.3 s), so nothing
        # was stored or sent; the analysis ends as cancelled, then the one error.
        assert kinds == ["analysis_cancelled", "error", "session"], ended
        cancelled, error, session = ended
        assert cancelled["analysis_id"] == started["analysis_id"]
        assert cancelled["reason"] == "cancelled", cancelled
        assert error["code"] == "session_expired", error
        assert session["session_id"] == session_id
        fresh = session["portfolio"]
        assert fresh["holdings"] == DEFAULT_HOLDINGS
        assert fresh["current_analysis"] is None
        assert fresh["analysis_results"] == []

        # Told once: nothing more arrives, and the connection works on the fresh session.
        await client.expect_quiet(1.5)
        await client.send("get_portfolio")
        portfolio = await next_frame(client, "portfolio")
        assert portfolio["analysis_results"] == []
        assert portfolio["current_analysis"] is None
        await client.send("analyze", ticker="MSFT")
        again = await client.recv_until(lambda f: f["type"] == "analysis_complete", timeout=20)
        assert [f["type"] for f in again].count("analysis_result") == 5
        assert not expiry_errors(client.frames[client.frames.index(session) :])

        assert await counter(server, 'trio_portfolio_errors_total{code="session_expired"}') == 1
        assert await counter(server, 'trio_portfolio_analyses_cancelled_total{reason="cancelled"}')
        assert not await counter(
            server, 'trio_portfolio_analyses_cancelled_total{reason="switched"}'
        )


async def test_results_before_the_deletion_stand_and_none_follow_it(
    real_redis: RedisServerInfo,
) -> None:
    session_id = new_session_id("x")
    async with (
        expiry_server(real_redis, metric_delay_seconds=(0.1, 2.5)) as server,
        open_client(server, session_id) as client,
    ):
        await greet(client)
        await client.send("analyze", ticker="GOOGL")
        await next_frame(client, "analysis_started")
        first = await next_frame(client, "analysis_result")
        await delete_session_keys(server, real_redis.url, session_id)

        ended = await client.recv_until(lambda f: f["type"] == "session", timeout=IO)
        kinds = [f["type"] for f in ended]
        # A result committed in the moment before the DEL may still arrive; after
        # the analysis ends, only the error and the fresh session.
        assert kinds[-3:] == ["analysis_cancelled", "error", "session"], ended
        assert set(kinds[:-3]) <= {"analysis_result"}, ended
        assert 1 + kinds.count("analysis_result") < 5
        assert ended[-3]["reason"] == "cancelled"
        assert ended[-3]["analysis_id"] == first["analysis_id"]
        await client.expect_quiet(1.5)
        assert len(expiry_errors(client.frames)) == 1


async def test_v1_gets_one_error_and_no_result_after_it(real_redis: RedisServerInfo) -> None:
    session_id = new_session_id("x")
    async with (
        expiry_server(real_redis) as server,
        open_client(server, session_id, v2=False) as client,
    ):
        await client.send("analyze", ticker="AAPL")
        # v1 has no analysis_started: wait until the analysis is the session's current one.
        services = services_of(server)
        with trio.fail_after(IO):
            while True:
                portfolio = await services.store.get(session_id)
                if portfolio is not None and portfolio.current_analysis is not None:
                    break
                await trio.sleep(0.01)
        await delete_session_keys(server, real_redis.url, session_id)

        error = await client.recv(IO)
        assert (error["type"], error["code"]) == ("error", "session_expired"), error
        await client.expect_quiet(1.5)
        # Still usable, on a fresh session.
        await client.send("analyze", ticker="AAPL")
        with trio.fail_after(20):
            results = [await client.recv(IO) for _ in range(5)]
        assert [f["type"] for f in results] == ["analysis_result"] * 5
        assert len(expiry_errors(client.frames)) == 1


@pytest.mark.parametrize("action", ["get_portfolio", "cancel"])
async def test_an_action_racing_the_analysis_still_tells_once(
    real_redis: RedisServerInfo, action: str
) -> None:
    """The control loop may find the session gone before the analysis does: one answer."""
    session_id = new_session_id("x")
    async with (
        expiry_server(real_redis, metric_delay_seconds=(0.0, 0.4)) as server,
        open_client(server, session_id) as client,
    ):
        await greet(client)
        await client.send("analyze", ticker="AAPL")
        await next_frame(client, "analysis_started")
        await delete_session_keys(server, real_redis.url, session_id)
        await client.send(action)

        ended = await client.recv_until(lambda f: f["type"] == "session", timeout=IO)
        kinds = [f["type"] for f in ended]
        assert kinds[-3:] == ["analysis_cancelled", "error", "session"], ended
        assert set(kinds[:-3]) <= {"analysis_result"}, ended
        assert ended[-3]["reason"] == "cancelled", ended
        assert ended[-2]["code"] == "session_expired"
        if action == "get_portfolio":
            await next_frame(client, "portfolio")
        await client.expect_quiet(1.5)
        assert len(expiry_errors(client.frames)) == 1
        assert not [f for f in client.frames if f.get("reason") == "switched"]


async def test_a_re_creation_at_the_session_cap_is_refused_with_an_error_frame(
    real_redis: RedisServerInfo,
) -> None:
    """An open connection whose session vanished may not re-create it past ``max_sessions``.

    The vanished session's id stays in the store's index until the market
    updater prunes it, so with a cap of one the store still counts one live
    session: the re-creation is refused with ``too_many_sessions`` (after the
    one ``session_expired``) and the connection stays usable.
    """
    session_id = new_session_id("cap")
    async with (
        expiry_server(real_redis, max_sessions=1) as server,
        open_client(server, session_id, v2=True) as client,
    ):
        await greet(client)
        await delete_session_keys(server, real_redis.url, session_id)
        await client.send("get_portfolio")
        expired = await next_frame(client, "error")
        assert expired["code"] == "session_expired", expired
        refused = await next_frame(client, "error")
        assert refused["code"] == "too_many_sessions", refused
        await client.send("bogus")
        answer = await next_frame(client, "error")
        assert answer["code"] == "unknown_action", answer
