"""The five portfolio metrics as pure functions of one snapshot.

Theory of operation
-------------------
An analysis hands this module one :class:`MetricInputs` (holdings, latest
prices and a price history per held ticker) and gets back plain floats.
Nothing here blocks, performs I/O or keeps state between calls, so the
analysis engine may run the metrics in any order, concurrently or again on
retry, and always gets the same numbers.

Every call goes through one preparation step, :func:`_prepare`, which turns
the inputs into arrays once: market-value weights, the log prices of the
*common window* and its centred log returns.  :func:`compute_all` prepares
once for all five metrics; :func:`compute_metric` prepares for one.  No
metric needs the full covariance matrix: each one is a handful of
matrix-vector products over the returns (``O(N·T)`` for ``N`` holdings and
``T`` returns), e.g. ``(Σw)_i`` is the covariance of ticker ``i`` with the
portfolio's return series.

Definitions (``docs/metrics.md`` has the long form for readers):

* weights ``w_j = q_j p_j / Σ_k q_k p_k`` over the holdings;
* the common window is the last ``n = min_j len(history[j])`` prices, the
  ticks every holding has; a holding without history makes ``n = 0``;
* log returns ``r_j,t = log p_j,t - log p_j,t-1`` over the window; fewer
  than :data:`MIN_WINDOW` prices (two returns) is *too little history*;
* a return series is *effectively riskless* when its volatility is at most
  :data:`RISKLESS_RATIO` times the volatility it would have with all its
  components perfectly correlated (Σ weight × volatility).  Below that the
  number is dominated by rounding noise, so the metric takes its documented
  fallback instead.

Numerical contract: for any valid :class:`MetricInputs` every metric is a
finite float and no metric raises.  Validity is checked when the inputs are
constructed, so an instance that exists is valid.  Weights switch to log
space when market values leave the float range, so they neither overflow
nor underflow; combined return series are rescaled before they are summed
for the same reason.  Every metric depends on quantities only through the
weights, so it is unchanged (up to rounding) when all quantities are scaled
by the same positive factor.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt

from trio_portfolio.models import METRICS

FloatArray = npt.NDArray[np.float64]

_SMALLEST_NORMAL: Final[float] = sys.float_info.min

DEFAULT_PERIODS_PER_YEAR: Final[float] = 252.0
"""One tick is one trading day; 252 trading days make a year.

This is the simulator's notion of time (``GbmSimulator`` uses the same
default), so pass it whenever the history comes from the simulator,
whatever the wall-clock market interval is.  A real feed with another tick
length passes its own ticks per year (one tick per minute of a 6.5-hour,
252-day year is ``252 * 390``).
"""

MAX_PERIODS_PER_YEAR: Final[float] = 1e12
"""Upper bound on ``periods_per_year`` (about 30,000 ticks a second).

Far beyond any real tick rate; it only exists so that an annualised slope
can never overflow to infinity.
"""

MIN_WINDOW: Final[int] = 3
"""Fewest common prices (two returns) for a metric to use the history.

A single return has no variance and a two-point line always fits exactly,
so with less than this every metric takes its documented fallback.
"""

RISKLESS_RATIO: Final[float] = 1e-6
"""Volatility ratio below which a combined return series counts as flat.

