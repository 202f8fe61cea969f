"""The wire contract, row by row, from outside (``docs/protocol.md`` lists the rows).

Rules of this suite: every test runs a whole server in-process
(:func:`~trio_portfolio.testing.live`) on 127.0.0.1, port 0, against the
harness's real redis-server, and talks to it through real sockets and real
WebSockets (trio-websocket as the client).  Metric delays are a few tens of
milliseconds; market ticks are off (an hour apart) unless a test asks.
Every wait is bounded (``fail_after``, or the client's own timeouts).
Frames are compared field by field, and every "the connection stays
usable" is proved by a successful action afterwards.
"""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request

from trio_portfolio.testing import (
    IO,
    METRIC_NAMES,
    PORTFOLIO_FIELDS,
    V1_RESULT_FIELDS,
    V2_RESULT_FIELDS,
    Client,
    Frame,
    LiveServer,
    RedisServerInfo,
    assert_iso_z,
    greet,
    is_type,
    live,
    new_session_id,
    open_client,
    store_of,
)

DEFAULT_HOLDINGS = {"AAPL": 100.0, "GOOGL": 50.0, "MSFT": 75.0}


async def run_analysis(client: Client, ticker: str) -> list[Frame]:
    """Analyze ``ticker`` (v2) to completion; the frames from started to complete."""
    await client.send("analyze", ticker=ticker)
    frames = await client.recv_until(is_type("analysis_complete"), timeout=IO)
    assert frames[0]["type"] == "analysis_started", frames
    return frames


async def portfolio(client: Client) -> Frame:
    await client.send("get_portfolio")
    frames = await client.recv_until(is_type("portfolio"), timeout=IO)
    assert len(frames) == 1, frames
    return frames[0]


def stored_state(frame: Frame) -> Frame:
    """What bad input must not change: everything but ``last_activity``."""
    return {k: v for k, v in frame.items() if k != "last_activity"}


# -- handshake -----------------------------------------------------------------------------


async def test_handshake_accepts_a_valid_session_path(real_redis: RedisServerInfo) -> None:
    async with live(real_redis) as server:
        session_id = "Ok_session-" + "x" * 53  # 64 characters, every allowed kind
        assert len(session_id) == 64
        async with open_client(server, session_id) as client:
            assert client.ws.subprotocol == "portfolio.v2"
            frame = await greet(client)
            assert frame["session_id"] == session_id


async def handshake_status(server: LiveServer, path: str, subprotocols: list[str]) -> int:
    """The HTTP status a WebSocket handshake on ``path`` gets (101 if accepted).

    Spoken with wsproto over a socket this test owns: trio-websocket's client
    leaks its socket when the server rejects the handshake.
    """
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(host=f"127.0.0.1:{server.port}", target=path, subprotocols=subprotocols)
    with trio.fail_after(IO):
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
            await stream.send_all(ws.send(request))
            while True:
                data = await stream.receive_some()
                assert data, "the server closed the socket without a response"
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        return 101
                    if isinstance(event, RejectConnection):
                        return event.status_code


@pytest.mark.parametrize(
    "path",
    [
        "/ws/" + "x" * 65,  # too long
        "/ws/bad!id",
        "/ws/bad.id",
        "/ws/bad%20id",  # a space, percent-encoded
        "/ws/%C3%A9t%C3%A9",  # non-ASCII
        "/ws/a/b",
        "/ws/",
    ],
    ids=["too-long", "bang", "dot", "space", "non-ascii", "slash", "empty"],
)
async def test_handshake_refuses_bad_session_ids(real_redis: RedisServerInfo, path: str) -> None:
    async with live(real_redis) as server:
        assert await handshake_status(server, "/ws/" + "x" * 64, ["portfolio.v2"]) == 101
        status = await handshake_status(server, path, ["portfolio.v2"])
        assert 400 <= status < 500
        assert status != 404  # the path is right, the id is not


async def test_handshake_beyond_max_connections_is_503(real_redis: RedisServerInfo) -> None:
    async with (
        live(real_redis, max_connections=2) as server,
        open_client(server, new_session_id()) as first,
        open_client(server, new_session_id()) as second,
    ):
        await greet(first)
        await greet(second)
        assert await handshake_status(server, f"/ws/{new_session_id()}", ["portfolio.v2"]) == 503
        # The two admitted clients are unaffected.
        await first.send("get_portfolio")
        assert (await first.recv(IO))["type"] == "portfolio"


