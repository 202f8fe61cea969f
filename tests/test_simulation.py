"""The market simulator: determinism, the configured statistics, the interface.

Rules of this suite: plain synchronous tests, no I/O except one child
Python process that checks results do not depend on hash salting.  The
statistical tests use fixed seeds, so they are deterministic; their
tolerances are several standard errors wide so that any seed would pass.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_portfolio.analytics import DEFAULT_PERIODS_PER_YEAR
from trio_portfolio.simulation import (
    CROSS_SECTOR_CORRELATION,
    DEFAULT_DRIFT,
    DEFAULT_PRICE_RANGE,
    DEFAULT_PROFILES,
    DEFAULT_VOLATILITY,
    OTHER_SECTOR,
    PRICE_CEILING,
    PRICE_FLOOR,
    SAME_SECTOR_CORRELATION,
    GbmSimulator,
    MarketSource,
    TickerProfile,
    default_profile,
)

LIVE_TICKERS = ("AAPL", "MSFT", "XOM", "ACME", "ZZZQ")  # two unknown, "other" sector
LIVE_TICKS = 20_000


@pytest.fixture(scope="module")
def live_log_returns() -> np.ndarray:
    """Log returns of LIVE_TICKS ticks of next_prices, one column per ticker."""
    simulator = GbmSimulator(seed=7)
    prices = {t: simulator.initial_price(t) for t in LIVE_TICKERS}
    path = np.empty((LIVE_TICKS + 1, len(LIVE_TICKERS)))
    path[0] = list(prices.values())
    for tick in range(LIVE_TICKS):
        prices = simulator.next_prices(prices, tick)
        path[tick + 1] = list(prices.values())
    assert np.all(np.isfinite(path))
    assert np.all(path > 0)
    return np.diff(np.log(path), axis=0)


def test_live_correlations_match_the_sector_model(live_log_returns: np.ndarray) -> None:
    # Standard error of a sample correlation is about (1 - ρ²)/√n < 0.007 here.
    expected = GbmSimulator().correlation_matrix(LIVE_TICKERS)
    sample = np.corrcoef(live_log_returns, rowvar=False)
    np.testing.assert_allclose(sample, expected, atol=0.035)


def test_live_volatility_matches_profiles(live_log_returns: np.ndarray) -> None:
    # Relative standard error of a sample deviation is 1/√(2n) = 0.5 % here.
    simulator = GbmSimulator()
    sample = live_log_returns.std(axis=0, ddof=1) * math.sqrt(DEFAULT_PERIODS_PER_YEAR)
    expected = [simulator.profile(t).volatility for t in LIVE_TICKERS]
    np.testing.assert_allclose(sample, expected, rtol=0.03)


def test_bootstrap_matches_volatility_and_correlation() -> None:
    # 100k steps = 397 simulated years: standard errors below 0.003 for the
    # correlations and 0.3 % for the volatilities.  μ = σ²/2 keeps log prices
    # driftless, so the paths stay well inside the price guard rails.
    profiles = {
        "ONE": TickerProfile(0.02, 0.2, "tech", 1000.0),
        "TWO": TickerProfile(0.045, 0.3, "tech", 1000.0),
        "AWAY": TickerProfile(0.005, 0.1, "energy", 1000.0),
    }
    simulator = GbmSimulator(seed=11, profiles=profiles)
    paths = np.array([simulator.bootstrap_history(t, 100_001) for t in profiles])
    assert paths.min() > PRICE_FLOOR
    assert paths.max() < PRICE_CEILING
    returns = np.diff(np.log(paths), axis=1).T
    annual_vol = returns.std(axis=0, ddof=1) * math.sqrt(DEFAULT_PERIODS_PER_YEAR)
    np.testing.assert_allclose(annual_vol, [p.volatility for p in profiles.values()], rtol=0.015)
    np.testing.assert_allclose(
        np.corrcoef(returns, rowvar=False), simulator.correlation_matrix(list(profiles)), atol=0.015
    )


def test_bootstrap_matches_drift() -> None:
    # 60 simulated years: the annual mean log return μ - σ²/2 = 0.295 has a
    # standard error of σ/√60 = 0.013.
    simulator = GbmSimulator(seed=12, profiles={"UP": TickerProfile(0.3, 0.1, "x", 1000.0)})
    history = simulator.bootstrap_history("UP", 60 * 252 + 1)
    annual_mean = math.log(history[-1] / history[0]) / 60
    assert annual_mean == pytest.approx(0.3 - 0.1**2 / 2, abs=0.06)


def test_prices_stay_within_the_guard_rails() -> None:
    simulator = GbmSimulator(profiles={"ROCKET": TickerProfile(10.0, 0.0, "x", 1e11)})
    for last in (0.99 * PRICE_CEILING, PRICE_CEILING):  # one step grows 4 %
        price = simulator.next_prices({"ROCKET": last}, 0)["ROCKET"]
        assert price <= PRICE_CEILING
        assert price == pytest.approx(PRICE_CEILING, rel=1e-12)
    history = simulator.bootstrap_history("ROCKET", 10_000)
    assert min(history) >= PRICE_FLOOR
    assert history[0] == pytest.approx(PRICE_FLOOR, rel=1e-12)


# --- determinism ---------------------------------------------------------------


def _run(simulator: GbmSimulator, tickers: tuple[str, ...], ticks: int) -> list[dict[str, float]]:
    prices = {t: simulator.initial_price(t) for t in tickers}
    out = []
    for tick in range(ticks):
        prices = simulator.next_prices(prices, tick)
        out.append(prices)
    return out


def test_same_seed_same_prices() -> None:
    tickers = ("AAPL", "GOOGL", "ACME")
    assert _run(GbmSimulator(seed=3), tickers, 50) == _run(GbmSimulator(seed=3), tickers, 50)
    assert GbmSimulator(seed=3).bootstrap_history("ACME", 30) == GbmSimulator(
        seed=3
    ).bootstrap_history("ACME", 30)


def test_distinct_seeds_differ() -> None:
    tickers = ("AAPL", "GOOGL", "ACME")
    first, second = _run(GbmSimulator(seed=1), tickers, 5), _run(GbmSimulator(seed=2), tickers, 5)
    for a, b in zip(first, second, strict=True):
        assert all(a[t] != b[t] for t in tickers)
    assert (
        GbmSimulator(seed=1).bootstrap_history("AAPL", 5)[:-1]
        != GbmSimulator(seed=2).bootstrap_history("AAPL", 5)[:-1]
    )


def test_distinct_ticks_differ() -> None:
    simulator = GbmSimulator()
    assert simulator.next_prices({"AAPL": 100.0}, 1) != simulator.next_prices({"AAPL": 100.0}, 2)


def test_a_price_does_not_depend_on_the_other_tickers() -> None:
    simulator = GbmSimulator(seed=4)
    alone = simulator.next_prices({"MSFT": 400.0}, 9)
    crowded = simulator.next_prices({"NVDA": 120.0, "ACME": 30.0, "MSFT": 400.0}, 9)
    assert crowded["MSFT"] == alone["MSFT"]
    assert list(crowded) == ["NVDA", "ACME", "MSFT"]


_CHILD = """
import json
from trio_portfolio.simulation import GbmSimulator, default_profile
sim = GbmSimulator(seed=5)
print(json.dumps([
    sim.bootstrap_history("ACME", 4),
    sim.next_prices({"AAPL": 190.0, "ACME": 33.0}, 12),
    default_profile("ACME").initial_price,
]))
"""


def test_results_do_not_depend_on_hash_salting() -> None:
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    sim = GbmSimulator(seed=5)
    assert json.loads(child.stdout) == [
        sim.bootstrap_history("ACME", 4),
        sim.next_prices({"AAPL": 190.0, "ACME": 33.0}, 12),
        default_profile("ACME").initial_price,
    ]


# --- bootstrap history ------------------------------------------------------------


@pytest.mark.parametrize("ticker", ["AAPL", "ACME"])
@pytest.mark.parametrize("length", [0, 1, 2, 256])
def test_bootstrap_shape(ticker: str, length: int) -> None:
    simulator = GbmSimulator(seed=2)
    history = simulator.bootstrap_history(ticker, length)
    assert len(history) == length
    assert all(math.isfinite(p) and p > 0 for p in history)
    if length:
        assert history[-1] == simulator.initial_price(ticker)


def test_shorter_bootstrap_is_the_tail_of_a_longer_one() -> None:
    simulator = GbmSimulator(seed=8)
    assert simulator.bootstrap_history("TSLA", 300)[-40:] == simulator.bootstrap_history("TSLA", 40)


def test_zero_volatility_grows_at_the_drift() -> None:
    simulator = GbmSimulator(profiles={"BOND": TickerProfile(0.0504, 0.0, "fixed", 100.0)})
    assert simulator.next_prices({"BOND": 100.0}, 0)["BOND"] == pytest.approx(
        100.0 * math.exp(0.0504 / 252)
    )
    history = simulator.bootstrap_history("BOND", 253)
    assert history[0] == pytest.approx(100.0 * math.exp(-0.0504))


# --- profiles and the correlation model --------------------------------------------


def test_default_profile_is_stable_and_documented() -> None:
    profile = default_profile("ZZZZ")
    assert profile == TickerProfile(DEFAULT_DRIFT, DEFAULT_VOLATILITY, OTHER_SECTOR, 399.79)
    low, high = DEFAULT_PRICE_RANGE
    prices = [default_profile(f"T{i}").initial_price for i in range(500)]
    assert all(low <= p <= high for p in prices)
    assert len(set(prices)) > 450  # spread out, not one price for all


def test_profiles_table_and_override() -> None:
    assert GbmSimulator().profile("AAPL") == DEFAULT_PROFILES["AAPL"]
    own = TickerProfile(0.0, 0.1, "tech", 12.5)
    simulator = GbmSimulator(profiles={"AAPL": own})
    assert simulator.profile("AAPL") == own
    assert simulator.profile("MSFT") == default_profile("MSFT")  # replaced, not merged
    assert simulator.initial_price("AAPL") == 12.5


def test_correlation_matrix_follows_sectors_and_is_positive_definite() -> None:
    simulator = GbmSimulator()
    tickers = [*DEFAULT_PROFILES, "ACME", "ZZZQ"]
    matrix = simulator.correlation_matrix(tickers)
    sectors = [simulator.profile(t).sector for t in tickers]
    for i, a in enumerate(sectors):
        for j, b in enumerate(sectors):
            if i == j:
                expected = 1.0
            elif a == b != OTHER_SECTOR:
                expected = SAME_SECTOR_CORRELATION
            else:
                expected = CROSS_SECTOR_CORRELATION
            assert matrix[i, j] == expected
    assert np.linalg.eigvalsh(matrix).min() > 0
    np.linalg.cholesky(matrix)


def test_correlation_matrix_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="distinct"):
        GbmSimulator().correlation_matrix(["AAPL", "AAPL"])


def test_simulator_is_a_market_source_with_the_analytics_year() -> None:
    simulator: MarketSource = GbmSimulator()
    assert isinstance(simulator, GbmSimulator)
    assert simulator.periods_per_year == DEFAULT_PERIODS_PER_YEAR
    assert simulator.seed == 0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(lambda: GbmSimulator(seed=-1), "seed", id="negative-seed"),
        pytest.param(lambda: GbmSimulator(periods_per_year=0.0), "periods", id="zero-ppy"),
        pytest.param(lambda: GbmSimulator(periods_per_year=math.nan), "periods", id="nan-ppy"),
        pytest.param(lambda: GbmSimulator().next_prices({"A": 1.0}, -1), "tick", id="tick"),
        pytest.param(lambda: GbmSimulator().next_prices({"A": 0.0}, 0), "last", id="zero-price"),
        pytest.param(
            lambda: GbmSimulator().next_prices({"A": math.inf}, 0), "last", id="inf-price"
        ),
        pytest.param(lambda: GbmSimulator().bootstrap_history("A", -1), "length", id="length"),
        pytest.param(lambda: TickerProfile(math.nan, 0.2, "x", 1.0), "drift", id="drift"),
        pytest.param(lambda: TickerProfile(0.1, -0.2, "x", 1.0), "volatility", id="vol"),
        pytest.param(lambda: TickerProfile(0.1, 0.2, "x", 0.0), "initial_price", id="price"),
    ],
)
def test_invalid_arguments(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    tick=st.integers(0, 10**9),
    last=st.floats(min_value=1e-300, max_value=1e300),
    ticker=st.sampled_from(["AAPL", "TSLA", "ACME"]),
)
def test_next_price_is_positive_and_finite(seed: int, tick: int, last: float, ticker: str) -> None:
    price = GbmSimulator(seed=seed).next_prices({ticker: last}, tick)[ticker]
    assert math.isfinite(price)
    assert price > 0
