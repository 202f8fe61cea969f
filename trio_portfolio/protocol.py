"""The wire: client messages in, server events out, for both dialects.

Theory of operation
-------------------
Everything the WebSocket layer needs to know about frame *contents* lives
here, as pure functions over frozen attrs values; this module imports
neither trio nor redis, so every rule below is tested without a socket.

* **Dialect.**  Chosen once per connection at the handshake by
  :func:`choose_dialect`: a client offering the ``portfolio.v2``
  subprotocol speaks v2, every other client speaks v1, the seed protocol.
* **Parsing.**  :func:`parse_client_message` turns one frame into one
  :data:`ClientMessage` or raises :class:`ProtocolError`, never anything
  else, whatever the input.  The error carries a machine code from
  :class:`ErrorCode` and a detail that names the offending field, so the
  connection answers with :func:`render_error` and stays open.  Unknown
  extra fields are ignored, so clients may send more than they must.
* **v1 and the v2-only actions.**  A v1 client may send ``analyze`` and
  ``cancel``: both have their whole effect without a reply (v1 never sees
  ``analysis_*`` events; a cancel simply stops the results).
  ``get_portfolio`` and ``set_holdings`` exist to be answered with a
  ``portfolio`` event, which v1 cannot receive, so from v1 they are refused
  with ``unsupported_in_v1`` before their fields are looked at, instead of
  being met with silence or changing holdings the client cannot see.
* **Rendering.**  Each ``render_*`` returns the JSON text of one frame, or
  ``None`` when the dialect does not receive that event (v1 gets only
  ``analysis_result`` and ``error``, with exactly the seed's fields).  An
  object nested in a frame is rendered exactly as the frame of its own type
  would be, ``type`` included: the results inside a ``portfolio`` are
  ``analysis_result`` objects, the ``portfolio`` inside a ``session`` is a
  ``portfolio`` object.  Numbers are finite JSON numbers; a NaN or an
  infinity is a bug upstream and raises :class:`ValueError` rather than
  becoming ``null``.
* **One converter.**  :data:`converter` (cattrs' orjson preset) owns every
  (un)structure hook for these types.  Its primitive structure hooks are
  strict (a string is not a number, a bool is not an int) because it reads
  the wire; parse store data that arrives as text elsewhere.
  :func:`encode_client_message` and :func:`parse_server_event` are the
  client side of the same contract, for test harnesses and benchmarks.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeAlias

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_unstructure_fn
from cattrs.preconf.orjson import make_converter

from trio_portfolio.models import (
    SESSION_ID_RE,
    TICKER_RE,
    AnalysisResult,
    CurrentAnalysis,
    Portfolio,
)

SUBPROTOCOL_V2 = "portfolio.v2"
MAX_HOLDINGS = 100
MAX_QUANTITY = 1e12
"""Upper bound on one holding, so that quantity × price stays finite."""


class Dialect(enum.Enum):
    """Which protocol a connection speaks; fixed at the handshake."""

    V1 = "v1"
    V2 = "v2"

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol the server accepts in the handshake reply."""
        return SUBPROTOCOL_V2 if self is Dialect.V2 else None


def choose_dialect(offered_subprotocols: Sequence[str]) -> Dialect:
    """Pick v2 if the client offered ``portfolio.v2`` (exact match), else v1.

    Other offered subprotocols are ignored: the server then accepts none,
    which is what the seed's clients expect.
    """
    return Dialect.V2 if SUBPROTOCOL_V2 in offered_subprotocols else Dialect.V1


class ErrorCode(enum.StrEnum):
    """Every machine code an ``error`` frame can carry."""

    BAD_JSON = "bad_json"
    UNKNOWN_ACTION = "unknown_action"
    BAD_TICKER = "bad_ticker"
    TICKER_NOT_HELD = "ticker_not_held"
    BAD_HOLDINGS = "bad_holdings"
    UNSUPPORTED_IN_V1 = "unsupported_in_v1"
    STORE_UNAVAILABLE = "store_unavailable"
    SESSION_EXPIRED = "session_expired"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_SESSIONS = "too_many_sessions"
    INTERNAL_ERROR = "internal_error"
    TICKER_LIMIT = "ticker_limit"
    UNKNOWN_TICKER = "unknown_ticker"