@pytest.mark.parametrize("path", ["/", "/wss/abc", "/ws", "/api/ws/abc"])
async def test_handshake_on_a_wrong_path_is_404(real_redis: RedisServerInfo, path: str) -> None:
    async with live(real_redis) as server:
        assert await handshake_status(server, path, []) == 404


# -- v1 ------------------------------------------------------------------------------------


async def test_v1_demo_client_works_unchanged(real_redis: RedisServerInfo) -> None:
    """Written like the seed's demo: no subprotocol, stdlib json, read five results."""
    async with live(real_redis) as server:
        url = server.ws_url(new_session_id())
        async with open_websocket_url(url) as ws:
            assert ws.subprotocol is None
            await ws.send_message(json.dumps({"action": "analyze", "ticker": "AAPL"}))
            results: list[Frame] = []
            with trio.fail_after(IO):
                while len(results) < 5:
                    results.append(json.loads(await ws.get_message()))
            for result in results:
                assert set(result) == V1_RESULT_FIELDS, result
                assert result["type"] == "analysis_result"
                assert result["ticker"] == "AAPL"
                assert isinstance(result["value"], float)
                assert_iso_z(result["timestamp"])
            assert {r["metric"] for r in results} == METRIC_NAMES
            # v1 never hears analysis_complete (or anything else).
            with trio.move_on_after(0.3):
                extra = await ws.get_message()
                pytest.fail(f"v1 received an extra frame: {extra!r}")


async def test_v1_switch_delivers_only_the_new_ticker_after_its_first_result(
    real_redis: RedisServerInfo,
) -> None:
    async with (
        live(real_redis, metric_delay_seconds=(0.05, 0.3)) as server,
        open_client(server, new_session_id(), v2=False) as client,
    ):
        await client.send("analyze", ticker="AAPL")
        first = await client.recv(IO)
        assert first["ticker"] == "AAPL"
        await client.send("analyze", ticker="GOOGL")
        googl: list[Frame] = []
        with trio.fail_after(IO):
            while len(googl) < 5:
                frame = await client.recv(IO)
                assert frame["type"] == "analysis_result", frame
                assert set(frame) == V1_RESULT_FIELDS
                if googl:
                    assert frame["ticker"] == "GOOGL", "an AAPL result after the first GOOGL"
                if frame["ticker"] == "GOOGL":
                    googl.append(frame)
        assert {f["metric"] for f in googl} == METRIC_NAMES
        await client.expect_quiet(0.4)
        aapl = [f for f in client.frames if f["ticker"] == "AAPL"]
        assert len(aapl) < 5  # the switch really cut the AAPL analysis short


async def test_v1_cancel_stops_the_results(real_redis: RedisServerInfo) -> None:
    async with (
        live(real_redis, metric_delay_seconds=(0.2, 0.4)) as server,
        open_client(server, new_session_id(), v2=False) as client,
    ):
        await client.send("analyze", ticker="MSFT")
        await trio.sleep(0.05)
        await client.send("cancel")
        await client.expect_quiet(0.6)
        assert client.frames == []


@pytest.mark.parametrize(
    "message",
    [{"action": "get_portfolio"}, {"action": "set_holdings", "holdings": {"AAPL": 1}}],
    ids=["get_portfolio", "set_holdings"],
)
async def test_v1_portfolio_actions_are_unsupported(
    real_redis: RedisServerInfo, message: Frame
) -> None:
    session_id = new_session_id()
    async with live(real_redis) as server:
        async with open_client(server, session_id, v2=False) as client:
            await client.send(**message)
            error = await client.recv(IO)
            assert error == {
                "type": "error",
                "code": "unsupported_in_v1",
                "detail": error["detail"],
            }
            assert "portfolio.v2" in error["detail"]
            # Still usable, and the holdings were not changed behind the client's back.
            await client.send("analyze", ticker="GOOGL")
            results = [await client.recv(IO) for _ in range(5)]
            assert {r["metric"] for r in results} == METRIC_NAMES
        async with open_client(server, session_id) as v2:
            assert (await greet(v2))["portfolio"]["holdings"] == DEFAULT_HOLDINGS


