"""One requested analysis: snapshot, five metrics in parallel, fenced commits, restarts.

Theory of operation
===================

An :class:`AnalysisRunner` owns the analysis of one ticker on one
connection, from the client's ``analyze`` until it completes, is cancelled
or is superseded.  It runs inside its own cancel scope in the connection's
nursery; the connection stops it with :meth:`AnalysisRunner.stop`, which
cancels that scope and waits until the runner has finished before
reporting it, so no frame of the old analysis can follow a frame of the
next (guarantee 1).

The runner and its connection share only the types of
:mod:`trio_portfolio.analysis_outcome`: the runner mints
analysis ids (:class:`~trio_portfolio.analysis_outcome.AnalysisId`), tells the connection
what to send and count through an
:class:`~trio_portfolio.analysis_outcome.AnalysisObserver`, and ends with an
:data:`~trio_portfolio.analysis_outcome.AnalysisOutcome`.

Each *attempt* takes one snapshot (``start_analysis``: holdings, prices and
version read atomically while the attempt becomes the session's current
analysis), computes the five metric values from it, then runs one task per
metric in a nursery.  Each metric task sleeps its simulated
latency, then *commits and sends* its result.

Commit-and-send is shielded from cancellation as one unit: the fenced
append runs in Redis, and only if it stored the result is the frame put in
the outbox.  So a result is sent if and only if it was stored (guarantee 4),
and a cancellation that lands mid-commit waits for that one commit to
finish instead of splitting it.  Every shield has a deadline (the
adapter's timeout bounds the call, ``send_timeout`` the whole shield), and
:meth:`AnalysisRunner.abandon` cuts every shield short when the connection's
grace period is over (a hard shutdown): a commit in flight then may be
stored and not sent, the one case where guarantee 4 yields to a bounded exit.

The append refuses a result (and the attempt ends) when:

* the portfolio version moved since the snapshot (``STALE``): the runner
  reports ``analysis_cancelled`` / ``portfolio_changed`` and starts a new
  attempt on a fresh snapshot (guarantee 3);
* another analysis became current (``SUPERSEDED``, e.g. another connection
  on the same session): the runner reports ``switched`` and ends
  (:class:`~trio_portfolio.analysis_outcome.Cancelled`);
* the session is gone (``MISSING``: it expired or was deleted): the runner
  reports ``analysis_cancelled`` / ``cancelled`` (the contract has no reason
  for it) and ends with
  :class:`~trio_portfolio.analysis_outcome.SessionGone`, which the connection
  answers with the one ``session_expired`` error.  A start (or restart) that
  finds the session gone ends the same way, with nothing to report.

The connection may also ask for a restart before any refusal, when it hears
(from the session's pub/sub events) that the version moved:
:meth:`AnalysisRunner.restart_if_older` cancels the attempt's own scope and
waits until the attempt has ended and its ``analysis_cancelled`` is queued.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import random
from collections.abc import Iterator

import attrs
import trio

from trio_portfolio.analysis_outcome import (
    AnalysisId,
    AnalysisObserver,
    AnalysisOutcome,
    Cancelled,
    Completed,
    Failed,
    SessionGone,
)
from trio_portfolio.analytics import MetricInputs, compute_all
from trio_portfolio.market import MarketData, unpack_history
from trio_portfolio.models import (
    METRICS,
    AnalysisResult,
    AppendStatus,
    Snapshot,
    StartRefused,
    utc_now,
)
from trio_portfolio.protocol import (
    CancelReason,
    Dialect,
    ErrorCode,
    render_cancelled,
    render_complete,
    render_result,
    render_started,
)
from trio_portfolio.redis_io import StoreUnavailable
from trio_portfolio.store import SessionStore

log = logging.getLogger(__name__)


class _Ending(enum.Enum):
    """How one attempt ended (internal: the runner turns it into an outcome)."""

    COMPLETE = "complete"
    STALE = "stale"
    SUPERSEDED = "superseded"
    RESTART = "restart"
    SESSION_GONE = "session_gone"
    FAILED = "failed"


@attrs.frozen
class AnalysisContext:
    """What a runner needs from its connection, and nothing more."""

    session_id: str
    dialect: Dialect
    store: SessionStore
    market: MarketData
    observer: AnalysisObserver
    """Where frames go and what the connection counts."""
    metric_delay: tuple[float, float]
    rng: random.Random
    connection_id: str
    send_timeout: float = 10.0


@attrs.define
class Attempt:
    """One snapshot and its five metrics."""

    analysis_id: AnalysisId
    snapshot: Snapshot
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    ended: trio.Event = attrs.field(factory=trio.Event)
    ending: _Ending = _Ending.COMPLETE
    failure: Failed | None = None
    """The error that ended the attempt (``ending`` is ``FAILED``)."""
    closed: bool = False
    """True once the attempt is reported (complete or cancelled) to the client."""
    committed: int = 0
    """How many of its results were stored (and so sent)."""


class AnalysisRunner:
    """The analysis of ``ticker`` on one connection, across restarts.

    Public surface for the connection: :meth:`run` (in its nursery),
    :meth:`stop`, :meth:`restart_if_older` and :attr:`live_analysis_id`.
    """

    def __init__(self, ctx: AnalysisContext, ticker: str) -> None:
        self.ctx = ctx
        self.ticker = ticker
        self._observer = ctx.observer
        self.started = False
        """True once the first attempt took its snapshot (``run`` reported ``None``)."""
        self._scope = trio.CancelScope()
        self._finished = trio.Event()
        self._attempt: Attempt | None = None
        self._outcome: AnalysisOutcome | None = None
        """How the runner ended; ``None`` until it ended by itself or was stopped."""
        self._shields: set[trio.CancelScope] = set()
        """The shielded scopes open now; :meth:`abandon` cancels them."""
        self._abandoned = False
        self._fence: AnalysisId | None = None
        """The analysis id this runner may have made the session's current one and not
        yet cleared: set *before* ``start_analysis`` is sent, since a call cancelled
        after the write still runs in Redis."""

    def _ids(self, analysis_id: str | None = None) -> dict[str, str]:
        """Log ``extra`` naming the connection, session and analysis of a line."""
        ids = {"connection_id": self.ctx.connection_id, "session_id": self.ctx.session_id}
        if analysis_id is not None:
            ids["analysis_id"] = analysis_id
        return ids

    @property
    def _live_attempt(self) -> Attempt | None:
        """The attempt that has started and not been reported finished, if any."""
        attempt = self._attempt
        return attempt if attempt is not None and not attempt.closed else None

    @property
    def live_analysis_id(self) -> AnalysisId | None:
        """The id of the attempt that started and is not yet reported finished, if any."""
        attempt = self._live_attempt
        return None if attempt is None else attempt.analysis_id

    async def run(
        self, *, task_status: trio.TaskStatus[AnalysisOutcome | None] = trio.TASK_STATUS_IGNORED
    ) -> AnalysisOutcome | None:
        """Run attempts until one completes or the analysis must stop; return the outcome.

        Reports ``None`` via ``task_status`` once the first snapshot is taken
        and ``analysis_started`` queued, or, if the analysis could not start,
        its outcome (:class:`SessionGone`, or :class:`Failed` with its
        ``error`` frame queued), the runner having finished by then.  Returns
        ``None`` when it was stopped from outside (:meth:`stop` knows the
        reason).  Never raises for store faults or refusals; they become
        outcomes and frames.  Cancellation (by :meth:`stop` or the
        connection's nursery) is the way to stop it.
        """
        reported = False
        try:
            with self._scope:
                while True:
                    attempt = await self._start_attempt()
                    if not isinstance(attempt, Attempt):
                        self._outcome = attempt
                        break
                    if not reported:
                        self.started = reported = True
                        task_status.started(None)
                    outcome = await self._run_attempt(attempt)
                    if outcome is not None:
                        self._outcome = outcome
                        break
        finally:
            if self._fence is not None:
                # Ended by cancellation or an error with a snapshot that may still
                # fence the session (cancelled mid start_analysis, before the
                # connection learnt of this runner, or while reporting): clear it
                # here, because nobody else knows of it.
                await self._unfence(self._fence)
            self._finished.set()
            if not reported:
                ended = self._outcome
                task_status.started(Cancelled(CancelReason.CANCELLED) if ended is None else ended)
        return self._outcome

    async def stop(self, reason: CancelReason, *, notify: bool = True) -> AnalysisOutcome:
        """Cancel the runner, wait until it has finished, then report and unfence it.

        The live attempt, if any, is counted and (``notify``) reported as
        ``analysis_cancelled`` with ``reason``; unfencing (clearing the
        session's ``current_analysis`` if it is still this attempt) is
        shielded, so it happens even while the connection itself is being
        torn down.  Returns how the runner ended: its own outcome if it had
        ended by itself, else :class:`Cancelled` with ``reason``.

        Idempotent and safe to cancel: if this call is cancelled (while
        waiting, or while queueing the frame), calling it again finishes the
        job without reporting anything twice.
        """
        self._scope.cancel()
        await self._finished.wait()
        await self._close_live_attempt(reason, notify=notify)
        if self._outcome is None:
            self._outcome = Cancelled(reason)
        return self._outcome

    def abandon(self) -> None:
        """Stop now, shields included: the connection's grace period is over.

        Cancels the runner and every shielded await it has open or opens from
        now on (a commit, an unfencing, a last frame), so it finishes at its
        next checkpoint.  A commit cut short may have been stored and not
        sent, and an unfencing skipped leaves ``current_analysis`` set until
        the next start replaces it: the price of a bounded shutdown.
        """
        self._abandoned = True
        self._scope.cancel()
        for scope in list(self._shields):
            scope.cancel()

    @contextlib.contextmanager
    def _shielded(self) -> Iterator[trio.CancelScope]:
        """A scope shielded from outside cancellation, for at most ``send_timeout``.

        Cancelled by :meth:`abandon`; check ``cancelled_caught`` after it.
        """
        scope = trio.CancelScope(shield=True)
        scope.deadline = trio.current_time() + self.ctx.send_timeout
        if self._abandoned:
            scope.cancel()
        self._shields.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._shields.discard(scope)

    async def restart_if_older(self, portfolio_version: int) -> None:
        """Restart the live attempt if its snapshot predates ``portfolio_version``."""
        attempt = self._live_attempt
        if attempt is None or attempt.snapshot.portfolio_version >= portfolio_version:
            return
        attempt.ending = _Ending.RESTART
        attempt.scope.cancel()
        await attempt.ended.wait()

    async def _close_live_attempt(self, reason: CancelReason, *, notify: bool = True) -> None:
        """After the attempt stopped: count it, report it (``notify``), unfence it."""
        attempt = self._live_attempt
        if attempt is None:
            return
        attempt.closed = True
        self._observer.analysis_cancelled(attempt.analysis_id, reason)
        try:
            if notify:
                await self._observer.send(
                    render_cancelled(attempt.analysis_id, self.ticker, reason, self.ctx.dialect)
                )
        finally:
            await self._unfence(attempt.analysis_id)

    async def _unfence(self, analysis_id: AnalysisId) -> None:
        """Clear the session's current analysis if it is still ``analysis_id`` (once).

        Shielded and bounded, so it happens even while the runner or the
        connection is being cancelled; fenced in Redis, so clearing late or
        twice changes nothing.
        """
        if self._fence != analysis_id:
            return  # cleared already (or never set)
        self._fence = None
        with self._shielded():
            try:
                await self.ctx.store.finish_analysis(self.ctx.session_id, analysis_id)
            except StoreUnavailable as exc:
                log.warning("could not clear analysis: %s", exc, extra=self._ids(analysis_id))

    async def _fail(self, code: ErrorCode, detail: str) -> Failed:
        """Queue the ``error`` frame of a failure; the outcome that records it."""
        await self._observer.send_error(code, detail)
        return Failed(code, detail)

    async def _start_attempt(self) -> Attempt | AnalysisOutcome:
        """A started attempt (``analysis_started`` queued), or why none could start."""
        ctx = self.ctx
        self._fence = analysis_id = AnalysisId.mint(ctx.connection_id)
        try:
            # Shielded (the adapter's timeout bounds it): a start cancelled after
            # its write would still run in Redis, possibly *after* the unfencing
            # finish_analysis sent on another pooled connection.
            with self._shielded() as shield:
                started = await ctx.store.start_analysis(
                    ctx.session_id, analysis_id, self.ticker, utc_now()
                )
        except StoreUnavailable as exc:
            return await self._fail(ErrorCode.STORE_UNAVAILABLE, f"cannot start: {exc}")
        if shield.cancelled_caught:  # abandoned, or no answer within send_timeout
            return await self._fail(ErrorCode.STORE_UNAVAILABLE, "cannot start: no answer in time")
        if isinstance(started, StartRefused):
            self._fence = None  # refused: nothing was made current
            if started is StartRefused.MISSING:
                return SessionGone()
            return await self._fail(
                ErrorCode.TICKER_NOT_HELD, f"{self.ticker} is not in this portfolio's holdings"
            )
        self._attempt = attempt = Attempt(analysis_id=analysis_id, snapshot=started)
        self._observer.analysis_started(analysis_id)
        await self._observer.send(
            render_started(
                analysis_id,
                self.ticker,
                started.portfolio_version,
                started.started_at,
                ctx.dialect,
            )
        )
        return attempt

    async def _run_attempt(self, attempt: Attempt) -> AnalysisOutcome | None:
        """Run one attempt to its end and report it; ``None`` means: restart."""
        try:
            with attempt.scope:
                values = await self._compute(attempt)
                if isinstance(values, Failed):
                    attempt.ending, attempt.failure = _Ending.FAILED, values
                else:
                    async with trio.open_nursery() as nursery:
                        for metric in METRICS:
                            nursery.start_soon(self._metric, attempt, metric, values[metric])
            if attempt.ending is _Ending.RESTART and attempt.committed == len(METRICS):
                # The restart came after the last result was stored and sent:
                # nothing is stale, so the attempt is complete, not cancelled.
                attempt.ending = _Ending.COMPLETE
            ending = attempt.ending
            if ending is _Ending.COMPLETE:
                await self._complete(attempt)
                return Completed(attempt.analysis_id)
            if ending in (_Ending.STALE, _Ending.RESTART):
                await self._close_live_attempt(CancelReason.PORTFOLIO_CHANGED)
                return None
            if ending is _Ending.SUPERSEDED:
                await self._close_live_attempt(CancelReason.SWITCHED)
                return Cancelled(CancelReason.SWITCHED)
            # SESSION_GONE and FAILED: the contract's reason for "stopped by the
            # server" is ``cancelled``; the error frame says why.
            await self._close_live_attempt(CancelReason.CANCELLED)
            if ending is _Ending.SESSION_GONE:
                return SessionGone()
            assert attempt.failure is not None
            return attempt.failure
        finally:
            attempt.ended.set()

    async def _compute(self, attempt: Attempt) -> dict[str, float] | Failed:
        """All five values from the snapshot, computed in a worker thread.

        :class:`Failed` (with an ``error`` frame queued) when the inputs are unusable.
        """
        snapshot = attempt.snapshot
        try:
            raw = await self.ctx.market.raw_histories(sorted(snapshot.holdings))
        except StoreUnavailable as exc:
            log.warning(
                "no price history for %s, using prices only: %s",
                snapshot.ticker,
                exc,
                extra=self._ids(attempt.analysis_id),
            )
            raw = {}
        try:
            return await trio.to_thread.run_sync(
                _compute_values, snapshot, raw, abandon_on_cancel=True
            )
        except ValueError as exc:
            log.error(
                "cannot analyse %s: %s", snapshot.ticker, exc, extra=self._ids(attempt.analysis_id)
            )
            return await self._fail(
                ErrorCode.INTERNAL_ERROR, f"cannot analyse {snapshot.ticker}: {exc}"
            )

    async def _metric(self, attempt: Attempt, metric: str, value: float) -> None:
        low, high = self.ctx.metric_delay
        await trio.sleep(self.ctx.rng.uniform(low, high))
        snapshot = attempt.snapshot
        result = AnalysisResult(
            analysis_id=attempt.analysis_id,
            ticker=self.ticker,
            metric=metric,
            value=value,
            timestamp=utc_now(),
            portfolio_version=snapshot.portfolio_version,
        )
        status: AppendStatus | None = None
        stored = False
        with self._shielded():
            try:
                status = await self.ctx.store.append_result(self.ctx.session_id, result)
            except StoreUnavailable as exc:
                attempt.failure = await self._fail(
                    ErrorCode.STORE_UNAVAILABLE, f"result not stored: {exc}"
                )
                attempt.ending = _Ending.FAILED
                attempt.scope.cancel()
                return
            if status is AppendStatus.STORED:
                stored = True
                attempt.committed += 1
                self._observer.result_committed(result)
                with trio.move_on_after(self.ctx.send_timeout):
                    await self._observer.send(render_result(result, self.ctx.dialect))
                return
        if stored:
            return  # stored; its frame was cut short (abandoned, or not taken in time)
        if status is None:  # abandoned, or no answer within send_timeout
            if attempt.failure is None:
                attempt.failure = Failed(ErrorCode.STORE_UNAVAILABLE, "result not stored in time")
            attempt.ending = _Ending.FAILED
            attempt.scope.cancel()
            return
        self._observer.write_fenced(status)
        if attempt.ending is _Ending.COMPLETE:
            attempt.ending = _FENCED_ENDING[status]
        attempt.scope.cancel()

    async def _complete(self, attempt: Attempt) -> None:
        attempt.closed = True
        self._observer.analysis_completed(attempt.analysis_id)
        await self._unfence(attempt.analysis_id)
        with self._shielded():
            await self._observer.send(
                render_complete(attempt.analysis_id, self.ticker, self.ctx.dialect)
            )


_FENCED_ENDING = {
    AppendStatus.STALE: _Ending.STALE,
    AppendStatus.SUPERSEDED: _Ending.SUPERSEDED,
    AppendStatus.MISSING: _Ending.SESSION_GONE,
}
"""What a refused append means for its attempt."""


def _compute_values(snapshot: Snapshot, raw_history: dict[str, str]) -> dict[str, float]:
    """Build the metric inputs (decoding the packed history) and compute all five.

    Runs in a worker thread: decoding tens of thousands of prices and the
    covariance work must not stall the Trio loop.
    """
    history = {t: unpack_history(packed) for t, packed in raw_history.items()}
    inputs = MetricInputs(
        ticker=snapshot.ticker,
        holdings=dict(snapshot.holdings),
        prices=dict(snapshot.prices),
        history=history,
    )
    return compute_all(inputs)