class ProtocolError(ValueError):
    """A request the server answers with an ``error`` frame, not a failure.

    Raised by the parsers here and by any layer that refuses a well-formed
    request (``ticker_not_held``, ``session_expired``...); the connection
    sends ``render_error(exc.code, exc.detail)`` and carries on.
    """

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code
        self.detail = detail


class CancelReason(enum.Enum):
    """Why an analysis stopped early, as sent in ``analysis_cancelled``."""

    SWITCHED = "switched"
    CANCELLED = "cancelled"
    PORTFOLIO_CHANGED = "portfolio_changed"


# -- validation ------------------------------------------------------------


def _json_type(value: object) -> str:
    """Name a decoded JSON value's type the way a client author would."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    return "object" if isinstance(value, Mapping) else type(value).__name__


def _show(value: object, limit: int = 40) -> str:
    """Echo client input in a detail: repr, bounded so a detail stays small."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        return _json_type(value)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def validate_session_id(session_id: str) -> bool:
    """Whether ``session_id`` may name a session (``[A-Za-z0-9_-]{1,64}``)."""
    return isinstance(session_id, str) and SESSION_ID_RE.fullmatch(session_id) is not None


def normalise_ticker(raw: object) -> str:
    """Strip and upper-case a ticker, or raise ``ProtocolError(bad_ticker)``."""
    if not isinstance(raw, str):
        raise ProtocolError(ErrorCode.BAD_TICKER, f"ticker must be a string, got {_json_type(raw)}")
    ticker = raw.strip()
    # ASCII first: str.upper() maps some letters outside it into A-Z ("ﬀ").
    ticker = ticker.upper() if ticker.isascii() else ""
    if TICKER_RE.fullmatch(ticker) is None:
        raise ProtocolError(
            ErrorCode.BAD_TICKER,
            f"{_show(raw)} is not a ticker: expected a letter then up to 9 of A-Z 0-9 . -",
        )
    return ticker


def _quantity(raw: object) -> float:
    """A holding's quantity as a float, or ``ValueError`` saying what is wrong."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"quantity must be a number, got {_json_type(raw)}")
    try:
        quantity = float(raw)
    except OverflowError:
        quantity = math.inf
    if not (math.isfinite(quantity) and 0 < quantity <= MAX_QUANTITY):
        raise ValueError(f"quantity must be a positive number up to 1e12, got {_show(raw)}")
    return quantity


def normalise_holdings(raw: object) -> dict[str, float]:
    """Validate a ``{TICKER: quantity}`` mapping, normalising its tickers.

    Raises ``ProtocolError(bad_holdings)`` naming the first offending entry
    by its key as sent, e.g. ``holdings['aapl!']: ...``: not an object,
    0 or more than 100 entries, a bad ticker, a quantity that is not a
    positive finite number (a bool is not a number), or two keys that
    normalise to the same ticker.
    """
    if not isinstance(raw, Mapping):
        raise ProtocolError(
            ErrorCode.BAD_HOLDINGS,
            f"holdings must be an object of TICKER: quantity, got {_json_type(raw)}",
        )
    if not 1 <= len(raw) <= MAX_HOLDINGS:
        raise ProtocolError(
            ErrorCode.BAD_HOLDINGS,
            f"holdings must have 1-{MAX_HOLDINGS} entries, got {len(raw)}",
        )
    holdings: dict[str, float] = {}
    for key, value in raw.items():
        where = f"holdings[{_show(key)}]"
        try:
            ticker = normalise_ticker(key)
        except ProtocolError as exc:
            raise ProtocolError(ErrorCode.BAD_HOLDINGS, f"{where}: {exc.detail}") from None
        if ticker in holdings:
            raise ProtocolError(
                ErrorCode.BAD_HOLDINGS,
                f"{where}: duplicates {ticker!r} after normalisation",
            )
        try:
            holdings[ticker] = _quantity(value)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_HOLDINGS, f"{where}: {exc}") from None
    return holdings


# -- wire types ------------------------------------------------------------


class _Tagged:
    """A wire object whose JSON carries ``{TAG_KEY: TAG}`` before its fields."""

    __slots__ = ()
    TAG_KEY: ClassVar[str]
    TAG: ClassVar[str]


class _Message(_Tagged):
    __slots__ = ()
    TAG_KEY = "action"


class _Event(_Tagged):
    __slots__ = ()
    TAG_KEY = "type"


@attrs.frozen
class Analyze(_Message):
    """Start analysing ``ticker``, replacing the connection's analysis."""

    TAG = "analyze"
    ticker: str = attrs.field(converter=normalise_ticker)