# -- v2 ------------------------------------------------------------------------------------


async def test_v2_session_frame_carries_the_default_portfolio(real_redis: RedisServerInfo) -> None:
    session_id = new_session_id()
    async with live(real_redis) as server, open_client(server, session_id) as client:
        frame = await greet(client)
        assert set(frame) == {"type", "session_id", "portfolio"}
        assert frame["session_id"] == session_id
        folio = frame["portfolio"]
        assert set(folio) == PORTFOLIO_FIELDS
        assert folio["type"] == "portfolio"
        assert folio["session_id"] == session_id
        assert folio["holdings"] == DEFAULT_HOLDINGS
        assert set(folio["prices"]) == set(DEFAULT_HOLDINGS)
        total = sum(q * folio["prices"][t] for t, q in DEFAULT_HOLDINGS.items())
        assert folio["total_value"] == pytest.approx(total)
        assert isinstance(folio["portfolio_version"], int)
        assert folio["current_analysis"] is None
        assert folio["analysis_results"] == []
        assert_iso_z(folio["last_activity"])


async def test_v2_analysis_lifecycle(real_redis: RedisServerInfo) -> None:
    async with live(real_redis) as server, open_client(server, new_session_id()) as client:
        version = (await greet(client))["portfolio"]["portfolio_version"]
        frames = await run_analysis(client, "AAPL")
        assert len(frames) == 7, frames
        started, results, complete = frames[0], frames[1:6], frames[6]
        assert set(started) == {
            "type",
            "analysis_id",
            "ticker",
            "portfolio_version",
            "started_at",
            "as_of",
        }
        analysis_id = started["analysis_id"]
        assert isinstance(analysis_id, str)
        assert analysis_id
        assert started["ticker"] == "AAPL"
        assert started["portfolio_version"] == version
        assert_iso_z(started["started_at"])
        for result in results:
            assert set(result) == V2_RESULT_FIELDS, result
            assert result["type"] == "analysis_result"
            assert result["analysis_id"] == analysis_id
            assert result["portfolio_version"] == version
            assert result["ticker"] == "AAPL"
            assert_iso_z(result["timestamp"])
        assert sorted(r["metric"] for r in results) == sorted(METRIC_NAMES)
        assert complete == {
            "type": "analysis_complete",
            "analysis_id": analysis_id,
            "ticker": "AAPL",
        }
        # A second analysis gets a new id.
        again = await run_analysis(client, "AAPL")
        assert again[0]["analysis_id"] != analysis_id


async def test_v2_lowercase_ticker_is_normalised(real_redis: RedisServerInfo) -> None:
    async with live(real_redis) as server, open_client(server, new_session_id()) as client:
        await greet(client)
        frames = await run_analysis(client, " msft ")
        assert {f["ticker"] for f in frames} == {"MSFT"}
        assert len(frames) == 7


async def test_v2_cancel(real_redis: RedisServerInfo) -> None:
    async with (
        live(real_redis, metric_delay_seconds=(0.2, 0.4)) as server,
        open_client(server, new_session_id()) as client,
    ):
        await greet(client)
        await client.send("analyze", ticker="GOOGL")
        started = await client.recv(IO)
        assert started["type"] == "analysis_started"
        await client.send("cancel")
        cancelled = await client.recv(IO)
        assert cancelled == {
            "type": "analysis_cancelled",
            "analysis_id": started["analysis_id"],
            "ticker": "GOOGL",
            "reason": "cancelled",
        }
        await client.expect_quiet(0.6)
        folio = await portfolio(client)
        assert folio["current_analysis"] is None
        assert folio["analysis_results"] == []
        # Cancelling with nothing in flight is a quiet no-op.
        await client.send("cancel")
        await client.expect_quiet(0.2)


