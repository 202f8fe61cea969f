"""The market updater: a fixed-rate price tick, and revaluation passes shared by processes.

Theory of operation
===================

Every server process runs :func:`run_market_updater`, which runs two loops:

* the *leader* (a Redis key with a lease, taken and renewed by a
  compare-and-set on the holder; one process at a time) **advances** the
  market on a fixed-rate schedule and never waits for a revaluation;
* every process, the leader included, **walks revaluation passes**: it
  takes buckets of the current pass, revalues their sessions with the
  freshest prices, and marks them done.

The two are decoupled because a walk of every session costs Redis time in
proportion to the sessions (about 22 µs each with 3 holdings: 0.2-0.5 s
for 10k), while a price tick costs almost nothing; tying them together made
any interval shorter than a walk skip ticks.  Now prices move on schedule
and sessions trail them by at most one pass.

An advance (:meth:`~trio_portfolio.market_data.MarketData.advance`) reads
the tick number and every price in one script, draws the next prices in a
worker thread and writes them with the histories in one script fenced on
the tick number *and* the leader key.  That script also opens a
revaluation *pass* for the new tick, but only if the current one is
complete: a pass still running is left alone (the very first pass is
opened by a walker, below).

A pass is a work record in Redis (the tick it was opened for, its start,
and :data:`~trio_portfolio.store.INDEX_BUCKETS` buckets of the session
index, each free, taken with a lease, or done).  A process's walker
(:func:`revalue_pass`) runs up to ``pipelines`` tasks that each take a few
buckets of the pass (an expired lease, a dead or stalled process's, is
handed out again), walk them in pages and send each page as pipelines of
per-session scripts (:meth:`~trio_portfolio.store.SessionStore.revalue_many`)
with the prices of the newest tick this process has read (the market is
read once per tick per process, with its tick, and cached), labelled with
*that* tick; then mark them done with the tickers their live sessions hold.
Take and done name the pass by its own tick, not the current one, so a pass
goes on while the market ticks.  The call that finishes the last bucket
prunes the universe (see :mod:`trio_portfolio.market_data`) and reports
how long the pass took and how many ticks the market got ahead of it (its
*lag*).  Then any walker opens the next pass at once
(:meth:`~trio_portfolio.market_data.MarketData.open_pass`: atomic, only if
the pass is complete and the market ticked since), for the newest tick:
ticks taken during a pass are not walked one by one, the next pass jumps
to the newest.  The leader's advance wakes its own walker; other processes
look for work every quarter interval (at most every 0.1 s).  In the
leader's process the walk waits before its next page from just before each
slot until the advance is written, so the advance's round trips are not
queued on the Trio loop behind the walk's reply parsing.

Bucket leases are short (:data:`_BUCKET_LEASE`, 2 s), renewed after a page
once a quarter of the lease has gone and given back when a walker is
cancelled, because a pass waits for its last bucket: a taker that dies or
stalls holds up the pass (never the ticks) for at most one lease.

What a reader may see: a session valued at the newest tick, or at most one
pass behind it (``valued_tick`` and ``as_of`` say which prices it carries).
With a walk faster than the interval every pass completes before the next
tick and the lag is 0, as before the split.

Fencing, so that late or duplicate work never moves a session back in time:

* every revaluation carries the tick of its prices, and a session already
  valued at that tick or later is left alone (the store's scripts record
  ``valued_tick``); so a bucket done twice moves each session's version at
  most once, two walkers with prices of different ticks can only move a
  session forward, and a stalled process that wakes up and writes tick
  ``T`` can only overwrite values older than ``T``;
* the leader renews its lease every third of it *during* an advance, and
  the advance runs under a cancel scope whose deadline is the end of the
  last confirmed lease: a renewal answered "not yours", or no confirmation
  in time (a stall, SIGSTOP), cancels it at once; the advance script
  re-checks the leader key itself;
* a bucket is worked under a deadline at the end of its own lease, so a
  walker that stalls past it stops too (the bucket is someone else's now).

Schedule: the leader advances at ``t0 + k * interval`` (no drift).  An
advance that overruns its slot does not make the next one start late and
queue behind it: the slots it missed are skipped and counted
(:attr:`TickReport.ticks_skipped`, the ``market_ticks_skipped`` metric); a
slow walk no longer skips anything, it shows as pass lag instead
(:attr:`PassReport.lag`, ``market_pass_lag_ticks``).  A failing advance
or walk is logged and retried with capped backoff; it never ends the loop.
Sessions nobody watches are revalued like the others (see
``docs/adr/003-market-revaluation.md``).

:func:`tick_once` (tools and tests) is the two in sequence: advance, then
walk until a pass at least as new as that tick has no bucket left to take.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing

import attrs
import trio

from trio_portfolio.market_data import (
    DEFAULT_MAX_TICKERS,
    HISTORY_LENGTH,
    MarketData,
    MarketState,
    PassState,
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
    "PassReport",
    "PassState",
    "PriceCache",
    "TickRace",
    "TickReport",
    "TickShare",
    "TickerRefused",
    "help_current_tick",
    "load_symbols",
    "pack_history",
    "revalue_pass",
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

_BUCKET_LEASE = 2.0
"""Seconds a taken bucket is ours, renewed while it is walked (see :func:`revalue_pass`).