@attrs.frozen
class Cancel(_Message):
    """Cancel the connection's analysis in flight, if any."""

    TAG = "cancel"


@attrs.frozen
class GetPortfolio(_Message):
    """Ask for a ``portfolio`` event (v2)."""

    TAG = "get_portfolio"


@attrs.frozen
class SetHoldings(_Message):
    """Replace the holdings atomically; answered with ``portfolio`` (v2)."""

    TAG = "set_holdings"
    holdings: dict[str, float] = attrs.field(converter=normalise_holdings)


ClientMessage: TypeAlias = Analyze | Cancel | GetPortfolio | SetHoldings

ACTIONS: Mapping[str, type[ClientMessage]] = {
    cls.TAG: cls for cls in (Analyze, Cancel, GetPortfolio, SetHoldings)
}
V1_ACTIONS: frozenset[str] = frozenset({Analyze.TAG, Cancel.TAG})
"""The actions a v1 connection may send; the rest need ``portfolio.v2``."""


@attrs.frozen
class AnalysisResultV1Event(_Event):
    """``analysis_result`` with exactly the seed's fields."""

    TAG = "analysis_result"
    ticker: str
    metric: str
    value: float
    timestamp: str


@attrs.frozen
class AnalysisResultEvent(_Event):
    """``analysis_result`` as v2 sends it and as nested in ``portfolio``."""

    TAG = "analysis_result"
    ticker: str
    metric: str
    value: float
    timestamp: str
    analysis_id: str
    portfolio_version: int
    as_of: str = ""
    """When the prices the result was computed from were current (its snapshot's);
    empty for a result stored before the field existed."""

    @classmethod
    def from_result(cls, result: AnalysisResult) -> AnalysisResultEvent:
        return cls(
            ticker=result.ticker,
            metric=result.metric,
            value=result.value,
            timestamp=result.timestamp,
            analysis_id=result.analysis_id,
            portfolio_version=result.portfolio_version,
            as_of=result.as_of,
        )


@attrs.frozen
class ErrorEvent(_Event):
    """``error``; ``code`` stays a string so newer codes still decode."""

    TAG = "error"
    detail: str
    code: str


@attrs.frozen
class PortfolioEvent(_Event):
    """``portfolio``: the whole session as a client may see it."""

    TAG = "portfolio"
    session_id: str
    holdings: dict[str, float]
    prices: dict[str, float]
    total_value: float
    portfolio_version: int
    current_analysis: CurrentAnalysis | None
    analysis_results: tuple[AnalysisResultEvent, ...]
    last_activity: str

    @classmethod
    def from_portfolio(cls, portfolio: Portfolio) -> PortfolioEvent:
        return cls(
            session_id=portfolio.session_id,
            holdings=portfolio.holdings,
            prices=portfolio.prices,
            total_value=portfolio.total_value,
            portfolio_version=portfolio.portfolio_version,
            current_analysis=portfolio.current_analysis,
            analysis_results=tuple(
                AnalysisResultEvent.from_result(r) for r in portfolio.analysis_results
            ),
            last_activity=portfolio.last_activity,
        )


@attrs.frozen
class SessionEvent(_Event):
    """``session``: the first frame after a v2 handshake."""

    TAG = "session"
    session_id: str
    portfolio: PortfolioEvent


@attrs.frozen
class AnalysisStartedEvent(_Event):
    TAG = "analysis_started"
    analysis_id: str
    ticker: str
    portfolio_version: int
    started_at: str
    as_of: str = ""
    """When the snapshot's prices were current (guarantee 3)."""


@attrs.frozen
class AnalysisCompleteEvent(_Event):
    TAG = "analysis_complete"
    analysis_id: str
    ticker: str


@attrs.frozen
class AnalysisCancelledEvent(_Event):
    TAG = "analysis_cancelled"
    analysis_id: str
    ticker: str
    reason: CancelReason