A combination of holdings (the portfolio, or the rest of it) whose
volatility is below a millionth of its undiversified volatility is a
near-perfect hedge; its computed variance is then mostly rounding error,
so the metrics fall back rather than divide by noise.
"""


def _check_positive_finite(where: str, value: float) -> None:
    try:
        valid = math.isfinite(value) and value > 0
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"{where} must be a finite number > 0, got {value!r}")


@attrs.frozen
class MetricInputs:
    """Everything the metrics of one analysis may look at.

    ``holdings`` maps each held ticker to its quantity, ``prices`` gives the
    latest price of every held ticker (weights use these), and ``history``
    gives per held ticker its prices oldest to newest on aligned ticks: the
    last element of every series is the same tick.  A history series is
    expected to end with the latest price but this is not required.  Series
    may differ in length or be missing (treated as empty); only the common
    window, the last ``min(len)`` prices, is used.  Entries of ``prices``
    and ``history`` for tickers that are not held are ignored.

    ``periods_per_year`` is the number of ticks per year used to annualise
    momentum; see :data:`DEFAULT_PERIODS_PER_YEAR`.

    Construction raises :class:`ValueError` unless: ``ticker`` is held;
    every quantity, every held ticker's price and every price in a held
    ticker's history is a finite number > 0; and ``periods_per_year`` is
    finite, > 0 and at most :data:`MAX_PERIODS_PER_YEAR`.  Treat the
    mappings as read-only.
    """

    ticker: str
    holdings: dict[str, float]
    prices: dict[str, float]
    history: dict[str, tuple[float, ...]]
    periods_per_year: float = DEFAULT_PERIODS_PER_YEAR

    def __attrs_post_init__(self) -> None:
        _check_scalars(self.ticker, self.holdings, self.prices, self.periods_per_year)
        _check_history(self.holdings, self.history)


def _check_scalars(
    ticker: str,
    holdings: Mapping[str, float],
    prices: Mapping[str, float],
    periods_per_year: float,
) -> None:
    """The :class:`MetricInputs` rules for everything but the history."""
    if ticker not in holdings:
        raise ValueError(f"ticker {ticker!r} is not held")
    for name, quantity in holdings.items():
        _check_positive_finite(f"quantity of {name!r}", quantity)
        if name not in prices:
            raise ValueError(f"no price for held ticker {name!r}")
        _check_positive_finite(f"price of {name!r}", prices[name])
    _check_positive_finite("periods_per_year", periods_per_year)
    if periods_per_year > MAX_PERIODS_PER_YEAR:
        raise ValueError(f"periods_per_year must be at most {MAX_PERIODS_PER_YEAR:g}")


def _check_history(holdings: Iterable[str], history: Mapping[str, Sequence[float]]) -> None:
    """The :class:`MetricInputs` rule for the held tickers' histories."""
    held = [history.get(name, ()) for name in holdings]
    try:
        flat = np.fromiter(
            itertools.chain.from_iterable(held),
            dtype=np.float64,
            count=sum(len(series) for series in held),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"history prices must be numbers: {exc}") from None
    if not (np.isfinite(flat).all() and (flat > 0).all()):
        raise ValueError("history prices must be finite numbers > 0")


@attrs.frozen(eq=False)
class _Prepared:
    """The arrays every metric reads, built once per call.

    Holdings are in sorted ticker order so that results do not depend on
    dict insertion order.  ``returns`` are the centred log returns of the
    common window, one row per holding; they and ``log_prices`` are
    ``None`` when the window is shorter than :data:`MIN_WINDOW`.
    """

    index: int
    log_values: FloatArray
    weights: FloatArray
    log_prices: FloatArray | None
    returns: FloatArray | None
    spreads: FloatArray | None
    periods_per_year: float


def _market_weights(quantities: FloatArray, prices: FloatArray) -> FloatArray:
    """``q p / Σ q p``, exact where the float range allows, else in log space.

    The direct formula is used whenever the total market value is a normal
    float, so ordinary portfolios get the textbook rounding (1:3 gives
    exactly 0.25 and 0.75); values beyond the float range go through
    :func:`_normalise_log`, which cannot overflow or lose every weight to
    underflow.
    """
    with np.errstate(over="ignore"):  # an overflow is detected below
        values = quantities * prices
        total = float(values.sum())
    if _SMALLEST_NORMAL <= total < math.inf:
        weights: FloatArray = values / total
        return weights
    return _normalise_log(np.log(quantities) + np.log(prices))


