"""The dashboard in headless Chromium, driven like a user would (Playwright).

Rules of this suite: localhost only; the browser is Debian's ``chromium``
(``/usr/bin/chromium``, or ``PORTFOLIO_TEST_CHROMIUM``) with a fresh
profile, and the tests skip only when no such binary exists.  Every wait is
a Playwright expectation with a deadline.  Two backends serve the page:

* the real server, ``python -m trio_portfolio serve`` in a subprocess on the
  harness's real Redis (``real_redis``), with fast metrics (0.2-0.6 s) and a
  market update every second; and
* a fake peer: :func:`serve_front_door` plus a small WebSocket peer that
  speaks enough of protocol v2 (sessions, holdings, five metrics with
  cancel-on-switch, market updates, errors) to exercise every part of the
  page on its own, independent of the rest of the server.

``UPDATE_SCREENSHOT=1`` saves ``docs/dashboard.png`` at the end of the
scenario (from the real server when it is integrated, else the fake peer).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import secrets
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from trio_portfolio.http import serve_front_door
from trio_portfolio.testing import RedisServerInfo, free_port
from trio_portfolio.testing.processes import (
    CLI,
    find_chromium,
    headless_browser,
    popen_until_healthy,
    threaded_tcp_server,
)

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "dashboard.png"
METRICS = ("portfolio_risk", "concentration", "correlation", "momentum", "allocation_score")
HOLDINGS = {"AAPL": 100.0, "GOOGL": 50.0, "MSFT": 75.0}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000
RECORD_ANALYSES = """
window.__analysisStates = [];
addEventListener("DOMContentLoaded", () => {
  const list = document.getElementById("analyses");
  new MutationObserver(() => {
    for (const item of list.querySelectorAll(".analysis")) {
      window.__analysisStates.push({
        id: item.dataset.analysisId,
        status: item.dataset.status,
        results: Number(item.dataset.results),
        text: item.querySelector(".status-text").textContent,
        spinner: item.querySelector(".spinner") !== null,
      });
    }
  }).observe(list, { childList: true });
});
"""
"""Records every rendered state of every analysis card, to check the progress display."""
START_TIMEOUT = 30.0


def _chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip("no chromium binary: apt-get install chromium (or set PORTFOLIO_TEST_CHROMIUM)")
    return found


def _server_serves_http() -> bool:
    """Whether ``server.py`` routes connections through the front door yet."""
    return "serve_front_door" in (ROOT / "trio_portfolio" / "server.py").read_text()


# -- the fake peer ------------------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


class FakeSession:
    """One session's holdings, prices and version, enough to render every event."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.holdings = dict(HOLDINGS)
        self.prices = {"AAPL": 187.5, "GOOGL": 141.2, "MSFT": 402.8}
        self.version = 1

    @property
    def total_value(self) -> float:
        return round(sum(q * self.prices[t] for t, q in self.holdings.items()), 2)

    def portfolio(self) -> dict[str, object]:
        return {
            "type": "portfolio",
            "session_id": self.session_id,
            "holdings": self.holdings,
            "prices": {t: self.prices[t] for t in self.holdings},
            "total_value": self.total_value,
            "portfolio_version": self.version,
            "current_analysis": None,
            "analysis_results": [],
            "last_activity": _now(),
        }


