"""Settings: defaults < TOML file < env < flags, each error naming its source.

Rules of this suite: nothing reads the real environment or the working
directory (``env`` is always a literal mapping, files live in
``tmp_path``); every setting has a flag and an environment variable that
work; every error message names the setting as the user spelled it; a
password in ``redis_url`` never reaches a printed form.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest

from trio_portfolio.config import (
    ConfigError,
    LogFormat,
    LogLevel,
    MarketSourceKind,
    RedisLayout,
    Settings,
    add_setting_flags,
    env_name,
    flag_name,
    load_settings,
    mask_url,
    settings_as_dict,
    settings_as_text,
)

FIELD_NAMES = [field.name for field in attrs.fields(Settings)]


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="trio-portfolio")
    add_setting_flags(result)
    return result


def from_flags(*argv: str, env: dict[str, str] | None = None) -> Settings:
    return load_settings(parser().parse_args(list(argv)), env or {}, None)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "portfolio.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    settings = load_settings({}, {}, None)
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.redis_url is None
    assert settings.redis_layout is RedisLayout.AUTO
    assert settings.redis_timeout_seconds == 5.0
    assert settings.data_dir == Path("./data")
    assert settings.session_ttl_seconds == 86400
    assert settings.market_update_interval_seconds == 30.0
    assert settings.metric_delay_seconds == (2.0, 5.0)
    assert settings.log_level is LogLevel.INFO
    assert settings.log_format is LogFormat.AUTO
    assert settings.default_holdings == {"AAPL": 100.0, "GOOGL": 50.0, "MSFT": 75.0}
    assert settings.results_limit == 500
    assert settings.key_prefix == "portfolio"
    assert settings.market_seed == 0
    assert settings.max_message_bytes == 65536
    assert settings.outbox_size == 64
    assert settings.max_connections == 10000
    assert settings.messages_per_second == 20.0
    assert settings.message_burst == 40
    assert settings.shutdown_timeout_seconds == 4.0


def test_defaults_do_not_share_mutable_state() -> None:
    first = Settings()
    first.default_holdings["ZZZ"] = 1.0
    assert "ZZZ" not in Settings().default_holdings


# One sample per setting: (text as typed after the flag / in the env, value).
SAMPLES: dict[str, tuple[str, Any]] = {
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("0", 0),
    "redis_url": ("redis://localhost:6380/1", "redis://localhost:6380/1"),
    "redis_layout": ("HASH", RedisLayout.HASH),
    "redis_timeout_seconds": ("0.5", 0.5),
    "wait_replicas": ("1", 1),
    "wait_replicas_timeout_ms": ("250", 250),
    "wait_replicas_connections": ("2", 2),
    "data_dir": ("/var/lib/portfolio", Path("/var/lib/portfolio")),
    "embedded_maxmemory": ("64MB", "64mb"),
    "embedded_maxmemory_policy": ("allkeys-LRU", "allkeys-lru"),
    "session_ttl_seconds": ("60", 60),
    "market_update_interval_seconds": ("5.5", 5.5),  # alone: >= slowest metric + margin
    "max_tickers": ("50", 50),
    "symbols": ("symbols.txt", Path("symbols.txt")),
    "market_pipelines": ("8", 8),
    "metric_delay_seconds": ("0,0", (0.0, 0.0)),
    "max_staleness_seconds": ("2.5", 2.5),
    "log_level": ("Debug", LogLevel.DEBUG),
    "log_format": ("json", LogFormat.JSON),
    "default_holdings": ("aapl:1, brk.b:2.5", {"AAPL": 1.0, "BRK.B": 2.5}),
    "results_limit": ("10", 10),
    "key_prefix": ("test:1", "test:1"),
    "market_seed": ("-42", -42),
    "market_source": ("Replay", MarketSourceKind.REPLAY),
    "replay_file": ("/srv/prices.csv", Path("/srv/prices.csv")),
    "replay_speed": ("60", 60.0),
    "replay_max_rows": ("1000", 1000),
    "max_message_bytes": ("2048", 2048),
    "outbox_size": ("1", 1),
    "max_connections": ("3", 3),
    "messages_per_second": ("1e3", 1000.0),
    "message_burst": ("5", 5),
    "shutdown_timeout_seconds": ("0", 0.0),
    "max_sessions": ("5", 5),
    "sessions_per_second": ("0.5", 0.5),
    "session_burst": ("3", 3),
    "max_tracked_addresses": ("10", 10),
    "max_connections_per_address": ("7", 7),
    "trusted_proxies": ("127.0.0.1/32, 10.0.0.0/8", ("127.0.0.1/32", "10.0.0.0/8")),
    "allowed_origins": ("https://App.example.com/,*", ("https://app.example.com", "*")),
    "allowed_hosts": (
        "Portfolio.example.com,localhost:8000",
        ("portfolio.example.com", "localhost:8000"),
    ),
    "auth_secret": ("0123456789abcdef-secret", "0123456789abcdef-secret"),
    "auth_secret_file": ("", None),
    "client_idle_timeout_seconds": ("0", 0.0),
    "client_auto_reconnect": ("off", False),
    "ping_interval_seconds": ("0.5", 0.5),
    "ping_timeout_seconds": ("3", 3.0),
    "idle_timeout_seconds": ("300", 300.0),
    "outbox_max_bytes": ("65536", 65536),
    "workers": ("2", 2),
}


def test_samples_cover_every_setting() -> None:
    assert sorted(SAMPLES) == sorted(FIELD_NAMES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_setting_has_a_working_flag(name: str) -> None:
    raw, value = SAMPLES[name]
    assert getattr(from_flags(flag_name(name), raw), name) == value


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_setting_has_a_working_env_var(name: str) -> None:
    raw, value = SAMPLES[name]
    assert getattr(load_settings({}, {env_name(name): raw}, None), name) == value


def test_names_derive_from_the_field() -> None:
    assert flag_name("redis_url") == "--redis-url"
    assert env_name("redis_url") == "PORTFOLIO_REDIS_URL"
    assert env_name("message_burst") == "PORTFOLIO_MESSAGE_BURST"


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = 1001\nhost = 'file-host'\nresults_limit = 7\n")
    env = {"PORTFOLIO_PORT": "1002", "PORTFOLIO_HOST": "env-host"}
    flags = {"port": "1003"}
    settings = load_settings(flags, env, path)
    assert (settings.port, settings.host, settings.results_limit) == (1003, "env-host", 7)
    assert settings.key_prefix == "portfolio"  # untouched default
    assert load_settings({}, env, path).port == 1002
    assert load_settings({}, {}, path).port == 1001


def test_flags_not_given_are_none_and_do_not_override() -> None:
    namespace = parser().parse_args([])
    assert all(getattr(namespace, name) is None for name in FIELD_NAMES)
    assert namespace.config is None
    assert load_settings(namespace, {"PORTFOLIO_PORT": "9"}, None).port == 9


def test_flags_accept_typed_values_and_ignore_other_keys() -> None:
    settings = load_settings({"port": 0, "data_dir": Path("x"), "command": "serve"}, {}, None)
    assert settings.port == 0
    assert settings.data_dir == Path("x")


def test_other_prefixed_env_vars_are_ignored() -> None:
    env = {"PORTFOLIO_TEST_REDIS_URL": "nonsense", "PORTFOLIO_PROT": "1"}
    assert load_settings({}, env, None) == Settings()


def test_help_shows_env_name_and_default() -> None:
    text = " ".join(parser().format_help().split())
    assert "--metric-delay-seconds MIN,MAX" in text
    assert "PORTFOLIO_METRIC_DELAY_SECONDS; default: 2,5" in text
    assert "default: AAPL:100,GOOGL:50,MSFT:75" in text
    assert "--config FILE" in text


# -- errors name the setting and its source -----------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORTFOLIO_PORT": "abc"}, "PORTFOLIO_PORT: expected an integer 0-65535, got 'abc'"),
        ({"PORTFOLIO_PORT": "65536"}, "PORTFOLIO_PORT: expected an integer 0-65535, got '65536'"),
        ({"PORTFOLIO_PORT": "8000.0"}, "PORTFOLIO_PORT: expected an integer 0-65535"),
        ({"PORTFOLIO_SESSION_TTL_SECONDS": "0"}, "PORTFOLIO_SESSION_TTL_SECONDS: expected an"),
        ({"PORTFOLIO_REDIS_TIMEOUT_SECONDS": "nan"}, "expected a number > 0, got 'nan'"),
        ({"PORTFOLIO_MARKET_UPDATE_INTERVAL_SECONDS": "-1"}, "expected a number >= 0.1, got '-1'"),
        (
            {"PORTFOLIO_METRIC_DELAY_SECONDS": "5,2"},
            "PORTFOLIO_METRIC_DELAY_SECONDS: expected MIN,MAX seconds with 0 <= MIN <= MAX,"
            " got '5,2'",
        ),
        ({"PORTFOLIO_METRIC_DELAY_SECONDS": "-1,2"}, "got '-1,2'"),
        ({"PORTFOLIO_METRIC_DELAY_SECONDS": "3"}, "got '3'"),
        ({"PORTFOLIO_METRIC_DELAY_SECONDS": "a,b"}, "got 'a,b'"),
        ({"PORTFOLIO_LOG_LEVEL": "verbose"}, "PORTFOLIO_LOG_LEVEL: expected one of debug,"),
        ({"PORTFOLIO_LOG_FORMAT": "xml"}, "PORTFOLIO_LOG_FORMAT: expected one of auto, json"),
        ({"PORTFOLIO_REDIS_LAYOUT": "list"}, "PORTFOLIO_REDIS_LAYOUT: expected one of auto"),
        ({"PORTFOLIO_REDIS_URL": "localhost:6379"}, "PORTFOLIO_REDIS_URL: expected a URL"),
        ({"PORTFOLIO_HOST": " "}, "PORTFOLIO_HOST: expected a host name"),
        ({"PORTFOLIO_KEY_PREFIX": "has space"}, "PORTFOLIO_KEY_PREFIX: expected 1-64 of"),
        ({"PORTFOLIO_OUTBOX_SIZE": "0"}, "PORTFOLIO_OUTBOX_SIZE: expected an integer > 0"),
        ({"PORTFOLIO_MESSAGE_BURST": "true"}, "PORTFOLIO_MESSAGE_BURST: expected an integer"),
        (
            {"PORTFOLIO_DEFAULT_HOLDINGS": "AAPL:-1"},
            "PORTFOLIO_DEFAULT_HOLDINGS: expected TICKER:QUANTITY,... with 1-100 positive"
            " quantities, got 'AAPL:-1' (holdings['AAPL']: quantity must be a positive number",
        ),
        ({"PORTFOLIO_DEFAULT_HOLDINGS": "AAPL"}, "('AAPL' is not TICKER:QUANTITY)"),
        ({"PORTFOLIO_DEFAULT_HOLDINGS": "AAPL:x"}, "('AAPL:x': quantity is not a number)"),
        ({"PORTFOLIO_DEFAULT_HOLDINGS": "AAPL:1,aapl:2"}, "duplicates 'AAPL'"),
        ({"PORTFOLIO_DEFAULT_HOLDINGS": "A A:1"}, "holdings['A A']: 'A A' is not a ticker"),
    ],
)
def test_env_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, env, None)
    assert message in str(info.value)


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--port: expected an integer 0-65535, got 'abc'$"):
        from_flags("--port", "abc")
    with pytest.raises(ConfigError, match=r"^--metric-delay-seconds: expected MIN,MAX"):
        from_flags("--metric-delay-seconds", "2")


def test_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = 70000\n")
    with pytest.raises(ConfigError) as info:
        load_settings({}, {}, path)
    assert str(info.value) == f"{path}: port: expected an integer 0-65535, got 70000"


def test_file_rejects_wrong_toml_types(tmp_path: Path) -> None:
    for text in ["port = true", "port = 80.5", "host = 3", "metric_delay_seconds = [1, 2, 3]"]:
        with pytest.raises(ConfigError, match=r"portfolio\.toml: "):
            load_settings({}, {}, write_toml(tmp_path, text))


def test_file_unknown_keys_are_named(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "prot = 1\nport = 2\nverbose = true\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) 'prot', 'verbose'"):
        load_settings({}, {}, path)


def test_file_must_exist_and_be_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings({}, {}, tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({}, {}, write_toml(tmp_path, "port = = 1"))


def test_file_takes_native_toml_values(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        port = 0
        metric_delay_seconds = [0, 0.5]
        redis_layout = "JSON"
        data_dir = "state"
        messages_per_second = 5
        [default_holdings]
        msft = 10
        "BRK.B" = 2.5
        """.replace("\n        ", "\n"),
    )
    settings = load_settings({}, {}, path)
    assert settings.port == 0
    assert settings.metric_delay_seconds == (0.0, 0.5)
    assert settings.redis_layout is RedisLayout.JSON
    assert settings.data_dir == Path("state")
    assert settings.messages_per_second == 5.0
    assert settings.default_holdings == {"MSFT": 10.0, "BRK.B": 2.5}


