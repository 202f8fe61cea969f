"""Market data in Redis: prices, histories, the bounded universe of tickers, and leadership.

Theory of operation
===================

Prices are shared state, so they live in Redis like everything else: every
server process sees the same price for a ticker, and a restarted or new
process continues the same price path.  All market keys share the hash tag
``{market}`` so the multi-key scripts below work on Redis Cluster:

* ``<prefix>:{market}:prices`` - hash, ticker -> latest price;
* ``<prefix>:{market}:history:<ticker>`` - string, the ticker's last
  ``history_length`` prices on aligned ticks (the last price of every
  ticker is the same tick), each packed as little-endian float64 in hex
  (16 characters, see :func:`pack_history`), kept as a *ring*: the price of
  tick ``t`` is at slot ``t mod length``, so a tick writes 16 characters per
  ticker (``SETRANGE``) instead of copying its whole history through Lua,
  and :func:`ring_to_history` turns a ring and the tick it was read with
  into the history, oldest first.  One string per ticker, so an analysis
  of 100 holdings reads 100 strings, not 25,600 list items, and the
  parsing is one C call.  (Earlier versions kept the histories, oldest
  first, in one hash ``<prefix>:{market}:history``;
  :meth:`MarketData.load_scripts` moves such a hash into rings once.);
* ``<prefix>:{market}:tick`` - how many ticks have been taken, and
  ``...:tick_at`` the ``as_of`` time of the last one;
* ``<prefix>:{market}:leader`` - which process advances the market (with a TTL);
* ``<prefix>:{market}:holders:<ticker>`` - sorted set, session -> Redis
  time (ms) of its last claim of the ticker by a write of holdings, and
  ``...:held`` / ``...:held_cutoff`` (see *The universe* and *Letting go*);
* ``<prefix>:{market}:work`` and ``...:seen`` - the current revaluation
  *pass*: the tick it was opened for, its start (Redis ms), which index
  buckets are taken or done, and the tickers the live sessions walked so far
  hold (see :mod:`trio_portfolio.market`).  A pass outlives the ticks taken
  while it runs: a tick opens a pass only when the current one is complete,
  and :meth:`MarketData.open_pass` (any walker) opens the first one, and the
  next one as soon as the current one is complete and the market has ticked
  since.

The universe
------------
Only tickers some live session holds are priced.  A ticker enters the market
when a write of holdings needs it (:meth:`MarketData.ensure_prices`): the
:class:`~trio_portfolio.simulation.MarketSource` gives it a price and a
bootstrapped history, written by one script that keeps another process's if
it got there first and refuses (``ticker_limit``) a ticker that would take
the universe past ``max_tickers``.  With a symbol list, a ticker not on it is
refused (``unknown_ticker``) before anything is sent.

A ticker leaves the market when a pass's walk of every session finds no live
session holding it: the last bucket's ``done`` script deletes its price,
history and holders.  Sessions expire by TTL without telling anyone, so the
walk (which every tick does anyway, to revalue) is the one place that knows
what is held; no reference count can drift.  The walk and the writes of
holdings run on different hash slots, so the race between them is closed by
time instead of by a shared script:

* every write of holdings first *claims* its tickers: at Redis time ``c``
  its session is recorded as a *holder* of each (the ticker's holders set),
  and its session script refuses to write later than
  :data:`~trio_portfolio.store.base.CLAIM_GRACE_MS` (``G``) after ``c``
  (:class:`~trio_portfolio.store.base.ClaimExpired`);
* the prune keeps every ticker with a holder claimed at or after
  ``start - G - S``, where ``start`` is the Redis time the pass began and
  ``S`` is :data:`~trio_portfolio.store.base.CLOCK_SKEW_MS`.

A ticker held by a live session at the prune was established by a write at
``s <= c + G``: if ``c >= start - G - S`` it is kept by its claim (which only
that session's own let-go of a later write ends, below), otherwise
``s < start``, so the walk, which visits every indexed session after
``start``, saw it.  Either way no session is left holding an unpriced
ticker.  One clock decides both sides: on a single Redis it is the same
server's; on Cluster the market's node times the claim and the session's
checks it, so the nodes' clocks must agree within ``S`` (the market keeps
claims that much longer).

Letting go
----------
The prune alone would keep every ticker let go until the next pass ends,
so a client replacing its holdings with fresh tickers many times a tick
would make the market price all of them.  So a write of holdings also *lets
go* of the tickers the session no longer holds (:meth:`MarketData.let_go`,
called once the write landed): the session's claim of each ends, and the
market drops at once each one nobody holds.  That is known without a walk:

* ``...:held`` is the set of tickers the last complete pass's walk found
  held, and ``...:held_cutoff`` that pass's ``start - G - S``;
* a session holding a ticker was written either before that pass began
  (then the walk saw the ticker: it is in ``held``, and only a prune drops
  it) or after, with a claim newer than the cutoff that has not ended: a
  claim ends only with a let-go by the same session for a write claimed
  later, and a session's writes land in the order of their claims (the
  store refuses a write whose claim is older than the session's last one,
  with :class:`~trio_portfolio.store.base.ClaimExpired`, and the connection
  claims again).

So a ticker with no claim left since the cutoff and not in ``held`` is
held by no one, and is dropped; before the first complete pass nothing is
dropped this way.  Claims older than the cutoff say nothing ``held`` does
not: they are trimmed whenever a ticker's holders are touched and, for every
ticker, by each prune, so a holders set holds at most the claims made since
``G + S`` before the last complete pass began (and, until a pass completes,
every claim: passes that stop completing show as ``market_pass_lag_ticks``).
A ticker the last walk saw held waits for the next prune.  Writes with a
plain price mapping (tools, tests) carry no claim and are not protected by
one.

Repair
------
Should a live session ever hold a ticker that is not priced (a failover
that lost a session's write after its let-go dropped the ticker; a tool
that wrote with a plain price mapping), the walk finds it held: the call
that completes a pass answers the tickers its walk saw held that are not
priced, and the walker brings them back (:meth:`MarketData.reprice`) with no
holder, so one that nobody holds after all leaves again at the next prune.
Meanwhile such a session keeps the price it stored.

The work of a tick on the Trio loop is proportional to the tickers held:
prices are read and written in one script each, random draws and history
packing run in a worker thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
import trio

from trio_portfolio.lua_scripts import load_script, lua_directory
from trio_portfolio.models import TICKER_RE, utc_now
from trio_portfolio.protocol import ErrorCode, ProtocolError
from trio_portfolio.redis_io import RedisClient
from trio_portfolio.simulation import MarketSource
from trio_portfolio.store import CLAIM_GRACE_MS, CLOCK_SKEW_MS, INDEX_BUCKETS, ClaimedPrices

log = logging.getLogger(__name__)

HISTORY_LENGTH = 256
LEGACY_HOLDER = "@legacy"
"""The holder name of claims an older version recorded (no session id starts with ``@``)."""
DEFAULT_MAX_TICKERS = 10_000
_HEX_PER_PRICE = 16  # one little-endian float64


def pack_history(prices: Sequence[float]) -> str:
    """Prices as stored in the history hash: little-endian float64, hex-encoded.

    Exact (no decimal rounding), fixed width (so Lua trims by length), and
    text (so replies stay UTF-8 strings like every other reply).
    """
    return np.asarray(prices, dtype="<f8").tobytes().hex()


def ring_to_history(ring: str, tick: int) -> str:
    """A history ring read at ``tick`` as a packed history, oldest first (pure string work).

    The price of tick ``t`` sits at slot ``t mod length``; the newest is the
    read tick's, so the oldest is at slot ``(tick + 1) mod length``.
    """
    length = len(ring) // _HEX_PER_PRICE
    if length == 0:
        return ""
    cut = ((tick + 1) % length) * _HEX_PER_PRICE
    return ring[cut:] + ring[:cut]


def unpack_history(packed: str) -> tuple[float, ...]:
    """The inverse of :func:`pack_history`; an empty string is an empty history."""
    return tuple(np.frombuffer(bytes.fromhex(packed), dtype="<f8").tolist())


_LUA = lua_directory("trio_portfolio")
"""``trio_portfolio/lua/``: the market's scripts (the store's live in ``store/lua/``)."""
_LIB = ("market_lib",)
_BOOTSTRAP = load_script(_LUA, "market_bootstrap", libraries=_LIB)
_CLAIM = load_script(_LUA, "market_claim", libraries=_LIB)
_READ = load_script(_LUA, "market_read", libraries=_LIB)
_TICK = load_script(_LUA, "market_tick", libraries=_LIB)
_TAKE = load_script(_LUA, "market_take", libraries=_LIB)
_PASS = load_script(_LUA, "market_pass", libraries=_LIB)
_RENEW = load_script(_LUA, "market_renew", libraries=_LIB)
_RELEASE = load_script(_LUA, "market_release", libraries=_LIB)
PASS_SCRIPTS = (_PASS, _RENEW, _RELEASE)
"""The revaluation passes' own scripts (loaded with :data:`SCRIPTS`)."""
_DONE = load_script(_LUA, "market_done", libraries=_LIB)
_LET_GO = load_script(_LUA, "market_let_go", libraries=_LIB)
_START = load_script(_LUA, "market_start")
_LEAD = load_script(_LUA, "market_lead")
_HISTORIES = load_script(_LUA, "market_histories", libraries=_LIB)
_MIGRATE = load_script(_LUA, "market_migrate_histories", libraries=_LIB)
SCRIPTS = (
    _BOOTSTRAP,
    _CLAIM,
    _READ,
    _TICK,
    _TAKE,
    _DONE,
    _LET_GO,
    _START,
    _LEAD,
    _HISTORIES,
    _MIGRATE,
)

