"""The five metrics: hand-computed values, edge cases and properties.

Rules of this suite: plain synchronous tests, no I/O.  Expected values are
worked out by hand (in comments) or by the plain-Python reference below,
which shares no code with ``trio_portfolio.analytics``; properties run
under hypothesis with a small ``max_examples`` so the suite stays quick.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_portfolio.analytics import (
    DEFAULT_PERIODS_PER_YEAR,
    MetricInputs,
    compute_all,
    compute_metric,
)
from trio_portfolio.models import METRICS

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None)


def metrics_of_all(
    holdings: dict[str, float],
    prices: dict[str, float],
    history: dict[str, tuple[float, ...]],
    periods_per_year: float = DEFAULT_PERIODS_PER_YEAR,
) -> dict[str, dict[str, float]]:
    """compute_all for every held ticker, keyed by ticker."""
    return {
        ticker: compute_all(MetricInputs(ticker, holdings, prices, history, periods_per_year))
        for ticker in holdings
    }


# --- hand-computed two-holding case -----------------------------------------
#
# A: 10 shares at 30 = 300, B: 4 shares at 25 = 100  =>  w = (0.75, 0.25).
# Log prices are chosen so the log returns are round numbers:
#   A returns (0.01, -0.01, 0.03): mean 0.01, deviations (0, -0.02, 0.02)
#   B returns (0.04, 0.00, -0.04): mean 0,    deviations (0.04, 0, -0.04)
# Sample covariances (divide by 2):
#   var A = (0 + 4 + 4)e-4 / 2 = 4e-4       (σ_A = 0.02)
#   var B = (16 + 0 + 16)e-4 / 2 = 16e-4    (σ_B = 0.04)
#   cov   = (0 + 0 - 8)e-4 / 2 = -4e-4
# Σw = (0.75·4 - 0.25·4, -0.75·4 + 0.25·16)e-4 = (2, 1)e-4
# w'Σw = (0.75·2 + 0.25·1)e-4 = 1.75e-4
#   risk A = 0.75·2 / 1.75 = 6/7, risk B = 0.25·1 / 1.75 = 1/7
#   correlation (the rest of the portfolio is the other ticker) = -4 / (2·4) = -0.5
# Momentum: x = 0..3 centred (-1.5, -0.5, 0.5, 1.5), Σx² = 5.
#   A log prices (+const) (0, 0.01, 0, 0.03): Σx·y = 0.04, slope 0.008 per tick,
#   annualised 0.008·252 = 2.016, times w 0.75 = 1.512.
#   B log prices (0, 0.04, 0.04, 0) are symmetric: slope 0.
# Allocation: 1/σ = (50, 25) => target (2/3, 1/3); scores 2/3 - 3/4 = -1/12, +1/12.

HAND_HOLDINGS = {"A": 10.0, "B": 4.0}
HAND_PRICES = {"A": 30.0, "B": 25.0}
HAND_HISTORY = {
    "A": tuple(30.0 * math.exp(y - 0.03) for y in (0.0, 0.01, 0.0, 0.03)),
    "B": tuple(25.0 * math.exp(y) for y in (0.0, 0.04, 0.04, 0.0)),
}
HAND_EXPECTED = {
    "A": {
        "concentration": 0.75,
        "portfolio_risk": 6 / 7,
        "correlation": -0.5,
        "momentum": 1.512,
        "allocation_score": -1 / 12,
    },
    "B": {
        "concentration": 0.25,
        "portfolio_risk": 1 / 7,
        "correlation": -0.5,
        "momentum": 0.0,
        "allocation_score": 1 / 12,
    },
}


@pytest.mark.parametrize("ticker", ["A", "B"])
@pytest.mark.parametrize("metric", METRICS)
def test_hand_computed_two_holdings(ticker: str, metric: str) -> None:
    inputs = MetricInputs(ticker, HAND_HOLDINGS, HAND_PRICES, HAND_HISTORY)
    expected = HAND_EXPECTED[ticker][metric]
    assert compute_metric(metric, inputs) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_compute_all_matches_compute_metric_in_metrics_order() -> None:
    inputs = MetricInputs("A", HAND_HOLDINGS, HAND_PRICES, HAND_HISTORY)
    result = compute_all(inputs)
    assert tuple(result) == METRICS
    for metric in METRICS:
        assert result[metric] == compute_metric(metric, inputs)


# --- a plain-Python reference for the general case ---------------------------


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _cov(xs: list[float], ys: list[float]) -> float:
    mx, my = _mean(xs), _mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / (len(xs) - 1)


def reference(
    ticker: str,
    holdings: dict[str, float],
    prices: dict[str, float],
    history: dict[str, tuple[float, ...]],
    periods_per_year: float,
) -> dict[str, float]:
    """The metric definitions written out with lists and loops.

    Only for inputs with a window of at least three prices, more than one
    holding and no degenerate variances: the fallbacks are tested apart.
    """
    names = list(holdings)
    total = sum(holdings[n] * prices[n] for n in names)
    w = {n: holdings[n] * prices[n] / total for n in names}
    window = min(len(history[n]) for n in names)
    logs = {n: [math.log(p) for p in history[n][-window:]] for n in names}
    rets = {n: [b - a for a, b in zip(logs[n], logs[n][1:], strict=False)] for n in names}
    cov = {(a, b): _cov(rets[a], rets[b]) for a in names for b in names}
    sigma_w = {a: sum(cov[a, b] * w[b] for b in names) for a in names}
    port_var = sum(w[a] * sigma_w[a] for a in names)
    others = [n for n in names if n != ticker]
    rest = sum(w[n] for n in others)
    basket = [sum(w[n] / rest * rets[n][t] for n in others) for t in range(window - 1)]
    correlation = _cov(rets[ticker], basket) / math.sqrt(
        _cov(rets[ticker], rets[ticker]) * _cov(basket, basket)
    )
    xs = [float(i) for i in range(window)]
    slope = _cov(xs, logs[ticker]) / _cov(xs, xs)
    inverse_vol = {n: 1.0 / math.sqrt(cov[n, n]) for n in names}
    target = inverse_vol[ticker] / sum(inverse_vol.values())
    return {
        "portfolio_risk": w[ticker] * sigma_w[ticker] / port_var,
        "concentration": w[ticker],
        "correlation": correlation,
        "momentum": slope * periods_per_year * w[ticker],
        "allocation_score": target - w[ticker],
    }


REF_HOLDINGS = {"AAPL": 12.0, "MSFT": 3.5, "XOM": 40.0}
REF_PRICES = {"AAPL": 191.0, "MSFT": 420.0, "XOM": 113.0}
REF_HISTORY = {
    # Uneven lengths: only the last five ticks are common.
    "AAPL": (170.0, 180.0, 185.0, 183.0, 188.0, 186.5, 190.0, 191.0),
    "MSFT": (410.0, 402.0, 415.0, 418.0, 420.0),
    "XOM": (100.0, 120.0, 118.0, 110.0, 112.0, 115.0, 113.0),
}


@pytest.mark.parametrize("ticker", sorted(REF_HOLDINGS))
@pytest.mark.parametrize("periods_per_year", [252.0, 365.0 * 24 * 120])
def test_matches_plain_python_reference(ticker: str, periods_per_year: float) -> None:
    inputs = MetricInputs(ticker, REF_HOLDINGS, REF_PRICES, REF_HISTORY, periods_per_year)
    expected = reference(ticker, REF_HOLDINGS, REF_PRICES, REF_HISTORY, periods_per_year)
    assert compute_all(inputs) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_only_the_common_window_is_used() -> None:
    truncated = {name: series[-5:] for name, series in REF_HISTORY.items()}
    assert metrics_of_all(REF_HOLDINGS, REF_PRICES, REF_HISTORY) == metrics_of_all(
        REF_HOLDINGS, REF_PRICES, truncated
    )


def test_result_does_not_depend_on_dict_order() -> None:
    reversed_holdings = dict(reversed(REF_HOLDINGS.items()))
    assert metrics_of_all(REF_HOLDINGS, REF_PRICES, REF_HISTORY) == metrics_of_all(
        reversed_holdings, REF_PRICES, REF_HISTORY
    )


def test_entries_for_tickers_not_held_are_ignored() -> None:
    prices = {**REF_PRICES, "TSLA": 200.0}
    history = {**REF_HISTORY, "TSLA": (1.0, 2.0)}
    assert metrics_of_all(REF_HOLDINGS, REF_PRICES, REF_HISTORY) == metrics_of_all(
        REF_HOLDINGS, prices, history
    )


def test_momentum_scales_with_periods_per_year() -> None:
    daily = compute_metric("momentum", MetricInputs("A", HAND_HOLDINGS, HAND_PRICES, HAND_HISTORY))
    weekly = compute_metric(
        "momentum", MetricInputs("A", HAND_HOLDINGS, HAND_PRICES, HAND_HISTORY, 52.0)
    )
    assert weekly == pytest.approx(daily * 52.0 / 252.0)


# --- documented fallbacks ------------------------------------------------------


def test_single_holding() -> None:
    # Log prices rise 0.01 a tick: slope 0.01, annualised 2.52, weight 1.
    history = {"A": tuple(50.0 * math.exp(0.01 * i) for i in range(5))}
    result = compute_all(MetricInputs("A", {"A": 3.0}, {"A": history["A"][-1]}, history))
    assert result == pytest.approx(
        {
            "portfolio_risk": 1.0,
            "concentration": 1.0,
            "correlation": 0.0,
            "momentum": 2.52,
            "allocation_score": 0.0,
        }
    )


@pytest.mark.parametrize(
    "history",
    [
        pytest.param({}, id="missing"),
        pytest.param({"A": (), "B": (), "C": ()}, id="empty"),
        pytest.param({"A": (1.0, 2.0), "B": (3.0, 4.0), "C": (5.0, 6.0)}, id="one-return"),
        pytest.param({"A": (1.0, 2.0, 3.0), "B": (3.0, 4.0, 5.0), "C": ()}, id="one-empty"),
    ],
)
def test_too_little_history_falls_back(history: dict[str, tuple[float, ...]]) -> None:
    holdings = {"A": 1.0, "B": 1.0, "C": 2.0}
    prices = {"A": 10.0, "B": 10.0, "C": 10.0}  # w = (0.25, 0.25, 0.5)
    result = metrics_of_all(holdings, prices, history)
    for ticker, weight in {"A": 0.25, "B": 0.25, "C": 0.5}.items():
        assert result[ticker] == pytest.approx(
            {
                "portfolio_risk": weight,
                "concentration": weight,
                "correlation": 0.0,
                "momentum": 0.0,
                "allocation_score": 1 / 3 - weight,
            }
        )


def test_constant_prices_fall_back() -> None:
    holdings = {"A": 1.0, "B": 3.0}
    prices = {"A": 10.0, "B": 10.0}
    history: dict[str, tuple[float, ...]] = {"A": (10.0,) * 6, "B": (10.0,) * 6}
    result = metrics_of_all(holdings, prices, history)
    assert result["A"] == {
        "portfolio_risk": 0.25,
        "concentration": 0.25,
        "correlation": 0.0,
        "momentum": 0.0,
        "allocation_score": 0.25,
    }


def test_one_flat_holding_makes_the_target_equal_weights() -> None:
    holdings = {"A": 1.0, "B": 1.0, "C": 2.0}
    prices = {"A": 10.0, "B": 10.0, "C": 10.0}
    history: dict[str, tuple[float, ...]] = {
        "A": (10.0, 11.0, 10.5, 12.0),
        "B": (10.0, 9.0, 9.5, 10.0),
        "C": (10.0,) * 4,
    }
    result = metrics_of_all(holdings, prices, history)
    assert result["A"]["allocation_score"] == pytest.approx(1 / 3 - 0.25)
    assert result["C"]["allocation_score"] == pytest.approx(1 / 3 - 0.5)
    assert result["C"]["correlation"] == 0.0  # a flat ticker has no correlation


def test_perfect_hedge_falls_back_to_weights() -> None:
    # A rises exactly when B falls, equal values: the portfolio never moves.
    holdings = {"A": 1.0, "B": 1.0}
    prices = {"A": 10.0, "B": 10.0}
    history: dict[str, tuple[float, ...]] = {
        "A": (10.0, 20.0, 10.0, 20.0, 10.0),
        "B": (10.0, 5.0, 10.0, 5.0, 10.0),
    }
    result = metrics_of_all(holdings, prices, history)
    assert result["A"]["portfolio_risk"] == 0.5
    assert result["B"]["portfolio_risk"] == 0.5
    assert result["A"]["correlation"] == pytest.approx(-1.0)


# --- invalid inputs --------------------------------------------------------------


def test_unknown_metric_is_a_value_error() -> None:
    inputs = MetricInputs("A", HAND_HOLDINGS, HAND_PRICES, HAND_HISTORY)
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metric("sharpe", inputs)


ONE = {"A": 1.0}


@pytest.mark.parametrize(
    ("ticker", "holdings", "prices", "history", "periods_per_year", "match"),
    [
        pytest.param("Z", ONE, ONE, {}, 252.0, "not held", id="not-held"),
        pytest.param("A", {"A": 0.0}, ONE, {}, 252.0, "quantity", id="zero-qty"),
        pytest.param("A", {"A": -1.0}, ONE, {}, 252.0, "quantity", id="negative-qty"),
        pytest.param("A", {"A": math.nan}, ONE, {}, 252.0, "quantity", id="nan-qty"),
        pytest.param("A", ONE, {}, {}, 252.0, "no price", id="no-price"),
        pytest.param("A", ONE, {"A": math.inf}, {}, 252.0, "price", id="inf-price"),
        pytest.param("A", ONE, ONE, {"A": (1.0, 0.0)}, 252.0, "history", id="zero-history"),
        pytest.param("A", ONE, ONE, {"A": (math.nan,)}, 252.0, "history", id="nan-history"),
        pytest.param("A", ONE, ONE, {}, 0.0, "periods_per_year", id="zero-periods"),
        pytest.param("A", ONE, ONE, {}, math.inf, "periods_per_year", id="inf-periods"),
        pytest.param("A", ONE, ONE, {}, 1e13, "periods_per_year", id="huge-periods"),
    ],
)
def test_invalid_inputs_are_rejected_at_construction(
    ticker: str,
    holdings: dict[str, float],
    prices: dict[str, float],
    history: dict[str, tuple[float, ...]],
    periods_per_year: float,
    match: str,
) -> None:
    with pytest.raises(ValueError, match=match):
        MetricInputs(ticker, holdings, prices, history, periods_per_year)


# --- properties ------------------------------------------------------------------

NAMES = ("AAPL", "MSFT", "XOM", "JPM", "TSLA", "KO")


@st.composite
def portfolios(draw: st.DrawFn, magnitude: float = 1e6) -> MetricInputs:
    """Arbitrary valid inputs: 1-6 holdings, ragged, empty, flat or wild histories."""
    positive = st.floats(min_value=1.0 / magnitude, max_value=magnitude)
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    holdings = {name: draw(positive) for name in names}
    prices = {name: draw(positive) for name in names}
    price_values = st.one_of(positive, st.sampled_from([1.0, 2.0, 0.5, 3.0]))
    history: dict[str, tuple[float, ...]] = {}
    for name in names:
        series = draw(
            st.one_of(
                st.lists(price_values, max_size=12),
                st.builds(lambda p, n: [p] * n, price_values, st.integers(0, 12)),
            )
        )
        history[name] = tuple(series)
    periods_per_year = draw(st.sampled_from([1.0, 252.0, 365.0 * 24 * 120]))
    return MetricInputs(draw(st.sampled_from(names)), holdings, prices, history, periods_per_year)


def _for_every_ticker(inputs: MetricInputs) -> dict[str, dict[str, float]]:
    return metrics_of_all(inputs.holdings, inputs.prices, inputs.history, inputs.periods_per_year)


@PROPERTY_SETTINGS
@given(portfolios())
def test_weights_sum_to_one(inputs: MetricInputs) -> None:
    result = _for_every_ticker(inputs)
    assert math.fsum(r["concentration"] for r in result.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(0.0 <= r["concentration"] <= 1.0 for r in result.values())


@PROPERTY_SETTINGS
@given(portfolios())
def test_risk_shares_sum_to_one(inputs: MetricInputs) -> None:
    result = _for_every_ticker(inputs)
    assert math.fsum(r["portfolio_risk"] for r in result.values()) == pytest.approx(1.0, abs=1e-6)


@PROPERTY_SETTINGS
@given(portfolios())
def test_allocation_scores_sum_to_zero(inputs: MetricInputs) -> None:
    result = _for_every_ticker(inputs)
    assert math.fsum(r["allocation_score"] for r in result.values()) == pytest.approx(0.0, abs=1e-9)


@PROPERTY_SETTINGS
@given(portfolios())
def test_correlation_is_bounded(inputs: MetricInputs) -> None:
    assert -1.0 <= compute_metric("correlation", inputs) <= 1.0


@PROPERTY_SETTINGS
@given(portfolios(), st.floats(min_value=1e-6, max_value=1e6))
def test_scaling_all_quantities_changes_nothing(inputs: MetricInputs, factor: float) -> None:
    scaled = MetricInputs(
        inputs.ticker,
        {name: quantity * factor for name, quantity in inputs.holdings.items()},
        inputs.prices,
        inputs.history,
        inputs.periods_per_year,
    )
    before, after = compute_all(inputs), compute_all(scaled)
    for metric in METRICS:
        assert after[metric] == pytest.approx(before[metric], rel=1e-6, abs=1e-9), metric


@PROPERTY_SETTINGS
@given(st.one_of(portfolios(), portfolios(magnitude=1e300)))
def test_every_metric_is_finite(inputs: MetricInputs) -> None:
    result = compute_all(inputs)
    assert all(math.isfinite(value) for value in result.values()), result
    assert all(type(value) is float for value in result.values())