class FakePeer:
    """:class:`~trio_portfolio.http.HttpApp` plus a v2 WebSocket peer, all in memory."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sessions: dict[str, FakeSession] = {}

    async def ready(self) -> tuple[bool, str]:
        await trio.lowlevel.checkpoint()
        return True, "ok"

    def metrics_text(self) -> str:
        return ""

    async def new_session(self, request: object) -> dict[str, object]:
        await trio.lowlevel.checkpoint()
        session = self._session(secrets.token_urlsafe(18))
        return {"session_id": session.session_id, "portfolio": session.portfolio()}

    def _session(self, session_id: str) -> FakeSession:
        return self.sessions.setdefault(session_id, FakeSession(session_id))

    async def on_websocket(self, stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(nursery, stream)
            session_id = request.path.partition("?")[0].removeprefix("/ws/")
            if "portfolio.v2" not in request.proposed_subprotocols:
                await request.reject(400, body=b"this fake speaks portfolio.v2 only\n")
                return
            ws = await request.accept(subprotocol="portfolio.v2")
            try:
                await FakeConnection(self, ws, self._session(session_id)).run()
            except* ConnectionClosed:
                pass  # the page went away: reloads, closed tabs, the end of the test
            nursery.cancel_scope.cancel()


class FakeConnection:
    """Cancel-on-switch done the simple way: cancel, wait, report, start the next."""

    def __init__(self, peer: FakePeer, ws: WebSocketConnection, session: FakeSession) -> None:
        self.peer = peer
        self.ws = ws
        self.session = session
        self.scope: trio.CancelScope | None = None
        self.done = trio.Event()
        self.current: tuple[str, str] | None = None

    async def send(self, frame: dict[str, object]) -> None:
        await self.ws.send_message(orjson.dumps(frame).decode())

    async def run(self) -> None:
        await self.send(
            {"type": "session", "session_id": self.session.session_id, **self._portfolio()}
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._market)
            while True:
                raw = await self.ws.get_message()
                message = orjson.loads(raw)
                action = message.get("action")
                if action == "analyze":
                    await self._analyze(nursery, str(message.get("ticker", "")).upper())
                elif action == "cancel":
                    await self._stop("cancelled")
                elif action == "set_holdings":
                    self.session.holdings = {t.upper(): q for t, q in message["holdings"].items()}
                    for ticker in self.session.holdings:
                        self.session.prices.setdefault(ticker, self.peer.rng.uniform(50, 500))
                    self.session.version += 1
                    await self.send(self.session.portfolio())
                else:
                    await self.send({"type": "error", "code": "unknown_action", "detail": "?"})

    def _portfolio(self) -> dict[str, object]:
        return {"portfolio": self.session.portfolio()}

    async def _market(self) -> None:
        while True:
            await trio.sleep(1.0)
            for ticker in self.session.prices:
                self.session.prices[ticker] *= math.exp(self.peer.rng.gauss(0, 0.004))
            self.session.version += 1
            await self.send(
                {
                    "type": "market_update",
                    "total_value": self.session.total_value,
                    "prices": dict(self.session.prices),
                    "portfolio_version": self.session.version,
                    "as_of": _now(),
                }
            )

    async def _stop(self, reason: str) -> None:
        if self.scope is None or self.current is None:
            return
        self.scope.cancel()
        await self.done.wait()
        analysis_id, ticker = self.current
        self.scope = self.current = None
        await self.send(
            {
                "type": "analysis_cancelled",
                "analysis_id": analysis_id,
                "ticker": ticker,
                "reason": reason,
            }
        )

    async def _analyze(self, nursery: trio.Nursery, ticker: str) -> None:
        if ticker not in self.session.holdings:
            await self.send(
                {"type": "error", "code": "ticker_not_held", "detail": f"{ticker} is not held"}
            )
            return
        await self._stop("switched")
        analysis_id = secrets.token_hex(6)
        self.current, self.scope, self.done = (
            (analysis_id, ticker),
            trio.CancelScope(),
            trio.Event(),
        )
        await self.send(
            {
                "type": "analysis_started",
                "analysis_id": analysis_id,
                "ticker": ticker,
                "portfolio_version": self.session.version,
                "started_at": _now(),
            }
        )
        nursery.start_soon(self._run_analysis, analysis_id, ticker, self.scope, self.done)

    async def _run_analysis(
        self, analysis_id: str, ticker: str, scope: trio.CancelScope, done: trio.Event
    ) -> None:
        try:
            with scope:
                async with trio.open_nursery() as metrics:
                    for metric in METRICS:
                        metrics.start_soon(self._metric, analysis_id, ticker, metric)
                await self.send(
                    {"type": "analysis_complete", "analysis_id": analysis_id, "ticker": ticker}
                )
                self.current = self.scope = None
        finally:
            done.set()

    async def _metric(self, analysis_id: str, ticker: str, metric: str) -> None:
        await trio.sleep(self.peer.rng.uniform(0.2, 0.6))
        await self.send(
            {
                "type": "analysis_result",
                "analysis_id": analysis_id,
                "ticker": ticker,
                "metric": metric,
                "value": round(self.peer.rng.uniform(-1, 1), 4),
                "timestamp": _now(),
                "portfolio_version": self.session.version,
            }
        )


@contextlib.contextmanager
def _fake_server() -> Iterator[str]:
    """The front door and the fake peer on a localhost port, in a thread of their own.

    A connection that fails is recorded, not fatal (as in the real server),
    and fails the test when the server stops.
    """
    failures: list[BaseException] = []
    peer = FakePeer(random.Random(7))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await serve_front_door(stream, on_websocket=peer.on_websocket, app=peer)
        except Exception as exc:
            failures.append(exc)

    with threaded_tcp_server(handle, "fake-dashboard-server", START_TIMEOUT) as port:
        yield f"http://127.0.0.1:{port}"
    assert failures == [], "".join(traceback.format_exception(failures[0]))


# -- the real server ----------------------------------------------------------------------------


@contextlib.contextmanager
def _real_server(redis_url: str, key_prefix: str, log_path: Path) -> Iterator[str]:
    """``python -m trio_portfolio serve`` until ``/health`` answers; SIGTERM at the end."""
    port = free_port()
    command = [
        *CLI,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--redis-url",
        redis_url,
        "--key-prefix",
        key_prefix,
        "--metric-delay-seconds",
        "0.2,0.6",
        "--market-update-interval-seconds",
        "1.1",  # >= slowest metric + 0.5 s: guarantee 8's start-up check
        "--log-format",
        "text",
    ]
    base = f"http://127.0.0.1:{port}"
    with popen_until_healthy(command, base, log_path, ROOT, START_TIMEOUT):
        yield base


# -- the scenario -------------------------------------------------------------------------------


@contextlib.contextmanager
def _browser(profile: Path) -> Iterator[BrowserContext]:
    viewport = {"width": 1280, "height": 900}
    with headless_browser(profile, _chromium(), CHROMIUM_ARGS, viewport) as context:
        yield cast("BrowserContext", context)


def _switch_mid_analysis(page: Page) -> None:
    """Analyse AAPL, switch to GOOGL while AAPL runs; retried if AAPL was too quick.

    In-page waits (``wait_for``) notice the running card within a frame,
    well inside the 0.2 s the fastest metric takes.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    running = page.locator('.analysis[data-ticker="AAPL"][data-status="running"]').first
    switched = page.locator('.analysis[data-ticker="AAPL"][data-reason="switched"]').first
    for _attempt in range(5):
        page.get_by_role("button", name="Analyse AAPL").click()
        try:
            running.wait_for(state="attached", timeout=3000)
        except PlaywrightTimeout:
            continue
        page.get_by_role("button", name="Analyse GOOGL").click()
        try:
            switched.wait_for(state="attached", timeout=3000)
        except PlaywrightTimeout:
            continue
        return
    pytest.fail("AAPL finished before every switch: the metrics are too fast to switch")


