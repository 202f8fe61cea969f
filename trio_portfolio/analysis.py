"""One requested analysis: snapshot, five metrics in parallel, fenced commits, restarts.

Theory of operation
===================

An :class:`AnalysisRunner` owns the analysis of one ticker on one
connection, from the client's ``analyze`` until it completes, is cancelled
or is superseded.  It runs inside its own cancel scope (``runner.scope``) in
the connection's nursery; the connection cancels that scope to switch or
cancel, then waits on ``runner.done`` before doing anything else, so no
frame of the old analysis can follow a frame of the next (guarantee 1).

The runner makes one or more *attempts*.  An attempt takes a snapshot with
the store's ``start_analysis`` script (which also makes it the session's
current analysis, fencing out every earlier one), computes all five metrics
from that one snapshot in a worker thread, and runs one task per metric:
each waits out its simulated latency, then *commits and sends* its result.

Commit-and-send is shielded from cancellation as one unit: the fenced
append runs in Redis, and only if it stored the result is the frame put in
the outbox.  So a result is sent if and only if it was stored (guarantee 4),
and a cancellation that lands mid-commit waits for that one commit to
finish instead of splitting it.  The adapter's timeout bounds the shield.

The append refuses a result (and the attempt ends) when:

* the portfolio version moved since the snapshot (``STALE``): the runner
  reports ``analysis_cancelled`` / ``portfolio_changed`` and starts a new
  attempt on a fresh snapshot (guarantee 3);
* another analysis became current (``SUPERSEDED``, e.g. another connection
  on the same session): the runner reports ``switched`` and ends.

The connection may also ask for a restart before any refusal, when it hears
(from the session's pub/sub events) that the version moved:
:meth:`AnalysisRunner.restart_if_older` cancels the attempt's own scope and
waits until the attempt has ended and its ``analysis_cancelled`` is queued.
"""

from __future__ import annotations

import enum
import logging
import random
import secrets
from collections.abc import Awaitable, Callable

import attrs
import trio

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
    render_error,
    render_result,
    render_started,
)
from trio_portfolio.redis_io import StoreUnavailable
from trio_portfolio.store import SessionStore

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How one attempt ended."""

    COMPLETE = "complete"
    STALE = "stale"
    SUPERSEDED = "superseded"
    RESTART = "restart"
    FAILED = "failed"


@attrs.frozen
class AnalysisContext:
    """What a runner needs from its connection, and nothing more."""

    session_id: str
    dialect: Dialect
    store: SessionStore
    market: MarketData
    send: Callable[[str | None], Awaitable[None]]
    """Queue a frame on the connection's outbox (``None`` is ignored)."""
    metric_delay: tuple[float, float]
    rng: random.Random
    connection_id: str
    send_timeout: float = 10.0
    on_event: Callable[[str], None] = lambda _name: None
    """Called with ``started``, ``completed``, ``cancelled:<reason>``,
    ``committed`` and ``rejected:<status>``, for metrics."""


@attrs.define
class Attempt:
    """One snapshot and its five metrics."""

    snapshot: Snapshot
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    ended: trio.Event = attrs.field(factory=trio.Event)
    outcome: Outcome = Outcome.COMPLETE
    closed: bool = False
    """True once the attempt is reported (complete or cancelled) to the client."""
    committed: int = 0
    """How many of its results were stored (and so sent)."""


