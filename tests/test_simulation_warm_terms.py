"""A ticker's bootstrap leaves the live tick nothing to compute for it.

The first tick after a flood of new tickers used to spend about 5 µs per
ticker on their profiles and hash keys, most of the tick; the bootstrap,
which runs in a worker thread anyway, computes them instead.  Checked by
counting what the tick computes, not by timing it.
"""

from __future__ import annotations

import pytest

from trio_portfolio import simulation
from trio_portfolio.simulation import GbmSimulator


def test_a_bootstrapped_ticker_is_drawn_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    simulator = GbmSimulator(seed=4)
    fresh = [f"W{i}" for i in range(20)]
    last = {ticker: simulator.bootstrap_history(ticker, 8)[-1] for ticker in fresh}
    computed: list[str] = []
    original = simulation.default_profile

    def counting(ticker: str) -> simulation.TickerProfile:
        computed.append(ticker)
        return original(ticker)

    monkeypatch.setattr(simulation, "default_profile", counting)
    simulator.next_prices(last, 1)
    assert computed == []
    simulator.next_prices({"NEVER_BOOTSTRAPPED": 10.0}, 1)
    assert computed == ["NEVER_BOOTSTRAPPED"]  # the counter sees a miss
