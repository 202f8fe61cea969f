"""Market prices without a market: the :class:`MarketSource` interface and a simulator.

Theory of operation
-------------------
A :class:`MarketSource` answers three questions, all synchronously and
without I/O: where does a ticker start, what did its recent past look like,
and what are the next prices.  The market updater owns the clock (the tick
number) and the last prices; the source only maps them to new prices.  A
feed backed by a real market can implement the same protocol later, doing
its fetching elsewhere (``docs/market-feeds.md``); nothing here ever calls
an external service.  :class:`~trio_portfolio.replay.ReplaySource` plays
historical prices from a CSV file through the same protocol.

:class:`GbmSimulator` moves every ticker by geometric Brownian motion::

    p_t = p_{t-1} · exp((μ - σ²/2)·dt + σ·√dt·z_t),   dt = 1 / periods_per_year

with the annual drift ``μ`` and volatility ``σ`` of the ticker's
:class:`TickerProfile`.  One tick is one trading day by default
(:data:`~trio_portfolio.analytics.DEFAULT_PERIODS_PER_YEAR` = 252), the
same convention the analytics use to annualise, however often the server
actually ticks: simulated time runs faster than the wall clock.

The standard normal shocks ``z`` are correlated by sector: two tickers of
the same sector correlate with :data:`SAME_SECTOR_CORRELATION`, any other
pair (including any pair involving the catch-all sector
:data:`OTHER_SECTOR`) with :data:`CROSS_SECTOR_CORRELATION`.  The shocks are
generated from the factor form of that correlation matrix::

    z_j = √ρ_cross · M + √(ρ_same - ρ_cross) · S_sector(j) + √(1 - ρ_same) · e_j

(``other`` has no sector factor: ``z_j = √ρ_cross · M + √(1 - ρ_cross) · e_j``)
with independent standard normal market factor ``M``, one factor ``S`` per
sector and one idiosyncratic ``e`` per ticker.  This factor loading matrix
is a square root of the correlation matrix, so the shocks have exactly the
covariance that a Cholesky factor would give them; we use it instead of
the Cholesky factor because each ticker's shock then depends only on its
own draws and its sector's, never on which other tickers are in the
market.  Adding a ticker to some portfolio does not move the prices of
the others, a ticker's past (:meth:`GbmSimulator.bootstrap_history`) can
be generated alone yet correlate with other tickers' pasts exactly like
live ticks do, and no matrix is factorised per tick.  The matrix is
positive definite whenever ``0 <= ρ_cross <= ρ_same < 1``: it is
``(1 - ρ_same)·I`` plus positive semi-definite terms.

Determinism: a live tick's draws are a counter-based stream, one standard
normal per ``(seed, factor kind, tick, key)`` (two SplitMix64 hashes, then
Box-Muller; ``key`` is a 64-bit BLAKE2b digest of the ticker or sector
name, Python's ``hash()`` being salted per process), computed for all
tickers of a tick in a few array operations: a tick of 1,000 tickers is
drawn and packed in about 1.5 ms, against about 18 ms with one random
generator per ticker.  A
bootstrapped past (hundreds of steps per factor, where one generator is
cheaper than hashing) draws from ``numpy.random.default_rng`` seeded with
``(seed, phase, kind, 0, key)``; the market's and each sector's draws are
the same for every ticker, so they are computed once and cached.
So a price is a function of the seed, the tick, the ticker's profile and
its last price, and is the same in every process.

Guard rails: prices are kept within [:data:`PRICE_FLOOR`,
:data:`PRICE_CEILING`] so that a very long run can never reach 0 or
infinity; with the built-in profiles neither bound is reached in years of
simulated time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Final, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from trio_portfolio.analytics import DEFAULT_PERIODS_PER_YEAR, MAX_PERIODS_PER_YEAR

FloatArray = npt.NDArray[np.float64]

OTHER_SECTOR: Final[str] = "other"
"""The catch-all sector: its tickers share only the market factor."""

SAME_SECTOR_CORRELATION: Final[float] = 0.6
"""Correlation of the shocks of two tickers in the same (real) sector."""

CROSS_SECTOR_CORRELATION: Final[float] = 0.25
"""Correlation of the shocks of any other pair of distinct tickers."""

DEFAULT_DRIFT: Final[float] = 0.05
"""Annual drift of a ticker without a profile: a modest equity premium."""

DEFAULT_VOLATILITY: Final[float] = 0.30
"""Annual volatility of a ticker without a profile: a typical single stock."""

DEFAULT_PRICE_RANGE: Final[tuple[float, float]] = (20.0, 500.0)
"""Range of the hash-derived initial price of a ticker without a profile."""

PRICE_FLOOR: Final[float] = 1e-6
"""No simulated price goes below this."""

PRICE_CEILING: Final[float] = 1e12
"""No simulated price goes above this."""

MAX_DRIFT: Final[float] = 10.0
"""Bound on ``|drift|`` (1000 % a year) that keeps every step finite."""

MAX_VOLATILITY: Final[float] = 10.0
"""Bound on ``volatility`` (1000 % a year) that keeps every step finite."""

# Clipping in log space keeps exp() in range; clipping again after exp()
# absorbs its rounding, so the bounds hold exactly.
_LOG_BOUNDS: Final[tuple[float, float]] = (math.log(PRICE_FLOOR), math.log(PRICE_CEILING))

_LIVE: Final[int] = 0
_BOOTSTRAP: Final[int] = 1
_MARKET: Final[int] = 0
_SECTOR: Final[int] = 1
_TICKER: Final[int] = 2


class MarketSource(Protocol):
    """Where prices come from: synchronous, without I/O, safe from any thread.

    The market (:class:`~trio_portfolio.market.MarketData`) owns the clock
    (the tick counter in Redis) and the stored prices; a source only maps
    them to prices.  Rules for an implementation (``docs/market-feeds.md``
    has an adapter skeleton for a real feed):

    * Calls come from Trio worker threads (``trio.to_thread.run_sync``),
      never the event loop, and several may run at once (bootstraps for new
      tickers while a tick is drawn): the methods must be thread-safe, e.g.
      read immutable state or a reference swapped atomically.
    * No I/O and no waiting in the methods: the worker thread's caller
      waits for the answer, and a market tick is fenced on the tick number
      it read.  Load files before (see :mod:`trio_portfolio.replay`); a live
      feed receives in a task of its own and answers from its latest
      snapshot.
    * Only the leading process calls :meth:`next_prices`, once per tick;
      every process may call :meth:`bootstrap_history` when a session first
      holds a ticker.  :meth:`initial_price` is part of the interface but the
      market uses the last element of the bootstrap history.
    * Simulated and replayed sources are deterministic (the same
      configuration and arguments give the same prices, in every process);
      a live feed cannot be, and need not be: the stored tick is the truth.
    * Errors: :class:`ValueError` for invalid arguments, as documented per
      method, and nothing else.  The market updater does not catch a
      source's exceptions (only store faults), so one raised from
      :meth:`next_prices` stops the server: a live feed without a fresh
      price answers with the last price it was given.
    """

    def initial_price(self, ticker: str) -> float:
        """The price a ticker has when it first enters the market."""
        ...

    def bootstrap_history(self, ticker: str, length: int) -> list[float]:
        """A plausible past of ``length`` prices, oldest first.

        The last element equals :meth:`initial_price`; the path is the same
        for the same source configuration and ticker.  ``length`` 0 gives
        an empty list; a negative length raises :class:`ValueError`.
        """
        ...

    def next_prices(self, last_prices: Mapping[str, float], tick: int) -> dict[str, float]:
        """One new price for every ticker in ``last_prices``, for tick ``tick``.

        The result is the same for the same configuration, tick, tickers
        and last prices.  A negative tick or a last price that is not a
        finite number > 0 raises :class:`ValueError`.
        """
        ...


def _stable_key(text: str) -> int:
    """A 64-bit key of ``text`` that is the same in every process."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"trio-portfolio")
    return int.from_bytes(digest.digest(), "big")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@attrs.frozen
