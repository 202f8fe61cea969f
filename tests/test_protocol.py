"""The wire contract (``docs/protocol.md``), checked without a socket.

Rules of this suite: every client action parses; every error code the
parser owns is produced by some input, with a detail that names the
problem; v1 frames carry exactly the seed's fields and v1 never receives
anything but ``analysis_result`` and ``error``; v2 frames carry exactly the
fields the contract lists (the sets in :mod:`trio_portfolio.testing`); what
is rendered decodes back to what was meant; and no input whatsoever makes
the parser raise anything but ``ProtocolError``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_portfolio.models import METRICS, AnalysisResult, CurrentAnalysis, Portfolio
from trio_portfolio.protocol import (
    ACTIONS,
    MAX_HOLDINGS,
    SUBPROTOCOL_V2,
    V1_ACTIONS,
    AnalysisCancelledEvent,
    AnalysisCompleteEvent,
    AnalysisResultEvent,
    AnalysisResultV1Event,
    AnalysisStartedEvent,
    Analyze,
    Cancel,
    CancelReason,
    ClientMessage,
    Dialect,
    ErrorCode,
    ErrorEvent,
    GetPortfolio,
    MarketUpdateEvent,
    PortfolioEvent,
    ProtocolError,
    SessionEvent,
    SetHoldings,
    choose_dialect,
    encode_client_message,
    normalise_holdings,
    normalise_ticker,
    parse_client_message,
    parse_server_event,
    render_cancelled,
    render_complete,
    render_error,
    render_market_update,
    render_portfolio,
    render_result,
    render_session,
    render_started,
    validate_session_id,
)
from trio_portfolio.testing import PORTFOLIO_FIELDS, V1_RESULT_FIELDS, V2_RESULT_FIELDS

TS = "2026-11-21T10:30:00.000Z"
RESULT = AnalysisResult(
    analysis_id="an-1",
    ticker="AAPL",
    metric="portfolio_risk",
    value=0.23,
    timestamp=TS,
    portfolio_version=7,
)
PORTFOLIO = Portfolio(
    session_id="s-1",
    holdings={"AAPL": 100.0, "MSFT": 75.0},
    prices={"AAPL": 190.5, "MSFT": 410.0},
    total_value=49800.0,
    portfolio_version=7,
    current_analysis=CurrentAnalysis("an-1", "AAPL", 7, TS),
    analysis_results=tuple(
        AnalysisResult("an-1", "AAPL", metric, i / 10, TS, 7) for i, metric in enumerate(METRICS)
    ),
    last_activity=TS,
    created_at=TS,
)

ERROR_FIELDS = {"type", "detail", "code"}


def load(frame: str | None) -> dict[str, Any]:
    assert isinstance(frame, str)
    decoded = orjson.loads(frame)
    assert isinstance(decoded, dict)
    return decoded


def refusal(text: str | bytes, dialect: Dialect = Dialect.V2) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_client_message(text, dialect=dialect)
    return info.value


# -- dialect, session ids, tickers -------------------------------------------


@pytest.mark.parametrize(
    ("offered", "dialect"),
    [
        ([], Dialect.V1),
        (["chat"], Dialect.V1),
        ([SUBPROTOCOL_V2], Dialect.V2),
        (["chat", SUBPROTOCOL_V2], Dialect.V2),
        (["PORTFOLIO.V2"], Dialect.V1),
    ],
)
def test_dialect_is_v2_only_when_offered(offered: list[str], dialect: Dialect) -> None:
    assert choose_dialect(offered) is dialect


def test_dialect_names_the_subprotocol_to_accept() -> None:
    assert Dialect.V2.subprotocol == "portfolio.v2"
    assert Dialect.V1.subprotocol is None


@pytest.mark.parametrize("session_id", ["a", "abc-DEF_123", "x" * 64])
def test_valid_session_ids(session_id: str) -> None:
    assert validate_session_id(session_id)


@pytest.mark.parametrize("session_id", ["", "x" * 65, "a b", "a/b", "abc\n", "é", "a.b"])
def test_invalid_session_ids(session_id: str) -> None:
    assert not validate_session_id(session_id)


@pytest.mark.parametrize(
    ("raw", "ticker"),
    [
        ("AAPL", "AAPL"),
        (" aapl ", "AAPL"),
        ("brk.b", "BRK.B"),
        ("bf-b", "BF-B"),
        ("A" * 10, "A" * 10),
    ],
)
def test_tickers_normalise(raw: str, ticker: str) -> None:
    assert normalise_ticker(raw) == ticker


@pytest.mark.parametrize(
    "raw", ["", "  ", "1ABC", ".A", "A" * 11, "A B", "A\nB", "ÄPL", "ﬀ", "ſ", 5, None]
)
def test_bad_tickers_are_refused(raw: object) -> None:
    with pytest.raises(ProtocolError) as info:
        normalise_ticker(raw)
    assert info.value.code is ErrorCode.BAD_TICKER


# -- parsing: every action ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"action": "analyze", "ticker": "AAPL"}', Analyze("AAPL")),
        ('{"action": "analyze", "ticker": " msft "}', Analyze("MSFT")),
        ('{"action": "cancel"}', Cancel()),
        ('{"action": "get_portfolio"}', GetPortfolio()),
        (
            '{"action": "set_holdings", "holdings": {"aapl": 10, "BRK.B": 2.5}}',
            SetHoldings({"AAPL": 10.0, "BRK.B": 2.5}),
        ),
        (b'{"action": "analyze", "ticker": "goog"}', Analyze("GOOG")),
        ('{"action": "analyze", "ticker": "IBM", "extra": [1, {"x": null}]}', Analyze("IBM")),
        ('{"action": "cancel", "ticker": "whatever!"}', Cancel()),
    ],
)
def test_every_action_parses(text: str | bytes, message: ClientMessage) -> None:
    assert parse_client_message(text) == message


def test_set_holdings_keeps_quantities_as_floats() -> None:
    message = parse_client_message('{"action": "set_holdings", "holdings": {"A": 1}}')
    assert isinstance(message, SetHoldings)
    assert message.holdings == {"A": 1.0}
    assert isinstance(message.holdings["A"], float)


@pytest.mark.parametrize("action", sorted(V1_ACTIONS))
def test_v1_may_analyze_and_cancel(action: str) -> None:
    text = orjson.dumps({"action": action, "ticker": "AAPL"})
    assert isinstance(parse_client_message(text, dialect=Dialect.V1), ACTIONS[action])


# -- parsing: every error code ------------------------------------------------

HOLDINGS_101 = {f"T{i}": 1 for i in range(MAX_HOLDINGS + 1)}

REFUSALS: list[tuple[str | bytes, ErrorCode, str]] = [
    ("not json", ErrorCode.BAD_JSON, "not valid JSON"),
    (b"\xff\xfe", ErrorCode.BAD_JSON, "not valid JSON"),
    ('{"action": "analyze", "ticker": NaN}', ErrorCode.BAD_JSON, "not valid JSON"),
    ("", ErrorCode.BAD_JSON, "not valid JSON"),
    ('["analyze"]', ErrorCode.BAD_JSON, "must be a JSON object, got array"),
    ('"analyze"', ErrorCode.BAD_JSON, "got string"),
    ("{}", ErrorCode.UNKNOWN_ACTION, "no action; known actions: analyze, cancel"),
    ('{"action": "buy"}', ErrorCode.UNKNOWN_ACTION, "unknown action 'buy'; known actions"),
    ('{"action": 3}', ErrorCode.UNKNOWN_ACTION, "unknown action 3"),
    ('{"action": ["analyze"]}', ErrorCode.UNKNOWN_ACTION, "unknown action array"),
    ('{"action": "ANALYZE", "ticker": "A"}', ErrorCode.UNKNOWN_ACTION, "'ANALYZE'"),
    ('{"action": "analyze"}', ErrorCode.BAD_TICKER, 'needs a "ticker"'),
    ('{"action": "analyze", "ticker": null}', ErrorCode.BAD_TICKER, "must be a string, got null"),
    ('{"action": "analyze", "ticker": "AA PL"}', ErrorCode.BAD_TICKER, "'AA PL' is not a ticker"),
    ('{"action": "analyze", "ticker": ""}', ErrorCode.BAD_TICKER, "'' is not a ticker"),
    ('{"action": "set_holdings"}', ErrorCode.BAD_HOLDINGS, 'needs "holdings"'),
    (
        '{"action": "set_holdings", "holdings": [["AAPL", 1]]}',
        ErrorCode.BAD_HOLDINGS,
        "must be an object of TICKER: quantity, got array",
    ),
    ('{"action": "set_holdings", "holdings": {}}', ErrorCode.BAD_HOLDINGS, "1-100 entries, got 0"),
    (
        orjson.dumps({"action": "set_holdings", "holdings": HOLDINGS_101}).decode(),
        ErrorCode.BAD_HOLDINGS,
        "1-100 entries, got 101",
    ),
    (
        '{"action": "set_holdings", "holdings": {"aapl ": -1}}',
        ErrorCode.BAD_HOLDINGS,
        "holdings['aapl ']: quantity must be a positive number",
    ),
    (
        '{"action": "set_holdings", "holdings": {"AAPL": 0}}',
        ErrorCode.BAD_HOLDINGS,
        "holdings['AAPL']: quantity must be a positive number up to 1e12, got 0",
    ),
    (
        '{"action": "set_holdings", "holdings": {"AAPL": 1e13}}',
        ErrorCode.BAD_HOLDINGS,
        "holdings['AAPL']: quantity must be a positive number up to 1e12",
    ),
    (
        '{"action": "set_holdings", "holdings": {"AAPL": true}}',
        ErrorCode.BAD_HOLDINGS,
        "holdings['AAPL']: quantity must be a number, got boolean",
    ),
    (
        '{"action": "set_holdings", "holdings": {"AAPL": "10"}}',
        ErrorCode.BAD_HOLDINGS,
        "holdings['AAPL']: quantity must be a number, got string",
    ),
    (
        '{"action": "set_holdings", "holdings": {"MSFT": 1, "a pl": 1}}',
        ErrorCode.BAD_HOLDINGS,
        "holdings['a pl']: 'a pl' is not a ticker",
    ),
    (
        '{"action": "set_holdings", "holdings": {"AAPL": 1, "aapl": 2}}',
        ErrorCode.BAD_HOLDINGS,
        "holdings['aapl']: duplicates 'AAPL' after normalisation",
    ),
]


@pytest.mark.parametrize(("text", "code", "detail"), REFUSALS)
def test_bad_input_is_refused_with_a_helpful_detail(
    text: str | bytes, code: ErrorCode, detail: str
) -> None:
    error = refusal(text)
    assert error.code is code
    assert detail in error.detail


@pytest.mark.parametrize("action", ["get_portfolio", "set_holdings"])
def test_v2_only_actions_are_refused_in_v1(action: str) -> None:
    # Refused before the fields are looked at: set_holdings has none here.
    error = refusal(orjson.dumps({"action": action}), Dialect.V1)
    assert error.code is ErrorCode.UNSUPPORTED_IN_V1
    assert action in error.detail
    assert "portfolio.v2" in error.detail


def test_v1_is_refused_an_unknown_action_as_unknown() -> None:
    assert refusal('{"action": "nope"}', Dialect.V1).code is ErrorCode.UNKNOWN_ACTION


def test_every_error_code_is_produced_or_owned_elsewhere() -> None:
    """The parser produces its codes; the others belong to later layers."""
    produced = {code for _, code, _ in REFUSALS} | {ErrorCode.UNSUPPORTED_IN_V1}
    elsewhere = {
        ErrorCode.TICKER_NOT_HELD,
        ErrorCode.STORE_UNAVAILABLE,
        ErrorCode.SESSION_EXPIRED,
        ErrorCode.RATE_LIMITED,
        ErrorCode.INTERNAL_ERROR,
        ErrorCode.TOO_MANY_SESSIONS,
        ErrorCode.TICKER_LIMIT,  # the market (market_data.TickerRefused)
        ErrorCode.UNKNOWN_TICKER,
    }
    assert produced | elsewhere == set(ErrorCode)
    assert not produced & elsewhere


def test_details_echo_input_boundedly() -> None:
    error = refusal(orjson.dumps({"action": "analyze", "ticker": "X" * 10_000}))
    assert len(error.detail) < 200


def test_huge_integer_quantities_are_bad_holdings() -> None:
    with pytest.raises(ProtocolError) as info:
        normalise_holdings({"AAPL": 10**400})
    assert info.value.code is ErrorCode.BAD_HOLDINGS


# -- rendering ---------------------------------------------------------------


@pytest.mark.parametrize("code", list(ErrorCode))
@pytest.mark.parametrize("dialect", list(Dialect))
def test_every_error_code_renders(code: ErrorCode, dialect: Dialect) -> None:
    frame = load(render_error(code, "something went wrong"))
    assert frame == {"type": "error", "detail": "something went wrong", "code": code.value}
    assert parse_server_event(render_error(code, "x"), dialect=dialect) == ErrorEvent("x", code)


def test_v1_result_has_exactly_the_seed_fields() -> None:
    assert load(render_result(RESULT, Dialect.V1)) == {
        "type": "analysis_result",
        "ticker": "AAPL",
        "metric": "portfolio_risk",
        "value": 0.23,
        "timestamp": TS,
    }


def test_v1_receives_nothing_but_results_and_errors() -> None:
    v1 = Dialect.V1
    assert render_session(PORTFOLIO, v1) is None
    assert render_portfolio(PORTFOLIO, v1) is None
    assert render_started("an-1", "AAPL", 7, TS, v1) is None
    assert render_complete("an-1", "AAPL", v1) is None
    assert render_cancelled("an-1", "AAPL", CancelReason.SWITCHED, v1) is None
    assert render_market_update(1.0, {"AAPL": 1.0}, 8, TS, v1) is None
    assert set(load(render_result(RESULT, v1))) == V1_RESULT_FIELDS
    assert set(load(render_error(ErrorCode.BAD_JSON, "x"))) == ERROR_FIELDS


def test_v2_result_adds_analysis_id_and_version() -> None:
    frame = load(render_result(RESULT, Dialect.V2))
    assert set(frame) == V2_RESULT_FIELDS
    assert frame["analysis_id"] == "an-1"
    assert frame["portfolio_version"] == 7


def test_v2_portfolio_fields() -> None:
    frame = load(render_portfolio(PORTFOLIO, Dialect.V2))
    assert set(frame) == PORTFOLIO_FIELDS
    assert frame["type"] == "portfolio"
    assert frame["holdings"] == {"AAPL": 100.0, "MSFT": 75.0}
    assert frame["prices"] == {"AAPL": 190.5, "MSFT": 410.0}
    assert frame["current_analysis"] == {
        "analysis_id": "an-1",
        "ticker": "AAPL",
        "portfolio_version": 7,
        "started_at": TS,
    }
    results = frame["analysis_results"]
    assert [r["metric"] for r in results] == list(METRICS)  # oldest first, newest last
    for result in results:
        assert set(result) == V2_RESULT_FIELDS
        assert result["type"] == "analysis_result"


def test_v2_portfolio_without_analysis_has_null() -> None:
    idle = Portfolio(
        session_id="s",
        holdings={"A": 1.0},
        prices={"A": 2.0},
        total_value=2.0,
        portfolio_version=1,
        current_analysis=None,
        analysis_results=(),
        last_activity=TS,
        created_at=TS,
    )
    frame = load(render_portfolio(idle, Dialect.V2))
    assert frame["current_analysis"] is None
    assert frame["analysis_results"] == []


def test_v2_session_carries_the_portfolio() -> None:
    frame = load(render_session(PORTFOLIO, Dialect.V2))
    assert set(frame) == {"type", "session_id", "portfolio"}
    assert frame["session_id"] == "s-1"
    assert frame["portfolio"] == load(render_portfolio(PORTFOLIO, Dialect.V2))


def test_v2_analysis_events() -> None:
    assert load(render_started("an-1", "AAPL", 7, TS, Dialect.V2, as_of=TS)) == {
        "type": "analysis_started",
        "analysis_id": "an-1",
        "ticker": "AAPL",
        "portfolio_version": 7,
        "started_at": TS,
        "as_of": TS,
    }
    assert load(render_complete("an-1", "AAPL", Dialect.V2)) == {
        "type": "analysis_complete",
        "analysis_id": "an-1",
        "ticker": "AAPL",
    }
    for reason in CancelReason:
        assert load(render_cancelled("an-1", "AAPL", reason, Dialect.V2)) == {
            "type": "analysis_cancelled",
            "analysis_id": "an-1",
            "ticker": "AAPL",
            "reason": reason.value,
        }
    assert {r.value for r in CancelReason} == {"switched", "cancelled", "portfolio_changed"}


def test_v2_market_update() -> None:
    assert load(render_market_update(1234.5, {"AAPL": 190.5}, 8, TS, Dialect.V2)) == {
        "type": "market_update",
        "total_value": 1234.5,
        "prices": {"AAPL": 190.5},
        "portfolio_version": 8,
        "as_of": TS,
    }


def test_numbers_are_json_numbers() -> None:
    frame = load(render_market_update(100, {"AAPL": 3}, 8, TS, Dialect.V2))
    assert isinstance(frame["total_value"], float)
    assert isinstance(frame["prices"]["AAPL"], float)
    assert isinstance(frame["portfolio_version"], int)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_never_sent(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        render_result(AnalysisResult("a", "AAPL", "momentum", bad, TS, 1), Dialect.V1)
    with pytest.raises(ValueError, match="non-finite"):
        render_market_update(1.0, {"AAPL": bad}, 1, TS, Dialect.V2)


# -- round trips -------------------------------------------------------------

tickers = st.from_regex(r"[A-Z][A-Z0-9.\-]{0,9}", fullmatch=True)
quantities = st.floats(min_value=1e-9, max_value=1e12, allow_nan=False, allow_infinity=False)
holdings = st.dictionaries(tickers, quantities, min_size=1, max_size=MAX_HOLDINGS)
client_messages: st.SearchStrategy[ClientMessage] = st.one_of(
    st.builds(Analyze, tickers),
    st.just(Cancel()),
    st.just(GetPortfolio()),
    st.builds(SetHoldings, holdings),
)


@given(client_messages)
def test_client_messages_round_trip(message: ClientMessage) -> None:
    text = encode_client_message(message)
    assert orjson.loads(text)["action"] == message.TAG
    assert parse_client_message(text) == message


@pytest.mark.parametrize(
    ("frame", "dialect", "event"),
    [
        (
            render_result(RESULT, Dialect.V1),
            Dialect.V1,
            AnalysisResultV1Event("AAPL", "portfolio_risk", 0.23, TS),
        ),
        (render_result(RESULT, Dialect.V2), Dialect.V2, AnalysisResultEvent.from_result(RESULT)),
        (
            render_portfolio(PORTFOLIO, Dialect.V2),
            Dialect.V2,
            PortfolioEvent.from_portfolio(PORTFOLIO),
        ),
        (
            render_session(PORTFOLIO, Dialect.V2),
            Dialect.V2,
            SessionEvent("s-1", PortfolioEvent.from_portfolio(PORTFOLIO)),
        ),
        (
            render_started("an-1", "AAPL", 7, TS, Dialect.V2),
            Dialect.V2,
            AnalysisStartedEvent("an-1", "AAPL", 7, TS),
        ),
        (
            render_complete("an-1", "AAPL", Dialect.V2),
            Dialect.V2,
            AnalysisCompleteEvent("an-1", "AAPL"),
        ),
        (
            render_cancelled("an-1", "AAPL", CancelReason.PORTFOLIO_CHANGED, Dialect.V2),
            Dialect.V2,
            AnalysisCancelledEvent("an-1", "AAPL", CancelReason.PORTFOLIO_CHANGED),
        ),
        (
            render_market_update(5.0, {"AAPL": 2.5}, 9, TS, Dialect.V2),
            Dialect.V2,
            MarketUpdateEvent(5.0, {"AAPL": 2.5}, 9, TS),
        ),
    ],
)
def test_server_events_round_trip(frame: str | None, dialect: Dialect, event: object) -> None:
    assert frame is not None
    assert parse_server_event(frame, dialect=dialect) == event


@given(
    st.builds(
        AnalysisResult,
        analysis_id=st.text(min_size=1),
        ticker=tickers,
        metric=st.sampled_from(METRICS),
        value=st.floats(allow_nan=False, allow_infinity=False),
        timestamp=st.just(TS),
        portfolio_version=st.integers(min_value=0, max_value=2**53),
    )
)
def test_results_round_trip_in_both_dialects(result: AnalysisResult) -> None:
    assert parse_server_event(render_result(result, Dialect.V2)) == (
        AnalysisResultEvent.from_result(result)
    )
    v1 = parse_server_event(render_result(result, Dialect.V1), dialect=Dialect.V1)
    assert v1 == AnalysisResultV1Event(result.ticker, result.metric, result.value, TS)


def test_v1_client_cannot_decode_v2_only_events() -> None:
    frame = render_complete("an-1", "AAPL", Dialect.V2)
    assert frame is not None
    with pytest.raises(ProtocolError, match="not a v1 event type"):
        parse_server_event(frame, dialect=Dialect.V1)


def test_server_event_decoding_names_bad_fields() -> None:
    frame = '{"type": "analysis_complete", "analysis_id": 5, "ticker": "AAPL"}'
    with pytest.raises(ProtocolError, match=r"\$\.analysis_id"):
        parse_server_event(frame)


# -- fuzz ----------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
plausible_frames = st.fixed_dictionaries(
    {"action": st.sampled_from([*ACTIONS, "nope"]) | json_values},
    optional={
        "ticker": tickers | json_values,
        "holdings": st.dictionaries(tickers | st.text(max_size=12), json_values) | json_values,
    },
).map(orjson.dumps)


def parses_or_refuses(text: str | bytes) -> None:
    """A message, or a ProtocolError whose error frame renders; nothing else."""
    for dialect in Dialect:
        outcome: ClientMessage | ProtocolError
        try:
            outcome = parse_client_message(text, dialect=dialect)
        except ProtocolError as error:
            outcome = error
        if isinstance(outcome, ProtocolError):
            assert load(render_error(outcome.code, outcome.detail))["detail"]
        else:
            assert isinstance(outcome, Analyze | Cancel | GetPortfolio | SetHoldings)


@given(st.text())
def test_fuzz_text_parses_or_refuses(text: str) -> None:
    parses_or_refuses(text)


@given(st.binary())
def test_fuzz_bytes_parse_or_refuse(data: bytes) -> None:
    parses_or_refuses(data)


@given(plausible_frames)
def test_fuzz_plausible_frames_parse_or_refuse(data: bytes) -> None:
    parses_or_refuses(data)


def test_protocol_and_config_are_pure() -> None:
    code = (
        "import sys, trio_portfolio.protocol, trio_portfolio.config;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'redis'));"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