def _normalise_log(log_values: FloatArray) -> FloatArray:
    """Turn log market values into weights summing to 1, overflow-free.

    Shifting by the maximum makes the largest term exactly 1, so the sum is
    at least 1 and nothing overflows; a term of ``-inf`` gets weight 0.
    """
    shifted = np.exp(log_values - log_values.max())
    total = float(shifted.sum())
    normalised: FloatArray = shifted / total
    return normalised


@attrs.frozen(eq=False)
class _Window:
    """The weight-independent arrays of one set of histories (read-only).

    ``log_prices`` and ``returns`` as in :class:`_Prepared`; ``spreads`` are
    the row norms of ``returns`` (what :func:`_allocation_score` needs),
    ``None`` with them.  Built by :func:`_window`, shared through a
    :class:`HistoryCache` by every analysis that reads the same histories.
    """

    log_prices: FloatArray | None
    returns: FloatArray | None
    spreads: FloatArray | None


def _window(tickers: list[str], history: Mapping[str, Sequence[float]]) -> _Window:
    """Log prices, centred log returns and their norms over the common window."""
    window = min(len(history.get(t, ())) for t in tickers)
    if window < MIN_WINDOW:
        return _Window(log_prices=None, returns=None, spreads=None)
    matrix = np.empty((len(tickers), window), dtype=np.float64)
    for row, name in enumerate(tickers):
        matrix[row] = history[name][-window:]
    log_prices = np.log(matrix, out=matrix)
    returns = np.diff(log_prices, axis=1)
    returns -= returns.mean(axis=1, keepdims=True)
    spreads = np.sqrt(np.einsum("jt,jt->j", returns, returns))
    for array in (log_prices, returns, spreads):
        array.setflags(write=False)
    return _Window(log_prices=log_prices, returns=returns, spreads=spreads)


def _prepare(inputs: MetricInputs) -> _Prepared:
    tickers = sorted(inputs.holdings)
    window = _window(tickers, inputs.history)
    return _prepare_with(
        inputs.ticker, tickers, inputs.holdings, inputs.prices, window, inputs.periods_per_year
    )


def _prepare_with(
    ticker: str,
    tickers: list[str],
    holdings: Mapping[str, float],
    prices: Mapping[str, float],
    window: _Window,
    periods_per_year: float,
) -> _Prepared:
    quantities = np.array([holdings[t] for t in tickers], dtype=np.float64)
    latest = np.array([prices[t] for t in tickers], dtype=np.float64)
    return _Prepared(
        index=tickers.index(ticker),
        log_values=np.log(quantities) + np.log(latest),
        weights=_market_weights(quantities, latest),
        log_prices=window.log_prices,
        returns=window.returns,
        spreads=window.spreads,
        periods_per_year=periods_per_year,
    )


def _combine(weights: FloatArray, returns: FloatArray) -> tuple[FloatArray, FloatArray] | None:
    """Weighted return contributions, rescaled, and their sum.

    Returns ``(contributions, combined)`` where row ``j`` of
    ``contributions`` is ``weights[j] * returns[j]`` divided by the largest
    absolute entry, and ``combined`` is their column sum; ``None`` when the
    combination is effectively riskless (:data:`RISKLESS_RATIO`).  The
    metrics built on this are ratios, so the common rescaling changes
    nothing except that tiny weights can no longer underflow the sums.
    """
    contributions = weights[:, np.newaxis] * returns
    scale = float(np.abs(contributions).max())
    if scale == 0.0:
        return None
    contributions /= scale
    combined: FloatArray = contributions.sum(axis=0)
    undiversified = float(np.sqrt(np.einsum("jt,jt->j", contributions, contributions)).sum())
    if float(np.sqrt(combined @ combined)) <= RISKLESS_RATIO * undiversified:
        return None
    return contributions, combined


def _concentration(s: _Prepared) -> float:
    return float(s.weights[s.index])


