"""The market updater: a fixed-rate tick, and a revaluation fenced by tick and shared by processes.

Theory of operation
===================

Every server process runs :func:`run_market_updater`.  One of them, the
*leader* (a Redis key with a lease, taken and renewed by a compare-and-set
on the holder), advances the market on a fixed-rate schedule; every process,
leader or not, helps revalue the sessions of the current tick.

A tick (:func:`tick_once`):

1. reads the tick number and every price in one script, draws the next
   prices in a worker thread and writes them with the histories in one
   script fenced on the tick number *and* the leader key, which also opens
   the tick's work record (:meth:`~trio_portfolio.market_data.MarketData.advance`);
2. revalues every session: the session index is split into
   :data:`~trio_portfolio.store.INDEX_BUCKETS` buckets, and up to
   ``pipelines`` tasks per process each take a few buckets (a lease in the work
   record; an expired lease, a dead or stalled process's, is handed out
   again), walk it in pages and send each page as pipelines of per-session
   scripts (:meth:`~trio_portfolio.store.SessionStore.revalue_many`), then
   mark it done with the tickers its live sessions hold.  Non-leaders poll
   the work record a few times per interval and take buckets too, so a
   tick's work is spread over every process;
3. the last bucket's ``done`` prunes the universe (see
   :mod:`trio_portfolio.market_data`).

Fencing, so that late or duplicate work never moves a session back in time:

* every revaluation carries its tick, and a session already valued at that
  tick or later is left alone (the store's scripts record ``valued_tick``);
  so a bucket done twice moves each session's version at most once, and a
  stalled process that wakes up and writes tick ``T`` can only overwrite
  values older than ``T``;
* the leader renews its lease every third of it *during* a long tick, and
  the tick runs under a cancel scope whose deadline is the end of the last
  confirmed lease: a renewal answered "not yours", or no confirmation in
  time (a stall, SIGSTOP), cancels the tick at once, before it sends
  anything more; the advance script re-checks the leader key itself;
* a bucket is worked under a deadline at the end of its own lease, so a
  helper that stalls past it stops too (the bucket is someone else's now).

Schedule: the leader ticks at ``t0 + k * interval`` (no drift).  A tick that
overruns its slot does not make the next one start late and queue behind
it: the slots it missed are skipped and counted
(:attr:`TickReport.ticks_skipped`, the ``market_ticks_skipped`` metric).
A failing tick is logged and retried with capped backoff; it never ends the
loop.  Sessions nobody watches are revalued like the others (see
``docs/adr/003-market-revaluation.md``).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from contextlib import aclosing

import attrs
import trio

from trio_portfolio.market_data import (
    DEFAULT_MAX_TICKERS,
    HISTORY_LENGTH,
    MarketData,
    MarketState,
    TickerRefused,
    TickRace,
    load_symbols,
    pack_history,
    unpack_history,
)
from trio_portfolio.redis_io import CommandError, StoreUnavailable
from trio_portfolio.services import open_service_nursery
from trio_portfolio.store import INDEX_BUCKETS, MarketPrices, RevalueTally, SessionStore
from trio_portfolio.store.codec import StoreDataError

__all__ = [
    "BUCKETS_PER_TAKE",
    "DEFAULT_MAX_TICKERS",
    "DEFAULT_PIPELINES",
    "HISTORY_LENGTH",
    "REVALUE_BATCH",
    "FixedRate",
    "MarketData",
    "MarketState",
    "TickRace",
    "TickReport",
    "TickShare",
    "TickerRefused",
    "help_current_tick",
    "load_symbols",
    "pack_history",
    "revalue_tick",
    "run_market_updater",
    "tick_once",
    "unpack_history",
]

log = logging.getLogger(__name__)

REVALUE_BATCH = 500
"""Sessions per page of a bucket walk (one SSCAN, then two pipelines)."""

DEFAULT_PIPELINES = 8
"""Buckets one process revalues at once, so this many pipelines are in flight."""

BUCKETS_PER_TAKE = 4
"""Buckets one task takes (and marks done) per round trip: fewer round trips, coarser sharing."""

_LEASE_SAFETY = 0.8
"""Fraction of a confirmed lease a process acts on (the rest absorbs clock and network skew)."""

_MIN_BUCKET_LEASE = 10.0
"""Seconds a taken bucket is ours (at least; three intervals if longer).

