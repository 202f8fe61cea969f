"""Browser pages against the real server, in headless Chromium (Playwright).

Rules of this suite (as ``test_dashboard.py``): localhost only; Debian's
``chromium`` (``/usr/bin/chromium`` or ``PORTFOLIO_TEST_CHROMIUM``), skipped
only when there is none; the server is ``python -m trio_portfolio serve`` in
a subprocess on the harness's real Redis; every wait is a Playwright
expectation with a deadline.

* **The original service's page**, written here in its shape: it calls
  ``POST /session``, reads ``data.config.features[...]`` exactly as the
  contract lists, opens ``ws://.../ws/{session_id}`` with no subprotocol
  (v1), sends ``{"action": "analyze", "ticker": ...}`` for the ticker
  clicked, and renders each ``analysis_result``.  The test serves it from
  its own port and forwards every other request there, byte for byte, to
  the server, so the page and its API share one origin as they did in
  the original service (``POST /session`` sends no CORS headers, so a page
  on another origin could not read the answer).
* **The dashboard with authentication on** (``--auth-secret``) and with
  the advertised idle timeout.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
import trio

from trio_portfolio.testing import RedisServerInfo, free_port
from trio_portfolio.testing.processes import (
    find_chromium,
    headless_browser,
    popen_until_healthy,
    threaded_tcp_server,
)

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("portfolio_risk", "concentration", "correlation", "momentum", "allocation_score")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
WAIT_MS = 20_000
START_TIMEOUT = 30.0

ORIGINAL_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Portfolio (original)</title></head>
<body>
<h1>Portfolio analysis</h1>
<p id="status">Starting…</p>
<p id="settings"></p>
<div id="tickers"></div>
<ul id="results"></ul>
<script>
let ws = null;
let sessionId = null;
let autoReconnect = false;
const latest = {};

async function init() {
  const response = await fetch("/session", { method: "POST" });
  if (!response.ok) {
    document.getElementById("status").textContent = "Session creation failed";
    return;
  }
  const data = await response.json();
  sessionId = data.session_id;
  const connectivity = data.config.features["client-connectivity"].settings;
  const idleTimeout = connectivity["idle-timeout-seconds"];
  autoReconnect = connectivity["auto-reconnect"];
  const holdings = data.config.features["client-ui"].settings["default-holdings"];
  const metrics = data.config.features.analysis.settings.metrics;
  const shown = document.getElementById("settings");
  shown.dataset.idleType = typeof idleTimeout;
  shown.dataset.reconnectType = typeof autoReconnect;
  shown.dataset.metrics = metrics.join(",");
  shown.textContent = `idle ${idleTimeout} s, reconnect ${autoReconnect}`;
  for (const ticker of Object.keys(holdings)) {
    const button = document.createElement("button");
    button.textContent = ticker;
    button.onclick = () => analyze(ticker);
    document.getElementById("tickers").append(button);
  }
  connect();
}

function connect() {
  ws = new WebSocket(`ws://${location.host}/ws/${sessionId}`);
  ws.onopen = () => { document.getElementById("status").textContent = "Connected"; };
  ws.onclose = () => {
    document.getElementById("status").textContent = "Disconnected";
    if (autoReconnect) setTimeout(connect, 1000);
  };
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type !== "analysis_result") return;
    latest[message.metric] = message;
    render(message.ticker);
  };
}

function analyze(ticker) {
  for (const key of Object.keys(latest)) delete latest[key];
  render(ticker);
  ws.send(JSON.stringify({ action: "analyze", ticker: ticker }));
}

function render(ticker) {
  const list = document.getElementById("results");
  list.replaceChildren();
  for (const result of Object.values(latest)) {
    if (result.ticker !== ticker) continue;
    const item = document.createElement("li");
    item.dataset.ticker = result.ticker;
    item.dataset.metric = result.metric;
    item.textContent = `${result.ticker} ${result.metric}: ${result.value}`;
    list.append(item);
  }
}

init();
</script>
</body></html>
"""


def _chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip("no chromium binary: apt-get install chromium (or set PORTFOLIO_TEST_CHROMIUM)")
    return found