def _check_progress_was_shown(page: Page, analysis_id: str) -> None:
    """While it ran, the card counted 0/5 .. 5/5 with a spinner, then said Complete.

    (5/5 may show running for a moment: the last result precedes ``analysis_complete``.)
    """
    states = [s for s in page.evaluate("window.__analysisStates") if s["id"] == analysis_id]
    running = [s for s in states if s["status"] == "running"]
    assert [s["results"] for s in running] == sorted(s["results"] for s in running)
    assert {s["results"] for s in running} >= {0, 1, 2, 3, 4}, states
    assert all(s["spinner"] and s["text"] == f"Computing {s['results']}/5" for s in running)
    assert states[-1] == {**states[-1], "status": "complete", "results": 5, "spinner": False}


def _run_scenario(context: BrowserContext, base: str, screenshot: Path | None) -> None:
    from playwright.sync_api import expect

    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
        ),
    )
    page.add_init_script(RECORD_ANALYSES)
    page.goto(f"{base}/")

    # The session: a server-made id in the fragment, the default holdings, a live socket.
    expect(page.locator("#connection")).to_have_attribute("data-state", "open", timeout=WAIT_MS)
    expect(page.locator("#holdings-body tr")).to_have_count(3)
    for ticker in HOLDINGS:
        expect(page.locator(f'#holdings-body tr[data-ticker="{ticker}"]')).to_be_visible()
    session_id = page.locator("#session-id").inner_text()
    assert len(session_id) >= 16
    assert page.url.endswith(f"#session={session_id}")

    # One analysis to completion: progress while running, five values at the end.
    page.get_by_role("button", name="Analyse MSFT").click()
    msft = page.locator('.analysis[data-ticker="MSFT"]').first
    expect(msft.locator(".progress-count")).to_be_visible(timeout=WAIT_MS)
    expect(msft).to_have_attribute("data-status", "complete", timeout=WAIT_MS)
    expect(msft.locator('dd:not([data-pending="true"])')).to_have_count(5)
    expect(msft.locator(".progress-count")).to_have_text("5/5")
    _check_progress_was_shown(page, msft.get_attribute("data-analysis-id") or "")

    # Cancel-on-switch: AAPL is marked switched, GOOGL completes with five metrics.
    _switch_mid_analysis(page)
    switched = page.locator('.analysis[data-ticker="AAPL"][data-reason="switched"]').first
    expect(switched).to_have_attribute("data-status", "cancelled")
    expect(switched.locator(".status-text")).to_contain_text("switched to GOOGL")
    googl = page.locator('.analysis[data-ticker="GOOGL"][data-status="complete"]').first
    expect(googl).to_be_visible(timeout=WAIT_MS)
    expect(googl.locator('dd:not([data-pending="true"])')).to_have_count(5)

    # Market updates draw the total-value line.
    expect(page.locator("#chart polyline")).to_have_count(1, timeout=WAIT_MS)

    # A second tab on the same session still shows MSFT after the first tab drops it:
    # analysing it there is refused with an error frame, shown as such.
    stale = context.new_page()
    stale.goto(f"{base}/#session={session_id}")
    expect(stale.locator("#connection")).to_have_attribute("data-state", "open", timeout=WAIT_MS)
    expect(stale.locator('#holdings-body tr[data-ticker="MSFT"]')).to_be_visible()

    page.get_by_role("button", name="Edit holdings").click()
    rows = page.locator("#edit-rows .edit-row")
    expect(rows).to_have_count(3)
    msft_row = rows.filter(has=page.locator('input[name="ticker"][value="MSFT"]'))
    msft_row.get_by_role("button", name="Remove row 3").click()
    page.get_by_role("button", name="Add a ticker").click()
    page.get_by_label("Ticker 3").fill("nvda")
    page.get_by_label("Quantity 3").fill("-3")
    page.get_by_role("button", name="Save holdings").click()
    expect(page.locator("#edit-error")).to_contain_text("positive number")
    page.get_by_label("Quantity 3").fill("20")
    page.get_by_role("button", name="Save holdings").click()
    expect(page.locator("#edit-form")).to_be_hidden(timeout=WAIT_MS)
    expect(page.locator("#holdings-body tr")).to_have_count(3)
    expect(page.locator('#holdings-body tr[data-ticker="NVDA"]')).to_be_visible()
    expect(page.locator('#holdings-body tr[data-ticker="MSFT"]')).to_have_count(0)

    stale.get_by_role("button", name="Analyse MSFT").click()
    error = stale.locator('#errors .error[data-code="ticker_not_held"]')
    expect(error).to_be_visible(timeout=WAIT_MS)
    expect(error.locator(".detail")).to_contain_text("MSFT")
    stale.close()

    if screenshot is not None:
        page.wait_for_timeout(4000)  # a few more market updates on the chart
        page.screenshot(path=str(screenshot), full_page=True)
    assert problems == []


def _screenshot_target() -> Path | None:
    return SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else None


def test_dashboard_against_the_real_server(
    request: pytest.FixtureRequest, key_prefix: str, tmp_path: Path
) -> None:
    if not _server_serves_http():
        pytest.skip("server.py does not route connections through serve_front_door yet")
    _chromium()
    real_redis: RedisServerInfo = request.getfixturevalue("real_redis")
    with (
        _real_server(real_redis.url, key_prefix, tmp_path / "server.log") as base,
        _browser(tmp_path / "profile") as context,
    ):
        _run_scenario(context, base, _screenshot_target())


def test_dashboard_against_the_fake_peer(tmp_path: Path) -> None:
    _chromium()
    screenshot = _screenshot_target() if not _server_serves_http() else None
    with _fake_server() as base, _browser(tmp_path / "profile") as context:
        _run_scenario(context, base, screenshot)