Generous: a bucket that outlives its lease is handed out again and partly
redone (fenced, so only wasted work), and a dead taker's buckets are redone
by the next tick anyway, whose work record starts afresh.
"""


@attrs.frozen
class TickReport:
    """What one market tick did in this process (for logs, metrics and tests).

    Session counts are this process's share of the tick: other processes may
    have revalued other buckets.  ``sessions_revalued`` counts sessions this
    tick wrote (or found unchanged); those already valued at it are
    ``sessions_fenced``.  ``tickers_pruned`` is non-empty when this
    process finished the tick's last bucket and the universe shrank.
    """

    tick: int
    as_of: str
    prices: dict[str, float]
    sessions_revalued: int
    sessions_changed: int
    sessions_pruned: int
    seconds: float
    sessions_fenced: int = 0
    buckets: int = 0
    tickers_pruned: tuple[str, ...] = ()
    ticks_skipped: int = 0


@attrs.define
class TickShare:
    """What this process did of one tick's revaluation."""

    revalued: int = 0
    changed: int = 0
    pruned: int = 0
    fenced: int = 0
    buckets: int = 0
    tickers_pruned: list[str] = attrs.Factory(list)


@attrs.define
class FixedRate:
    """A fixed-rate schedule: slots at ``next_at + k * interval``; overruns skip slots.

    Pure (the caller passes the time), so the arithmetic is tested alone.
    """

    interval: float
    next_at: float

    def after_tick(self, now: float) -> int:
        """Move to the first slot after ``now``; how many slots were skipped."""
        self.next_at += self.interval
        if now < self.next_at:
            return 0
        missed = math.floor((now - self.next_at) / self.interval) + 1
        self.next_at += missed * self.interval
        return missed


async def revalue_tick(
    market: MarketData,
    store: SessionStore,
    tick: int,
    as_of: str,
    prices: MarketPrices,
    *,
    taker: str,
    batch: int = REVALUE_BATCH,
    pipelines: int = DEFAULT_PIPELINES,
    bucket_lease: float = _MIN_BUCKET_LEASE,
) -> TickShare:
    """Take and revalue buckets of ``tick`` until none is left to take; this process's share.

    ``pipelines`` tasks each take :data:`BUCKETS_PER_TAKE` buckets at a time
    and work them under a deadline at the end of their lease; buckets that
    outlive it are taken again (by anyone, this task included), and what was
    done of them is fenced.  The first store error cancels the other tasks
    and is raised.

    Raises:
      StoreUnavailable, CommandError, StoreDataError: from any round trip
        (the buckets done so far stay done).
    """
    share = TickShare()
    errors: list[Exception] = []

    async def worker(cancel: trio.CancelScope) -> None:
        most = BUCKETS_PER_TAKE
        try:
            while True:
                asked_at = trio.current_time()
                taken = await market.take_buckets(taker, bucket_lease, most)
                if taken is None or taken[0] != tick:
                    return
                tally = RevalueTally()
                with trio.move_on_at(asked_at + bucket_lease * _LEASE_SAFETY) as scope:
                    for bucket in taken[1]:
                        await _revalue_bucket(
                            store, tick, as_of, prices, bucket, batch, share, tally
                        )
                if scope.cancelled_caught:
                    # Once the lease has run out anyone (this task included) takes them
                    # again; what was done of them is fenced.
                    log.warning("buckets %s of tick %d outlived their lease", taken[1], tick)
                    await trio.sleep_until(asked_at + bucket_lease * 1.05)
                    continue
                if trio.current_time() - asked_at > bucket_lease / 8:
                    most = 1  # big buckets: one per lease, so no lease is at risk
                share.fenced += tally.fenced
                pruned = await market.finish_buckets(tick, taken[1], tally.held)
                share.buckets += len(taken[1])
                if pruned:
                    share.tickers_pruned += pruned
                    log.info("market universe: %d tickers no session holds dropped", len(pruned))
        except (StoreUnavailable, CommandError, StoreDataError) as exc:
            errors.append(exc)
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, pipelines)):
            nursery.start_soon(worker, nursery.cancel_scope)
    if errors:
        raise errors[0]
    return share