class TickerProfile:
    """How one ticker moves: annual drift ``μ`` and volatility ``σ``.

    ``sector`` selects the correlation with other tickers
    (:data:`OTHER_SECTOR` correlates only through the market).  Values are
    validated: drift and volatility finite with ``|drift| <= MAX_DRIFT``
    and ``0 <= volatility <= MAX_VOLATILITY``, and ``initial_price`` within
    [:data:`PRICE_FLOOR`, :data:`PRICE_CEILING`]; otherwise
    :class:`ValueError`.
    """

    drift: float
    volatility: float
    sector: str
    initial_price: float

    def __attrs_post_init__(self) -> None:
        _require(
            math.isfinite(self.drift) and abs(self.drift) <= MAX_DRIFT,
            f"drift must be finite with |drift| <= {MAX_DRIFT}, got {self.drift!r}",
        )
        _require(
            math.isfinite(self.volatility) and 0.0 <= self.volatility <= MAX_VOLATILITY,
            f"volatility must be in [0, {MAX_VOLATILITY}], got {self.volatility!r}",
        )
        _require(
            PRICE_FLOOR <= self.initial_price <= PRICE_CEILING,
            f"initial_price must be in [{PRICE_FLOOR}, {PRICE_CEILING}], "
            f"got {self.initial_price!r}",
        )