Short, because a pass waits for its last bucket: a taker that dies or stalls
holds up the pass (not the ticks) for at most this long before its buckets
are handed out again.  Renewed after a page once a quarter of it has gone,
so a bucket of any size keeps its taker while pages keep coming; a page
slower than the lease (Redis stalled) loses it, and the bucket is partly
redone (fenced, so only wasted work).
"""

_MAX_WALK_POLL = 0.1
"""Longest a walker waits between looks for work (it is woken at once by its own advance)."""

_GATE_LEAD = 0.1
_GATE_LEAD_MAX = 0.01
"""The walk is held from ``min(interval * _GATE_LEAD, _GATE_LEAD_MAX)`` before a slot.

So the pages in flight drain and the advance finds the loop idle (see :class:`_Role`).
"""

_GIVE_BACK_SECONDS = 0.5
"""Longest a cancelled walker spends giving its buckets back (shielded)."""

_BUSY_WAIT = 0.01
"""How long :func:`tick_once` waits while other processes hold the last buckets of a pass."""


@attrs.frozen
class TickReport:
    """What one market tick did in this process (for logs, metrics and tests).

    From :func:`tick_once`, the advance and the walk that followed it:
    session counts are this process's share (other processes may have
    revalued other buckets); ``sessions_revalued`` counts sessions it wrote
    (or found unchanged), those already valued at its prices' tick or later
    are ``sessions_fenced``; ``tickers_pruned`` is non-empty when it
    finished a pass's last bucket and the universe shrank.  From
    :func:`run_market_updater`'s ``on_tick``, the advance alone: session
    counts are 0 (the walk is reported per pass, :class:`PassReport`),
    ``seconds`` is the advance's duration and ``ticks_skipped`` the
    schedule slots it overran.
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


@attrs.frozen
class PassReport:
    """What this process did of one revaluation pass (``on_pass`` of the updater).

    ``tick`` is the pass's (it was opened for that tick); ``prices_tick``
    the newest tick whose prices this process used in it (at least
    ``tick``).  ``seconds`` is this process's time in the pass.
    ``completed`` is true when this process finished the pass's last bucket;
    only then are ``pass_seconds`` (the whole pass, open to complete, on
    Redis's clock), ``lag`` (ticks the market was past the pass's tick when
    it completed: 0 when sessions keep up with the ticks) and
    ``tickers_pruned`` filled.
    """

    tick: int
    prices_tick: int
    sessions_revalued: int
    sessions_changed: int
    sessions_pruned: int
    sessions_fenced: int
    buckets: int
    seconds: float
    completed: bool = False
    pass_seconds: float = 0.0
    lag: int = 0
    tickers_pruned: tuple[str, ...] = ()

    @property
    def sessions_counted(self) -> int | None:
        """The live sessions, when this process walked every bucket of the pass (else None)."""
        if self.buckets < INDEX_BUCKETS:
            return None
        return self.sessions_revalued + self.sessions_fenced