async def _revalue_bucket(
    store: SessionStore,
    tick: int,
    as_of: str,
    prices: MarketPrices,
    bucket: int,
    batch: int,
    share: TickShare,
    tally: RevalueTally,
) -> None:
    async with aclosing(store.iter_bucket(bucket, batch)) as pages:
        async for ids in pages:
            fenced = tally.fenced
            outcomes = await store.revalue_many(ids, prices, as_of, tick=tick, tally=tally)
            gone = [o.session_id for o in outcomes if o.missing]
            if gone:
                await store.forget(gone)
            share.revalued += len(outcomes) - len(gone) - (tally.fenced - fenced)
            share.changed += sum(1 for o in outcomes if o.changed)
            share.pruned += len(gone)


async def tick_once(
    market: MarketData,
    store: SessionStore,
    *,
    revalue_batch: int = REVALUE_BATCH,
    holder: str = "",
    pipelines: int = DEFAULT_PIPELINES,
    bucket_lease: float = _MIN_BUCKET_LEASE,
) -> TickReport:
    """Advance the market one tick and revalue every session (with whoever helps).

    ``holder`` is the leader id the advance is fenced on (``""``: not
    checked, for tools and tests).  Returns when no bucket of the tick is
    left to take; buckets other processes took may still be in progress.

    Raises:
      TickRace: the market moved on meanwhile or ``holder`` lost the lead.
      StoreUnavailable, CommandError, StoreDataError: from any round trip.
    """
    started = trio.current_time()
    await _bucket_legacy_ids(store)
    tick, as_of, prices = await market.advance(holder)
    if not prices:
        return TickReport(tick, as_of, {}, 0, 0, 0, trio.current_time() - started)
    share = await revalue_tick(
        market,
        store,
        tick,
        as_of,
        MarketPrices(prices),
        taker=holder or secrets.token_hex(8),
        batch=revalue_batch,
        pipelines=pipelines,
        bucket_lease=bucket_lease,
    )
    return TickReport(
        tick=tick,
        as_of=as_of,
        prices=prices,
        sessions_revalued=share.revalued,
        sessions_changed=share.changed,
        sessions_pruned=share.pruned,
        seconds=trio.current_time() - started,
        sessions_fenced=share.fenced,
        buckets=share.buckets,
        tickers_pruned=tuple(share.tickers_pruned),
    )


async def _bucket_legacy_ids(store: SessionStore) -> None:
    """Fold ids left in the whole index (by an earlier version) into their buckets.

    Cheap when there is nothing to fold: one ``SCARD`` of a key that no
    longer exists.  Kept every tick, not once, because a process of the
    earlier version may still be running beside this one during an upgrade.
    """
    if await store.legacy_index_size() > 0:
        moved = await store.fold_legacy_index()
        log.info("session index: %d ids moved from the whole index into buckets", moved)


@attrs.define
class _HelperCache:
    """The prices of the tick a helper last joined (read once per tick)."""

    state: MarketState | None = None
    prices: MarketPrices | None = None


async def help_current_tick(
    market: MarketData,
    store: SessionStore,
    *,
    taker: str,
    cache: _HelperCache | None = None,
    pipelines: int = DEFAULT_PIPELINES,
    bucket_lease: float = _MIN_BUCKET_LEASE,
) -> TickShare | None:
    """Take buckets of the current tick if any are left (what a non-leader does); its share.

    None when there was nothing to do.  The tick's prices are read once per
    tick (with ``cache``) in the same script as its number.

    Raises:
      StoreUnavailable, CommandError, StoreDataError: from any round trip.
    """
    tick, done = await market.tick_progress()
    if tick < 0 or done >= INDEX_BUCKETS:
        return None
    cache = _HelperCache() if cache is None else cache
    if cache.state is None or cache.state.tick != tick:
        cache.state = await market.read()
        cache.prices = MarketPrices(cache.state.prices)
    if cache.state.tick != tick or cache.prices is None:
        return None
    return await revalue_tick(
        market,
        store,
        tick,
        cache.state.as_of,
        cache.prices,
        taker=taker,
        pipelines=pipelines,
        bucket_lease=bucket_lease,
    )


