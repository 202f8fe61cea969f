"""When a result is too old to store: the one definition of staleness (guarantee 3).

The rule
========

A result of analysis *A*, computed from a snapshot taken with holdings
version ``h`` and portfolio version ``v``, is **fresh** at the moment
``now`` at which it would be stored iff all three hold:

1. *A* is the session's current analysis (guarantee 2; else the append is
   refused ``SUPERSEDED``, which is not staleness);
2. the session's ``holdings_version`` is still ``h``: **a holdings change
   always makes a running analysis stale**, whatever the bound;
3. the session's ``portfolio_version`` is still ``v``, **or** the session's
   valuation was first superseded after the snapshot (``superseded_at``) no
   more than ``max_staleness`` before ``now``.  With ``max_staleness == 0``
   (the default) any newer valuation makes the result stale.

A stale result is neither stored nor sent; the append is refused ``STALE``
and the runner restarts the analysis on a fresh snapshot.

The clock.  ``superseded_at`` and ``now`` are both Redis's clock (``TIME``,
in ms) read inside the scripts: ``start_analysis`` clears
``superseded_at`` when it takes the snapshot, a revaluation that changes the
valuation sets it if it is absent (so it keeps the *first* supersession),
and ``append_result`` compares it with ``TIME``.  One clock, so skew between
server processes cannot bend the rule.  (Valkey freezes ``TIME`` for the
length of one script; nothing here waits inside a script.)

Who implements it, and where it points back here:

* **the fence** - ``fence_verdict`` in ``store/lua/store_lib.lua``, called by
  both layouts' ``append_result`` scripts: the authority, checked in Redis
  for every result.  :func:`is_fresh` is the same rule in Python (tests
  check that the two agree);
* **the runner's restart decision**
  (:meth:`trio_portfolio.analysis.AnalysisRunner.portfolio_changed`): a
  holdings change restarts the running attempt at once; a valuation change
  restarts it at once when ``max_staleness`` is 0, and otherwise at
  :func:`restart_deadline` (when rule 3 would first fail) unless the attempt
  completes first.  A ``STALE`` refusal restarts it at once.  The timer only
  makes the restart prompt; correctness rests on the fence.

Analyses finish (guarantee 8)
=============================

Let ``D`` be the slowest metric delay, ``m`` = :data:`OVERHEAD_MARGIN_SECONDS`
(what one attempt may spend beyond its metric delays: the snapshot and the
commit round trips), ``B`` = ``max_staleness`` and ``I`` the market's tick
interval.  An attempt lasts at most ``D + m`` (the metric delays are measured
from the snapshot).

* If ``B >= D + m``, no market move can make a result stale: every result is
  stored at most ``D + m`` after its snapshot, so at most that long after any
  supersession.  Market moves restart nothing.
* If ``I >= D + m``, at most one tick falls inside any attempt after the
  first: the first attempt is restarted at most ``B`` after the tick ``s``
  that superseded it (by the timer or the fence), and the second, started by
  ``s + B``, has stored everything by ``s + B + D + m``, which is no more than
  ``B`` after the next tick (at or after ``s + I``).  Market moves restart an
  analysis at most once.
* Otherwise (``I < D + m`` and ``B < D + m``) a tick can land inside every
  attempt and make it stale: analyses could restart forever.  Start-up
  refuses these settings (:func:`analyses_finish_problem`).

So with accepted settings an analysis delivers its five results, from the
client's ``analyze``, within :func:`analysis_duration_bound`: ``D + m`` when
``B >= D + m``, else ``2 (D + m) + B``; provided each store call answers
within the margin and the client changes no holdings meanwhile (each
holdings change restarts the analysis, and the bound then counts from it).

Pure: no I/O, no trio.
"""

from __future__ import annotations

__all__ = [
    "OVERHEAD_MARGIN_SECONDS",
    "analyses_finish_problem",
    "analysis_duration_bound",
    "is_fresh",
    "restart_deadline",
    "to_milliseconds",
]

OVERHEAD_MARGIN_SECONDS = 0.5
"""What one analysis attempt may spend beyond its slowest metric delay (snapshot,
commit round trips, scheduling), in the guarantee-8 rule and bound."""

_EPSILON = 1e-9


def to_milliseconds(seconds: float) -> int:
    """``max_staleness`` as the scripts take it: whole milliseconds, rounded."""
    return round(seconds * 1000)


def is_fresh(
    *,
    current: bool,
    holdings_version: int,
    snapshot_holdings_version: int,
    portfolio_version: int,
    snapshot_portfolio_version: int,
    superseded_at_ms: int | None,
    now_ms: int,
    max_staleness_ms: int,
) -> bool:
    """The rule of the module docstring; ``superseded_at_ms`` is ``None`` when unset.

    A newer portfolio version without a ``superseded_at`` (written by a
    revaluation that predates the field) counts as superseded long ago:
    stale, the safe answer.
    """
    if not current or holdings_version != snapshot_holdings_version:
        return False
    if portfolio_version == snapshot_portfolio_version:
        return True
    if max_staleness_ms <= 0 or superseded_at_ms is None:
        return False
    return now_ms - superseded_at_ms <= max_staleness_ms


def restart_deadline(superseded_at: float, max_staleness: float) -> float:
    """When an attempt whose prices were superseded at ``superseded_at`` turns stale.

    Same clock as ``superseded_at`` (the runner uses ``trio.current_time()``
    at the moment it heard of the supersession, a little after Redis's).
    """
    return superseded_at + max_staleness


def _needed(slowest_delay: float) -> float:
    return round(slowest_delay + OVERHEAD_MARGIN_SECONDS, 6)


def analyses_finish_problem(
    market_interval: float, slowest_delay: float, max_staleness: float
) -> str | None:
    """Why these settings could restart analyses forever (guarantee 8), or ``None``.

    Refused when both the tick interval and the staleness bound are shorter
    than the slowest metric delay plus :data:`OVERHEAD_MARGIN_SECONDS`.  The
    message names the settings as flags and a value of either that works.
    """
    needed = _needed(slowest_delay)
    if market_interval + _EPSILON >= needed or max_staleness + _EPSILON >= needed:
        return None
    return (
        f"--market-update-interval-seconds {market_interval:g} and "
        f"--max-staleness-seconds {max_staleness:g} are both shorter than the slowest "
        f"metric (--metric-delay-seconds max {slowest_delay:g}) plus "
        f"{OVERHEAD_MARGIN_SECONDS:g} s of overhead, so market ticks could restart "
        f"analyses forever (guarantee 8); use --max-staleness-seconds {needed:g} "
        f"or --market-update-interval-seconds {needed:g} (or more)"
    )


def analysis_duration_bound(
    market_interval: float, slowest_delay: float, max_staleness: float
) -> float:
    """Seconds within which an analysis delivers its five results (module docstring).

    Raises :class:`ValueError` for settings that :func:`analyses_finish_problem`
    refuses: they have no bound.
    """
    problem = analyses_finish_problem(market_interval, slowest_delay, max_staleness)
    if problem is not None:
        raise ValueError(problem)
    attempt = _needed(slowest_delay)
    if max_staleness + _EPSILON >= attempt:
        return attempt
    return round(2 * attempt + max_staleness, 6)