@attrs.define
class TickShare:
    """What this process did of one pass's revaluation (or, summed, of several)."""

    revalued: int = 0
    changed: int = 0
    pruned: int = 0
    fenced: int = 0
    buckets: int = 0
    tickers_pruned: list[str] = attrs.Factory(list)
    prices_tick: int = -1
    """The newest tick whose prices were used (-1: none yet)."""
    completed: bool = False
    """This process finished the pass's last bucket (then the next two are filled)."""
    pass_seconds: float = 0.0
    lag: int = 0

    def add(self, other: TickShare) -> None:
        """Fold ``other`` (a later pass's share) into this one."""
        self.revalued += other.revalued
        self.changed += other.changed
        self.pruned += other.pruned
        self.fenced += other.fenced
        self.buckets += other.buckets
        self.tickers_pruned += other.tickers_pruned
        self.prices_tick = max(self.prices_tick, other.prices_tick)
        if other.completed:
            self.completed, self.pass_seconds, self.lag = True, other.pass_seconds, other.lag


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


@attrs.define
class PriceCache:
    """The newest market state this process read, shared by its walker tasks.

    Read (tick, ``as_of`` and every price in one script) only when a take
    answers that the market is at a newer tick than the cached one, so once
    per tick per process however many buckets it walks.
    """

    state: MarketState | None = None
    prices: MarketPrices | None = None
    _lock: trio.Lock = attrs.Factory(trio.Lock)

    async def at_least(self, market: MarketData, tick: int) -> tuple[MarketState, MarketPrices]:
        """The cached state if it is of ``tick`` or newer, else a fresh read.

        Raises:
          StoreUnavailable, CommandError: from the read.
        """
        async with self._lock:
            if self.state is None or self.prices is None or self.state.tick < tick:
                state = await market.read()
                self.state, self.prices = state, MarketPrices(state.prices)
            return self.state, self.prices