def _portfolio_risk(s: _Prepared) -> float:
    """Euler risk share ``w_i cov(r_i, r_p) / var(r_p)`` of the ticker.

    With ``r_p = Σ w_j r_j`` this equals ``w_i (Σw)_i / (w'Σw)`` and the
    shares of all holdings sum to 1.  Fallbacks: 1.0 for a single holding;
    the weight when history is too short or the portfolio is effectively
    riskless (weights also sum to 1, so the shares still do).
    """
    weight = float(s.weights[s.index])
    if len(s.weights) == 1:
        return 1.0
    if s.returns is None:
        return weight
    combined = _combine(s.weights, s.returns)
    if combined is None:
        return weight
    contributions, portfolio = combined
    return float(contributions[s.index] @ portfolio) / float(portfolio @ portfolio)


def _correlation(s: _Prepared) -> float:
    """Pearson correlation of the ticker with the rest of the portfolio.

    The rest is the value-weighted basket of the other holdings with its
    weights renormalised to sum to 1.  Fallback 0.0 (no measurable linear
    relation) for a single holding, too little history, a flat ticker or an
    effectively riskless basket.
    """
    if len(s.weights) == 1 or s.returns is None:
        return 0.0
    own = s.returns[s.index]
    own_scale = float(np.abs(own).max())
    if own_scale == 0.0:
        return 0.0
    others = s.log_values.copy()
    others[s.index] = -np.inf
    combined = _combine(_normalise_log(others), s.returns)
    if combined is None:
        return 0.0
    basket = combined[1]
    own = own / own_scale
    denominator = float(np.sqrt(own @ own)) * float(np.sqrt(basket @ basket))
    return min(1.0, max(-1.0, float(own @ basket) / denominator))


def _momentum(s: _Prepared) -> float:
    """Annualised OLS slope of the ticker's log price, times its weight.

    The slope is the trend's continuously compounded growth per tick;
    multiplying by ``periods_per_year`` annualises it and by the weight
    expresses it as the position's contribution to portfolio trend.
    Fallback 0.0 when history is too short.
    """
    if s.log_prices is None:
        return 0.0
    series = s.log_prices[s.index]
    steps = np.arange(series.size, dtype=np.float64)
    steps -= steps.mean()
    slope = float(steps @ (series - series.mean())) / float(steps @ steps)
    return slope * s.periods_per_year * float(s.weights[s.index])


def _allocation_score(s: _Prepared) -> float:
    """Inverse-volatility target weight minus current weight.

    Targets are ``(1/σ_i) / Σ_j (1/σ_j)``.  When history is too short or
    any holding's volatility is zero the inverse-volatility target does not
    exist and the target is equal weights ``1/N``.  Volatilities enter only
    as ratios, computed as ``min σ / σ_j`` so that nothing overflows.
    """
    count = len(s.weights)
    weight = float(s.weights[s.index])
    spreads = s.spreads
    if spreads is None:
        return 1.0 / count - weight
    smallest = float(spreads.min())
    if smallest == 0.0:
        return 1.0 / count - weight
    inverse = smallest / spreads
    return float(inverse[s.index]) / float(inverse.sum()) - weight


_METRIC_FUNCTIONS: Final[Mapping[str, Callable[[_Prepared], float]]] = MappingProxyType(
    {
        "portfolio_risk": _portfolio_risk,
        "concentration": _concentration,
        "correlation": _correlation,
        "momentum": _momentum,
        "allocation_score": _allocation_score,
    }
)


def compute_metric(metric: str, inputs: MetricInputs) -> float:
    """Compute one metric of :data:`trio_portfolio.models.METRICS`.

    Raises :class:`ValueError` for an unknown metric name and for nothing
    else: the result is always a finite float.
    """
    try:
        function = _METRIC_FUNCTIONS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}") from None
    return function(_prepare(inputs))


def compute_all(inputs: MetricInputs) -> dict[str, float]:
    """Compute every metric, in :data:`~trio_portfolio.models.METRICS` order.

    Cheaper than five :func:`compute_metric` calls: the history is turned
    into arrays once and shared by all five.
    """
    prepared = _prepare(inputs)
    return {metric: _METRIC_FUNCTIONS[metric](prepared) for metric in METRICS}