async def test_v2_get_portfolio_lists_results_newest_last(real_redis: RedisServerInfo) -> None:
    session_id = new_session_id()
    async with live(real_redis) as server, open_client(server, session_id) as client:
        greeting = await greet(client)
        first = await run_analysis(client, "AAPL")
        second = await run_analysis(client, "MSFT")
        folio = await portfolio(client)
        assert set(folio) == PORTFOLIO_FIELDS
        assert folio["session_id"] == session_id
        assert folio["holdings"] == DEFAULT_HOLDINGS
        assert folio["portfolio_version"] == greeting["portfolio"]["portfolio_version"]
        assert folio["total_value"] == greeting["portfolio"]["total_value"]
        assert folio["current_analysis"] is None
        assert_iso_z(folio["last_activity"])
        assert folio["last_activity"] >= greeting["portfolio"]["last_activity"]
        stored = folio["analysis_results"]
        streamed = [f for f in first + second if f["type"] == "analysis_result"]
        assert len(stored) == 10
        # Newest last: every result of the first analysis before any of the second.
        ids = [r["analysis_id"] for r in stored]
        assert ids == [first[0]["analysis_id"]] * 5 + [second[0]["analysis_id"]] * 5
        key = "analysis_id", "metric", "value", "timestamp", "portfolio_version", "ticker"
        assert sorted(tuple(r[k] for k in key) for r in stored) == sorted(
            tuple(r[k] for k in key) for r in streamed
        )
        assert all(r["type"] == "analysis_result" for r in stored)


async def test_v2_get_portfolio_shows_the_current_analysis(real_redis: RedisServerInfo) -> None:
    async with (
        live(real_redis, metric_delay_seconds=(0.5, 0.6)) as server,
        open_client(server, new_session_id()) as client,
    ):
        await greet(client)
        await client.send("analyze", ticker="GOOGL")
        started = await client.recv(IO)
        folio = await portfolio(client)
        assert folio["current_analysis"] == {
            "analysis_id": started["analysis_id"],
            "ticker": "GOOGL",
            "portfolio_version": started["portfolio_version"],
            "started_at": started["started_at"],
        }


async def test_v2_set_holdings(real_redis: RedisServerInfo) -> None:
    async with live(real_redis) as server, open_client(server, new_session_id()) as client:
        before = (await greet(client))["portfolio"]
        await client.send("set_holdings", holdings={"aapl": 10, "TSLA": 2.5, "brk.b": 1})
        frames = await client.recv_until(is_type("portfolio"), timeout=IO)
        assert len(frames) == 1
        after = frames[0]
        assert set(after) == PORTFOLIO_FIELDS
        assert after["holdings"] == {"AAPL": 10.0, "TSLA": 2.5, "BRK.B": 1.0}
        assert set(after["prices"]) == {"AAPL", "TSLA", "BRK.B"}
        assert all(p > 0 for p in after["prices"].values())
        total = sum(q * after["prices"][t] for t, q in after["holdings"].items())
        assert after["total_value"] == pytest.approx(total)
        assert after["portfolio_version"] > before["portfolio_version"]
        # The new holdings are what get_portfolio and analyze see from now on.
        assert stored_state(await portfolio(client)) == stored_state(after)
        frames = await run_analysis(client, "tsla")
        assert frames[0]["portfolio_version"] == after["portfolio_version"]
        await client.send("analyze", ticker="GOOGL")
        error = await client.recv(IO)
        assert error["type"] == "error"
        assert error["code"] == "ticker_not_held"


