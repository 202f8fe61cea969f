"""The market's settings: sub-second ticks, the universe cap, the symbol list, pipelines.

Rules of this suite: settings are loaded as a user gives them (flags, env,
TOML) through :func:`load_settings`; the start-up check of the symbol list
runs a whole server in-process against a real redis-server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from trio_portfolio.config import ConfigError, Settings, load_settings
from trio_portfolio.testing import RedisServerInfo
from trio_portfolio.testing.live_server import open_live_server
from trio_portfolio.testing.live_server import test_settings as server_settings


def test_ticks_go_down_to_a_tenth_of_a_second_and_no_further() -> None:
    tenth = load_settings(
        {"market_update_interval_seconds": "0.1", "max_staleness_seconds": "5.5"}, {}, None
    )
    assert tenth.market_update_interval_seconds == 0.1
    with pytest.raises(
        ConfigError, match=r"--market-update-interval-seconds: expected a number >= 0.1, got '0.05'"
    ):
        load_settings({"market_update_interval_seconds": "0.05"}, {}, None)
    with pytest.raises(ConfigError, match="market_update_interval_seconds"):
        Settings(market_update_interval_seconds=0.0)


def test_universe_settings_defaults_and_limits(tmp_path: Path) -> None:
    defaults = Settings()
    assert (defaults.max_tickers, defaults.symbols, defaults.market_pipelines) == (10000, None, 8)
    toml = tmp_path / "portfolio.toml"
    toml.write_text('max_tickers = 20\nsymbols = "list.txt"\nmarket_pipelines = 2\n')
    loaded = load_settings({}, {}, toml)
    assert (loaded.max_tickers, loaded.symbols, loaded.market_pipelines) == (
        20,
        Path("list.txt"),
        2,
    )
    assert load_settings({}, {"PORTFOLIO_SYMBOLS": ""}, None).symbols is None
    with pytest.raises(ConfigError, match="PORTFOLIO_MAX_TICKERS: expected an integer > 0"):
        load_settings({}, {"PORTFOLIO_MAX_TICKERS": "0"}, None)
    with pytest.raises(ConfigError, match="--market-pipelines: expected an integer 1-64"):
        load_settings({"market_pipelines": "65"}, {}, None)


async def test_a_symbol_list_without_the_default_holdings_refuses_to_start(
    real_redis: RedisServerInfo, tmp_path: Path
) -> None:
    symbols = tmp_path / "symbols.txt"
    symbols.write_text("AAPL\nMSFT\n")  # no GOOGL
    with (
        trio.fail_after(20),
        pytest.RaisesGroup(
            pytest.RaisesExc(ConfigError, match="default_holdings: GOOGL not on the symbol list"),
            flatten_subgroups=True,
        ),
    ):
        async with open_live_server(server_settings(real_redis.url, symbols=symbols)):
            pass
