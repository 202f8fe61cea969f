"""The simulator's vectorised live draw: standard normals, independent, bounded cache.

``trio_portfolio/simulation.py`` (*Determinism*) draws a whole tick with a
counter-based stream.  These check what the module docstring promises of
it beyond what ``tests/test_simulation.py`` checks of the prices: the raw
shocks are standard normal and uncorrelated across tickers and ticks, and
the per-ticker cache stays within :data:`LIVE_TERMS_CACHE`.
"""

from __future__ import annotations

import numpy as np
import pytest

from trio_portfolio import simulation
from trio_portfolio.simulation import GbmSimulator


def test_live_normals_are_standard_and_independent() -> None:
    keys = np.arange(200_000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    a = simulation._live_normals(1, 2, 10, keys)
    b = simulation._live_normals(1, 2, 11, keys)
    c = simulation._live_normals(2, 2, 10, keys)
    for draws in (a, b, c):
        assert abs(float(draws.mean())) < 0.01
        assert float(draws.std()) == pytest.approx(1.0, abs=0.01)
        # Tails of a normal, not of a uniform: about 4.55 % beyond 2 sigma.
        assert float((np.abs(draws) > 2).mean()) == pytest.approx(0.0455, abs=0.003)
    for x, y in ((a, b), (a, c), (a[:-1], a[1:])):
        assert abs(float(np.corrcoef(x, y)[0, 1])) < 0.01
    assert np.array_equal(a, simulation._live_normals(1, 2, 10, keys)), "a pure function"


def test_the_live_terms_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulation, "LIVE_TERMS_CACHE", 50)
    simulator = GbmSimulator(seed=1)
    first = simulator.next_prices({f"T{i}": 10.0 for i in range(40)}, 1)
    for round_ in range(5):
        simulator.next_prices({f"R{round_}_{i}": 10.0 for i in range(40)}, 1)
        assert len(simulator._terms) <= 50
    assert simulator.next_prices({f"T{i}": 10.0 for i in range(40)}, 1) == first


def test_the_shared_bootstrap_draws_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulation, "SHARED_DRAWS_CACHE", 3)
    simulator = GbmSimulator(seed=1)
    first = simulator.bootstrap_history("AAPL", 20)
    for length in range(5, 40):
        simulator.bootstrap_history("AAPL", length)  # market and sector draws per length
        assert len(simulator._shared) <= 3
    assert simulator.bootstrap_history("AAPL", 20) == first, "recomputed draws are the same"