BAD_INPUT: list[tuple[str, str | bytes, str]] = [
    ("not-json", "this is not json", "bad_json"),
    ("truncated-json", '{"action": "analyze", "ticker": "AA', "bad_json"),
    ("json-array", '["analyze", "AAPL"]', "bad_json"),
    ("json-string", '"analyze"', "bad_json"),
    ("binary-garbage", b"\xff\xfe\x00garbage", "bad_json"),
    ("no-action", '{"ticker": "AAPL"}', "unknown_action"),
    ("unknown-action", '{"action": "sell", "ticker": "AAPL"}', "unknown_action"),
    ("action-not-string", '{"action": 7}', "unknown_action"),
    ("ticker-missing", '{"action": "analyze"}', "bad_ticker"),
    ("ticker-digits", '{"action": "analyze", "ticker": "123"}', "bad_ticker"),
    ("ticker-too-long", '{"action": "analyze", "ticker": "ABCDEFGHIJK"}', "bad_ticker"),
    ("ticker-number", '{"action": "analyze", "ticker": 42}', "bad_ticker"),
    ("ticker-empty", '{"action": "analyze", "ticker": ""}', "bad_ticker"),
    ("ticker-not-held", '{"action": "analyze", "ticker": "TSLA"}', "ticker_not_held"),
    ("holdings-missing", '{"action": "set_holdings"}', "bad_holdings"),
    ("holdings-empty", '{"action": "set_holdings", "holdings": {}}', "bad_holdings"),
    (
        "holdings-101",
        json.dumps(
            {"action": "set_holdings", "holdings": {f"T{i}": 1 for i in range(101)}},
        ),
        "bad_holdings",
    ),
    ("holdings-negative", '{"action": "set_holdings", "holdings": {"AAPL": -5}}', "bad_holdings"),
    ("holdings-zero", '{"action": "set_holdings", "holdings": {"AAPL": 0}}', "bad_holdings"),
    ("holdings-string", '{"action": "set_holdings", "holdings": {"AAPL": "10"}}', "bad_holdings"),
    ("holdings-bool", '{"action": "set_holdings", "holdings": {"AAPL": true}}', "bad_holdings"),
    ("holdings-null", '{"action": "set_holdings", "holdings": {"AAPL": null}}', "bad_holdings"),
    ("holdings-list", '{"action": "set_holdings", "holdings": [["AAPL", 1]]}', "bad_holdings"),
    ("holdings-bad-key", '{"action": "set_holdings", "holdings": {"a a": 1}}', "bad_holdings"),
    ("holdings-huge", '{"action": "set_holdings", "holdings": {"AAPL": 1e300}}', "bad_holdings"),
]


@pytest.mark.parametrize(
    ("frame", "code"), [(f, c) for _, f, c in BAD_INPUT], ids=[i for i, _, _ in BAD_INPUT]
)
async def test_v2_bad_input_is_answered_and_harmless(
    real_redis: RedisServerInfo, frame: str | bytes, code: str
) -> None:
    async with live(real_redis) as server, open_client(server, new_session_id()) as client:
        await greet(client)
        await run_analysis(client, "AAPL")
        before = await portfolio(client)
        assert len(before["analysis_results"]) == 5
        await client.send_raw(frame)
        error = await client.recv(IO)
        assert error["type"] == "error", error
        assert error["code"] == code, error
        assert isinstance(error["detail"], str)
        assert error["detail"]
        assert set(error) == {"type", "code", "detail"}
        await client.expect_quiet(0.1)
        # Nothing stored was lost or changed, and the connection still works.
        assert stored_state(await portfolio(client)) == stored_state(before)
        frames = await run_analysis(client, "MSFT")
        assert len(frames) == 7


async def test_many_bad_frames_in_a_row_leave_the_connection_usable(
    real_redis: RedisServerInfo,
) -> None:
    async with live(real_redis) as server, open_client(server, new_session_id()) as client:
        await greet(client)
        await run_analysis(client, "GOOGL")
        before = await portfolio(client)
        for _, frame, _ in BAD_INPUT:
            await client.send_raw(frame)
        errors = [await client.recv(IO) for _ in BAD_INPUT]
        assert [e["code"] for e in errors] == [code for _, _, code in BAD_INPUT]
        assert stored_state(await portfolio(client)) == stored_state(before)
        assert len(await run_analysis(client, "AAPL")) == 7


async def test_oversized_frame_closes_with_1009(real_redis: RedisServerInfo) -> None:
    session_id = new_session_id()
    async with live(real_redis, max_message_bytes=2048) as server:
        async with open_client(server, session_id) as client:
            await greet(client)
            await run_analysis(client, "AAPL")
            before = await portfolio(client)
            # Just under the limit is an ordinary frame (extra fields are ignored).
            padded = json.dumps({"action": "get_portfolio", "pad": ""})
            padded = padded.replace('""', '"' + "x" * (2000 - len(padded)) + '"')
            assert len(padded) <= 2048
            await client.send_raw(padded)
            assert (await client.recv(IO))["type"] == "portfolio"
            await client.send_raw(json.dumps({"action": "analyze", "ticker": "A" * 4096}))
            frames, code = await client.recv_until_closed(IO)
            assert code == 1009
            assert frames == []
        async with open_client(server, session_id) as again:
            greeting = await greet(again)
            assert stored_state(greeting["portfolio"]) == stored_state(before)