@contextlib.contextmanager
def _server(redis_url: str, log_path: Path, *extra: str) -> Iterator[int]:
    """``python -m trio_portfolio serve`` until ``/health`` answers; its port; SIGTERM after."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "trio_portfolio", "serve", "--port", str(port)),
        *("--redis-url", redis_url, "--key-prefix", "t" + secrets.token_hex(6)),
        *("--metric-delay-seconds", "0.2,0.6", "--market-update-interval-seconds", "1.1"),
        *("--log-format", "text", *extra),
    ]
    with popen_until_healthy(command, f"http://127.0.0.1:{port}", log_path, ROOT, START_TIMEOUT):
        yield port


async def _serve_page_or_forward(stream: trio.SocketStream, upstream_port: int) -> None:
    """``GET /original.html`` is the page; anything else is spliced to the server as is."""
    head = bytearray()
    with trio.move_on_after(10):
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            head += chunk
    if head.startswith(b"GET /original.html "):
        body = ORIGINAL_PAGE.encode()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        return
    upstream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    async with upstream:
        await upstream.send_all(bytes(head))

        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while chunk := await source.receive_some(65536):
                    await sink.send_all(chunk)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, stream, upstream)
            nursery.start_soon(pump, upstream, stream)


@contextlib.contextmanager
def _page_host(upstream_port: int) -> Iterator[str]:
    """The page's own origin (a thread running a small Trio server); its base URL."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await _serve_page_or_forward(stream, upstream_port)

    with threaded_tcp_server(handle, "original-page-host", START_TIMEOUT) as port:
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def _browser(profile: Path) -> Iterator[BrowserContext]:
    with headless_browser(profile, _chromium(), CHROMIUM_ARGS) as context:
        yield cast("BrowserContext", context)


def test_the_original_page_sees_five_results_for_the_ticker_it_clicks(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    _chromium()
    real_redis: RedisServerInfo = request.getfixturevalue("real_redis")
    with (
        _server(real_redis.url, tmp_path / "server.log") as port,
        _page_host(port) as base,
        _browser(tmp_path / "profile") as context,
    ):
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(f"{base}/original.html")
        expect(page.locator("#status")).to_have_text("Connected", timeout=WAIT_MS)
        settings = page.locator("#settings")
        expect(settings).to_have_attribute("data-idle-type", "number")
        expect(settings).to_have_attribute("data-reconnect-type", "boolean")
        expect(settings).to_have_attribute("data-metrics", ",".join(METRICS))
        for ticker in ("GOOGL", "AAPL"):  # the second click switches away from the first
            page.get_by_role("button", name=ticker, exact=True).click()
            results = page.locator(f'#results li[data-ticker="{ticker}"]')
            expect(results).to_have_count(5, timeout=WAIT_MS)
            for metric in METRICS:
                expect(page.locator(f'#results li[data-metric="{metric}"]')).to_have_count(1)
        assert problems == []


def test_the_dashboard_with_authentication_on(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    _chromium()
    real_redis: RedisServerInfo = request.getfixturevalue("real_redis")
    secret = ("--auth-secret", "a-browser-test-secret-" + secrets.token_hex(8))
    with (
        _server(real_redis.url, tmp_path / "server.log", *secret) as port,
        _browser(tmp_path / "profile") as context,
    ):
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        expect(page.locator("#connection")).to_have_attribute("data-state", "open", timeout=WAIT_MS)
        assert "&credential=" in page.url
        page.get_by_role("button", name="Analyse MSFT").click()
        msft = page.locator('.analysis[data-ticker="MSFT"][data-status="complete"]').first
        expect(msft).to_be_visible(timeout=WAIT_MS)
        expect(msft.locator('dd:not([data-pending="true"])')).to_have_count(5)
        # A second tab from the address (fragment) reaches the same session.
        session_id = page.locator("#session-id").inner_text()
        other = context.new_page()
        other.goto(page.url)
        expect(other.locator("#connection")).to_have_attribute(
            "data-state", "open", timeout=WAIT_MS
        )
        expect(other.locator("#session-id")).to_have_text(session_id)
        # Without the credential the socket is refused and the page never opens.
        bare = context.new_page()
        bare.goto(f"http://127.0.0.1:{port}/#session={session_id}")
        expect(bare.locator("#connection")).to_have_attribute(
            "data-state", "closed", timeout=WAIT_MS
        )


def test_the_dashboard_lets_an_idle_socket_go_and_comes_back(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    _chromium()
    real_redis: RedisServerInfo = request.getfixturevalue("real_redis")
    idle = ("--client-idle-timeout-seconds", "2")
    with (
        _server(real_redis.url, tmp_path / "server.log", *idle) as port,
        _browser(tmp_path / "profile") as context,
    ):
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        connection = page.locator("#connection")
        expect(connection).to_have_attribute("data-state", "open", timeout=WAIT_MS)
        expect(connection).to_have_attribute("data-state", "idle", timeout=WAIT_MS)
        page.locator("h1").click()
        expect(connection).to_have_attribute("data-state", "open", timeout=WAIT_MS)