_BOOTSTRAPS_PER_GIL_TURN = 8
"""Histories a bootstrap thread computes (about 0.3 ms) before it lets other threads run."""

_MIGRATE_BATCH = 200
"""Tickers one migration script moves from the old history hash (bounds its Redis time)."""


class TickRace(Exception):
    """Another process advanced the market first, or this one no longer leads: nothing written."""


class TickerRefused(ProtocolError):
    """A write of holdings names tickers the market will not price (nothing was changed).

    ``code`` is :attr:`ErrorCode.UNKNOWN_TICKER` (not on the symbol list) or
    :attr:`ErrorCode.TICKER_LIMIT` (the universe is full); the connection
    answers it as an ``error`` frame like any other refusal.
    """


@attrs.frozen
class MarketState:
    """The market as one script read it: tick, its time, every price."""

    tick: int
    as_of: str
    prices: dict[str, float]


@attrs.frozen
class PassState:
    """Where the current revaluation pass stands (one script read it, :meth:`MarketData.open_pass`).

    ``tick`` is the tick the pass was opened for (-1: no pass yet),
    ``market_tick`` the current tick; ``opened`` is true if this very call
    opened the pass.
    """

    tick: int
    done: int
    market_tick: int
    opened: bool = False

    @property
    def complete(self) -> bool:
        """Every bucket of the pass is done."""
        return self.tick >= 0 and self.done >= INDEX_BUCKETS


