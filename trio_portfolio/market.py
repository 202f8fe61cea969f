"""Market data in Redis, and the market updater that revalues every session.

Theory of operation
===================

Prices are shared state, so they live in Redis like everything else: every
server process sees the same price for a ticker, and a restarted or new
process continues the same price path.  All market keys share the hash tag
``{market}`` so the multi-key scripts below work on Redis Cluster:

* ``<prefix>:{market}:prices`` - hash, ticker -> latest price;
* ``<prefix>:{market}:history`` - hash, ticker -> the last ``history_length``
  prices, oldest first, on aligned ticks (the last price of every ticker is
  the same tick), packed as little-endian float64 in hex (see
  :func:`pack_history`): one string per ticker, so an analysis of 100
  holdings reads 100 strings, not 25,600 list items, and the parsing is one
  C call in the analysis's worker thread instead of work on the Trio loop;
* ``<prefix>:{market}:tick`` - how many ticks have been taken;
* ``<prefix>:{market}:leader`` - which process runs the updater (with a TTL).

A ticker enters the market the first time a session holds it
(:meth:`MarketData.ensure_prices`): the :class:`~trio_portfolio.simulation.MarketSource`
gives it a price and a bootstrapped history ending at that price, written by
one script that does nothing if another process got there first, so it is
valued and analysable at once.

The updater (:func:`run_market_updater`) runs in every process but acts only
in the one holding the leader key, renewed each tick: if that process dies,
another takes over within a few intervals.  A tick draws one new price per
known ticker (all sessions see the same prices), writes them with the
histories in one script fenced on the tick number (two leaders can never
both advance the market), then revalues every indexed session in pipelined
batches of ``revalue_batch`` - one round trip per batch, not per session.
Revaluation never touches a session's activity time or TTL.  A failing tick
is logged and retried with capped backoff; it never ends the loop.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from importlib import resources
from typing import Any

import attrs
import numpy as np
import trio

from trio_portfolio.models import utc_now
from trio_portfolio.redis_io import RedisClient, ReplyError, Script, StoreUnavailable
from trio_portfolio.simulation import MarketSource
from trio_portfolio.store import SessionStore

log = logging.getLogger(__name__)

HISTORY_LENGTH = 256
_HEX_PER_PRICE = 16  # one little-endian float64


def pack_history(prices: Sequence[float]) -> str:
    """Prices as stored in the history hash: little-endian float64, hex-encoded.

    Exact (no decimal rounding), fixed width (so Lua trims by length), and
    text (so replies stay UTF-8 strings like every other reply).
    """
    return np.asarray(prices, dtype="<f8").tobytes().hex()


def unpack_history(packed: str) -> tuple[float, ...]:
    """The inverse of :func:`pack_history`; an empty string is an empty history."""
    return tuple(np.frombuffer(bytes.fromhex(packed), dtype="<f8").tolist())


def _script(name: str) -> Script:
    return Script(resources.files("trio_portfolio.lua").joinpath(name).read_text())


_BOOTSTRAP = _script("market_bootstrap.lua")
_TICK = _script("market_tick.lua")
_LEAD = _script("market_lead.lua")


@attrs.frozen
class TickReport:
    """What one market tick did (for logs, metrics and tests)."""

    tick: int
    as_of: str
    prices: dict[str, float]
    sessions_revalued: int
    sessions_changed: int
    sessions_pruned: int
    seconds: float


class MarketData:
    """Prices and histories of every ticker any session holds, kept in Redis."""

    def __init__(
        self,
        redis: RedisClient,
        source: MarketSource,
        *,
        key_prefix: str,
        history_length: int = HISTORY_LENGTH,
    ) -> None:
        self._redis = redis
        self.source = source
        self.history_length = history_length
        base = f"{key_prefix}:{{market}}"
        self._prices_key = f"{base}:prices"
        self._tick_key = f"{base}:tick"
        self._leader_key = f"{base}:leader"
        self._history_key = f"{base}:history"

    async def load_scripts(self) -> None:
        """Load the market scripts (EVALSHA would also load them on first use)."""
        await self._redis.load_scripts([_BOOTSTRAP, _TICK, _LEAD])

    async def prices(self) -> dict[str, float]:
        """Every known ticker's latest price."""
        flat = await self._redis.execute("HGETALL", self._prices_key)
        return {flat[i]: float(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def ensure_prices(self, tickers: Sequence[str]) -> dict[str, float]:
        """Latest prices for ``tickers``, bringing tickers new to the market in first.

        A new ticker gets the source's initial price and a bootstrapped
        history in one script; if another process added it meanwhile, the
        script keeps theirs.  Returns a price for every ticker asked for.
        """
        tickers = sorted(set(tickers))
        if not tickers:
            return {}
        known = await self._redis.execute("HMGET", self._prices_key, *tickers)
        prices = {t: float(p) for t, p in zip(tickers, known, strict=True) if p is not None}
        missing = [t for t in tickers if t not in prices]
        if missing:
            args = await trio.to_thread.run_sync(self._bootstrap_args, missing)
            reply = await self._redis.evalsha(
                _BOOTSTRAP, [self._prices_key, self._history_key], args
            )
            prices.update({reply[i]: float(reply[i + 1]) for i in range(0, len(reply), 2)})
        return prices

    def _bootstrap_args(self, tickers: Sequence[str]) -> list[str]:
        """``ticker, packed history, initial price`` triplets (CPU work: run in a thread)."""
        args: list[str] = []
        for ticker in tickers:
            history = self.source.bootstrap_history(ticker, self.history_length)
            args += [ticker, pack_history(history), repr(history[-1])]
        return args

    async def raw_histories(self, tickers: Sequence[str]) -> dict[str, str]:
        """Each ticker's packed history (:func:`unpack_history` decodes it; ``""``: none).

        Packed, not parsed: decoding is CPU work that belongs in the
        analysis's worker thread, not on the Trio loop.
        """
        if not tickers:
            return {}
        replies = await self._redis.execute("HMGET", self._history_key, *tickers)
        return {t: packed or "" for t, packed in zip(tickers, replies, strict=True)}

    async def try_lead(self, holder: str, ttl_seconds: float) -> bool:
        """Take or renew market leadership for ``ttl_seconds``; True if ``holder`` leads."""
        reply = await self._redis.evalsha(
            _LEAD, [self._leader_key], [holder, max(1, int(ttl_seconds * 1000))]
        )
        return bool(reply)

    async def advance(self) -> tuple[int, str, dict[str, float]]:
        """Draw and store one tick of prices for every known ticker.

        Returns ``(tick, as_of, prices)``.  Fenced on the tick counter: if
        another process advanced the market meanwhile, nothing is written and
        :class:`TickRace` is raised.
        """
        last = await self.prices()
        tick = int(await self._redis.execute("GET", self._tick_key) or 0)
        if not last:
            return tick, utc_now(), {}
        new = await trio.to_thread.run_sync(self.source.next_prices, last, tick + 1)
        as_of = utc_now()
        tickers = sorted(new)
        reply = await self._redis.evalsha(
            _TICK,
            [self._prices_key, self._tick_key, self._history_key],
            [
                tick,
                self.history_length * _HEX_PER_PRICE,
                *(x for t in tickers for x in (t, repr(new[t]), pack_history([new[t]]))),
            ],
        )
        if reply is None:
            raise TickRace(f"another process advanced the market past tick {tick}")
        return int(reply), as_of, new


class TickRace(Exception):
    """Two processes tried to take the same tick; the loser writes nothing."""


async def tick_once(
    market: MarketData, store: SessionStore, *, revalue_batch: int = 500
) -> TickReport:
    """Advance the market one tick and revalue every session in pipelined batches."""
    started = trio.current_time()
    tick, as_of, prices = await market.advance()
    revalued = changed = pruned = 0
    if prices:
        async for batch in store.iter_session_ids(revalue_batch):
            outcomes = await store.revalue_many(batch, prices, as_of)
            gone = [o.session_id for o in outcomes if o.missing]
            if gone:
                await store.forget(gone)
            revalued += len(outcomes) - len(gone)
            changed += sum(1 for o in outcomes if o.changed)
            pruned += len(gone)
    return TickReport(
        tick=tick,
        as_of=as_of,
        prices=prices,
        sessions_revalued=revalued,
        sessions_changed=changed,
        sessions_pruned=pruned,
        seconds=trio.current_time() - started,
    )


async def run_market_updater(
    market: MarketData,
    store: SessionStore,
    *,
    interval: float,
    on_tick: Any = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Tick every ``interval`` seconds while this process leads; never raises on store faults.

    ``on_tick`` (optional) is called with each :class:`TickReport`, for
    metrics.  Leadership is held for three intervals and renewed every tick,
    so a dead leader is replaced within about three intervals.
    """
    holder = secrets.token_hex(8)
    task_status.started()
    failures = 0
    while True:
        await trio.sleep(interval if failures == 0 else min(interval, 0.5 * 2**failures))
        try:
            if not await market.try_lead(holder, 3 * interval):
                failures = 0
                continue
            report = await tick_once(market, store)
        except TickRace as exc:
            log.info("market tick skipped: %s", exc)
            continue
        except (StoreUnavailable, ReplyError) as exc:
            failures = min(failures + 1, 6)
            log.warning("market tick failed (attempt %d), retrying: %s", failures, exc)
            continue
        failures = 0
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
