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

Each *attempt* takes one snapshot (``start_analysis``: holdings, prices,
versions and the prices' ``as_of``, read atomically while the attempt
becomes the session's current analysis), computes the five metric values
from it, then runs one task per metric in a nursery.  Each metric task
sleeps its simulated latency, counted from the snapshot (so the time spent
computing is not added to it: guarantee 8's bound), then *commits and
sends* its result.

Commit-and-send is shielded from cancellation as one unit, with a deadline
(:attr:`AnalysisContext.commit_timeout`): the fenced append runs in Redis,
and only if it stored the result is the frame put in the outbox.  So a
result is sent if and only if it was stored (guarantee 4), and a
cancellation that lands mid-commit waits for that one commit to finish
instead of splitting it.

Exactly once through store faults.  Every result carries an id
(:meth:`~trio_portfolio.models.AnalysisResult.id_for`: analysis id and
metric) and the append is idempotent per id.  When an append fails with
:class:`~trio_portfolio.redis_io.StoreUnavailable` its outcome is unknown
(the script may have run before the connection broke or the call timed
out), so the commit asks again, with ``retry=True`` and a short backoff,
until it gets a definite answer (``STORED`` or ``ALREADY_STORED``: stream
it; a refusal: do not) or its deadline passes.  The rule for a result still
unconfirmed at the deadline:

1. the attempt fails: one ``error`` ``store_unavailable``, and the attempt
   ends (``analysis_cancelled`` / ``cancelled``) only after step 2;
2. the runner *resolves* the result before it reports the attempt's end:
   first it makes sure the analysis is no longer current
   (``finish_analysis``), so that no copy of the append still in flight can
   store it afterwards, then it asks again; for an analysis that is not
   current the append can store nothing, and with ``retry=True`` it answers
   ``ALREADY_STORED`` if an earlier call stored the result.  A stored result
   is streamed then (before the attempt's ``analysis_cancelled``), one that
   was not is dropped.  The runner keeps trying (cancellable, backoff up to
   :data:`RETRY_BACKOFF_MAX` s) until the store answers;
3. if the connection stops the runner meanwhile (switch, cancel),
   :meth:`AnalysisRunner.stop` makes one more bounded, shielded try before it
   reports the stop; what is still unknown is left in
   :attr:`AnalysisRunner.unresolved`, which the connection hands to its next
   runner.  That runner resolves it the same way *before* its first
   snapshot (a stored result is streamed then: after its own analysis's
   ``analysis_cancelled``, before the next ``analysis_started``, so guarantee
   1 holds), and refuses to start (``store_unavailable``) while it cannot,
   keeping the results for the next ``analyze``.  Only a client that leaves
   while the store is still unreachable leaves a result unresolved (it was
   logged, with its id, when it was handed on).

Every shield has a deadline, and :meth:`AnalysisRunner.abandon` cuts every
shield short when the connection's grace period is over (a hard shutdown): a
commit in flight then may be stored and not sent, the one case where
guarantee 4 yields to a bounded exit.

The append refuses a result (and the attempt ends) when:

* the result is stale by :mod:`trio_portfolio.staleness` (``STALE``: the
  holdings changed, or the prices were superseded longer ago than
  ``max_staleness_seconds``): the runner reports ``analysis_cancelled`` /
  ``portfolio_changed`` and starts a new attempt on a fresh snapshot
  (guarantee 3);
* another analysis became current (``SUPERSEDED``, e.g. another connection
  on the same session): the runner reports ``switched`` and ends
  (:class:`~trio_portfolio.analysis_outcome.Cancelled`);
* the session is gone (``MISSING``: it expired or was deleted): the runner
  reports ``analysis_cancelled`` / ``cancelled`` (the contract has no reason
  for it) and ends with
  :class:`~trio_portfolio.analysis_outcome.SessionGone`, which the connection
  answers with the one ``session_expired`` error.  A start (or restart) that
  finds the session gone ends the same way, with nothing to report.

Restarts that cannot steal.  A restart's ``start_analysis`` names the
attempt it replaces, and the script starts it only if that attempt is
still the session's current one (the replaced attempt is not unfenced
first, so the swap is one atomic step).  If another analysis became current
meanwhile, the restart is refused and the runner ends as ``switched``: the
replaced attempt is reported ``analysis_cancelled`` / ``switched``.  A
restart is not client activity.

The connection may also ask for a restart before any refusal, when it hears
(from the session's pub/sub events) that the portfolio changed:
:meth:`AnalysisRunner.portfolio_changed`.  A holdings change restarts the
attempt at once; a valuation change restarts it at once when
``max_staleness_seconds`` is 0, and otherwise arms the attempt's deadline at
the moment its results would turn stale
(:func:`~trio_portfolio.staleness.restart_deadline`), so an attempt that
finishes in time is not restarted at all.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Sequence

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
from trio_portfolio.analytics import HistoryCache, cache_key, compute_all_shared
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
from trio_portfolio.staleness import restart_deadline, to_milliseconds
from trio_portfolio.store import SessionStore

log = logging.getLogger(__name__)

COMMIT_TIMEOUT = 10.0
"""Seconds one result's commit may take, re-asks included, before it counts as unconfirmed."""

RETRY_BACKOFF_MIN = 0.05
RETRY_BACKOFF_MAX = 1.0
"""Seconds between re-asks of an append whose outcome is unknown (doubling from the minimum)."""

_DELIVERED = frozenset({AppendStatus.STORED, AppendStatus.ALREADY_STORED})
"""Append answers whose result is stored, so its frame is sent."""

INLINE_MAX_HOLDINGS = 32
"""Most holdings whose metrics are computed on the Trio loop on a history cache hit.

Measured with ``bench/bench_loop_latency.py``: a hit of 100 holdings held the
loop up to 1.3 ms (hashing 400 KB of packed history, then the products), a
hit of 32 well under 1 ms; larger portfolios always go to a worker thread.
"""


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
    history_cache: HistoryCache
    """The server's cache of history arrays, shared by every analysis of the process."""
    send_timeout: float = 10.0
    max_staleness: float = 0.0
    """``max_staleness_seconds``: how long results may use superseded prices."""
    commit_timeout: float = attrs.field(factory=lambda: COMMIT_TIMEOUT)
    """Deadline of one shielded commit, re-asks after store faults included
    (:data:`COMMIT_TIMEOUT` when the context is made)."""


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
    started_clock: float = attrs.field(factory=trio.current_time)
    """``trio.current_time()`` when the snapshot came back: metric delays count from it."""
    superseded_clock: float | None = None
    """When the runner first heard that a newer valuation superseded the snapshot's."""
    unconfirmed: dict[str, AnalysisResult] = attrs.field(factory=dict)
    """Results whose append had no definite answer by the commit deadline, by id
    (at most one per metric)."""


class AnalysisRunner:
    """The analysis of ``ticker`` on one connection, across restarts.

    Public surface for the connection: :meth:`run` (in its nursery),
    :meth:`stop`, :meth:`portfolio_changed` (and :meth:`restart_if_older`)
    and :attr:`live_analysis_id`.
    """

    def __init__(
        self, ctx: AnalysisContext, ticker: str, unresolved: Sequence[AnalysisResult] = ()
    ) -> None:
        self.ctx = ctx
        self.ticker = ticker
        self.unresolved: list[AnalysisResult] = list(unresolved)
        """Results of earlier analyses on this connection whose store outcome is still
        unknown (at most one analysis's five): resolved before this runner's first
        snapshot; what is still unknown when it ends is for the connection to hand to
        the next runner."""
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
        self._fences: list[AnalysisId] = []
        """The analysis ids this runner may have made the session's current one and not
        yet cleared (at most two: an attempt and its restart): an id is added *before*
        ``start_analysis`` is sent, since a call cancelled after the write still runs
        in Redis."""

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
                if self.unresolved and not await self._resolve_inherited():
                    self._outcome = await self._fail(
                        ErrorCode.STORE_UNAVAILABLE,
                        "cannot start: results of the previous analysis are not confirmed yet",
                    )
                    return self._outcome
                previous: Attempt | None = None
                while True:
                    attempt = await self._start_attempt(previous)
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
                    previous = attempt  # restart: reported when its successor starts
        finally:
            # Ended by cancellation or an error with a snapshot that may still
            # fence the session (cancelled mid start_analysis, before the
            # connection learnt of this runner, or while reporting): clear it
            # here, because nobody else knows of it.
            for analysis_id in list(self._fences):
                await self._unfence(analysis_id)
            self._finished.set()
            if not reported:
                ended = self._outcome
                task_status.started(Cancelled(CancelReason.CANCELLED) if ended is None else ended)
        return self._outcome

    async def stop(self, reason: CancelReason, *, notify: bool = True) -> AnalysisOutcome:
        """Cancel the runner, wait until it has finished, then report and unfence it.

        The live attempt, if any, is counted and (``notify``) reported as
        ``analysis_cancelled`` with ``reason``, after its unconfirmed results
        (if any) had one more bounded try at being resolved; unfencing
        (clearing the session's ``current_analysis`` if it is still this
        attempt) is shielded, so it happens even while the connection itself
        is being torn down.  Returns how the runner ended: its own outcome if
        it had ended by itself, else :class:`Cancelled` with ``reason``.

        Idempotent and safe to cancel: if this call is cancelled (while
        waiting, or while queueing the frame), calling it again finishes the
        job without reporting anything twice.  Every shielded step has a
        deadline (``commit_timeout``, ``send_timeout``).
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

    def _shield(self, timeout: float | None = None) -> trio.CancelScope:
        """A scope shielded from outside cancellation, for at most ``timeout``.

        ``timeout`` defaults to ``send_timeout``.  Registered in
        :attr:`_shields` so that :meth:`abandon` can cancel it (cancelled at
        once if the runner is abandoned already): the caller enters it and
        discards it from :attr:`_shields` in a ``finally``, then checks
        ``cancelled_caught``.  A plain scope and a ``try``, not a generator
        context manager: this is on every commit and frame of an analysis.
        """
        scope = trio.CancelScope(
            shield=True,
            deadline=trio.current_time() + (self.ctx.send_timeout if timeout is None else timeout),
        )
        if self._abandoned:
            scope.cancel()
        self._shields.add(scope)
        return scope

    async def portfolio_changed(self, portfolio_version: int, *, holdings_changed: bool) -> None:
        """The session's portfolio moved to ``portfolio_version``: restart now, or later.

        The restart decision of :mod:`trio_portfolio.staleness`: nothing if
        the live attempt's snapshot is that version or newer; a holdings
        change (or any change with ``max_staleness`` 0) restarts the attempt
        and waits until it has ended and its restart is under way; a
        valuation change otherwise arms the attempt's deadline at the moment
        its results would turn stale (from the first supersession heard),
        and the attempt is restarted then unless it has completed.
        """
        attempt = self._live_attempt
        if attempt is None or attempt.snapshot.portfolio_version >= portfolio_version:
            return
        if holdings_changed or self.ctx.max_staleness <= 0:
            if attempt.ending is _Ending.COMPLETE:
                attempt.ending = _Ending.RESTART  # an ending named already stands
            attempt.scope.cancel()
            await attempt.ended.wait()
            return
        if attempt.superseded_clock is None:
            attempt.superseded_clock = trio.current_time()
            stale_at = restart_deadline(attempt.superseded_clock, self.ctx.max_staleness)
            attempt.scope.deadline = min(attempt.scope.deadline, stale_at)

    async def restart_if_older(self, portfolio_version: int) -> None:
        """Restart the live attempt if its snapshot predates ``portfolio_version`` (holdings)."""
        await self.portfolio_changed(portfolio_version, holdings_changed=True)

    async def _close_live_attempt(self, reason: CancelReason, *, notify: bool = True) -> None:
        """After the attempt stopped: resolve, count, report (``notify``) and unfence it.

        The report is shielded (bounded by ``send_timeout``), so an attempt
        marked closed always had its ``analysis_cancelled`` queued.
        """
        attempt = self._live_attempt
        if attempt is None:
            return
        if attempt.unconfirmed:
            shield = self._shield(self.ctx.commit_timeout)
            try:
                with shield:
                    await self._resolve_unconfirmed(attempt)
            finally:
                self._shields.discard(shield)
            self._give_up_unconfirmed(attempt)
        attempt.closed = True
        self._observer.analysis_cancelled(attempt.analysis_id, reason)
        try:
            if notify:
                await self._send_shielded(
                    render_cancelled(attempt.analysis_id, self.ticker, reason, self.ctx.dialect)
                )
        finally:
            await self._unfence(attempt.analysis_id)

    async def _send_shielded(self, frame: str | None) -> None:
        """Queue ``frame`` even while being cancelled, for at most ``send_timeout``."""
        shield = self._shield()
        try:
            with shield:
                await self._observer.send(frame)
        finally:
            self._shields.discard(shield)

    def _forget_fence(self, analysis_id: AnalysisId) -> None:
        """``analysis_id`` is known not to be current (refused, or replaced by a restart)."""
        if analysis_id in self._fences:
            self._fences.remove(analysis_id)

    async def _unfence(self, analysis_id: AnalysisId) -> None:
        """Clear the session's current analysis if it is still ``analysis_id`` (once).

        Shielded and bounded, so it happens even while the runner or the
        connection is being cancelled; fenced in Redis, so clearing late or
        twice changes nothing.
        """
        if analysis_id not in self._fences:
            return  # cleared already (or never set)
        self._fences.remove(analysis_id)
        shield = self._shield()
        try:
            with shield:
                try:
                    await self.ctx.store.finish_analysis(self.ctx.session_id, analysis_id)
                except StoreUnavailable as exc:
                    log.warning("could not clear analysis: %s", exc, extra=self._ids(analysis_id))
        finally:
            self._shields.discard(shield)

    async def _fail(self, code: ErrorCode, detail: str) -> Failed:
        """Queue the ``error`` frame of a failure; the outcome that records it."""
        await self._observer.send_error(code, detail)
        return Failed(code, detail)

    async def _start_attempt(self, previous: Attempt | None) -> Attempt | AnalysisOutcome:
        """A started attempt (``analysis_started`` queued), or why none could start.

        ``previous`` is the attempt being restarted: still fenced and not yet
        reported.  It is reported here, once the restart's fate is known:
        ``portfolio_changed`` (restarted, or the restart failed), ``switched``
        (another analysis is current: the restart was refused) or
        ``cancelled`` (the session is gone).
        """
        ctx = self.ctx
        analysis_id = AnalysisId.mint(ctx.connection_id)
        self._fences.append(analysis_id)
        try:
            # Shielded (the adapter's timeout bounds it): a start cancelled after
            # its write would still run in Redis, possibly *after* the unfencing
            # finish_analysis sent on another pooled connection.
            shield = self._shield()
            try:
                with shield:
                    started = await ctx.store.start_analysis(
                        ctx.session_id,
                        analysis_id,
                        self.ticker,
                        utc_now(),
                        replacing=None if previous is None else previous.analysis_id,
                    )
            finally:
                self._shields.discard(shield)
        except StoreUnavailable as exc:
            if previous is not None:
                await self._close_live_attempt(CancelReason.PORTFOLIO_CHANGED)
            return await self._fail(ErrorCode.STORE_UNAVAILABLE, f"cannot start: {exc}")
        if shield.cancelled_caught:  # abandoned, or no answer within send_timeout
            return await self._fail(ErrorCode.STORE_UNAVAILABLE, "cannot start: no answer in time")
        if isinstance(started, StartRefused):
            self._forget_fence(analysis_id)  # refused: nothing was made current
            if previous is not None:
                if started is not StartRefused.NOT_HELD:
                    self._forget_fence(previous.analysis_id)  # not current (or no session)
                await self._close_live_attempt(_RESTART_REFUSED[started])
            if started is StartRefused.MISSING:
                return SessionGone()
            if started is StartRefused.SWITCHED:
                return Cancelled(CancelReason.SWITCHED)
            return await self._fail(
                ErrorCode.TICKER_NOT_HELD, f"{self.ticker} is not in this portfolio's holdings"
            )
        if previous is not None:
            self._forget_fence(previous.analysis_id)  # the script replaced it
            await self._close_live_attempt(CancelReason.PORTFOLIO_CHANGED)
        self._attempt = attempt = Attempt(analysis_id=analysis_id, snapshot=started)
        self._observer.analysis_started(analysis_id)
        await self._send_shielded(
            render_started(
                analysis_id,
                self.ticker,
                started.portfolio_version,
                started.started_at,
                ctx.dialect,
                as_of=started.as_of,
            )
        )
        return attempt

    async def _run_attempt(self, attempt: Attempt) -> AnalysisOutcome | None:
        """Run one attempt to its end and report it; ``None`` means: restart.

        A restarted attempt is left unreported (and fenced): the next
        :meth:`_start_attempt` replaces and reports it.
        """
        try:
            with attempt.scope:
                values = await self._compute(attempt)
                if isinstance(values, Failed):
                    attempt.ending, attempt.failure = _Ending.FAILED, values
                else:
                    await self._deliver_metrics(attempt, values)
            if (
                attempt.scope.cancelled_caught
                and attempt.ending is _Ending.COMPLETE
                and attempt.committed < len(METRICS)
            ):
                # Only the staleness deadline cancels without naming an ending.
                attempt.ending = _Ending.RESTART
            if attempt.ending is _Ending.RESTART and attempt.committed == len(METRICS):
                # The restart came after the last result was stored and sent:
                # nothing is stale, so the attempt is complete, not cancelled.
                attempt.ending = _Ending.COMPLETE
            ending = attempt.ending
            if ending is _Ending.COMPLETE:
                await self._complete(attempt)
                return Completed(attempt.analysis_id)
            if ending in (_Ending.STALE, _Ending.RESTART):
                return None
            if ending is _Ending.SUPERSEDED:
                await self._close_live_attempt(CancelReason.SWITCHED)
                return Cancelled(CancelReason.SWITCHED)
            if attempt.unconfirmed:
                await self._resolve_unconfirmed(attempt)  # cancellable: stop() finishes it
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
        """All five values from the snapshot: inline on a history cache hit, else in a thread.

        Between two market ticks every analysis of the same holdings reads the
        same packed histories, so their arrays (log prices, returns) come from
        the server's :class:`~trio_portfolio.analytics.HistoryCache` and what is
        left is a few small matrix-vector products, cheaper than the hand-off
        to a worker thread.  A miss (decoding and validating the histories)
        runs in a worker thread, and so does every portfolio of more than
        :data:`INLINE_MAX_HOLDINGS` holdings (hashing its histories alone
        would hold the loop too long).  :class:`Failed` (with an ``error``
        frame queued) when the inputs are unusable.
        """
        snapshot = attempt.snapshot
        tickers = sorted(snapshot.holdings)
        try:
            raw = await self.ctx.market.raw_histories(tickers)
        except StoreUnavailable as exc:
            log.warning(
                "no price history for %s, using prices only: %s",
                snapshot.ticker,
                exc,
                extra=self._ids(attempt.analysis_id),
            )
            raw = {}
        cache = self.ctx.history_cache
        try:
            if (
                len(tickers) <= INLINE_MAX_HOLDINGS
                and cache_key(tickers, _fingerprint(raw)) in cache
            ):
                return _compute_values(snapshot, raw, cache)
            return await trio.to_thread.run_sync(
                _compute_values, snapshot, raw, cache, abandon_on_cancel=True
            )
        except ValueError as exc:
            log.error(
                "cannot analyse %s: %s", snapshot.ticker, exc, extra=self._ids(attempt.analysis_id)
            )
            return await self._fail(
                ErrorCode.INTERNAL_ERROR, f"cannot analyse {snapshot.ticker}: {exc}"
            )

    async def _deliver_metrics(self, attempt: Attempt, values: dict[str, float]) -> None:
        """Commit and stream the five results, each when its (simulated) delay is over.

        Each metric is ready at the attempt's start plus a delay drawn from
        ``metric_delay``.  Those ready already (all of them with no delay
        configured) are committed together, one pipeline of fenced appends,
        in this task; each of the others waits in a task of its own.  Every
        result is its own fenced append either way, so the answers (and
        what :meth:`_settle` does with them) are those of separate calls.
        """
        low, high = self.ctx.metric_delay
        ready_at = {m: attempt.started_clock + self.ctx.rng.uniform(low, high) for m in METRICS}
        now = trio.current_time()
        due = [m for m in METRICS if ready_at[m] <= now]
        async with trio.open_nursery() as nursery:
            for metric in METRICS:
                if ready_at[metric] > now:
                    nursery.start_soon(
                        self._metric, attempt, metric, values[metric], ready_at[metric]
                    )
            if due:
                results = [AnalysisResult.of(attempt.snapshot, m, values[m]) for m in due]
                for result, status in zip(
                    results, await self._commit(attempt, results), strict=True
                ):
                    await self._settle(attempt, result, status)

    async def _metric(self, attempt: Attempt, metric: str, value: float, ready_at: float) -> None:
        """One metric whose delay is not over yet: wait, then commit and stream it."""
        await trio.sleep_until(ready_at)
        result = AnalysisResult.of(attempt.snapshot, metric, value)
        (status,) = await self._commit(attempt, [result])
        await self._settle(attempt, result, status)

    async def _settle(
        self, attempt: Attempt, result: AnalysisResult, status: AppendStatus | None
    ) -> None:
        """Act on one result's append answer (its frame, if stored, is queued already)."""
        if status is None:
            attempt.unconfirmed[result.result_id] = result
            first = attempt.ending is not _Ending.FAILED
            attempt.ending = _Ending.FAILED
            attempt.scope.cancel()
            if first:
                shield = self._shield()
                try:
                    with shield:
                        attempt.failure = await self._fail(
                            ErrorCode.STORE_UNAVAILABLE,
                            f"result {result.metric} not confirmed within "
                            f"{self.ctx.commit_timeout:g}s; "
                            "the analysis stops once the store answers",
                        )
                finally:
                    self._shields.discard(shield)
                if attempt.failure is None:
                    attempt.failure = Failed(ErrorCode.STORE_UNAVAILABLE, "result not confirmed")
            return
        if status is AppendStatus.ALREADY_STORED:
            self._observer.write_fenced(status)  # counted: a re-ask found it stored
        if status in _DELIVERED:
            return  # _commit queued its frame
        self._observer.write_fenced(status)
        if attempt.ending is _Ending.COMPLETE:
            attempt.ending = _FENCED_ENDING[status]
        attempt.scope.cancel()

    async def _commit(
        self, attempt: Attempt, results: list[AnalysisResult]
    ) -> list[AppendStatus | None]:
        """The fenced, idempotent appends of ``results`` (one pipeline); frames of those stored.

        ``None`` for each if the outcome is still unknown at the deadline.
        Shielded for at most ``commit_timeout``: a store fault (the outcome
        of the calls unknown) is answered by asking again with ``retry=True``
        after a backoff, until a definite answer.  Stored results (or ones a
        re-ask found stored) are counted and their frames queued under the
        same shield, its deadline moved to ``send_timeout`` from then: one
        scope per commit instead of two, on the path every result takes.
        """
        ctx = self.ctx
        backoff = RETRY_BACKOFF_MIN
        retry = False
        statuses: list[AppendStatus | None] = [None] * len(results)
        shield = self._shield(ctx.commit_timeout)
        try:
            with shield:
                while True:
                    try:
                        answers = await ctx.store.append_results(
                            ctx.session_id,
                            results,
                            holdings_version=attempt.snapshot.holdings_version,
                            max_staleness_ms=to_milliseconds(ctx.max_staleness),
                            retry=retry,
                        )
                        break
                    except StoreUnavailable as exc:
                        log.warning(
                            "append of %s unanswered, asking again: %s",
                            ", ".join(r.result_id for r in results),
                            exc,
                            extra=self._ids(attempt.analysis_id),
                        )
                    retry = True
                    await trio.sleep(backoff)
                    backoff = min(RETRY_BACKOFF_MAX, backoff * 2)
                statuses = list(answers)
                shield.deadline = trio.current_time() + ctx.send_timeout
                for result, status in zip(results, answers, strict=True):
                    if status in _DELIVERED:
                        self._count_committed(attempt, result)
                        await self._observer.send(render_result(result, ctx.dialect))
        finally:
            self._shields.discard(shield)
        return statuses

    async def _deliver(self, attempt: Attempt, result: AnalysisResult) -> None:
        """A stored result: count it and queue its frame (shielded, bounded)."""
        self._count_committed(attempt, result)
        await self._send_shielded(render_result(result, self.ctx.dialect))

    def _count_committed(self, attempt: Attempt, result: AnalysisResult) -> None:
        """``result`` is stored: one more of the attempt's five, and the observer told."""
        attempt.committed += 1
        self._observer.result_committed(result)

    async def _resolve_unconfirmed(self, attempt: Attempt) -> None:
        """Settle every unconfirmed result of ``attempt``: stream it if stored, else drop it.

        First the analysis is made non-current (``finish_analysis``), so no
        copy of a lost append can still store it; then each result is asked
        again with ``retry=True``, which for a non-current analysis stores
        nothing and finds a stored result by its id.  Retries store faults
        with backoff until done; the caller bounds it (a deadline, or
        cancellation).
        """
        ctx = self.ctx
        backoff = RETRY_BACKOFF_MIN
        while attempt.unconfirmed:
            try:
                if attempt.analysis_id in self._fences:
                    await ctx.store.finish_analysis(ctx.session_id, attempt.analysis_id)
                    self._forget_fence(attempt.analysis_id)
                for result_id, result in list(attempt.unconfirmed.items()):
                    status = await ctx.store.append_result(
                        ctx.session_id,
                        result,
                        holdings_version=attempt.snapshot.holdings_version,
                        max_staleness_ms=to_milliseconds(ctx.max_staleness),
                        retry=True,
                    )
                    del attempt.unconfirmed[result_id]
                    if status in (AppendStatus.STORED, AppendStatus.ALREADY_STORED):
                        log.info(
                            "unconfirmed result %s was stored: streaming it",
                            result_id,
                            extra=self._ids(attempt.analysis_id),
                        )
                        await self._deliver(attempt, result)
            except StoreUnavailable:
                await trio.sleep(backoff)
                backoff = min(RETRY_BACKOFF_MAX, backoff * 2)

    def _give_up_unconfirmed(self, attempt: Attempt) -> None:
        """Hand results still unresolved to :attr:`unresolved` (the next runner's job)."""
        for result_id, result in attempt.unconfirmed.items():
            log.warning(
                "unconfirmed result %s: the store did not answer; resolved by the next analysis",
                result_id,
                extra=self._ids(attempt.analysis_id),
            )
            self.unresolved.append(result)
        attempt.unconfirmed.clear()

    async def _resolve_inherited(self) -> bool:
        """Resolve :attr:`unresolved` before the first snapshot; ``False`` if the store failed.

        As :meth:`_resolve_unconfirmed`: make each one's analysis non-current
        (``finish_analysis``, fenced), then ask again with ``retry=True``; a
        stored result is streamed now, before anything of this analysis (so
        guarantee 1 holds), one that was not is dropped.  One bounded,
        shielded try (``commit_timeout``): the connection's control loop is
        waiting for this runner to start.
        """
        ctx = self.ctx
        shield = self._shield(ctx.commit_timeout)
        try:
            with shield:
                try:
                    for analysis_id in dict.fromkeys(r.analysis_id for r in self.unresolved):
                        await ctx.store.finish_analysis(ctx.session_id, analysis_id)
                    while self.unresolved:
                        result = self.unresolved[0]
                        status = await ctx.store.append_result(ctx.session_id, result, retry=True)
                        del self.unresolved[0]
                        if status in (AppendStatus.STORED, AppendStatus.ALREADY_STORED):
                            log.info(
                                "unconfirmed result %s was stored: streaming it",
                                result.result_id,
                                extra=self._ids(result.analysis_id),
                            )
                            self._observer.result_committed(result)
                            await self._send_shielded(render_result(result, ctx.dialect))
                except StoreUnavailable as exc:
                    log.warning("cannot resolve earlier results yet: %s", exc, extra=self._ids())
        finally:
            self._shields.discard(shield)
        return not self.unresolved

    async def _complete(self, attempt: Attempt) -> None:
        attempt.closed = True
        self._observer.analysis_completed(attempt.analysis_id)
        await self._unfence(attempt.analysis_id)
        await self._send_shielded(
            render_complete(attempt.analysis_id, self.ticker, self.ctx.dialect)
        )


_FENCED_ENDING = {
    AppendStatus.STALE: _Ending.STALE,
    AppendStatus.SUPERSEDED: _Ending.SUPERSEDED,
    AppendStatus.MISSING: _Ending.SESSION_GONE,
}
"""What a refused append means for its attempt (``STORED`` and ``ALREADY_STORED`` are
not refusals: both mean the result is stored, and it is streamed)."""

_RESTART_REFUSED = {
    StartRefused.SWITCHED: CancelReason.SWITCHED,
    StartRefused.MISSING: CancelReason.CANCELLED,
    StartRefused.NOT_HELD: CancelReason.PORTFOLIO_CHANGED,
}
"""How a restarted attempt is reported when its restart is refused."""


def _fingerprint(raw_history: dict[str, str]) -> tuple[str, ...]:
    """The :class:`HistoryCache` fingerprint of packed histories: the strings themselves.

    ``raw_history`` holds exactly the held tickers (in sorted order) or
    nothing, so the strings determine the histories the metrics read.
    """
    return tuple(raw_history.values())


def _compute_values(
    snapshot: Snapshot, raw_history: dict[str, str], cache: HistoryCache
) -> dict[str, float]:
    """The five values, the history arrays shared through ``cache``.

    On a miss the packed histories are decoded and validated (raises
    :class:`ValueError` for unusable inputs, like
    :class:`~trio_portfolio.analytics.MetricInputs`); that and numpy's work on
    large portfolios run in a worker thread, not on the Trio loop.
    """
    return compute_all_shared(
        snapshot.ticker,
        snapshot.holdings,
        snapshot.prices,
        fingerprint=_fingerprint(raw_history),
        load_history=lambda: {t: unpack_history(p) for t, p in raw_history.items()},
        cache=cache,
    )