@attrs.frozen
class Taken:
    """Buckets taken of a pass (:meth:`MarketData.take_buckets`), with the current tick."""

    market_tick: int
    buckets: list[int]


@attrs.frozen
class Finished:
    """What a ``done`` of buckets answered (:meth:`MarketData.finish_buckets`).

    ``completed`` is true for the one call that finished the pass's last
    bucket; only then are ``seconds`` (the pass's duration, open to
    complete, on Redis's clock), ``lag`` (how many ticks the market was past
    the pass's tick at that moment), ``pruned`` (the tickers the universe
    lost) and ``unpriced`` filled.
    """

    done: int
    completed: bool = False
    seconds: float = 0.0
    lag: int = 0
    pruned: tuple[str, ...] = ()
    unpriced: tuple[str, ...] = ()
    """Tickers the walk found held that are not priced (see *Repair*): to bring back."""


def load_symbols(path: Path) -> frozenset[str]:
    """The symbol list in ``path``: one ticker per line; blank lines and ``#`` comments skipped.

    Raises:
      OSError: if the file cannot be read.
      ValueError: for a line that is not a valid ticker (named ``file:line``)
        or a file with no ticker at all.
    """
    symbols: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        ticker = text.upper()
        if not TICKER_RE.fullmatch(ticker):
            raise ValueError(f"{path}:{number}: not a ticker: {text!r}")
        symbols.add(ticker)
    if not symbols:
        raise ValueError(f"{path}: no tickers")
    return frozenset(symbols)