def test_file_comes_from_config_flag_then_env(tmp_path: Path) -> None:
    by_flag = write_toml(tmp_path, "port = 1")
    by_env = tmp_path / "env.toml"
    by_env.write_text("port = 2", encoding="utf-8")
    env = {"PORTFOLIO_CONFIG": str(by_env)}
    assert from_flags("--config", str(by_flag), env=env).port == 1
    assert from_flags(env=env).port == 2
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("port = 3", encoding="utf-8")
    assert load_settings({"config": str(by_flag)}, env, explicit).port == 3


def test_redis_url_schemes_and_unset() -> None:
    for url in ["redis://h:6379/0", "rediss://h", "unix:///tmp/redis.sock"]:
        assert load_settings({}, {"PORTFOLIO_REDIS_URL": url}, None).redis_url == url
    assert load_settings({}, {"PORTFOLIO_REDIS_URL": ""}, None).redis_url is None


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"^port: expected an integer 0-65535, got -1$"):
        Settings(port=-1)
    with pytest.raises(ConfigError, match=r"^log_level: expected one of"):
        Settings(log_level="info")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^default_holdings: "):
        Settings(default_holdings={"aapl": 1.0})
    with pytest.raises(ConfigError, match=r"^redis_url: .* got 'http://u:\*\*\*@h'$"):
        Settings(redis_url="http://u:secret@h")


