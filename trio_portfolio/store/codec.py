"""What crosses the script boundary: ARGV encoding and reply decoding, shared by both layouts.

Both layouts' scripts take the same ARGV and answer in the same shape - a
status string, then JSON text in the json layout's document schema (see
:mod:`trio_portfolio.store.json_layout`) - so validation of what goes in
and parsing of what comes back are written once, here.  Pure: no I/O, no
Redis client.

Arguments the store cannot represent raise :class:`ValueError` before
anything is sent; replies that cannot be read as a session raise
:class:`StoreDataError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs
import orjson

from trio_portfolio.models import (
    SESSION_ID_RE,
    AnalysisResult,
    AppendStatus,
    CurrentAnalysis,
    Portfolio,
    Snapshot,
)

__all__ = [
    "StoreDataError",
    "append_status",
    "check_number",
    "check_session_id",
    "holdings_and_prices_json",
    "payload_document",
    "portfolio_from_document",
    "result_json",
    "snapshot_from_payload",
    "split_reply",
]


class StoreDataError(Exception):
    """A reply could not be read as a session: the stored data or a script is broken."""


# -- arguments -----------------------------------------------------------------------------


def check_session_id(session_id: str) -> None:
    """Raise :class:`ValueError` unless ``session_id`` is a valid session id."""
    if not SESSION_ID_RE.fullmatch(session_id):
        raise ValueError(f"invalid session id {session_id!r}")


def check_number(what: str, value: float) -> float:
    """``value`` as a float; :class:`ValueError` unless it is finite and > 0."""
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return number


def holdings_and_prices_json(
    holdings: Mapping[str, float], prices: Mapping[str, float]
) -> tuple[str, str]:
    """ARGV JSON for holdings and the prices of the held tickers (and only those).

    Raises :class:`ValueError` for empty holdings, a quantity or price that
    is not a finite number > 0, or a held ticker without a price.
    """
    if not holdings:
        raise ValueError("holdings must not be empty")
    quantities = {t: check_number(f"quantity of {t}", q) for t, q in holdings.items()}
    missing = sorted(t for t in quantities if t not in prices)
    if missing:
        raise ValueError(f"no price for held tickers {missing}")
    held = {t: check_number(f"price of {t}", prices[t]) for t in quantities}
    return orjson.dumps(quantities).decode(), orjson.dumps(held).decode()


def result_json(result: AnalysisResult) -> str:
    """ARGV JSON of one result; :class:`ValueError` if its value is not finite."""
    if not math.isfinite(result.value):
        raise ValueError(f"result value must be finite, got {result.value!r}")
    return orjson.dumps(attrs.asdict(result)).decode()


# -- replies -------------------------------------------------------------------------------


def split_reply(reply: Any) -> tuple[str, list[Any]]:
    """Split a script reply ``[status, *payload]`` (the shape every session script answers)."""
    if not (isinstance(reply, list) and reply and isinstance(reply[0], str)):
        raise StoreDataError(f"unexpected script reply {reply!r:.200}")
    return reply[0], reply[1:]


def payload_document(payload: list[Any]) -> dict[str, Any]:
    """The JSON object text a script sent after its status."""
    try:
        value = orjson.loads(payload[0])
    except (IndexError, TypeError, orjson.JSONDecodeError) as exc:
        raise StoreDataError(f"unreadable script payload {payload!r:.200}") from exc
    if not isinstance(value, dict):
        raise StoreDataError(f"script payload is not an object: {payload!r:.200}")
    return value


def _numbers(value: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in value.items()}


def portfolio_from_document(
    session_id: str, document: Mapping[str, Any], results_limit: int
) -> Portfolio:
    """A :class:`Portfolio` from a session in the json layout's document schema.

    Both layouts answer reads in this schema.  Only the newest
    ``results_limit`` results are kept (the json layout trims lazily).
    """
    try:
        current = document["current_analysis"]
        results = document["analysis_results"][-results_limit:]
        return Portfolio(
            session_id=session_id,
            holdings=_numbers(document["holdings"]),
            prices=_numbers(document["prices"]),
            total_value=float(document["total_value"]),
            portfolio_version=int(document["portfolio_version"]),
            current_analysis=None
            if current is None
            else CurrentAnalysis(
                analysis_id=str(current["analysis_id"]),
                ticker=str(current["ticker"]),
                portfolio_version=int(current["portfolio_version"]),
                started_at=str(current["started_at"]),
            ),
            analysis_results=tuple(
                AnalysisResult(
                    analysis_id=str(r["analysis_id"]),
                    ticker=str(r["ticker"]),
                    metric=str(r["metric"]),
                    value=float(r["value"]),
                    timestamp=str(r["timestamp"]),
                    portfolio_version=int(r["portfolio_version"]),
                    as_of=str(r.get("as_of") or ""),
                    result_id=str(r.get("result_id") or ""),
                )
                for r in results
            ),
            last_activity=str(document["last_activity"]),
            created_at=str(document["created_at"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreDataError(f"session {session_id} is not a readable portfolio: {exc!r}") from exc


def snapshot_from_payload(
    session_id: str, analysis_id: str, ticker: str, started_at: str, payload: list[Any]
) -> Snapshot:
    """The :class:`Snapshot` a ``start_analysis`` script answered with its ``started`` status."""
    snapshot = payload_document(payload)
    try:
        return Snapshot(
            session_id=session_id,
            analysis_id=analysis_id,
            ticker=ticker,
            holdings=_numbers(snapshot["holdings"]),
            prices=_numbers(snapshot["prices"]),
            total_value=float(snapshot["total_value"]),
            portfolio_version=int(snapshot["portfolio_version"]),
            started_at=started_at,
            holdings_version=int(snapshot["holdings_version"]),
            as_of=str(snapshot["as_of"] or started_at),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreDataError(f"unreadable snapshot of {session_id}: {exc!r}") from exc


_APPEND_STATUS = {status.value: status for status in AppendStatus}


def append_status(status: str) -> AppendStatus:
    """The :class:`AppendStatus` an ``append_result`` script answered."""
    try:
        return _APPEND_STATUS[status]
    except KeyError:
        raise StoreDataError(f"unexpected append status {status!r}") from None