async def revalue_pass(
    market: MarketData,
    store: SessionStore,
    pass_tick: int,
    *,
    taker: str,
    cache: PriceCache,
    batch: int = REVALUE_BATCH,
    pipelines: int = DEFAULT_PIPELINES,
    bucket_lease: float = _BUCKET_LEASE,
    before_page: Callable[[], Awaitable[None]] | None = None,
) -> TickShare:
    """Take and revalue buckets of the pass of ``pass_tick`` until none is left to take.

    ``pipelines`` tasks each take :data:`BUCKETS_PER_TAKE` buckets at a time
    and work them under a deadline at the end of their lease, with the
    prices of the newest tick (``cache``), labelled with that tick.  After a
    page, once a quarter of the lease has gone, the leases are renewed and
    the deadline pushed; a renewal answered "not yours" stops the task's
    work at once.  Buckets that outlive their lease are taken again (by
    anyone, this task included), and what was done of them is fenced.
    ``before_page`` (optional) is awaited before each page: the updater
    holds its walk there while its own advance runs, so the advance is not
    queued behind the walk on the Trio loop.  Returns this process's
    share once no bucket is left to take (others may still be walking
    theirs).  The first store error cancels the other tasks and is raised.

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
                taken = await market.take_buckets(taker, bucket_lease, most, pass_tick)
                if taken is None:
                    return
                state, prices = await cache.at_least(market, max(pass_tick, taken.market_tick))
                share.prices_tick = max(share.prices_tick, state.tick)
                tally = RevalueTally()
                lost = False
                with trio.move_on_at(asked_at + bucket_lease * _LEASE_SAFETY) as scope:
                    confirmed = [asked_at]

                    async def between_pages(
                        buckets: list[int] = taken.buckets,
                        scope: trio.CancelScope = scope,
                        confirmed: list[float] = confirmed,
                    ) -> None:
                        nonlocal lost
                        if before_page is not None:
                            await before_page()
                        if trio.current_time() - confirmed[0] < bucket_lease / 4:
                            return
                        sent = trio.current_time()
                        if await market.renew_buckets(taker, bucket_lease, pass_tick, buckets):
                            confirmed[0] = sent
                            scope.deadline = sent + bucket_lease * _LEASE_SAFETY
                        else:
                            lost = True
                            scope.cancel()

                    for bucket in taken.buckets:
                        await _revalue_bucket(
                            store, state, prices, bucket, batch, share, tally, between_pages
                        )
                if lost:
                    continue  # someone else has them now (or the pass is over)
                if scope.cancelled_caught:
                    # Once the lease has run out anyone (this task included) takes them
                    # again; what was done of them is fenced.
                    log.warning(
                        "buckets %s of pass %d outlived their lease", taken.buckets, pass_tick
                    )
                    await trio.sleep_until(asked_at + bucket_lease * 1.05)
                    continue
                if trio.current_time() - asked_at > bucket_lease / 8:
                    most = 1  # big buckets: one per lease, so no lease is at risk
                share.fenced += tally.fenced
                finished = await market.finish_buckets(pass_tick, taken.buckets, tally.held)
                if finished is None:
                    return  # the pass is over (completed by others, the next one opened)
                share.buckets += len(taken.buckets)
                if finished.completed:
                    share.completed = True
                    share.pass_seconds, share.lag = finished.seconds, finished.lag
                    share.tickers_pruned += finished.pruned
                    if finished.pruned:
                        log.info(
                            "market universe: %d tickers no session holds dropped",
                            len(finished.pruned),
                        )
                    if finished.unpriced:
                        await _reprice(market, finished.unpriced)
        except (StoreUnavailable, CommandError, StoreDataError) as exc:
            errors.append(exc)
            cancel.cancel()
        except trio.Cancelled:
            await _give_back(market, taker, pass_tick)
            raise

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, pipelines)):
            nursery.start_soon(worker, nursery.cancel_scope)
    if errors:
        raise errors[0]
    return share


async def _reprice(market: MarketData, tickers: Sequence[str]) -> None:
    """Bring back tickers the walk found held but not priced (market_data.py, *Repair*).

    A refusal (the universe is full) is logged: the next pass tries again.
    """
    try:
        brought = await market.reprice(tickers)
    except TickerRefused as exc:
        log.warning("market: %d held tickers are not priced: %s", len(tickers), exc.detail)
        return
    if brought:
        # Usually a session let a ticker go between its page of the walk and the
        # pass's end (harmless: the next prune drops it again); else a lost write.
        log.info(
            "market: %d tickers held when walked but not priced at the pass's end "
            "were priced again: %s",
            len(brought),
            ", ".join(brought[:10]),
        )


async def _give_back(market: MarketData, taker: str, pass_tick: int) -> None:
    """End our leases on the pass's buckets now, so the pass does not wait a lease for them.

    For a walker that was cancelled (a shutdown, the updater stopped).
    Every bucket of ours, not just those we know of: a take cancelled while
    its answer was on the way holds buckets we never heard of.  Shielded,
    for at most :data:`_GIVE_BACK_SECONDS`; a failure is only logged (the
    leases then run out by themselves).
    """
    with trio.CancelScope(shield=True, deadline=trio.current_time() + _GIVE_BACK_SECONDS):
        try:
            await market.release_buckets(taker, pass_tick)
        except (StoreUnavailable, CommandError) as exc:
            log.info("buckets of pass %d not given back: %s", pass_tick, exc)


async def _revalue_bucket(
    store: SessionStore,
    state: MarketState,
    prices: MarketPrices,
    bucket: int,
    batch: int,
    share: TickShare,
    tally: RevalueTally,
    between_pages: Callable[[], Awaitable[None]],
) -> None:
    async with aclosing(store.iter_bucket(bucket, batch)) as pages:
        async for ids in pages:
            await between_pages()
            fenced = tally.fenced
            outcomes = await store.revalue_many(
                ids, prices, state.as_of, tick=state.tick, tally=tally
            )
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
    bucket_lease: float = _BUCKET_LEASE,
) -> TickReport:
    """Advance the market one tick and revalue every session (with whoever helps).

    ``holder`` is the leader id the advance is fenced on (``""``: not
    checked, for tools and tests).  If a pass of an older tick was still
    running, it is walked to the end first, then the pass of this tick (or
    newer).  Returns when no bucket of a pass at least as new as the tick is
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
    taker = holder or secrets.token_hex(8)
    cache = PriceCache()
    total = TickShare()
    while True:
        state = await market.open_pass()
        if state.tick < 0 or (state.complete and state.tick >= tick):
            break
        if state.complete:
            continue  # completed between the two reads: the next call opens the next pass
        share = await revalue_pass(
            market,
            store,
            state.tick,
            taker=taker,
            cache=cache,
            batch=revalue_batch,
            pipelines=pipelines,
            bucket_lease=bucket_lease,
        )
        total.add(share)
        if state.tick >= tick:
            break
        if not share.buckets:
            await trio.sleep(_BUSY_WAIT)  # others hold what is left of the older pass
    return TickReport(
        tick=tick,
        as_of=as_of,
        prices=prices,
        sessions_revalued=total.revalued,
        sessions_changed=total.changed,
        sessions_pruned=total.pruned,
        seconds=trio.current_time() - started,
        sessions_fenced=total.fenced,
        buckets=total.buckets,
        tickers_pruned=tuple(total.tickers_pruned),
    )


