"""Domain values shared by the store, the analysis engine and the protocol.

Everything here is a frozen attrs class with no I/O, so the same values flow
from a Lua script's reply, through an analysis, onto the wire.  Mappings are
plain ``dict`` for cheap (un)structuring; treat them as read-only.

Timestamps are ISO-8601 UTC strings with a trailing ``Z`` (the wire format);
:func:`utc_now` makes one.  Keeping them as strings means a value read back
from Redis is byte-for-byte what was written.
"""

from __future__ import annotations

import enum
import re
from datetime import UTC, datetime

import attrs

METRICS: tuple[str, ...] = (
    "portfolio_risk",
    "concentration",
    "correlation",
    "momentum",
    "allocation_score",
)
"""The five metrics every analysis produces, in a stable order."""

TICKER_RE = re.compile(r"^[A-Z][A-Z0-9.\-]{0,9}$")
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")

DEFAULT_HOLDINGS: dict[str, float] = {"AAPL": 100.0, "GOOGL": 50.0, "MSFT": 75.0}


def utc_now() -> str:
    """Return the current time as an ISO-8601 UTC string ending in ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@attrs.frozen
class CurrentAnalysis:
    """The marker that fences writes: only this analysis may append results."""

    analysis_id: str
    ticker: str
    portfolio_version: int
    started_at: str


@attrs.frozen
class AnalysisResult:
    """One metric value of one analysis, as stored and as streamed."""

    analysis_id: str
    ticker: str
    metric: str
    value: float
    timestamp: str
    portfolio_version: int
    as_of: str = ""
    """When the prices it was computed from were current (the snapshot's ``as_of``);
    empty for results stored before the field existed."""
    result_id: str = ""
    """The result's identity (:meth:`id_for`), which makes its append idempotent:
    the store answers ``ALREADY_STORED`` for an id it has stored.  Empty: no
    identity, every append is a new result (tools and tests only)."""

    @staticmethod
    def id_for(analysis_id: str, metric: str) -> str:
        """The id of ``metric``'s result in analysis attempt ``analysis_id``: one per pair."""
        return f"{analysis_id}:{metric}"

    @classmethod
    def of(cls, snapshot: Snapshot, metric: str, value: float) -> AnalysisResult:
        """``metric``'s result, computed now from ``snapshot``, with its idempotent id."""
        return cls(
            analysis_id=snapshot.analysis_id,
            ticker=snapshot.ticker,
            metric=metric,
            value=value,
            timestamp=utc_now(),
            portfolio_version=snapshot.portfolio_version,
            as_of=snapshot.as_of,
            result_id=cls.id_for(snapshot.analysis_id, metric),
        )


@attrs.frozen
class Portfolio:
    """A whole session as read from the store.

    ``prices`` are the prices that produced ``total_value`` (one per held
    ticker).  ``analysis_results`` holds at most the configured number of
    newest results, oldest first.
    """

    session_id: str
    holdings: dict[str, float]
    prices: dict[str, float]
    total_value: float
    portfolio_version: int
    current_analysis: CurrentAnalysis | None
    analysis_results: tuple[AnalysisResult, ...]
    last_activity: str
    created_at: str


@attrs.frozen
class Snapshot:
    """The portfolio as one analysis sees it, taken atomically with its start."""

    session_id: str
    analysis_id: str
    ticker: str
    holdings: dict[str, float]
    prices: dict[str, float]
    total_value: float
    portfolio_version: int
    started_at: str
    holdings_version: int = 0
    """Bumped only by ``set_holdings``: a result whose holdings version is no longer
    the session's is always stale (:mod:`trio_portfolio.staleness`)."""
    as_of: str = ""
    """When its prices were current: the session's last market valuation (its
    creation time until the first one)."""


class StartRefused(enum.Enum):
    """Why :meth:`SessionStore.start_analysis` took no snapshot."""

    MISSING = "missing"  # the session does not exist (expired)
    NOT_HELD = "not_held"  # the ticker is not in the holdings
    SWITCHED = "switched"  # a restart found another analysis current: it must not take over


class AppendStatus(enum.Enum):
    """What the fenced append did with a result."""

    STORED = "stored"
    SUPERSEDED = "superseded"  # another (or no) analysis is current
    STALE = "stale"  # holdings changed, or prices superseded too long ago (staleness.py)
    MISSING = "missing"  # the session does not exist
    ALREADY_STORED = "already_stored"  # this result id was stored before: not again


@attrs.frozen
class RevalueOutcome:
    """The market updater's view of one session after a revaluation.

    ``changed`` is false when the new prices left ``total_value`` and the
    held prices as they were (no version bump, no event); ``missing`` means
    the session is gone and can be dropped from the index.
    """

    session_id: str
    missing: bool
    changed: bool
    portfolio_version: int
    total_value: float
