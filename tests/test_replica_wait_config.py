"""The ``--wait-replicas`` settings: off by default, every source, refused clearly."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from trio_portfolio.config import ConfigError, Settings, add_setting_flags, load_settings


def from_flags(*argv: str) -> Settings:
    parser = argparse.ArgumentParser(prog="trio-portfolio")
    add_setting_flags(parser)
    return load_settings(parser.parse_args(list(argv)), {}, None)


def test_off_by_default() -> None:
    settings = Settings()
    assert settings.wait_replicas == 0
    assert (settings.wait_replicas_timeout_ms, settings.wait_replicas_connections) == (100, 4)


def test_every_source(tmp_path: Path) -> None:
    assert from_flags("--wait-replicas", "2", "--wait-replicas-timeout-ms", "50").wait_replicas == 2
    env = {"PORTFOLIO_WAIT_REPLICAS": "1", "PORTFOLIO_WAIT_REPLICAS_CONNECTIONS": "8"}
    from_env = load_settings({}, env, None)
    assert (from_env.wait_replicas, from_env.wait_replicas_connections) == (1, 8)
    path = tmp_path / "portfolio.toml"
    path.write_text("wait_replicas = 1\nwait_replicas_timeout_ms = 250\n", encoding="utf-8")
    from_file = load_settings({}, {}, path)
    assert (from_file.wait_replicas, from_file.wait_replicas_timeout_ms) == (1, 250)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--wait-replicas", "-1"), r"^--wait-replicas: expected an integer 0-16, got '-1'$"),
        (("--wait-replicas", "17"), r"^--wait-replicas: expected an integer 0-16"),
        (
            ("--wait-replicas-timeout-ms", "0"),
            r"^--wait-replicas-timeout-ms: expected an integer 1-60000 \(milliseconds\)",
        ),
        (("--wait-replicas-connections", "0"), r"^--wait-replicas-connections: expected"),
        (("--wait-replicas-connections", "65"), r"^--wait-replicas-connections: expected"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_flags(*argv)