async def _bucket_legacy_ids(store: SessionStore) -> None:
    """Fold ids left in the whole index (by an earlier version) into their buckets.

    Cheap when there is nothing to fold: one ``SCARD`` of a key that no
    longer exists.  Done every pass, not once, because a process of the
    earlier version may still be running beside this one during an upgrade.
    """
    if await store.legacy_index_size() > 0:
        moved = await store.fold_legacy_index()
        log.info("session index: %d ids moved from the whole index into buckets", moved)


async def help_current_tick(
    market: MarketData,
    store: SessionStore,
    *,
    taker: str,
    cache: PriceCache | None = None,
    pipelines: int = DEFAULT_PIPELINES,
    bucket_lease: float = _BUCKET_LEASE,
) -> TickShare | None:
    """Take buckets of the current pass if any are left (opening the next one if due); its share.

    None when there was nothing to do (no pass, or it is complete and the
    market has not ticked since).

    Raises:
      StoreUnavailable, CommandError, StoreDataError: from any round trip.
    """
    state = await market.open_pass()
    if state.tick < 0 or state.complete:
        return None
    return await revalue_pass(
        market,
        store,
        state.tick,
        taker=taker,
        cache=PriceCache() if cache is None else cache,
        pipelines=pipelines,
        bucket_lease=bucket_lease,
    )


def _open_event() -> trio.Event:
    event = trio.Event()
    event.set()
    return event


@attrs.define
class _Role:
    """What the leader loop tells this process's walker.

    Whether this process leads; ``wake`` (set by each advance: a pass may
    have opened); and a gate the walker passes before each page, closed
    while this process advances the market: the advance is a few round
    trips, and without the gate each of them would wait on the Trio loop
    behind the walk's pages (milliseconds of reply parsing each), enough to
    make a 0.1 s tick overrun its slot.
    """

    leading: bool = False
    wake: trio.Event = attrs.Factory(trio.Event)
    gate: trio.Event = attrs.Factory(_open_event)

    def woken(self) -> None:
        """A pass may have opened: wake the walker (it then waits on a fresh event)."""
        self.wake.set()
        self.wake = trio.Event()

    def close_gate(self) -> None:
        """Hold the walk before its next page (until :meth:`open_gate`)."""
        if self.gate.is_set():
            self.gate = trio.Event()

    def open_gate(self) -> None:
        self.gate.set()

    async def pass_gate(self) -> None:
        """What the walker awaits before each page."""
        await self.gate.wait()