# -- secrets -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:s3cret@host", "redis://:***@host"),
        ("rediss://default:p%40ss@h:1", "rediss://default:***@h:1"),
        ("unix:///tmp/r.sock?db=1&password=s3cret", "unix:///tmp/r.sock?db=1&password=***"),
        ("redis://user@host", "redis://user@host"),
        ("redis://host:6379", "redis://host:6379"),
        ("redis://u:s3cret@[::1", "redis://***"),
        ("u:s3cret@host:6379", "***@host:6379"),
        ("redis://h/0?db=1&x=a%20b", "redis://h/0?db=1&x=a%20b"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_password_never_printed() -> None:
    settings = load_settings({}, {"PORTFOLIO_REDIS_URL": "redis://u:s3cret@h:6379"}, None)
    assert settings.redis_url == "redis://u:s3cret@h:6379"  # the real value is kept
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in settings_as_text(settings)
    assert "s3cret" not in str(settings_as_dict(settings))
    assert settings_as_dict(settings, mask_secrets=False)["redis_url"] == settings.redis_url
    with pytest.raises(ConfigError) as info:
        load_settings({}, {"PORTFOLIO_REDIS_URL": "http://u:s3cret@h"}, None)
    assert "s3cret" not in str(info.value)


# -- rendering -----------------------------------------------------------------


def test_settings_as_text_is_toml_that_reloads(tmp_path: Path) -> None:
    settings = from_flags(
        "--port",
        "0",
        "--metric-delay-seconds",
        "0,0.5",
        "--default-holdings",
        "brk.b:2,aapl:1",
        "--redis-url",
        "redis://localhost:6380/2",
        "--host",
        'odd "host"\\name',
        "--log-level",
        "WARNING",
    )
    text = settings_as_text(settings)
    assert "port = 0\n" in text
    assert 'default_holdings = { "BRK.B" = 2.0, "AAPL" = 1.0 }' in text
    unset = {name for name in FIELD_NAMES if getattr(settings, name) is None}
    assert set(tomllib.loads(text)) == set(FIELD_NAMES) - unset
    assert load_settings({}, {}, write_toml(tmp_path, text)) == settings


def test_settings_as_text_comments_unset_values() -> None:
    text = settings_as_text(Settings())
    assert "# redis_url is unset\n" in text
    assert "redis_url" not in tomllib.loads(text)


def test_settings_as_dict_is_plain() -> None:
    plain = settings_as_dict(Settings())
    assert plain["data_dir"] == "data"
    assert plain["log_level"] == "info"
    assert plain["metric_delay_seconds"] == [2.0, 5.0]
    assert plain["redis_url"] is None