async def test_a_flood_is_throttled_then_closed_with_1008(real_redis: RedisServerInfo) -> None:
    session_id = new_session_id()
    async with live(real_redis, messages_per_second=20.0, message_burst=40) as server:
        async with open_client(server, session_id) as client:
            await greet(client)
            await run_analysis(client, "AAPL")
            before = await portfolio(client)
            sent = 0
            with trio.fail_after(IO):
                try:
                    for _ in range(400):
                        await client.send("cancel")
                        sent += 1
                except ConnectionClosed:
                    pass
                frames, code = await client.recv_until_closed(IO)
            assert code == 1008
            assert frames, "the flood was never answered with rate_limited"
            assert {f["type"] for f in frames} == {"error"}
            assert {f["code"] for f in frames} == {"rate_limited"}
            # About one burst was served, about one burst throttled, then the close.
            assert 20 <= len(frames) <= 60, len(frames)
        async with open_client(server, session_id) as again:
            greeting = await greet(again)
            assert stored_state(greeting["portfolio"]) == stored_state(before)
            assert len(await run_analysis(again, "MSFT")) == 7


async def test_a_short_burst_is_only_throttled(real_redis: RedisServerInfo) -> None:
    async with (
        live(real_redis, messages_per_second=20.0, message_burst=10) as server,
        open_client(server, new_session_id()) as client,
    ):
        await greet(client)
        for _ in range(15):
            await client.send("get_portfolio")
        frames = [await client.recv(IO) for _ in range(15)]
        kinds = [f["type"] if f["type"] != "error" else f["code"] for f in frames]
        assert kinds.count("portfolio") >= 10
        assert kinds.count("rate_limited") >= 1
        assert set(kinds) == {"portfolio", "rate_limited"}
        await trio.sleep(0.5)  # the bucket refills (5 in debt, 20 a second)
        assert (await portfolio(client))["type"] == "portfolio"


# -- sessions ------------------------------------------------------------------------------


async def test_reconnecting_resumes_the_session(real_redis: RedisServerInfo) -> None:
    session_id = new_session_id()
    async with live(real_redis) as server:
        async with open_client(server, session_id) as client:
            await greet(client)
            await client.send("set_holdings", holdings={"AAPL": 3, "NVDA": 4})
            await client.recv_until(is_type("portfolio"), timeout=IO)
            await run_analysis(client, "NVDA")
            before = await portfolio(client)
        async with open_client(server, session_id) as client:
            after = (await greet(client))["portfolio"]
            assert stored_state(after) == stored_state(before)
            assert after["holdings"] == {"AAPL": 3.0, "NVDA": 4.0}
            assert len(after["analysis_results"]) == 5
        # v1 resumes the same session too: NVDA is held there.
        async with open_client(server, session_id, v2=False) as client:
            await client.send("analyze", ticker="NVDA")
            results = [await client.recv(IO) for _ in range(5)]
            assert {r["ticker"] for r in results} == {"NVDA"}


async def test_an_unknown_session_is_created(real_redis: RedisServerInfo) -> None:
    session_id = new_session_id()
    async with live(real_redis) as server:
        store = store_of(server)
        assert await store.get(session_id) is None
        async with open_client(server, session_id) as client:
            folio = (await greet(client))["portfolio"]
            assert folio["holdings"] == DEFAULT_HOLDINGS
            assert folio["analysis_results"] == []
        stored = await store.get(session_id)
        assert stored is not None
        assert stored.holdings == DEFAULT_HOLDINGS
        assert stored.portfolio_version == folio["portfolio_version"]
        # A v1 connection creates its session as well.
        other = new_session_id()
        async with open_client(server, other, v2=False) as client:
            await client.send("analyze", ticker="AAPL")
            await client.recv(IO)
        assert await store.get(other) is not None