async def run_market_updater(
    market: MarketData,
    store: SessionStore,
    *,
    interval: float,
    on_tick: Callable[[TickReport], None] | None = None,
    on_help: Callable[[int, TickShare], None] | None = None,
    on_pass: Callable[[PassReport], None] | None = None,
    pipelines: int = DEFAULT_PIPELINES,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Lead (advance every ``interval`` seconds, fixed rate) or follow, and walk passes.

    Never raises on store faults.  ``on_tick`` (optional) is called with the
    :class:`TickReport` of each advance this process took as leader;
    ``on_pass`` with a :class:`PassReport` of every pass this process took
    buckets of; ``on_help`` with the pass's tick and share when it did so
    as a non-leader.  Leadership is a lease of two intervals, renewed every
    interval even mid-advance, so a dead leader is replaced within two
    intervals and the next tick comes within three; non-leaders ask for it
    every quarter interval.  The walker runs in its own task, in every
    process, and never holds up the schedule.
    """
    holder = secrets.token_hex(8)
    poll = interval / 4
    role = _Role()
    async with open_service_nursery() as nursery:
        nursery.start_soon(
            _walk_passes,
            market,
            store,
            holder,
            role,
            min(poll, _MAX_WALK_POLL),
            _BUCKET_LEASE,
            pipelines,
            on_pass,
            on_help,
        )
        task_status.started()
        await _lead_or_follow(market, store, holder, interval, role, on_tick)


async def _lead_or_follow(
    market: MarketData,
    store: SessionStore,
    holder: str,
    interval: float,
    role: _Role,
    on_tick: Callable[[TickReport], None] | None,
) -> None:
    """The leader loop: ask for the lead every quarter interval; leading, advance on schedule."""
    lease = 2 * interval
    poll = interval / 4
    schedule: FixedRate | None = None
    failures = 0
    while True:
        if failures:
            await trio.sleep(min(interval, 0.5 * 2**failures))
        elif schedule is not None:
            # Hold the walk a little before the slot, so its pages in flight drain
            # and the advance finds the loop idle.
            await trio.sleep_until(schedule.next_at - min(interval * _GATE_LEAD, _GATE_LEAD_MAX))
            role.close_gate()
            await trio.sleep_until(schedule.next_at)
        else:
            await trio.sleep(poll)
        asked_at = trio.current_time()
        try:
            role.leading = await market.try_lead(holder, lease)
            if not role.leading:
                schedule = None
                failures = 0
                continue
            if schedule is None:
                schedule = FixedRate(interval, asked_at)
            role.close_gate()
            report = await _advance_under_lease(market, holder, lease, asked_at)
        except TickRace as exc:
            log.info("market tick skipped: %s", exc)
            schedule = None
            continue
        except (StoreUnavailable, CommandError, StoreDataError) as exc:
            failures = min(failures + 1, 6)
            log.warning("market tick failed (attempt %d), retrying: %s", failures, exc)
            continue
        finally:
            role.open_gate()
        failures = 0
        skipped = schedule.after_tick(trio.current_time()) if schedule is not None else 0
        if report is None:
            role.leading = False
            schedule = None
            continue
        role.woken()
        report = attrs.evolve(report, ticks_skipped=skipped)
        if skipped:
            log.info("market tick %d overran its slot: %d skipped", report.tick, skipped)
        log.debug("market tick %d advanced in %.3fs", report.tick, report.seconds)
        if on_tick is not None:
            on_tick(report)


async def _advance_under_lease(
    market: MarketData,
    holder: str,
    lease: float,
    confirmed_at: float,
) -> TickReport | None:
    """One advance under the lease: renewed every lease/3, cancelled the moment it is not ours.

    ``confirmed_at`` is when the renewal that let us tick was *sent*, so the
    deadline errs early.  Returns None if the lease was lost meanwhile.
    """
    with trio.CancelScope(deadline=confirmed_at + lease * _LEASE_SAFETY) as scope:
        async with open_service_nursery() as nursery:
            nursery.start_soon(_renew_lease, market, holder, lease, scope)
            started = trio.current_time()
            tick, as_of, prices = await market.advance(holder)
            return TickReport(tick, as_of, prices, 0, 0, 0, trio.current_time() - started)
    log.warning("market tick stopped: this process's leadership was lost or not confirmed")
    return None


async def _renew_lease(
    market: MarketData, holder: str, lease: float, scope: trio.CancelScope
) -> None:
    """Renew the lease every lease/3; push ``scope``'s deadline, or cancel it if the lease is gone.

    Never raises: a renewal that fails leaves the deadline where it was, so
    the advance stops when the last confirmed lease would have ended.
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


async def _walk_passes(
    market: MarketData,
    store: SessionStore,
    taker: str,
    role: _Role,
    poll: float,
    bucket_lease: float,
    pipelines: int,
    on_pass: Callable[[PassReport], None] | None,
    on_help: Callable[[int, TickShare], None] | None,
) -> None:
    """This process's walker: join the current pass, open the next when due; never raises.

    After a pass in which it took buckets it looks again at once (the next
    pass may be due); otherwise it waits for its own leader's advance or
    ``poll`` seconds.  Store faults are logged and retried with capped
    backoff.
    """
    cache = PriceCache()
    failures = 0
    walked = -1  # the last pass this process took part in
    while True:
        wake = role.wake  # taken before looking, so an advance meanwhile is not missed
        try:
            state = await market.open_pass()
            share: TickShare | None = None
            began = trio.current_time()
            if state.tick >= 0 and not state.complete:
                if state.tick != walked:
                    await _bucket_legacy_ids(store)  # once per pass, not per tick
                    walked = state.tick
                share = await revalue_pass(
                    market,
                    store,
                    state.tick,
                    taker=taker,
                    cache=cache,
                    pipelines=pipelines,
                    bucket_lease=bucket_lease,
                    before_page=role.pass_gate,
                )
        except (StoreUnavailable, CommandError, StoreDataError) as exc:
            failures = min(failures + 1, 6)
            log.warning("market revaluation failed (attempt %d), retrying: %s", failures, exc)
            await trio.sleep(min(2 * _MAX_WALK_POLL, 0.05 * 2**failures))
            continue
        failures = 0
        if share is not None and share.buckets:
            _report_pass(state, share, trio.current_time() - began, role, on_pass, on_help)
            continue
        with trio.move_on_after(poll):
            await wake.wait()


def _report_pass(
    state: PassState,
    share: TickShare,
    seconds: float,
    role: _Role,
    on_pass: Callable[[PassReport], None] | None,
    on_help: Callable[[int, TickShare], None] | None,
) -> None:
    report = PassReport(
        tick=state.tick,
        prices_tick=share.prices_tick,
        sessions_revalued=share.revalued,
        sessions_changed=share.changed,
        sessions_pruned=share.pruned,
        sessions_fenced=share.fenced,
        buckets=share.buckets,
        seconds=seconds,
        completed=share.completed,
        pass_seconds=share.pass_seconds,
        lag=share.lag,
        tickers_pruned=tuple(share.tickers_pruned),
    )
    if report.completed:
        log.debug(
            "market pass of tick %d: %d sessions revalued here, %.3fs, %d ticks behind",
            report.tick,
            report.sessions_revalued,
            report.pass_seconds,
            report.lag,
        )
    if on_pass is not None:
        on_pass(report)
    if on_help is not None and not role.leading:
        on_help(state.tick, share)