DEFAULT_PROFILES: Final[Mapping[str, TickerProfile]] = MappingProxyType(
    {
        # Illustrative round numbers near mid-2024 levels: plausible, not
        # data and not forecasts.  (drift μ, volatility σ, sector, price)
        "AAPL": TickerProfile(0.12, 0.28, "technology", 190.0),
        "MSFT": TickerProfile(0.12, 0.26, "technology", 420.0),
        "NVDA": TickerProfile(0.20, 0.50, "technology", 120.0),
        "AMD": TickerProfile(0.15, 0.50, "technology", 160.0),
        "INTC": TickerProfile(0.03, 0.38, "technology", 30.0),
        "GOOGL": TickerProfile(0.10, 0.30, "communication", 170.0),
        "META": TickerProfile(0.12, 0.38, "communication", 500.0),
        "NFLX": TickerProfile(0.12, 0.42, "communication", 650.0),
        "DIS": TickerProfile(0.05, 0.28, "communication", 100.0),
        "AMZN": TickerProfile(0.12, 0.32, "consumer_discretionary", 185.0),
        "TSLA": TickerProfile(0.10, 0.60, "consumer_discretionary", 220.0),
        "JPM": TickerProfile(0.08, 0.24, "financials", 200.0),
        "BAC": TickerProfile(0.07, 0.28, "financials", 40.0),
        "GS": TickerProfile(0.08, 0.28, "financials", 460.0),
        "V": TickerProfile(0.10, 0.22, "financials", 275.0),
        "XOM": TickerProfile(0.06, 0.28, "energy", 115.0),
        "CVX": TickerProfile(0.06, 0.28, "energy", 155.0),
        "JNJ": TickerProfile(0.05, 0.18, "healthcare", 155.0),
        "PFE": TickerProfile(0.03, 0.24, "healthcare", 28.0),
        "UNH": TickerProfile(0.08, 0.24, "healthcare", 520.0),
        "KO": TickerProfile(0.05, 0.16, "consumer_staples", 62.0),
        "PG": TickerProfile(0.05, 0.16, "consumer_staples", 165.0),
        "WMT": TickerProfile(0.07, 0.20, "consumer_staples", 68.0),
    }
)
"""The built-in profiles, keyed by ticker."""


def default_profile(ticker: str) -> TickerProfile:
    """The profile of a ticker that has none: same for a ticker in every run.

    Drift :data:`DEFAULT_DRIFT`, volatility :data:`DEFAULT_VOLATILITY`,
    sector :data:`OTHER_SECTOR`, and an initial price spread log-uniformly
    over :data:`DEFAULT_PRICE_RANGE` by a stable hash of the ticker, rounded
    to cents, so unknown tickers do not all start at the same price.
    """
    low, high = DEFAULT_PRICE_RANGE
    fraction = _stable_key(f"price:{ticker}") / 2.0**64
    price = round(low * (high / low) ** fraction, 2)
    return TickerProfile(DEFAULT_DRIFT, DEFAULT_VOLATILITY, OTHER_SECTOR, price)