class MarketData:
    """Prices and histories of every ticker a live session holds, kept in Redis.

    ``max_tickers`` caps the universe; ``symbols`` (optional) is the only
    tickers that may be held.  Safe to use from many tasks and processes at
    once: every decision is taken in a script.
    """

    def __init__(
        self,
        redis: RedisClient,
        source: MarketSource,
        *,
        key_prefix: str,
        history_length: int = HISTORY_LENGTH,
        max_tickers: int = DEFAULT_MAX_TICKERS,
        symbols: frozenset[str] | None = None,
    ) -> None:
        if max_tickers < 1:
            raise ValueError("max_tickers must be at least 1")
        self._redis = redis
        self.source = source
        self.history_length = history_length
        self.max_tickers = max_tickers
        self.symbols = symbols
        base = f"{key_prefix}:{{market}}"
        self.prices_key = f"{base}:prices"
        self.tick_key = f"{base}:tick"
        self.tick_at_key = f"{base}:tick_at"
        self.leader_key = f"{base}:leader"
        self.history_key = f"{base}:history"
        """The hash earlier versions kept of histories; only read, to migrate it into rings."""
        self.history_ring_prefix = f"{base}:history:"
        self.legacy_claims_key = f"{base}:claims"
        """The hash of claim times versions before holders kept; made holders at start."""
        self.work_key = f"{base}:work"
        self.seen_key = f"{base}:seen"
        self.holders_prefix = f"{base}:holders:"
        self.held_key = f"{base}:held"
        self.held_cutoff_key = f"{base}:held_cutoff"

    def history_ring_key(self, ticker: str) -> str:
        """The key of ``ticker``'s history ring (see the module docstring)."""
        return self.history_ring_prefix + ticker

    async def load_scripts(self) -> None:
        """Load the market scripts, and bring what an older version stored up to date.

        Histories in the old hash move into rings (:meth:`migrate_histories`),
        the claims of versions before holders become holder entries, and
        letting go waits for this version's first complete pass (see
        ``market_start.lua``).  Each is a no-op when there is nothing to
        do.  An older process still running beside this one is not covered:
        its claims are not holders (every process of a deployment runs one
        version; restart them all on an upgrade).
        """
        await self._redis.load_scripts((*SCRIPTS, *PASS_SCRIPTS))
        legacy = await self._redis.evalsha(
            _START,
            [self.legacy_claims_key, self.held_key, self.held_cutoff_key],
            [self.holders_prefix, LEGACY_HOLDER],
        )
        if legacy:
            log.info("market: %d claims of an older version kept as holders", legacy)
        moved = await self.migrate_histories()
        if moved:
            log.info("market: %d price histories moved into rings", moved)

    async def migrate_histories(self) -> int:
        """Move every history of the old hash into its ring, :data:`_MIGRATE_BATCH` per script.

        Each script re-reads the tick it aligns to, so a tick between two
        batches is harmless; a ticker that already has a ring keeps it.
        Safe to run from several processes at once.  Returns how many moved.
        """
        moved = 0
        while True:
            tickers = [
                str(t)
                for t in (await self._redis.execute("HKEYS", self.history_key))[:_MIGRATE_BATCH]
            ]
            if not tickers:
                return moved
            reply = await self._redis.evalsha(
                _MIGRATE,
                [self.history_key, self.tick_key, *map(self.history_ring_key, tickers)],
                tickers,
            )
            moved += int(reply)

    async def prices(self) -> dict[str, float]:
        """Every priced ticker's latest price."""
        flat = await self._redis.execute("HGETALL", self.prices_key)
        return {flat[i]: float(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def universe_size(self) -> int:
        """How many tickers the market prices now."""
        size: int = await self._redis.execute("HLEN", self.prices_key)
        return size

    async def read(self) -> MarketState:
        """The tick, its ``as_of`` and every price, read atomically in one round trip."""
        reply = await self._redis.evalsha(
            _READ, [self.prices_key, self.tick_key, self.tick_at_key], []
        )
        flat = reply[2:]
        prices = {flat[i]: float(flat[i + 1]) for i in range(0, len(flat), 2)}
        return MarketState(int(reply[0]), reply[1] or utc_now(), prices)

    async def ensure_prices(self, tickers: Sequence[str], *, holder: str) -> ClaimedPrices:
        """Latest prices for ``tickers``, claimed by session ``holder`` for a write that follows.

        Tickers new to the market get the source's initial price and a
        bootstrapped history (computed in a worker thread) in one script;
        if another process added one meanwhile, the script keeps theirs.
        The answer carries the claim time the store's scripts check (see
        *The universe*); the claim also makes ``holder`` a holder of each
        ticker until its own :meth:`let_go` of a later write (see *Letting
        go*), so pass the session the write is for.

        Raises:
          TickerRefused: ``unknown_ticker`` for a ticker off the symbol list
            (nothing sent), ``ticker_limit`` if the new tickers would take the
            universe past ``max_tickers`` (nothing written).
          StoreUnavailable, CommandError: as every Redis call.
        """
        tickers = sorted(set(tickers))
        if self.symbols is not None:
            unknown = [t for t in tickers if t not in self.symbols]
            if unknown:
                raise TickerRefused(
                    ErrorCode.UNKNOWN_TICKER,
                    f"not on this server's symbol list: {', '.join(unknown[:10])}"
                    + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""),
                )
        if not tickers:
            return ClaimedPrices({}, 0)
        reply = await self._redis.evalsha(
            _CLAIM,
            [self.prices_key, self.held_cutoff_key],
            [holder, self.holders_prefix, *tickers],
        )
        claimed_at = int(reply[0])
        prices = {t: float(p) for t, p in zip(tickers, reply[1:], strict=True) if p is not None}
        missing = [t for t in tickers if t not in prices]
        if missing:
            prices.update(await self._bootstrap(missing, holder))
        return ClaimedPrices(prices, claimed_at)

    async def reprice(self, tickers: Sequence[str]) -> list[str]:
        """Bring back ``tickers`` a walk found held but not priced (see *Repair*).

        Each gets a bootstrapped history and a price as a new ticker would,
        unless it is priced by now; no claim, no holder, so if no session
        holds it at the next pass's end, that pass drops it again.  Returns
        the tickers that were missing.

        Raises:
          TickerRefused: ``ticker_limit`` if they do not fit under ``max_tickers``.
          StoreUnavailable, CommandError: as every Redis call.
        """
        flat = await self._redis.execute("HMGET", self.prices_key, *tickers) if tickers else []
        missing = [t for t, price in zip(tickers, flat, strict=True) if price is None]
        if missing:
            await self._bootstrap(missing, "")
        return missing

    async def _bootstrap(self, missing: Sequence[str], holder: str) -> dict[str, float]:
        """Price ``missing`` tickers (kept if another process priced one first); their prices.

        ``holder`` (``""``: none) is recorded as a holder of each.

        Raises:
          TickerRefused: ``ticker_limit`` (nothing written).
          StoreUnavailable, CommandError: as every Redis call.
        """
        if len(missing) > self.max_tickers:
            raise self._full(len(missing), None)
        args = await trio.to_thread.run_sync(self._bootstrap_args, missing)
        reply = await self._redis.evalsha(
            _BOOTSTRAP,
            [
                self.prices_key,
                self.tick_key,
                self.held_cutoff_key,
                *(self.history_ring_key(t) for t in args[::3]),
            ],
            [self.max_tickers, holder, self.holders_prefix, *args],
        )
        if reply[0] == "ticker_limit":
            raise self._full(len(missing), int(reply[1]))
        flat = reply[1:]
        return {flat[i]: float(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def let_go(self, holder: str, claimed_at_ms: int, tickers: Sequence[str]) -> list[str]:
        """Session ``holder``'s write claimed at ``claimed_at_ms`` landed without ``tickers``.

        Ends the session's claims of them and drops from the market at once
        every one nobody else holds (see *Letting go*); the others wait for
        a pass's prune.  Returns the tickers dropped.  Only an optimisation:
        a let-go that never comes (the process died, Redis could not answer)
        leaves the ticker to the prune.

        Raises:
          StoreUnavailable, CommandError: as every Redis call.
        """
        if not tickers or claimed_at_ms <= 0:
            return []
        reply = await self._redis.evalsha(
            _LET_GO,
            [self.prices_key, self.held_key, self.held_cutoff_key, self.seen_key],
            [holder, claimed_at_ms, self.holders_prefix, self.history_ring_prefix, *tickers],
        )
        return [str(t) for t in reply]

    def _full(self, new: int, size: int | None) -> TickerRefused:
        priced = "" if size is None else f" ({size} priced now)"
        return TickerRefused(
            ErrorCode.TICKER_LIMIT,
            f"the market prices at most {self.max_tickers} tickers{priced}: "
            f"{new} new ones do not fit; nothing was changed",
        )

    def _bootstrap_args(self, tickers: Sequence[str]) -> list[str]:
        """``ticker, packed history, initial price`` triplets (CPU work: run in a thread)."""
        args: list[str] = []
        for n, ticker in enumerate(tickers, 1):
            history = self.source.bootstrap_history(ticker, self.history_length)
            args += [ticker, pack_history(history), repr(history[-1])]
            if n % _BOOTSTRAPS_PER_GIL_TURN == 0:
                # Hand the GIL over: without this a thread bootstrapping 100
                # tickers (about 4 ms) keeps it for the whole 5 ms switch
                # interval, and the event loop and the tick's draw wait.
                time.sleep(0)
        return args

    async def raw_histories(self, tickers: Sequence[str]) -> dict[str, str]:
        """Each ticker's packed history (:func:`unpack_history` decodes it; ``""``: none).

        Packed, not parsed: decoding is CPU work that belongs in the
        analysis's worker thread, not on the Trio loop.
        """
        if not tickers:
            return {}
        reply = await self._redis.evalsha(
            _HISTORIES, [self.tick_key, *map(self.history_ring_key, tickers)], []
        )
        tick = int(reply[0])
        return {
            t: ring_to_history(ring, tick) if ring else ""
            for t, ring in zip(tickers, reply[1:], strict=True)
        }

    async def try_lead(self, holder: str, ttl_seconds: float) -> bool:
        """Take or renew market leadership for ``ttl_seconds``; True if ``holder`` leads.

        Compare-and-set on the holder: a process whose lease ran out and
        was taken over gets False and must stop advancing the market.
        """
        reply = await self._redis.evalsha(
            _LEAD, [self.leader_key], [holder, max(1, int(ttl_seconds * 1000))]
        )
        return bool(reply)

    async def advance(self, holder: str = "") -> tuple[int, str, dict[str, float]]:
        """Draw and store one tick of prices for every priced ticker; open a pass if one is due.

        Returns ``(tick, as_of, prices)``.  The tick and prices are read in
        one script, the draw runs in a worker thread, and the write is
        fenced on the tick counter and (unless ``holder`` is ``""``) on the
        leader key.  The script opens a revaluation pass for the new tick
        only if the current one is complete; a pass still running is left
        to finish (and the first pass is opened by :meth:`open_pass`).
        With no ticker priced nothing is written and the current tick is
        returned with empty prices.

        Raises:
          TickRace: another process advanced the market meanwhile, or
            ``holder`` no longer leads; nothing was written.
          StoreUnavailable, CommandError: as every Redis call.
        """
        state = await self.read()
        if not state.prices:
            return state.tick, utc_now(), {}
        tickers, texts, packed = await trio.to_thread.run_sync(
            self._draw, state.prices, state.tick + 1
        )
        as_of = utc_now()
        reply = await self._redis.evalsha(
            _TICK,
            [
                self.prices_key,
                self.tick_key,
                self.leader_key,
                self.tick_at_key,
                self.work_key,
                self.seen_key,
            ],
            [
                state.tick,
                holder,
                self.history_length * _HEX_PER_PRICE,
                as_of,
                self.history_ring_prefix,
                ",".join(tickers),
                ",".join(texts),
                packed,
            ],
        )
        if reply is None:
            raise TickRace(f"the market moved past tick {state.tick} or this process lost the lead")
        prices = {t: float(p) for t, p in zip(tickers, texts, strict=True)}
        return int(reply[0]), as_of, prices

    def _draw(self, last: dict[str, float], tick: int) -> tuple[list[str], list[str], str]:
        """The next tick: tickers (sorted), price texts, packed prices (CPU work: a thread)."""
        drawn = self.source.next_prices(last, tick)
        tickers = sorted(drawn)
        prices = [drawn[t] for t in tickers]
        return tickers, [repr(p) for p in prices], pack_history(prices)

    async def take_buckets(
        self, taker: str, lease_seconds: float, most: int, pass_tick: int
    ) -> Taken | None:
        """Take up to ``most`` buckets of the pass opened for ``pass_tick``.

        None when every bucket is done or taken by a live taker, or when the
        current pass is not ``pass_tick``'s (it completed and the next one
        opened, or there is none).  A bucket whose taker's lease ran out is
        handed out again.  The answer carries the current tick, so a walker
        knows when its cached prices are older than the market's.
        """
        reply = await self._redis.evalsha(
            _TAKE,
            [self.work_key, self.tick_key],
            [taker, max(1, int(lease_seconds * 1000)), INDEX_BUCKETS, most, pass_tick],
        )
        if int(reply[0]) != pass_tick or len(reply) < 3:
            return None
        return Taken(int(reply[1]), [int(b) for b in reply[2:]])

    async def renew_buckets(
        self, taker: str, lease_seconds: float, pass_tick: int, buckets: Sequence[int]
    ) -> bool:
        """Renew ``taker``'s leases on ``buckets`` of the pass of ``pass_tick``; True if all ours.

        False (nothing renewed) when the pass is over or a lease ran out and
        the bucket was handed out again: the taker should stop.
        """
        reply = await self._redis.evalsha(
            _RENEW,
            [self.work_key],
            [taker, max(1, int(lease_seconds * 1000)), pass_tick, *buckets],
        )
        return bool(reply)

    async def release_buckets(self, taker: str, pass_tick: int) -> int:
        """End every lease ``taker`` holds on buckets of the pass of ``pass_tick``; how many.

        Every bucket, not a list: a take cancelled while its answer was on
        the way took buckets the taker never heard of.
        """
        reply = await self._redis.evalsha(
            _RELEASE, [self.work_key], [taker, pass_tick, INDEX_BUCKETS]
        )
        return int(reply)

    async def finish_buckets(
        self, pass_tick: int, buckets: Sequence[int], held: set[str]
    ) -> Finished | None:
        """Record ``buckets`` of the pass of ``pass_tick`` as revalued, with what they hold.

        Checked against the pass's own tick, not the current one (the market
        may have ticked meanwhile; the pass goes on).  None if the current
        pass is another one (then nothing is recorded).  The call that
        finishes the last bucket prunes the universe and answers the pass's
        duration and lag (see :class:`Finished`).
        """
        reply = await self._redis.evalsha(
            _DONE,
            [
                self.work_key,
                self.tick_key,
                self.seen_key,
                self.prices_key,
                self.held_key,
                self.held_cutoff_key,
            ],
            [
                pass_tick,
                ",".join(map(str, buckets)),
                INDEX_BUCKETS,
                CLAIM_GRACE_MS + CLOCK_SKEW_MS,
                self.history_ring_prefix,
                self.holders_prefix,
                *sorted(held),
            ],
        )
        if reply[0] != "done":
            return None
        if reply[2] == "":
            return Finished(int(reply[1]))
        count = int(reply[4])
        return Finished(
            int(reply[1]),
            completed=True,
            seconds=int(reply[2]) / 1000,
            lag=int(reply[3]),
            pruned=tuple(str(t) for t in reply[5 : 5 + count]),
            unpriced=tuple(str(t) for t in reply[5 + count :]),
        )

    async def open_pass(self) -> PassState:
        """Open the next revaluation pass if it is due; where the current pass stands.

        Due: there is no pass yet, or the current one is complete and the
        market has ticked since it opened.  Any process may call it (the
        check and the opening are one script): the walkers call it as soon
        as a pass completes, so a pass that lagged is followed at once by
        one at the newest tick.
        """
        reply = await self._redis.evalsha(
            _PASS, [self.work_key, self.tick_key, self.seen_key], [INDEX_BUCKETS]
        )
        return PassState(int(reply[0]), int(reply[1]), int(reply[2]), bool(reply[3]))

    async def tick_progress(self) -> tuple[int, int]:
        """``(pass tick, buckets done)`` of the current pass (``(-1, 0)`` when none).

        The pass's tick is the one it was opened for; the market may be ahead.
        """
        tick, done = await self._redis.execute("HMGET", self.work_key, "tick", "done")
        return (-1 if tick is None else int(tick)), int(done or 0)