DEFAULT_HISTORY_CACHE_ENTRIES: Final[int] = 64
"""Windows a :class:`HistoryCache` keeps by default.

Between two market ticks every analysis of the same set of held tickers
reads the same histories, so one entry serves them all; distinct holdings
sets each take one.  An entry of 100 holdings x 256 ticks is about 400 KB,
so the default bounds the cache at about 26 MB in the worst case and a
few KB for the default three-ticker portfolio.
"""


@attrs.frozen
class HistoryCacheStatistics:
    """What :meth:`HistoryCache.statistics` reports."""

    entries: int
    capacity: int
    hits: int
    misses: int


class HistoryCache:
    """A bounded, thread-safe LRU of the weight-independent metric arrays.

    The key is ``(held tickers, history_key)`` where ``history_key`` is the
    caller's fingerprint of the histories (the packed strings read from the
    store, or the market tick that wrote them): equal keys must mean equal
    histories.  What is cached is derived from the histories alone (log
    prices, centred returns, their norms), never from quantities or prices,
    so a hit gives exactly the numbers a fresh :func:`compute_all` gives.
    Owned by whoever creates it (one per server process is the intent);
    worker threads and the event loop may share one.  At most ``capacity``
    entries, least recently used dropped first.  Raises :class:`ValueError`
    for a capacity below 1.
    """

    def __init__(self, capacity: int = DEFAULT_HISTORY_CACHE_ENTRIES) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._entries: OrderedDict[Hashable, _Window] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def statistics(self) -> HistoryCacheStatistics:
        with self._lock:
            return HistoryCacheStatistics(
                entries=len(self._entries),
                capacity=self._capacity,
                hits=self._hits,
                misses=self._misses,
            )

    def _get(self, key: Hashable) -> _Window | None:
        with self._lock:
            window = self._entries.get(key)
            if window is None:
                self._misses += 1
            else:
                self._hits += 1
                self._entries.move_to_end(key)
            return window

    def _put(self, key: Hashable, window: _Window) -> None:
        with self._lock:
            self._entries[key] = window
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


def cache_key(holdings: Iterable[str], fingerprint: Hashable) -> Hashable:
    """The :class:`HistoryCache` key of a computation (for ``key in cache``)."""
    return (tuple(sorted(holdings)), fingerprint)


def compute_all_shared(
    ticker: str,
    holdings: Mapping[str, float],
    prices: Mapping[str, float],
    *,
    fingerprint: Hashable,
    load_history: Callable[[], Mapping[str, Sequence[float]]],
    cache: HistoryCache,
    periods_per_year: float = DEFAULT_PERIODS_PER_YEAR,
) -> dict[str, float]:
    """:func:`compute_all` with the history arrays shared through ``cache``.

    Same result, bit for bit, as ``compute_all(MetricInputs(ticker,
    holdings, prices, load_history(), periods_per_year))``, and the same
    :class:`ValueError` for invalid inputs; but ``load_history`` (e.g. the
    decoding of packed histories) runs, and the history is validated and
    turned into arrays, only when ``(held tickers, fingerprint)`` is not
    cached yet.  ``fingerprint`` must determine the held tickers'
    histories (the packed strings themselves are a safe choice).
    Quantities and prices are checked on every call.
    """
    _check_scalars(ticker, holdings, prices, periods_per_year)
    tickers = sorted(holdings)
    key = cache_key(tickers, fingerprint)
    window = cache._get(key)
    if window is None:
        history = load_history()
        _check_history(tickers, history)
        window = _window(tickers, history)
        cache._put(key, window)
    prepared = _prepare_with(ticker, tickers, holdings, prices, window, periods_per_year)
    return {metric: _METRIC_FUNCTIONS[metric](prepared) for metric in METRICS}