def _mix(market: FloatArray, sector: FloatArray | None, own: FloatArray) -> FloatArray:
    """Combine independent factor draws into unit-variance sector-correlated shocks."""
    if sector is None:
        mixed: FloatArray = (
            math.sqrt(CROSS_SECTOR_CORRELATION) * market
            + math.sqrt(1.0 - CROSS_SECTOR_CORRELATION) * own
        )
        return mixed
    mixed = (
        math.sqrt(CROSS_SECTOR_CORRELATION) * market
        + math.sqrt(SAME_SECTOR_CORRELATION - CROSS_SECTOR_CORRELATION) * sector
        + math.sqrt(1.0 - SAME_SECTOR_CORRELATION) * own
    )
    return mixed


@attrs.frozen
class _LiveTerms:
    """Per-ticker constants of a live tick (see :meth:`GbmSimulator._live_terms`)."""

    key: int
    sector_key: int
    in_sector: bool
    drift: float
    scale: float


LIVE_TERMS_CACHE: Final[int] = 65_536
"""Most tickers whose live-tick constants one simulator keeps (then the cache starts afresh)."""

SHARED_DRAWS_CACHE: Final[int] = 64
"""Most shared bootstrap draw arrays (market, sectors; per history length) one simulator keeps."""

_GOLDEN: Final[int] = 0x9E3779B97F4A7C15
_MIX1: Final[int] = 0xBF58476D1CE4E5B9
_MIX2: Final[int] = 0x94D049BB133111EB
_UINT64: Final[int] = 2**64 - 1


def _splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64's finaliser, elementwise (numpy's uint64 arithmetic wraps modulo 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(_MIX1)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(_MIX2)
    return x ^ (x >> np.uint64(31))