async def run_market_updater(
    market: MarketData,
    store: SessionStore,
    *,
    interval: float,
    on_tick: Callable[[TickReport], None] | None = None,
    on_help: Callable[[int, TickShare], None] | None = None,
    pipelines: int = DEFAULT_PIPELINES,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Lead (tick every ``interval`` seconds, fixed rate) or help; never raises on store faults.

    ``on_tick`` (optional) is called with each :class:`TickReport` this
    process took as leader, for metrics; ``on_help`` with the tick and share
    of each tick this process helped with as a non-leader.  Leadership is a lease of two
    intervals, renewed every interval even mid-tick, so a dead leader is
    replaced within two intervals and the next tick comes within three;
    non-leaders ask for it and for work every quarter interval.
    """
    holder = secrets.token_hex(8)
    lease = 2 * interval
    poll = interval / 4
    bucket_lease = max(_MIN_BUCKET_LEASE, lease)
    cache = _HelperCache()
    schedule: FixedRate | None = None
    failures = 0
    task_status.started()
    while True:
        if failures:
            await trio.sleep(min(interval, 0.5 * 2**failures))
        elif schedule is not None:
            await trio.sleep_until(schedule.next_at)
        else:
            await trio.sleep(poll)
        asked_at = trio.current_time()
        try:
            if not await market.try_lead(holder, lease):
                schedule = None
                share = await help_current_tick(
                    market,
                    store,
                    taker=holder,
                    cache=cache,
                    pipelines=pipelines,
                    bucket_lease=bucket_lease,
                )
                if share is not None and share.buckets and on_help is not None:
                    assert cache.state is not None
                    on_help(cache.state.tick, share)
                failures = 0
                continue
            if schedule is None:
                schedule = FixedRate(interval, asked_at)
            report = await _lead_one_tick(
                market, store, holder, lease, asked_at, pipelines, bucket_lease
            )
        except TickRace as exc:
            log.info("market tick skipped: %s", exc)
            schedule = None
            continue
        except (StoreUnavailable, CommandError, StoreDataError) as exc:
            failures = min(failures + 1, 6)
            log.warning("market tick failed (attempt %d), retrying: %s", failures, exc)
            continue
        failures = 0
        skipped = schedule.after_tick(trio.current_time()) if schedule is not None else 0
        if report is None:
            schedule = None
            continue
        report = attrs.evolve(report, ticks_skipped=skipped)
        if skipped:
            log.info("market tick %d overran its slot: %d skipped", report.tick, skipped)
        log.debug(
            "market tick %d: %d sessions revalued, %d changed, %d pruned in %.3fs",
            report.tick,
            report.sessions_revalued,
            report.sessions_changed,
            report.sessions_pruned,
            report.seconds,
        )
        if on_tick is not None:
            on_tick(report)


async def _lead_one_tick(
    market: MarketData,
    store: SessionStore,
    holder: str,
    lease: float,
    confirmed_at: float,
    pipelines: int,
    bucket_lease: float,
) -> TickReport | None:
    """One tick under the lease: renewed every lease/3, cancelled the moment it is not ours.

    ``confirmed_at`` is when the renewal that let us tick was *sent*, so the
    deadline errs early.  Returns None if the lease was lost mid-tick.
    """
    with trio.CancelScope(deadline=confirmed_at + lease * _LEASE_SAFETY) as scope:
        async with open_service_nursery() as nursery:
            nursery.start_soon(_renew_lease, market, holder, lease, scope)
            return await tick_once(
                market,
                store,
                holder=holder,
                pipelines=pipelines,
                bucket_lease=bucket_lease,
            )
    log.warning("market tick stopped: this process's leadership was lost or not confirmed")
    return None


async def _renew_lease(
    market: MarketData, holder: str, lease: float, scope: trio.CancelScope
) -> None:
    """Renew the lease every lease/3; push ``scope``'s deadline, or cancel it if the lease is gone.

    Never raises: a renewal that fails leaves the deadline where it was, so
    the tick stops when the last confirmed lease would have ended.
    """
    while True:
        await trio.sleep(lease / 3)
        sent = trio.current_time()
        try:
            ours = await market.try_lead(holder, lease)
        except (StoreUnavailable, CommandError) as exc:
            log.warning("market lease renewal failed: %s", exc)
            continue
        if not ours:
            scope.cancel()
            return
        scope.deadline = sent + lease * _LEASE_SAFETY