@attrs.frozen
class MarketUpdateEvent(_Event):
    TAG = "market_update"
    total_value: float
    prices: dict[str, float]
    portfolio_version: int
    as_of: str


ServerEvent: TypeAlias = (
    AnalysisResultV1Event
    | AnalysisResultEvent
    | ErrorEvent
    | SessionEvent
    | AnalysisStartedEvent
    | AnalysisCompleteEvent
    | AnalysisCancelledEvent
    | PortfolioEvent
    | MarketUpdateEvent
)

_V2_EVENTS: Mapping[str, type[ServerEvent]] = {
    cls.TAG: cls
    for cls in (
        AnalysisResultEvent,
        ErrorEvent,
        SessionEvent,
        AnalysisStartedEvent,
        AnalysisCompleteEvent,
        AnalysisCancelledEvent,
        PortfolioEvent,
        MarketUpdateEvent,
    )
}
_V1_EVENTS: Mapping[str, type[ServerEvent]] = {
    AnalysisResultV1Event.TAG: AnalysisResultV1Event,
    ErrorEvent.TAG: ErrorEvent,
}

# -- the converter ---------------------------------------------------------

converter = make_converter()
"""The one converter for every wire type; built once at import."""


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"refusing to send a non-finite number: {value!r}")
    return float(value)


def _structure_str(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_json_type(value)}")
    return value


