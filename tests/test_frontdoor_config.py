"""The front door's settings: each refuses a bad value with a message naming it; secrets masked.

Pure: settings are loaded from dictionaries standing for flags and the environment.
"""

from __future__ import annotations

import pytest

from trio_portfolio.config import (
    ConfigError,
    Settings,
    load_settings,
    settings_as_dict,
    settings_as_text,
)

BAD = {
    "max_sessions": "0",
    "sessions_per_second": "0",
    "session_burst": "-1",
    "max_tracked_addresses": "0",
    "max_connections_per_address": "0",
    "trusted_proxies": "10.0.0.300/8",
    "allowed_origins": "ftp://example.com",
    "allowed_hosts": "exa mple.com",
    "auth_secret": "short",
    "client_idle_timeout_seconds": "-1",
    "client_auto_reconnect": "maybe",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_names_the_setting(name: str) -> None:
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match=flag):
        load_settings({name: BAD[name]}, {}, None)
    env = "PORTFOLIO_" + name.upper()
    with pytest.raises(ConfigError, match=env):
        load_settings({}, {env: BAD[name]}, None)


def test_toml_lists_and_booleans(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "portfolio.toml"
    path.write_text(
        'trusted_proxies = ["10.0.0.0/8"]\nallowed_origins = ["https://app.example.com"]\n'
        "client_auto_reconnect = false\nmax_sessions = 7\n"
    )
    settings = load_settings({}, {}, path)
    assert settings.trusted_proxies == ("10.0.0.0/8",)
    assert settings.allowed_origins == ("https://app.example.com",)
    assert settings.client_auto_reconnect is False
    assert settings.max_sessions == 7


def test_defaults() -> None:
    settings = Settings()
    assert (settings.session_burst, settings.sessions_per_second) == (100, 10.0)
    assert settings.max_sessions == 100_000
    assert settings.max_connections_per_address == 2000
    assert settings.trusted_proxies == settings.allowed_origins == settings.allowed_hosts == ()
    assert settings.auth_key() is None  # authentication off
    assert settings.client_auto_reconnect is True


def test_the_secret_is_never_shown() -> None:
    secret = "the-very-secret-value-123"
    settings = Settings(auth_secret=secret)
    assert secret not in repr(settings)
    assert secret not in settings_as_text(settings)
    assert settings_as_dict(settings)["auth_secret"] == "***"
    assert settings.auth_key() == secret.encode()