class AnalysisRunner:
    """The analysis of ``ticker`` on one connection, across restarts."""

    def __init__(self, ctx: AnalysisContext, ticker: str) -> None:
        self.ctx = ctx
        self.ticker = ticker
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.attempt: Attempt | None = None
        self.refused: StartRefused | None = None
        """Why the analysis could not start, when it could not."""
        self._fence: str | None = None
        """The analysis id this runner may have made the session's current one and not
        yet cleared: set *before* ``start_analysis`` is sent, since a call cancelled
        after the write still runs in Redis."""

    def _ids(self, analysis_id: str | None = None) -> dict[str, str]:
        """Log ``extra`` naming the connection, session and analysis of a line."""
        ids = {"connection_id": self.ctx.connection_id, "session_id": self.ctx.session_id}
        if analysis_id is not None:
            ids["analysis_id"] = analysis_id
        return ids

    def new_analysis_id(self) -> str:
        """Unique per attempt; prefixed with the connection id to recognise our own."""
        return f"{self.ctx.connection_id}-{secrets.token_hex(4)}"

    @property
    def live_attempt(self) -> Attempt | None:
        """The attempt that has started and not been reported finished, if any."""
        attempt = self.attempt
        return attempt if attempt is not None and not attempt.closed else None

    async def run(self, *, task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED) -> None:
        """Run attempts until one completes or the analysis must stop.

        Reports ``True`` via ``task_status`` once the first snapshot is taken
        and ``analysis_started`` queued, or ``False`` if the analysis could
        not start (an ``error`` frame has been queued).  Never raises for
        store faults or refusals; they become frames.
        """
        reported = False
        try:
            with self.scope:
                while True:
                    attempt = await self._start_attempt()
                    if attempt is None:
                        return
                    if not reported:
                        task_status.started(True)
                        reported = True
                    outcome = await self._run_attempt(attempt)
                    if outcome in (Outcome.COMPLETE, Outcome.SUPERSEDED, Outcome.FAILED):
                        return
        finally:
            if not reported:
                task_status.started(False)
            if self._fence is not None:
                # Ended by cancellation or an error with a snapshot that may still
                # fence the session (cancelled mid start_analysis, before the
                # connection learnt of this runner, or while reporting): clear it
                # here, because nobody else knows of it.
                await self._unfence(self._fence)
            self.done.set()

    async def restart_if_older(self, portfolio_version: int) -> None:
        """Restart the live attempt if its snapshot predates ``portfolio_version``."""
        attempt = self.live_attempt
        if attempt is None or attempt.snapshot.portfolio_version >= portfolio_version:
            return
        attempt.outcome = Outcome.RESTART
        attempt.scope.cancel()
        await attempt.ended.wait()

    async def close_live_attempt(self, reason: CancelReason, *, notify: bool = True) -> None:
        """After the attempt stopped: report it (``notify``) and unfence it in the store.

        Unfencing (clearing the session's ``current_analysis`` if it is still
        this attempt) is shielded, so it happens even while the connection
        itself is being torn down.
        """
        attempt = self.live_attempt
        if attempt is None:
            return
        attempt.closed = True
        self.ctx.on_event(f"cancelled:{reason.value}")
        if notify:
            await self.ctx.send(
                render_cancelled(
                    attempt.snapshot.analysis_id, self.ticker, reason, self.ctx.dialect
                )
            )
        await self._unfence(attempt.snapshot.analysis_id)

    async def _unfence(self, analysis_id: str) -> None:
        """Clear the session's current analysis if it is still ``analysis_id`` (once).

        Shielded and bounded, so it happens even while the runner or the
        connection is being cancelled; fenced in Redis, so clearing late or
        twice changes nothing.
        """
        if self._fence != analysis_id:
            return  # cleared already (or never set)
        self._fence = None
        with trio.CancelScope(shield=True), trio.move_on_after(self.ctx.send_timeout):
            try:
                await self.ctx.store.finish_analysis(self.ctx.session_id, analysis_id)
            except StoreUnavailable as exc:
                log.warning("could not clear analysis: %s", exc, extra=self._ids(analysis_id))

    async def _start_attempt(self) -> Attempt | None:
        ctx = self.ctx
        self._fence = analysis_id = self.new_analysis_id()
        try:
            # Shielded (the adapter's timeout bounds it): a start cancelled after
            # its write would still run in Redis, possibly *after* the unfencing
            # finish_analysis sent on another pooled connection.
            with trio.CancelScope(shield=True):
                started = await ctx.store.start_analysis(
                    ctx.session_id, analysis_id, self.ticker, utc_now()
                )
        except StoreUnavailable as exc:
            await ctx.send(render_error(ErrorCode.STORE_UNAVAILABLE, f"cannot start: {exc}"))
            return None
        if isinstance(started, StartRefused):
            self.refused = started
            self._fence = None  # refused: nothing was made current
        if started is StartRefused.NOT_HELD:
            await ctx.send(
                render_error(
                    ErrorCode.TICKER_NOT_HELD,
                    f"{self.ticker} is not in this portfolio's holdings",
                )
            )
            return None
        if started is StartRefused.MISSING:
            await ctx.send(
                render_error(
                    ErrorCode.SESSION_EXPIRED,
                    "the session expired; a new one was started",
                )
            )
            return None
        assert isinstance(started, Snapshot)
        self.attempt = attempt = Attempt(snapshot=started)
        ctx.on_event("started")
        await ctx.send(
            render_started(
                started.analysis_id,
                self.ticker,
                started.portfolio_version,
                started.started_at,
                ctx.dialect,
            )
        )
        return attempt

    async def _run_attempt(self, attempt: Attempt) -> Outcome:
        snapshot = attempt.snapshot
        try:
            with attempt.scope:
                values = await self._compute(snapshot)
                if values is None:
                    attempt.outcome = Outcome.FAILED
                else:
                    async with trio.open_nursery() as nursery:
                        for metric in METRICS:
                            nursery.start_soon(self._metric, attempt, metric, values[metric])
            if attempt.outcome is Outcome.RESTART and attempt.committed == len(METRICS):
                # The restart came after the last result was stored and sent:
                # nothing is stale, so the attempt is complete, not cancelled.
                attempt.outcome = Outcome.COMPLETE
            if attempt.outcome is Outcome.COMPLETE:
                await self._complete(attempt)
            elif attempt.outcome in (Outcome.STALE, Outcome.RESTART):
                await self.close_live_attempt(CancelReason.PORTFOLIO_CHANGED)
            elif attempt.outcome is Outcome.SUPERSEDED:
                await self.close_live_attempt(CancelReason.SWITCHED)
            elif attempt.outcome is Outcome.FAILED:
                await self.close_live_attempt(CancelReason.CANCELLED)
            return attempt.outcome
        finally:
            attempt.ended.set()

    async def _compute(self, snapshot: Snapshot) -> dict[str, float] | None:
        """All five values from the snapshot, computed in a worker thread.

        ``None`` (with an ``error`` frame queued) when the inputs are unusable.
        """
        try:
            raw = await self.ctx.market.raw_histories(sorted(snapshot.holdings))
        except StoreUnavailable as exc:
            log.warning(
                "no price history for %s, using prices only: %s",
                snapshot.ticker,
                exc,
                extra=self._ids(snapshot.analysis_id),
            )
            raw = {}
        try:
            return await trio.to_thread.run_sync(
                _compute_values, snapshot, raw, abandon_on_cancel=True
            )
        except ValueError as exc:
            log.error(
                "cannot analyse %s: %s", snapshot.ticker, exc, extra=self._ids(snapshot.analysis_id)
            )
            await self.ctx.send(
                render_error(ErrorCode.INTERNAL_ERROR, f"cannot analyse {snapshot.ticker}: {exc}")
            )
            return None

    async def _metric(self, attempt: Attempt, metric: str, value: float) -> None:
        low, high = self.ctx.metric_delay
        await trio.sleep(self.ctx.rng.uniform(low, high))
        snapshot = attempt.snapshot
        result = AnalysisResult(
            analysis_id=snapshot.analysis_id,
            ticker=self.ticker,
            metric=metric,
            value=value,
            timestamp=utc_now(),
            portfolio_version=snapshot.portfolio_version,
        )
        with trio.CancelScope(shield=True):
            try:
                status = await self.ctx.store.append_result(self.ctx.session_id, result)
            except StoreUnavailable as exc:
                await self.ctx.send(
                    render_error(ErrorCode.STORE_UNAVAILABLE, f"result not stored: {exc}")
                )
                attempt.outcome = Outcome.FAILED
                attempt.scope.cancel()
                return
            if status is AppendStatus.STORED:
                attempt.committed += 1
                self.ctx.on_event("committed")
                with trio.move_on_after(self.ctx.send_timeout):
                    await self.ctx.send(render_result(result, self.ctx.dialect))
                return
        self.ctx.on_event(f"rejected:{status.value}")
        if attempt.outcome is Outcome.COMPLETE:
            attempt.outcome = Outcome.STALE if status is AppendStatus.STALE else Outcome.SUPERSEDED
        attempt.scope.cancel()

    async def _complete(self, attempt: Attempt) -> None:
        attempt.closed = True
        self.ctx.on_event("completed")
        await self._unfence(attempt.snapshot.analysis_id)
        with trio.CancelScope(shield=True), trio.move_on_after(self.ctx.send_timeout):
            await self.ctx.send(
                render_complete(attempt.snapshot.analysis_id, self.ticker, self.ctx.dialect)
            )


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