def _structure_int(value: object, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {_json_type(value)}")
    return value


def _structure_float(value: object, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {_json_type(value)}")
    return _finite(value)


def _tagged_unstructure_factory(cls: type[_Tagged]) -> Callable[[Any], dict[str, Any]]:
    fields_of = make_dict_unstructure_fn(cls, converter)
    key, tag = cls.TAG_KEY, cls.TAG

    def unstructure(obj: Any) -> dict[str, Any]:
        return {key: tag, **fields_of(obj)}

    return unstructure


def _is_tagged(cls: Any) -> bool:
    try:
        return issubclass(cls, _Tagged)
    except TypeError:  # generic aliases and other non-classes
        return False


def _structure_analyze(payload: Mapping[str, Any], _: type) -> Analyze:
    if "ticker" not in payload:
        raise ProtocolError(
            ErrorCode.BAD_TICKER,
            'analyze needs a "ticker": {"action": "analyze", "ticker": "AAPL"}',
        )
    return Analyze(payload["ticker"])


def _structure_set_holdings(payload: Mapping[str, Any], _: type) -> SetHoldings:
    if "holdings" not in payload:
        raise ProtocolError(
            ErrorCode.BAD_HOLDINGS, 'set_holdings needs "holdings": {TICKER: quantity}'
        )
    return SetHoldings(payload["holdings"])


converter.register_unstructure_hook(float, _finite)
converter.register_structure_hook(str, _structure_str)
converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(float, _structure_float)
converter.register_unstructure_hook_factory(_is_tagged, _tagged_unstructure_factory)
converter.register_structure_hook(Analyze, _structure_analyze)
converter.register_structure_hook(SetHoldings, _structure_set_holdings)

# -- parsing ---------------------------------------------------------------

_KNOWN = ", ".join(ACTIONS)


def _load_object(text: str | bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"frame is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(
            ErrorCode.BAD_JSON, f"frame must be a JSON object, got {_json_type(payload)}"
        )
    return payload


def parse_client_message(text: str | bytes, *, dialect: Dialect = Dialect.V2) -> ClientMessage:
    """Parse one client frame, or raise :class:`ProtocolError`; nothing else.

    Checks run in this order, so the detail answers the first problem:
    JSON object (``bad_json``), known ``action`` (``unknown_action``),
    allowed in ``dialect`` (``unsupported_in_v1``), then the fields
    (``bad_ticker``, ``bad_holdings``).  Unknown extra fields are ignored.
    """
    payload = _load_object(text)
    action = payload.get("action")
    cls = ACTIONS.get(action) if isinstance(action, str) else None
    if cls is None:
        got = "no action" if action is None else f"unknown action {_show(action)}"
        raise ProtocolError(ErrorCode.UNKNOWN_ACTION, f"{got}; known actions: {_KNOWN}")
    if dialect is Dialect.V1 and cls.TAG not in V1_ACTIONS:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_IN_V1,
            f"{cls.TAG!r} needs the {SUBPROTOCOL_V2!r} subprotocol; "
            f"v1 supports: {', '.join(sorted(V1_ACTIONS))}",
        )
    return converter.structure(payload, cls)


def encode_client_message(message: ClientMessage) -> str:
    """The JSON text a client sends for ``message`` (inverse of parsing)."""
    return converter.dumps(message).decode()


def parse_server_event(text: str | bytes, *, dialect: Dialect = Dialect.V2) -> ServerEvent:
    """Decode a server frame as a client of ``dialect`` receives it.

    Raises ``ProtocolError(bad_json)`` if the frame is not an event this
    dialect may receive, with cattrs-style paths for bad fields.
    """
    payload = _load_object(text)
    kind = payload.get("type")
    events = _V1_EVENTS if dialect is Dialect.V1 else _V2_EVENTS
    cls = events.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not a {dialect.value} event type: {_show(kind)}")
    try:
        return converter.structure(payload, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        detail = "; ".join(cattrs.transform_error(exc, path="$"))
        raise ProtocolError(ErrorCode.BAD_JSON, detail) from None


# -- rendering -------------------------------------------------------------


def render_event(event: ServerEvent) -> str:
    """The JSON text of any event (dialect gating is the caller's)."""
    return converter.dumps(event).decode()


def render_error(code: ErrorCode, detail: str) -> str:
    """``error``, sent in both dialects."""
    return render_event(ErrorEvent(detail=detail, code=code.value))


def render_result(result: AnalysisResult, dialect: Dialect) -> str:
    """``analysis_result``: the seed's fields, plus ids, version and ``as_of`` in v2."""
    if dialect is Dialect.V1:
        return render_event(
            AnalysisResultV1Event(
                ticker=result.ticker,
                metric=result.metric,
                value=result.value,
                timestamp=result.timestamp,
            )
        )
    return render_event(AnalysisResultEvent.from_result(result))


def render_portfolio(portfolio: Portfolio, dialect: Dialect) -> str | None:
    """``portfolio`` (v2 only), results oldest first."""
    if dialect is Dialect.V1:
        return None
    return render_event(PortfolioEvent.from_portfolio(portfolio))


def render_session(portfolio: Portfolio, dialect: Dialect) -> str | None:
    """``session`` (v2 only), carrying the portfolio as a ``portfolio`` object."""
    if dialect is Dialect.V1:
        return None
    return render_event(
        SessionEvent(
            session_id=portfolio.session_id,
            portfolio=PortfolioEvent.from_portfolio(portfolio),
        )
    )


def render_started(
    analysis_id: str,
    ticker: str,
    portfolio_version: int,
    started_at: str,
    dialect: Dialect,
    *,
    as_of: str = "",
) -> str | None:
    """``analysis_started`` (v2 only): the snapshot was taken, with prices of ``as_of``."""
    if dialect is Dialect.V1:
        return None
    return render_event(
        AnalysisStartedEvent(
            analysis_id=analysis_id,
            ticker=ticker,
            portfolio_version=portfolio_version,
            started_at=started_at,
            as_of=as_of,
        )
    )


def render_complete(analysis_id: str, ticker: str, dialect: Dialect) -> str | None:
    """``analysis_complete`` (v2 only): all five results were delivered."""
    if dialect is Dialect.V1:
        return None
    return render_event(AnalysisCompleteEvent(analysis_id=analysis_id, ticker=ticker))


def render_cancelled(
    analysis_id: str, ticker: str, reason: CancelReason, dialect: Dialect
) -> str | None:
    """``analysis_cancelled`` (v2 only): the analysis stopped early."""
    if dialect is Dialect.V1:
        return None
    return render_event(
        AnalysisCancelledEvent(analysis_id=analysis_id, ticker=ticker, reason=reason)
    )


def render_market_update(
    total_value: float,
    prices: Mapping[str, float],
    portfolio_version: int,
    as_of: str,
    dialect: Dialect,
) -> str | None:
    """``market_update`` (v2 only): the session was revalued."""
    if dialect is Dialect.V1:
        return None
    return render_event(
        MarketUpdateEvent(
            total_value=total_value,
            prices=dict(prices),
            portfolio_version=portfolio_version,
            as_of=as_of,
        )
    )
