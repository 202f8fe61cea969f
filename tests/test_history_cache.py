"""analytics.HistoryCache and compute_all_shared: the shared path gives compute_all's numbers.

Rules: pure functions, no I/O; hypothesis draws the portfolios.  The shared
path must agree with :func:`compute_all` bit for bit, validate like
:class:`MetricInputs`, call the history loader once per key, and keep at
most ``capacity`` entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_portfolio.analytics import (
    HistoryCache,
    MetricInputs,
    cache_key,
    compute_all,
    compute_all_shared,
)

prices_st = st.floats(min_value=0.5, max_value=500.0, allow_nan=False)


@st.composite
def portfolios(
    draw: st.DrawFn,
) -> tuple[str, dict[str, float], dict[str, float], dict[str, tuple[float, ...]]]:
    names = draw(st.lists(st.sampled_from("ABCDEFGH"), min_size=1, max_size=6, unique=True))
    length = draw(st.integers(min_value=0, max_value=12))
    history = {n: tuple(draw(st.lists(prices_st, min_size=length, max_size=length))) for n in names}
    holdings = {n: draw(st.floats(min_value=0.1, max_value=1e4)) for n in names}
    prices = {n: draw(prices_st) for n in names}
    return draw(st.sampled_from(names)), holdings, prices, history


def shared(
    cache: HistoryCache,
    ticker: str,
    holdings: Mapping[str, float],
    prices: Mapping[str, float],
    history: Mapping[str, Sequence[float]],
) -> dict[str, float]:
    fingerprint = tuple(sorted((name, tuple(series)) for name, series in history.items()))
    return compute_all_shared(
        ticker,
        holdings,
        prices,
        fingerprint=fingerprint,
        load_history=lambda: history,
        cache=cache,
    )


@settings(max_examples=200, deadline=None)
@given(portfolios())
def test_shared_equals_compute_all_bit_for_bit(
    portfolio: tuple[str, dict[str, float], dict[str, float], dict[str, tuple[float, ...]]],
) -> None:
    ticker, holdings, prices, history = portfolio
    expected = compute_all(MetricInputs(ticker, holdings, prices, history))
    cache = HistoryCache(capacity=4)
    assert shared(cache, ticker, holdings, prices, history) == expected  # miss
    assert shared(cache, ticker, holdings, prices, history) == expected  # hit
    assert cache.statistics().hits == 1


def test_loader_runs_once_per_key_and_other_weights_share_it() -> None:
    history = {"A": (10.0, 11.0, 10.5, 12.0), "B": (5.0, 5.5, 5.2, 5.1)}
    calls = 0

    def load() -> Mapping[str, Sequence[float]]:
        nonlocal calls
        calls += 1
        return history

    cache = HistoryCache()
    for quantity in (1.0, 2.0, 30.0):
        holdings = {"A": quantity, "B": 3.0}
        prices = {"A": 12.0, "B": 5.1}
        got = compute_all_shared(
            "A", holdings, prices, fingerprint="tick-7", load_history=load, cache=cache
        )
        assert got == compute_all(MetricInputs("A", holdings, prices, history))
    assert calls == 1
    assert cache_key(["B", "A"], "tick-7") in cache
    assert cache.statistics().misses == 1


def test_capacity_bounds_entries_least_recent_first() -> None:
    cache = HistoryCache(capacity=2)
    history = {"A": (1.0, 2.0, 3.0)}
    for tick in range(3):
        compute_all_shared(
            "A", {"A": 1.0}, {"A": 3.0}, fingerprint=tick, load_history=lambda: history, cache=cache
        )
    assert cache.statistics().entries == 2
    assert cache_key(["A"], 0) not in cache
    assert cache_key(["A"], 2) in cache
    with pytest.raises(ValueError, match="capacity"):
        HistoryCache(capacity=0)


@pytest.mark.parametrize(
    ("holdings", "prices", "history", "message"),
    [
        ({"A": -1.0}, {"A": 1.0}, {"A": (1.0, 2.0, 3.0)}, "quantity"),
        ({"A": 1.0}, {"A": float("nan")}, {"A": (1.0, 2.0, 3.0)}, "price"),
        ({"A": 1.0}, {"A": 1.0}, {"A": (1.0, -2.0, 3.0)}, "history"),
        ({"B": 1.0}, {"B": 1.0}, {}, "not held"),
    ],
)
def test_invalid_inputs_raise_like_metric_inputs_and_are_not_cached(
    holdings: dict[str, float],
    prices: dict[str, float],
    history: dict[str, tuple[float, ...]],
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        MetricInputs("A", holdings, prices, history)
    cache = HistoryCache()
    with pytest.raises(ValueError, match=message):
        compute_all_shared(
            "A", holdings, prices, fingerprint=1, load_history=lambda: history, cache=cache
        )
    assert cache.statistics().entries == 0