def _counter_normals(
    seed: int, kind: int, ticks: npt.NDArray[np.uint64], keys: npt.NDArray[np.uint64]
) -> FloatArray:
    """One standard normal per ``(seed, kind, tick, key)`` (``ticks`` and ``keys`` broadcast).

    A counter-based stream: each value is a pure function of its four
    inputs (SplitMix64 hashes of them, then Box-Muller), so a ticker's draw
    never depends on which other tickers or steps are drawn with it, and a
    whole tick (or a whole bootstrapped past) is a handful of array
    operations instead of one random generator per ticker.
    """
    base = ((seed * _GOLDEN) ^ ((kind + 1) * _MIX1)) & _UINT64
    with np.errstate(over="ignore"):
        per_tick = _splitmix64((ticks + np.uint64(1)) * np.uint64(_MIX2) ^ np.uint64(base))
        mixed = _splitmix64(keys ^ per_tick)
        first = _splitmix64(mixed + np.uint64(_GOLDEN))
        second = _splitmix64(mixed + np.uint64((2 * _GOLDEN) & _UINT64))
    # 53-bit uniforms in (0, 1] and [0, 1).
    u1 = ((first >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (second >> np.uint64(11)).astype(np.float64) * 2.0**-53
    normals: FloatArray = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)
    return normals


def _live_normals(seed: int, kind: int, tick: int, keys: npt.NDArray[np.uint64]) -> FloatArray:
    """One standard normal per key of one live tick (see :func:`_counter_normals`)."""
    return _counter_normals(seed, kind, np.full(1, tick, dtype=np.uint64), keys)


class GbmSimulator(MarketSource):
    """Correlated geometric Brownian motion; see the module docstring.

    ``seed`` (an int >= 0) selects the market's randomness; simulators
    with the same arguments produce the same prices.  ``periods_per_year``
    is the number of ticks per simulated year, in
    [1, :data:`~trio_portfolio.analytics.MAX_PERIODS_PER_YEAR`].
    ``profiles`` replaces the built-in :data:`DEFAULT_PROFILES`; tickers
    missing from it get :func:`default_profile`.  Invalid arguments raise
    :class:`ValueError`.  Instances are immutable.
    """

    def __init__(
        self,
        seed: int = 0,
        periods_per_year: float = DEFAULT_PERIODS_PER_YEAR,
        profiles: Mapping[str, TickerProfile] | None = None,
    ) -> None:
        _require(seed >= 0, f"seed must be >= 0, got {seed!r}")
        _require(
            math.isfinite(periods_per_year) and 1.0 <= periods_per_year <= MAX_PERIODS_PER_YEAR,
            f"periods_per_year must be in [1, {MAX_PERIODS_PER_YEAR:g}], got {periods_per_year!r}",
        )
        self._seed = int(seed)
        self._periods_per_year = float(periods_per_year)
        self._profiles: Mapping[str, TickerProfile] = MappingProxyType(
            dict(DEFAULT_PROFILES if profiles is None else profiles)
        )
        self._terms: dict[str, _LiveTerms] = {}
        self._shared: dict[tuple[int, int, int], FloatArray] = {}

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def periods_per_year(self) -> float:
        return self._periods_per_year

    def profile(self, ticker: str) -> TickerProfile:
        """The ticker's profile: from the table, else :func:`default_profile`."""
        found = self._profiles.get(ticker)
        return default_profile(ticker) if found is None else found

    def correlation_matrix(self, tickers: Sequence[str]) -> FloatArray:
        """The correlation of the tickers' shocks, in the order given.

        Duplicate tickers raise :class:`ValueError` (the matrix would be
        singular and the duplicate meaningless).
        """
        _require(len(set(tickers)) == len(tickers), "tickers must be distinct")
        sectors = [self.profile(t).sector for t in tickers]
        size = len(tickers)
        matrix = np.full((size, size), CROSS_SECTOR_CORRELATION, dtype=np.float64)
        for row, sector in enumerate(sectors):
            for column in range(size):
                if sector != OTHER_SECTOR and sectors[column] == sector:
                    matrix[row, column] = SAME_SECTOR_CORRELATION
        np.fill_diagonal(matrix, 1.0)
        return matrix

    def initial_price(self, ticker: str) -> float:
        return self.profile(ticker).initial_price

    def bootstrap_history(self, ticker: str, length: int) -> list[float]:
        """A past of ``length`` prices ending exactly at the initial price.

        The path is GBM run backwards from the initial price, driven by the
        same factor model as live ticks but by draws of its own (they never
        coincide with any tick's), so bootstrapped histories of different
        tickers are correlated like live prices.  Draws are ordered from
        the newest step back, so a shorter history is the tail of a longer
        one: ``bootstrap_history(t, n) == bootstrap_history(t, m)[-n:]``.
        It also caches what live ticks need of the ticker (the next tick
        draws it; computing that there would cost the tick about 5 µs per
        new ticker, most of a flood's tick).
        """
        _require(length >= 0, f"length must be >= 0, got {length!r}")
        self._live_terms(ticker)
        profile = self.profile(ticker)
        if length <= 1:
            return [profile.initial_price] * length
        steps = length - 1
        sector = None
        if profile.sector != OTHER_SECTOR:
            sector = self._shared_bootstrap_draws(_SECTOR, _stable_key(profile.sector), steps)
        shocks = _mix(
            self._shared_bootstrap_draws(_MARKET, 0, steps),
            sector,
            self._draw(_BOOTSTRAP, _TICKER, 0, _stable_key(ticker), steps),
        )
        drift, scale = self._step_terms(profile)
        backwards = np.cumsum(drift + scale * shocks)
        log_path = math.log(profile.initial_price) - backwards[::-1]
        path = np.clip(np.exp(np.clip(log_path, *_LOG_BOUNDS)), PRICE_FLOOR, PRICE_CEILING)
        prices: list[float] = path.tolist()
        prices.append(profile.initial_price)
        return prices

    def _shared_bootstrap_draws(self, kind: int, key: int, steps: int) -> FloatArray:
        """The market's or a sector's bootstrap draws: the same for every ticker, so cached.

        At most :data:`SHARED_DRAWS_CACHE` entries (one per sector and
        history length); emptied when full.  The arrays are never mutated.
        """
        found = self._shared.get((kind, key, steps))
        if found is None:
            found = self._draw(_BOOTSTRAP, kind, 0, key, steps)
            found.setflags(write=False)
            if len(self._shared) >= SHARED_DRAWS_CACHE:
                self._shared = {}
            self._shared[(kind, key, steps)] = found
        return found

    def next_prices(self, last_prices: Mapping[str, float], tick: int) -> dict[str, float]:
        _require(tick >= 0, f"tick must be >= 0, got {tick!r}")
        if not last_prices:
            return {}
        tickers = list(last_prices)
        last = np.fromiter(last_prices.values(), dtype=np.float64, count=len(tickers))
        bad = ~(np.isfinite(last) & (last > 0))
        if bad.any():
            ticker = tickers[int(np.argmax(bad))]
            raise ValueError(
                f"last price of {ticker!r} must be a finite number > 0, got {last_prices[ticker]!r}"
            )
        terms = [self._live_terms(t) for t in tickers]
        keys = np.fromiter((t.key for t in terms), dtype=np.uint64, count=len(terms))
        sector_keys = np.fromiter((t.sector_key for t in terms), dtype=np.uint64, count=len(terms))
        in_sector = np.fromiter((t.in_sector for t in terms), dtype=bool, count=len(terms))
        drift = np.fromiter((t.drift for t in terms), dtype=np.float64, count=len(terms))
        scale = np.fromiter((t.scale for t in terms), dtype=np.float64, count=len(terms))
        market = _live_normals(self._seed, _MARKET, tick, np.zeros(1, dtype=np.uint64))[0]
        own = _live_normals(self._seed, _TICKER, tick, keys)
        sector = _live_normals(self._seed, _SECTOR, tick, sector_keys)
        shocks = np.where(
            in_sector,
            _mix(market, sector, own),
            _mix(market, None, own),
        )
        log_price = np.clip(np.log(last) + drift + scale * shocks, *_LOG_BOUNDS)
        prices = np.clip(np.exp(log_price), PRICE_FLOOR, PRICE_CEILING)
        return dict(zip(tickers, prices.tolist(), strict=True))

    def _live_terms(self, ticker: str) -> _LiveTerms:
        """What a live tick needs of ``ticker`` (profile, hash keys, step terms), cached.

        The cache holds at most :data:`LIVE_TERMS_CACHE` tickers and is
        emptied when full (a market never prices more than its cap of
        tickers, 10,000 by default, so a full cache means churn, and
        recomputing is only a few microseconds per ticker).  A plain dict,
        replaced rather than mutated in place when cleared, so concurrent
        worker threads at worst compute an entry twice.
        """
        found = self._terms.get(ticker)
        if found is not None:
            return found
        profile = self.profile(ticker)
        drift, scale = self._step_terms(profile)
        in_sector = profile.sector != OTHER_SECTOR
        terms = _LiveTerms(
            key=_stable_key(ticker),
            sector_key=_stable_key(profile.sector) if in_sector else 0,
            in_sector=in_sector,
            drift=drift,
            scale=scale,
        )
        if len(self._terms) >= LIVE_TERMS_CACHE:
            self._terms = {}
        self._terms[ticker] = terms
        return terms

    def _step_terms(self, profile: TickerProfile) -> tuple[float, float]:
        """``((μ - σ²/2)·dt, σ·√dt)``: the mean and scale of one log step."""
        dt = 1.0 / self._periods_per_year
        sigma = profile.volatility
        return (profile.drift - 0.5 * sigma * sigma) * dt, sigma * math.sqrt(dt)

    def _draw(self, phase: int, kind: int, tick: int, key: int, size: int) -> FloatArray:
        """``size`` standard normals from the stream named by the arguments."""
        rng = np.random.default_rng([self._seed, phase, kind, tick, key])
        return rng.standard_normal(size)
