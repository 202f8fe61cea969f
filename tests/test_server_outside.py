"""Checks from outside the server: metric formulas, HTTP endpoints, store outages.

Everything here talks to a real server over real sockets, against a real
redis-server (through a fault-injecting TCP proxy for the outage tests).
The metric check re-implements each formula of ``docs/metrics.md``
independently with numpy, from the holdings and prices the server reports
and the price history it keeps in Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio

from trio_portfolio.models import METRICS
from trio_portfolio.redis_io import open_redis
from trio_portfolio.testing import (
    Client,
    Frame,
    LiveServer,
    RedisServerInfo,
    greet,
    http_request,
    open_client,
    open_live_server,
    open_tcp_proxy,
    test_settings,
)
from trio_portfolio.testing.redis_clients import stored_histories


def expected_metrics(
    ticker: str,
    holdings: dict[str, float],
    prices: dict[str, float],
    history: dict[str, np.ndarray],
) -> dict[str, float]:
    """docs/metrics.md, written again from the page, not from analytics.py."""
    names = sorted(holdings)
    q = np.array([holdings[t] for t in names])
    p = np.array([prices[t] for t in names])
    w = q * p / (q * p).sum()
    i = names.index(ticker)
    if len(names) == 1:
        return {
            "concentration": 1.0,
            "portfolio_risk": 1.0,
            "correlation": 0.0,
            "momentum": _slope(history[ticker]) * 252,
            "allocation_score": 0.0,
        }
    n = min(len(history[t]) for t in names)
    window = np.array([history[t][-n:] for t in names])
    returns = np.diff(np.log(window), axis=1)
    cov = np.cov(returns)
    others = [j for j in range(len(names)) if j != i]
    basket = (w[others] / w[others].sum()) @ returns[others]
    inverse_vol = 1 / returns.std(axis=1, ddof=1)
    return {
        "concentration": float(w[i]),
        "portfolio_risk": float(w[i] * (cov @ w)[i] / (w @ cov @ w)),
        "correlation": float(np.corrcoef(returns[i], basket)[0, 1]),
        "momentum": float(_slope(window[i]) * 252 * w[i]),
        "allocation_score": float(inverse_vol[i] / inverse_vol.sum() - w[i]),
    }


def _slope(prices: np.ndarray) -> float:
    return float(np.polyfit(np.arange(len(prices)), np.log(prices), 1)[0])


async def stored_history(server: LiveServer, tickers: list[str]) -> dict[str, np.ndarray]:
    """The price history the server keeps in Redis (decoded independently)."""
    async with open_redis(server.info.redis_url) as redis:
        stored = await stored_histories(redis, server.settings.key_prefix, tickers)
    return {t: np.asarray(h, dtype=np.float64) for t, h in stored.items()}


async def analyse(client: Client, ticker: str) -> dict[str, float]:
    await client.send("analyze", ticker=ticker)
    frames = await client.recv_until(lambda f: f["type"] in ("analysis_complete", "error"))
    assert frames[-1]["type"] == "analysis_complete", frames[-1]
    return {f["metric"]: f["value"] for f in frames if f["type"] == "analysis_result"}


async def test_each_metric_reproduces_its_documented_formula(real_redis: RedisServerInfo) -> None:
    settings = test_settings(real_redis.url, metric_delay_seconds=(0.0, 0.02))
    async with open_live_server(settings) as server, open_client(server, "formulas") as client:
        await greet(client)
        holdings = {"AAPL": 100.0, "GOOGL": 50.0, "MSFT": 75.0, "XOM": 40.0, "ZZNEW": 12.5}
        await client.send("set_holdings", holdings=holdings)
        portfolio = await client.recv()
        assert portfolio["type"] == "portfolio"
        assert set(portfolio["prices"]) == set(holdings), "new tickers are priced at once"
        history = await stored_history(server, sorted(holdings))
        assert all(len(series) == 256 for series in history.values()), "bootstrapped history"
        for ticker in holdings:
            got = await analyse(client, ticker)
            want = expected_metrics(ticker, portfolio["holdings"], portfolio["prices"], history)
            assert set(got) == set(METRICS)
            for metric in METRICS:
                assert got[metric] == pytest.approx(want[metric], rel=1e-9, abs=1e-12), (
                    ticker,
                    metric,
                )

        await client.send("set_holdings", holdings={"MSFT": 3.0})
        single = await client.recv()
        got = await analyse(client, "MSFT")
        want = expected_metrics("MSFT", single["holdings"], single["prices"], history)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


async def test_http_endpoints_answer_beside_the_websocket(real_redis: RedisServerInfo) -> None:
    settings = test_settings(real_redis.url, metric_delay_seconds=(0.0, 0.02))
    async with open_live_server(settings) as server:
        health = await http_request(server, "GET", "/health")
        assert (health.status, health.json()) == (200, {"status": "ok"})
        ready = await http_request(server, "GET", "/ready")
        assert ready.status == 200

        created = await http_request(server, "POST", "/session")
        assert created.status == 201
        session_id = created.json()["session_id"]
        assert len(session_id) >= 32
        assert created.json()["portfolio"]["holdings"] == {
            "AAPL": 100.0,
            "GOOGL": 50.0,
            "MSFT": 75.0,
        }
        other = (await http_request(server, "POST", "/session")).json()["session_id"]
        assert other != session_id

        async with open_client(server, session_id) as client:
            greeting = await greet(client)
            assert greeting["session_id"] == session_id
            await analyse(client, "GOOGL")

        metrics = (await http_request(server, "GET", "/metrics")).body.decode()
        for series in (
            "trio_portfolio_connections_open ",
            "trio_portfolio_analyses_started_total ",
            "trio_portfolio_analyses_completed_total ",
            "trio_portfolio_results_committed_total 5",
            "trio_portfolio_redis_call_seconds_bucket",
            "trio_portfolio_redis_call_seconds_count",
        ):
            assert series in metrics, series

        assert (await http_request(server, "GET", "/no-such-page")).status == 404
        assert (await http_request(server, "DELETE", "/health")).status == 405


async def wait_for_status(server: LiveServer, path: str, status: int, within: float) -> Frame:
    """Poll ``path`` until it answers ``status``; return its JSON body."""
    with trio.fail_after(within):
        while True:
            response = await http_request(server, "GET", path)
            if response.status == status:
                body: Frame = response.json()
                return body
            await trio.sleep(0.05)


@asynccontextmanager
async def server_behind_proxy(redis: RedisServerInfo) -> AsyncIterator[tuple[LiveServer, Any]]:
    async with open_tcp_proxy(*redis.address) as proxy:
        settings = test_settings(
            proxy.url, metric_delay_seconds=(0.0, 0.05), redis_timeout_seconds=0.5
        )
        async with open_live_server(settings) as server:
            yield server, proxy


async def test_store_outage_is_survivable(real_redis: RedisServerInfo) -> None:
    """Guarantee 7: keep running, answer store_unavailable, report not-ready, recover."""
    async with (
        server_behind_proxy(real_redis) as (server, proxy),
        open_client(server, "outage") as client,
    ):
        await greet(client)
        await analyse(client, "AAPL")
        await wait_for_status(server, "/ready", 200, within=5)

        proxy.refuse(True)
        await proxy.cut()
        not_ready = await wait_for_status(server, "/ready", 503, within=5)
        assert not_ready["status"] == "not_ready"
        assert "redis" in not_ready["reason"].lower()
        assert (await http_request(server, "GET", "/health")).status == 200

        with trio.fail_after(5):
            await client.send("analyze", ticker="MSFT")
            error = await client.recv()
        assert error == {
            "type": "error",
            "code": "store_unavailable",
            "detail": error["detail"],
        }
        await client.send("get_portfolio")
        assert (await client.recv())["code"] == "store_unavailable"

        proxy.refuse(False)
        await wait_for_status(server, "/ready", 200, within=10)
        results = await analyse(client, "MSFT")
        assert set(results) == set(METRICS)
        await client.send("get_portfolio")
        stored = await client.recv()
        assert {r["ticker"] for r in stored["analysis_results"]} == {"AAPL", "MSFT"}, (
            "nothing stored before the outage was lost"
        )


async def test_server_starts_while_redis_is_down_and_becomes_ready(
    real_redis: RedisServerInfo,
) -> None:
    async with open_tcp_proxy(*real_redis.address) as proxy:
        proxy.refuse(True)
        settings = test_settings(proxy.url, redis_timeout_seconds=0.5)
        from trio_portfolio.server import serve

        async with trio.open_nursery() as nursery:
            starting = trio.Event()
            port_box: list[int] = []

            async def run() -> None:
                info = await nursery.start(
                    lambda task_status: serve(
                        settings, handle_signals=False, task_status=task_status
                    )
                )
                port_box.append(info.port)
                starting.set()

            nursery.start_soon(run)
            await trio.sleep(1.0)
            assert not starting.is_set(), "the store cannot be open while Redis is unreachable"
            proxy.refuse(False)
            with trio.fail_after(10):
                await starting.wait()
            nursery.cancel_scope.cancel()
        assert port_box
