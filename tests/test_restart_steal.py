"""Restarts that cannot steal (issue 10, deliver 3): checked from outside.

An automatic restart (``portfolio_changed``) names the attempt it replaces,
and the start script refuses it unless that attempt is still the session's
current one.  So when another connection starts an analysis between the
portfolio change and the restart, the restarting connection ends as
``switched`` and the newer analysis keeps the session: the client who
switched last wins.

Two ways in: a deterministic one, where the portfolio change and the other
analysis's start land in Redis in one ``MULTI``/``EXEC`` (as another
process would make them), so the first connection hears of the change only
after the other analysis is current; and the race as clients make it, a
second WebSocket connection sending ``set_holdings`` and ``analyze`` back to
back, on ten sessions at once.
"""

from __future__ import annotations

import functools

import trio

from trio_portfolio.models import utc_now
from trio_portfolio.store.codec import holdings_and_prices_json
from trio_portfolio.testing import (
    IO,
    Client,
    Frame,
    LiveServer,
    RedisServerInfo,
    greet,
    is_type,
    live,
    new_session_id,
    open_client,
    services_of,
    start_analysis,
    store_of,
)

HOLDINGS = {"AAPL": 200.0, "GOOGL": 50.0, "MSFT": 75.0}


def analysis_events(frames: list[Frame]) -> list[tuple[str, str]]:
    return [
        (f["type"], f.get("reason", ""))
        for f in frames
        if f["type"] in ("analysis_started", "analysis_complete", "analysis_cancelled")
    ]


async def test_a_restart_after_another_analysis_started_ends_switched(
    real_redis: RedisServerInfo,
) -> None:
    session_id = new_session_id("steal")
    async with (
        live(real_redis, metric_delay_seconds=(0.8, 1.2)) as server,
        open_client(server, session_id) as client,
    ):
        await greet(client)
        first = await start_analysis(client, "AAPL")
        store = store_of(server)
        redis = server.info.server.redis
        prices = await services_of(server).market.ensure_prices(list(HOLDINGS), holder="tests")
        holdings_json, prices_json = holdings_and_prices_json(HOLDINGS, prices)
        keys = store.session_keys(session_id)
        channel = store.events_channel(session_id)
        now, ttl = utc_now(), store.session_ttl_seconds
        scripts = store._scripts  # white box: two scripts in one transaction
        replies = await redis.pipeline(
            [
                ("MULTI",),
                ("EVALSHA", scripts["set_holdings"].sha, len(keys), *keys,
                 channel, holdings_json, prices_json, now, ttl),
                ("EVALSHA", scripts["start_analysis"].sha, len(keys), *keys,
                 channel, "intruder-1", "MSFT", now, ttl, ""),
                ("EXEC",),
            ]
        )  # fmt: skip
        assert [reply[0] for reply in replies[-1]] == ["replaced", "started"], replies
        frames = await client.recv_until(is_type("analysis_cancelled"), timeout=IO)
        await client.expect_quiet(1.5)  # past every metric delay: no restart follows
        assert frames[-1] == {
            "type": "analysis_cancelled",
            "analysis_id": first["analysis_id"],
            "ticker": "AAPL",
            "reason": "switched",
        }
        assert analysis_events(client.frames) == [
            ("analysis_started", ""),
            ("analysis_cancelled", "switched"),
        ]
        portfolio = await store.get(session_id)
        assert portfolio is not None
        assert portfolio.current_analysis is not None
        assert portfolio.current_analysis.analysis_id == "intruder-1"
        assert all(r.analysis_id == first["analysis_id"] for r in portfolio.analysis_results)


async def race(server: LiveServer, session_id: str) -> tuple[Client, Client]:
    """A analyzes; B changes the holdings and analyzes at once; both read to the end."""
    async with open_client(server, session_id) as a, open_client(server, session_id) as b:
        await greet(a)
        await greet(b)
        await start_analysis(a, "AAPL")
        await a.recv_until(is_type("analysis_result"), timeout=IO)
        await b.send("set_holdings", holdings=HOLDINGS)
        await b.send("analyze", ticker="MSFT")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(b.recv_until, is_type("analysis_complete"), timeout=IO)
            )
            nursery.start_soon(
                functools.partial(
                    a.recv_until,
                    lambda f: f["type"] == "analysis_cancelled" and f["reason"] == "switched",
                    timeout=IO,
                )
            )
        await a.expect_quiet(0.6)
        return a, b


async def test_the_client_who_switched_last_keeps_the_session(real_redis: RedisServerInfo) -> None:
    async with live(real_redis, metric_delay_seconds=(0.1, 0.4)) as server:
        outcomes: dict[str, tuple[Client, Client]] = {}

        async def run(session_id: str) -> None:
            outcomes[session_id] = await race(server, session_id)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(run, new_session_id("race"))
        for session_id, (a, b) in outcomes.items():
            b_events = analysis_events(b.frames)
            assert b_events == [("analysis_started", ""), ("analysis_complete", "")], b.frames
            a_events = analysis_events(a.frames)
            assert a_events[-1] == ("analysis_cancelled", "switched"), a.frames
            assert a_events.count(("analysis_started", "")) <= 2  # one restart at most
            b_id = next(f["analysis_id"] for f in b.frames if f["type"] == "analysis_started")
            portfolio = await store_of(server).get(session_id)
            assert portfolio is not None
            assert [r.analysis_id for r in portfolio.analysis_results[-5:]] == [b_id] * 5
