"""When the chaos suite's load client counts an ``analyze`` as answered.

The ``debug_sleep`` row failed 1 run in 3 under CPU load with "analyze
unanswered for 10 s" (10 s is the client's own I/O timeout).  The server
had answered within about 2 s: the analysis was cancelled
``portfolio_changed`` by a market tick, its restart could not start while
Redis stalled (``start_analysis`` timed out), and the server said so with
an ``error`` ``store_unavailable``.  The client took every ``error`` after
an ``analysis_started`` for a result not stored (which does not end an
analysis) and so waited for a restart that was never coming.  These are
the frame sequences the server sends (see ``AnalysisRunner._start_attempt``),
one test per way an analysis ends or goes on.
"""

from __future__ import annotations

from typing import Any

from trio_portfolio.testing.chaos import _AnalysisEnd


def _started(analysis_id: str) -> dict[str, Any]:
    return {"type": "analysis_started", "analysis_id": analysis_id}


def _cancelled(analysis_id: str, reason: str) -> dict[str, Any]:
    return {"type": "analysis_cancelled", "analysis_id": analysis_id, "reason": reason}


def _result(analysis_id: str) -> dict[str, Any]:
    return {"type": "analysis_result", "analysis_id": analysis_id, "metric": "momentum"}


ERROR = {"type": "error", "code": "store_unavailable", "detail": "cannot start: timeout"}
MARKET = {"type": "market_update", "portfolio_version": 9}


def _ends_at(frames: list[dict[str, Any]]) -> int | None:
    """The index of the frame that ends the request, or ``None`` if none does."""
    done = _AnalysisEnd()
    return next((i for i, frame in enumerate(frames) if done(frame)), None)


def test_a_restart_refused_by_the_store_ends_the_request() -> None:
    frames = [_started("a1"), _result("a1"), MARKET, _cancelled("a1", "portfolio_changed"), ERROR]
    assert _ends_at(frames) == 4


def test_an_error_before_any_start_is_the_refusal() -> None:
    assert _ends_at([MARKET, ERROR]) == 1


def test_an_error_while_an_attempt_runs_does_not_end_it() -> None:
    frames = [
        _started("a1"),
        ERROR,
        _result("a1"),
        {"type": "analysis_complete", "analysis_id": "a1"},
    ]
    assert _ends_at(frames) == 3


def test_a_restart_that_starts_goes_on_to_its_own_end() -> None:
    frames = [
        _started("a1"),
        _cancelled("a1", "portfolio_changed"),
        _started("a2"),
        ERROR,  # a result of a2 not stored: a2 goes on
        _cancelled("a2", "cancelled"),
    ]
    assert _ends_at(frames) == 4


def test_frames_of_an_older_analysis_do_not_end_the_current_one() -> None:
    frames = [
        _started("a1"),
        _cancelled("a0", "switched"),
        {"type": "analysis_complete", "analysis_id": "a0"},
        _cancelled("a1", "switched"),
    ]
    assert _ends_at(frames) == 3
