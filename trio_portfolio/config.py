"""Settings: one frozen value, loaded from defaults < TOML file < env < flags.

Theory of operation
-------------------
Every setting is one field of :class:`Settings`, declared once with its
default and, in its metadata, its help text and rule (:func:`_rule`).  Its
command-line flag (``--redis-url``) and environment variable
(``PORTFOLIO_REDIS_URL``) are derived from the field name, so nothing is
listed twice and a new field gets both for free.

:func:`load_settings` merges the sources by precedence, then converts each
winning raw value with :data:`_converter`, whose structure hooks accept both
text (env, flags) and native TOML values (numbers, arrays, tables), and
checks it against the field's rule.  A failure is a :class:`ConfigError`
naming the setting *as the user wrote it* and where it came from::

    PORTFOLIO_PORT: expected an integer 0-65535, got 'abc'
    --metric-delay-seconds: expected MIN,MAX seconds with 0 <= MIN <= MAX, got '5,2'
    portfolio.toml: port: expected an integer 0-65535, got 70000

The same rules run when a ``Settings`` is constructed, so one built in
code is as valid as a loaded one.  ``redis_url`` may carry a password: the repr,
:func:`settings_as_dict` and :func:`settings_as_text` mask it.

Pure: no trio, no redis, no I/O other than reading the named TOML file.
"""

import argparse
import enum
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NewType
from urllib.parse import urlsplit

import attrs
import cattrs

from trio_portfolio.models import DEFAULT_HOLDINGS
from trio_portfolio.protocol import ProtocolError, normalise_holdings
from trio_portfolio.staleness import analyses_finish_problem, analysis_duration_bound

ENV_PREFIX = "PORTFOLIO_"
CONFIG_ENV = "PORTFOLIO_CONFIG"
REDIS_URL_SCHEMES = (
    "redis://",
    "rediss://",
    "unix://",
    "redis+cluster://",
    "rediss+cluster://",
    "redis+sentinel://",
    "rediss+sentinel://",
)
_MASK = "***"
MIN_MARKET_INTERVAL = 0.1
"""The shortest market tick interval accepted (sub-second feeds; see docs/adr/003)."""


class ConfigError(ValueError):
    """A setting is invalid; the message names it and its source."""


class RedisLayout(enum.StrEnum):
    """How sessions are stored: RedisJSON documents, hashes, or probe."""

    AUTO = "auto"
    JSON = "json"
    HASH = "hash"


class MarketSourceKind(enum.StrEnum):
    """Where market prices come from: the simulator, or a replayed CSV file."""

    SIMULATED = "simulated"
    REPLAY = "replay"


SAMPLE_PRICES_FILE = Path(__file__).parent / "data" / "sample_prices.csv"
"""The replay file bundled with the package (made by ``python3 -m trio_portfolio.replay``)."""


class MaxmemoryPolicy(enum.StrEnum):
    """What the embedded Redis does when full: ``noeviction`` refuses writes, losing nothing.

    Any other policy lets Redis delete sessions (or the market's prices) to
    make room; they are offered for a Redis used as a cache, not as the store.
    """

    NOEVICTION = "noeviction"
    ALLKEYS_LRU = "allkeys-lru"
    ALLKEYS_LFU = "allkeys-lfu"
    ALLKEYS_RANDOM = "allkeys-random"
    VOLATILE_LRU = "volatile-lru"
    VOLATILE_LFU = "volatile-lfu"
    VOLATILE_RANDOM = "volatile-random"
    VOLATILE_TTL = "volatile-ttl"


MemorySize = NewType("MemorySize", str)
"""A Redis memory size as Redis reads it (``256mb``, ``2gb``, ``1000000``; ``0`` is none)."""

_MEMORY_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 10**6, "mb": 1024**2}
_MEMORY_UNITS |= {"g": 10**9, "gb": 1024**3}
_MIN_MAXMEMORY = 10**6  # below a megabyte Redis is full before the first session


def memory_size_bytes(value: str) -> int | None:
    """The bytes a Redis memory size stands for (units as Redis reads them), or None."""
    match = re.fullmatch(r"(0|[1-9][0-9]{0,17})([kmg]?b?)", value.strip().lower())
    if match is None or match.group(2) not in _MEMORY_UNITS:
        return None
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2)]


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(enum.StrEnum):
    """``auto`` is text on a terminal, JSON lines otherwise."""

    AUTO = "auto"
    JSON = "json"
    TEXT = "text"


def mask_url(url: str) -> str:
    """``url`` with its password (userinfo or ``?password=``) replaced by ``***``.

    Follows redis-py's reading of a URL: in ``redis://user@host`` the
    userinfo is a user name, not a secret, and is kept.  Everything else is
    left byte for byte as written.
    """
    if "://" not in url:  # not a URL; "user:pass@host" would still be a secret
        return f"{_MASK}@{url.rpartition('@')[2]}" if "@" in url else url
    try:
        parts = urlsplit(url)
    except ValueError:  # unparseable: no telling where a password would be
        return url.partition("://")[0] + "://" + _MASK
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{_MASK}@{hostport}"
    query = re.sub(r"(^|&)password=[^&]*", rf"\1password={_MASK}", parts.query)
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    masked += f"?{query}" if "?" in url else ""
    masked += f"#{parts.fragment}" if "#" in url else ""
    return masked


@attrs.frozen
class _Rule:
    """How one setting is described and checked, kept in the field metadata."""

    help: str
    expect: str  # completes "expected ..., got ..."
    check: Callable[[Any], bool]
    metavar: str


def _rule(help: str, expect: str, check: Callable[[Any], bool], metavar: str) -> dict[str, _Rule]:
    """Field metadata: the setting's help text and the rule its value obeys."""
    return {"rule": _Rule(help=help, expect=expect, check=check, metavar=metavar)}


def _positive(value: float) -> bool:
    return value > 0


def _non_negative(value: float) -> bool:
    return value >= 0


def _tick_interval(value: float) -> bool:
    return value >= MIN_MARKET_INTERVAL


def _valid_pipelines(value: int) -> bool:
    return 1 <= value <= 64


def _valid_wait_replicas(value: int) -> bool:
    return 0 <= value <= 16


def _valid_wait_timeout(value: int) -> bool:
    return 1 <= value <= 60_000


def _valid_port(value: int) -> bool:
    return 0 <= value <= 65535


def _valid_redis_url(value: str | None) -> bool:
    if value is None:
        return True
    try:
        urlsplit(value)
    except ValueError:
        return False
    return value.startswith(REDIS_URL_SCHEMES)


def _valid_holdings(value: dict[str, float]) -> bool:
    try:
        return normalise_holdings(value) == value
    except ProtocolError:
        return False


def _valid_delay(value: tuple[float, float]) -> bool:
    return 0 <= value[0] <= value[1]


def _valid_key_prefix(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", value) is not None


def _valid_maxmemory(value: str) -> bool:
    size = memory_size_bytes(value)
    return size is not None and (size == 0 or size >= _MIN_MAXMEMORY)


def _anything(value: object) -> bool:
    return True


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _member_of(cls: type[enum.Enum]) -> Callable[[object], bool]:
    """A check that a value is a member of ``cls``, not just its string."""
    return lambda value: isinstance(value, cls)


def _mask_repr(value: str | None) -> str:
    return repr(value if value is None else mask_url(value))


def _secret_repr(value: str | None) -> str:
    return repr(value if value is None else _MASK)


MIN_SECRET_CHARS = 16


def _valid_secret(value: str | None) -> bool:
    return value is None or len(value) >= MIN_SECRET_CHARS


def _valid_networks(value: tuple[str, ...]) -> bool:
    try:
        for item in value:
            ipaddress.ip_network(item, strict=False)
    except ValueError:
        return False
    return True


def _valid_origins(value: tuple[str, ...]) -> bool:
    return all(item in ("*", "null") or _ORIGIN_RE.fullmatch(item) for item in value)


def _valid_hosts(value: tuple[str, ...]) -> bool:
    return all(_HOST_RE.fullmatch(item) for item in value)


_ORIGIN_RE = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9.\-]+)(:[0-9]{1,5})?")
"""``scheme://host[:port]``, lower case, no path: what a browser sends as ``Origin``."""
_HOST_RE = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.\-]+)(:[0-9]{1,5})?")


def _shown(name: str, value: object) -> str:
    """``value`` as an error message may show it: secrets masked."""
    if name == "redis_url" and isinstance(value, str):
        return repr(mask_url(value))
    if name in _SECRETS and value is not None:
        return repr(_MASK)
    return repr(value)


_SECRETS = frozenset({"auth_secret"})
"""Settings shown only as ``***`` (besides the password in ``redis_url``)."""

MAX_WORKERS = 64
"""Most worker processes ``serve --workers`` starts (``auto`` is capped here too)."""


def _valid_workers(value: int) -> bool:
    return 1 <= value <= MAX_WORKERS


def cpu_count() -> int:
    """What ``workers = auto`` means: the CPUs of this machine, at most :data:`MAX_WORKERS`."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


_POSITIVE_INT = "an integer > 0"
_POSITIVE_NUMBER = "a number > 0"


@attrs.frozen
class Settings:
    """The effective configuration of one server process.

    Each field's metadata holds its :class:`_Rule`; construction checks
    every rule and raises :class:`ConfigError` naming the field.
    """

    host: str = attrs.field(
        default="127.0.0.1",
        metadata=_rule("interface to listen on", "a host name", bool, "HOST"),
    )
    port: int = attrs.field(
        default=8000,
        metadata=_rule("TCP port; 0 picks a free one", "an integer 0-65535", _valid_port, "PORT"),
    )
    redis_url: str | None = attrs.field(
        default=None,
        repr=_mask_repr,
        metadata=_rule(
            "Redis to use; unset starts the embedded Redis",
            "a URL starting with redis://, rediss://, unix://, redis[s]+cluster:// or"
            " redis[s]+sentinel://",
            _valid_redis_url,
            "URL",
        ),
    )
    redis_layout: RedisLayout = attrs.field(
        default=RedisLayout.AUTO,
        metadata=_rule(
            "session layout; auto probes for RedisJSON",
            "one of auto, json, hash",
            _member_of(RedisLayout),
            "auto|json|hash",
        ),
    )
    redis_timeout_seconds: float = attrs.field(
        default=5.0,
        metadata=_rule("timeout of one Redis round trip", _POSITIVE_NUMBER, _positive, "SECONDS"),
    )
    wait_replicas: int = attrs.field(
        default=0,
        metadata=_rule(
            "replicas that must acknowledge a stored result before it is sent (WAIT; 0: off, "
            "docs/adr/005)",
            "an integer 0-16",
            _valid_wait_replicas,
            "N",
        ),
    )
    wait_replicas_timeout_ms: int = attrs.field(
        default=100,
        metadata=_rule(
            "longest wait for --wait-replicas acknowledgements; fewer in time: sent anyway, "
            "counted in replica_wait_short",
            "an integer 1-60000 (milliseconds)",
            _valid_wait_timeout,
            "MS",
        ),
    )
    wait_replicas_connections: int = attrs.field(
        default=4,
        metadata=_rule(
            "dedicated write-and-WAIT connections per Redis master (results waiting beyond "
            "them queue)",
            "an integer 1-64",
            _valid_pipelines,
            "N",
        ),
    )
    data_dir: Path = attrs.field(
        default=Path("data"),
        metadata=_rule("persistence directory of the embedded Redis", "a path", _anything, "DIR"),
    )
    embedded_maxmemory: MemorySize = attrs.field(
        default=MemorySize("256mb"),
        metadata=_rule(
            "memory cap of the embedded Redis (0: none); a full Redis refuses writes",
            "0 (no cap) or a size of at least 1m such as 256mb or 2gb",
            _valid_maxmemory,
            "SIZE",
        ),
    )
    embedded_maxmemory_policy: MaxmemoryPolicy = attrs.field(
        default=MaxmemoryPolicy.NOEVICTION,
        metadata=_rule(
            "what the embedded Redis does when full; other than noeviction, it deletes data",
            "one of " + ", ".join(MaxmemoryPolicy),
            _member_of(MaxmemoryPolicy),
            "POLICY",
        ),
    )
    session_ttl_seconds: int = attrs.field(
        default=86400,
        metadata=_rule(
            "a session expires after this long without client activity",
            _POSITIVE_INT,
            _positive,
            "SECONDS",
        ),
    )
    market_update_interval_seconds: float = attrs.field(
        default=30.0,
        metadata=_rule(
            "time between market ticks (fixed rate; an overrunning tick skips slots)",
            f"a number >= {MIN_MARKET_INTERVAL}",
            _tick_interval,
            "SECONDS",
        ),
    )
    max_tickers: int = attrs.field(
        default=10000,
        metadata=_rule(
            "most tickers the market prices; set_holdings past it answers ticker_limit",
            _POSITIVE_INT,
            _positive,
            "N",
        ),
    )
    symbols: Path | None = attrs.field(
        default=None,
        metadata=_rule(
            "file of the only tickers that may be held, one per line (# comments); "
            "others answer unknown_ticker; unset allows any",
            "a path",
            _anything,
            "FILE",
        ),
    )
    market_pipelines: int = attrs.field(
        default=8,
        metadata=_rule(
            "index buckets one process revalues at once (pipelines in flight per tick)",
            "an integer 1-64",
            _valid_pipelines,
            "N",
        ),
    )
    metric_delay_seconds: tuple[float, float] = attrs.field(
        default=(2.0, 5.0),
        metadata=_rule(
            "simulated compute time per metric, drawn from MIN-MAX (0,0 for benchmarks)",
            "MIN,MAX seconds with 0 <= MIN <= MAX",
            _valid_delay,
            "MIN,MAX",
        ),
    )
    max_staleness_seconds: float = attrs.field(
        default=0.0,
        metadata=_rule(
            "how long an analysis may keep storing results computed from prices that a "
            "newer market valuation superseded (0: not at all); a holdings change always "
            "restarts it",
            "a number >= 0",
            _non_negative,
            "SECONDS",
        ),
    )
    log_level: LogLevel = attrs.field(
        default=LogLevel.INFO,
        metadata=_rule(
            "log threshold", "one of debug, info, warning, error", _member_of(LogLevel), "LEVEL"
        ),
    )
    log_format: LogFormat = attrs.field(
        default=LogFormat.AUTO,
        metadata=_rule(
            "log format; auto is text on a terminal, JSON lines otherwise",
            "one of auto, json, text",
            _member_of(LogFormat),
            "auto|json|text",
        ),
    )
    default_holdings: dict[str, float] = attrs.field(
        factory=lambda: dict(DEFAULT_HOLDINGS),
        metadata=_rule(
            "holdings of a new session",
            "TICKER:QUANTITY,... with 1-100 positive quantities",
            _valid_holdings,
            "TICKER:QTY,...",
        ),
    )
    results_limit: int = attrs.field(
        default=500,
        metadata=_rule("newest analysis results kept per session", _POSITIVE_INT, _positive, "N"),
    )
    key_prefix: str = attrs.field(
        default="portfolio",
        metadata=_rule(
            "namespace of every Redis key",
            "1-64 of A-Z a-z 0-9 _ . : -",
            _valid_key_prefix,
            "PREFIX",
        ),
    )
    market_seed: int = attrs.field(
        default=0, metadata=_rule("seed of the simulated market", "an integer", _anything, "N")
    )
    market_source: MarketSourceKind = attrs.field(
        default=MarketSourceKind.SIMULATED,
        metadata=_rule(
            "where prices come from: the simulator, or replay of --replay-file",
            "one of simulated, replay",
            _member_of(MarketSourceKind),
            "simulated|replay",
        ),
    )
    replay_file: Path = attrs.field(
        default=SAMPLE_PRICES_FILE,
        metadata=_rule(
            "CSV of timestamp,ticker,price rows for --market-source replay",
            "a path",
            _anything,
            "FILE",
        ),
    )
    replay_speed: float = attrs.field(
        default=1.0,
        metadata=_rule(
            "replay seconds played per wall-clock second (1: real time)",
            _POSITIVE_NUMBER,
            _positive,
            "FACTOR",
        ),
    )
    replay_max_rows: int = attrs.field(
        default=1_000_000,
        metadata=_rule(
            "largest replay file, in rows (and 128 bytes a row)", _POSITIVE_INT, _positive, "N"
        ),
    )
    max_message_bytes: int = attrs.field(
        default=65536,
        metadata=_rule(
            "largest client frame; a larger one closes with 1009", _POSITIVE_INT, _positive, "BYTES"
        ),
    )
    outbox_size: int = attrs.field(
        default=64,
        metadata=_rule("frames buffered per connection", _POSITIVE_INT, _positive, "N"),
    )
    max_connections: int = attrs.field(
        default=10000,
        metadata=_rule("concurrent WebSocket connections", _POSITIVE_INT, _positive, "N"),
    )
    messages_per_second: float = attrs.field(
        default=20.0,
        metadata=_rule(
            "sustained client frames per second per connection", _POSITIVE_NUMBER, _positive, "RATE"
        ),
    )
    message_burst: int = attrs.field(
        default=40,
        metadata=_rule(
            "client frames allowed in a burst above the rate", _POSITIVE_INT, _positive, "N"
        ),
    )
    shutdown_timeout_seconds: float = attrs.field(
        default=4.0,
        metadata=_rule(
            "grace period for connections at shutdown", "a number >= 0", _non_negative, "SECONDS"
        ),
    )
    max_sessions: int = attrs.field(
        default=100_000,
        metadata=_rule(
            "live sessions in the store; creating more is refused (503)",
            _POSITIVE_INT,
            _positive,
            "N",
        ),
    )
    sessions_per_second: float = attrs.field(
        default=10.0,
        metadata=_rule(
            "sustained new sessions per second per client address (over it: 429)",
            _POSITIVE_NUMBER,
            _positive,
            "RATE",
        ),
    )
    session_burst: int = attrs.field(
        default=100,
        metadata=_rule(
            "new sessions a client address may create in a burst above the rate",
            _POSITIVE_INT,
            _positive,
            "N",
        ),
    )
    max_tracked_addresses: int = attrs.field(
        default=100_000,
        metadata=_rule(
            "client addresses the new-session rate limit remembers (least recent forgotten)",
            _POSITIVE_INT,
            _positive,
            "N",
        ),
    )
    max_connections_per_address: int = attrs.field(
        default=2000,
        metadata=_rule(
            "concurrent WebSocket connections per client address (over it: 429)",
            _POSITIVE_INT,
            _positive,
            "N",
        ),
    )
    trusted_proxies: tuple[str, ...] = attrs.field(
        default=(),
        metadata=_rule(
            "proxies (CIDRs) whose X-Forwarded-For names the client address",
            "comma-separated IP networks like 127.0.0.1/32,10.0.0.0/8",
            _valid_networks,
            "CIDR,...",
        ),
    )
    allowed_origins: tuple[str, ...] = attrs.field(
        default=(),
        metadata=_rule(
            "Origins allowed besides the server's own (empty: loopback origins; * any)",
            "comma-separated scheme://host[:port] in lower case, or * or null",
            _valid_origins,
            "ORIGIN,...",
        ),
    )
    allowed_hosts: tuple[str, ...] = attrs.field(
        default=(),
        metadata=_rule(
            "Host header values served (DNS rebinding guard; empty: any)",
            "comma-separated host or host:port in lower case",
            _valid_hosts,
            "HOST,...",
        ),
    )
    auth_secret: str | None = attrs.field(
        default=None,
        repr=_secret_repr,
        metadata=_rule(
            "turns on session credentials: the HMAC key (unset: no authentication)",
            f"a secret of at least {MIN_SECRET_CHARS} characters",
            _valid_secret,
            "SECRET",
        ),
    )
    auth_secret_file: Path | None = attrs.field(
        default=None,
        metadata=_rule(
            "like --auth-secret, read from this file (surrounding whitespace stripped)",
            "a path",
            _anything,
            "FILE",
        ),
    )
    client_idle_timeout_seconds: float = attrs.field(
        default=1800.0,
        metadata=_rule(
            "advertised to browser pages: close the socket after this long without "
            "user activity (0: never)",
            "a number >= 0",
            _non_negative,
            "SECONDS",
        ),
    )
    ping_interval_seconds: float = attrs.field(
        default=20.0,
        metadata=_rule(
            "ping every WebSocket this often (0: never)", "a number >= 0", _non_negative, "SECONDS"
        ),
    )
    ping_timeout_seconds: float = attrs.field(
        default=20.0,
        metadata=_rule(
            "close (1011) a WebSocket whose pong is this late",
            _POSITIVE_NUMBER,
            _positive,
            "SECONDS",
        ),
    )
    idle_timeout_seconds: float = attrs.field(
        default=0.0,
        metadata=_rule(
            "close (1000) a WebSocket that sent no frame for this long (0: never)",
            "a number >= 0",
            _non_negative,
            "SECONDS",
        ),
    )
    client_auto_reconnect: bool = attrs.field(
        default=True,
        metadata=_rule(
            "advertised to browser pages: reconnect after the socket drops",
            "true or false",
            _is_bool,
            "true|false",
        ),
    )
    outbox_max_bytes: int = attrs.field(
        default=1 << 20,
        metadata=_rule(
            "bytes of frames queued per connection; more closes it (1008) as too slow",
            _POSITIVE_INT,
            _positive,
            "BYTES",
        ),
    )

    workers: int = attrs.field(
        default=1,
        metadata=_rule(
            "worker processes sharing the port (auto: one per CPU); 1 is a single process",
            f"an integer 1-{MAX_WORKERS} or auto",
            _valid_workers,
            "N|auto",
        ),
    )

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(type(self)):
            rule: _Rule = field.metadata["rule"]
            value = getattr(self, field.name)
            if not rule.check(value):
                shown = _shown(field.name, value)
                raise ConfigError(f"{field.name}: expected {rule.expect}, got {shown}")
        if self.auth_secret is not None and self.auth_secret_file is not None:
            raise ConfigError("auth_secret and auth_secret_file: give one of them, not both")

    def auth_key(self) -> bytes | None:
        """The HMAC key of session credentials, ``None`` when authentication is off.

        Reads ``auth_secret_file`` when that is the source (on every call:
        the server calls this once at start).  Raises :class:`ConfigError`
        when the file cannot be read or holds a secret that is too short.
        """
        if self.auth_secret is not None:
            return self.auth_secret.encode()
        if self.auth_secret_file is None:
            return None
        try:
            secret = self.auth_secret_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            path = self.auth_secret_file
            raise ConfigError(f"auth_secret_file: cannot read {path}: {why}") from None
        if not _valid_secret(secret):
            raise ConfigError(
                f"auth_secret_file: {self.auth_secret_file} holds fewer than "
                f"{MIN_SECRET_CHARS} characters"
            )
        return secret.encode()


_FIELDS: dict[str, "attrs.Attribute[Any]"] = {f.name: f for f in attrs.fields(Settings)}


def flag_name(name: str) -> str:
    """``redis_url`` -> ``--redis-url``."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """``redis_url`` -> ``PORTFOLIO_REDIS_URL``."""
    return ENV_PREFIX + name.upper()


# -- the converter: text or TOML value -> typed value -------------------------


class _Invalid(ValueError):
    """A raw value does not convert; ``reason`` adds to the field's rule."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "invalid")
        self.reason = reason


def _to_int(raw: object, _: type) -> int:
    if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", raw):
        return int(raw)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    raise _Invalid


def _to_float(raw: object, _: type) -> float:
    if isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            raise _Invalid from None
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    else:
        raise _Invalid
    if not math.isfinite(value):
        raise _Invalid
    return value


def _to_str(raw: object, _: type) -> str:
    if not isinstance(raw, str):
        raise _Invalid
    return raw.strip()


def _to_optional_str(raw: object, _: type) -> str | None:
    """``None`` and the empty string both mean "unset"."""
    return None if raw is None or raw == "" else _to_str(raw, str)


def _to_bool(raw: object, _: type) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
    raise _Invalid


def _to_strings(raw: object, _: type) -> tuple[str, ...]:
    """From ``a,b`` (empty text: none) or a TOML array of strings; each stripped, lower case."""
    items: Sequence[object]
    if isinstance(raw, str):
        items = [item for item in raw.split(",") if item.strip()]
    elif isinstance(raw, list | tuple):
        items = raw
    else:
        raise _Invalid
    return tuple(_to_str(item, str).lower().rstrip("/") for item in items)


def _to_optional_path(raw: object, _: type) -> Path | None:
    return None if raw is None or raw == "" else _to_path(raw, Path)


def _to_path(raw: object, _: type) -> Path:
    if isinstance(raw, Path):
        return raw
    text = _to_str(raw, str)
    if not text:
        raise _Invalid
    return Path(text)


def _to_memory_size(raw: object, _: object) -> MemorySize:
    """From ``256mb`` (any case) or a TOML integer of bytes."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return MemorySize(str(raw))
    return MemorySize(_to_str(raw, str).lower())


def _to_enum(raw: object, cls: type[enum.StrEnum]) -> enum.StrEnum:
    try:
        return cls(_to_str(raw, str).lower())
    except ValueError:
        raise _Invalid from None


def _to_delay(raw: object, _: type) -> tuple[float, float]:
    parts: Sequence[object]
    if isinstance(raw, str):
        parts = raw.split(",")
    elif isinstance(raw, list | tuple):
        parts = raw
    else:
        raise _Invalid
    if len(parts) != 2:
        raise _Invalid
    return (_to_float(parts[0], float), _to_float(parts[1], float))


def _to_holdings(raw: object, _: type) -> dict[str, float]:
    """From ``AAPL:100,MSFT:75`` or a TOML table, validated like ``set_holdings``."""
    table: Mapping[object, object]
    if isinstance(raw, str):
        table = {}
        for item in raw.split(","):
            ticker, colon, quantity = item.partition(":")
            if not colon:
                raise _Invalid(f"{item.strip()!r} is not TICKER:QUANTITY")
            try:
                table[ticker] = _to_float(quantity, float)
            except _Invalid:
                raise _Invalid(f"{item.strip()!r}: quantity is not a number") from None
    elif isinstance(raw, Mapping):
        table = raw
    else:
        raise _Invalid
    try:
        return normalise_holdings(table)
    except ProtocolError as exc:
        raise _Invalid(exc.detail) from None


_converter = cattrs.Converter()
"""Owns every hook turning a raw setting (text or TOML value) into its type."""
_converter.register_structure_hook(int, _to_int)
_converter.register_structure_hook(float, _to_float)
_converter.register_structure_hook(str, _to_str)
_converter.register_structure_hook(Path, _to_path)
_converter.register_structure_hook_func(lambda t: t == str | None, _to_optional_str)
_converter.register_structure_hook_func(lambda t: t == tuple[float, float], _to_delay)
_converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _to_strings)
_converter.register_structure_hook_func(lambda t: t == Path | None, _to_optional_path)
_converter.register_structure_hook(bool, _to_bool)
_converter.register_structure_hook_func(lambda t: t == dict[str, float], _to_holdings)
_converter.register_structure_hook_func(lambda t: t is MemorySize, _to_memory_size)
for _enum in (
    RedisLayout,
    LogLevel,
    LogFormat,
    MarketSourceKind,
    MaxmemoryPolicy,
):  # before the str hook they subclass
    _converter.register_structure_hook(_enum, _to_enum)


_converter.register_unstructure_hook(Path, str)
_converter.register_unstructure_hook_func(lambda t: t == tuple[float, float], list)
_converter.register_unstructure_hook_func(lambda t: t == tuple[str, ...], list)
_converter.register_unstructure_hook_func(lambda t: t == Path | None, lambda v: v and str(v))


# -- loading ----------------------------------------------------------------


def _convert(name: str, raw: object, source: str) -> Any:
    """Turn one raw value into the field's type, or a :class:`ConfigError`."""
    field = _FIELDS[name]
    rule: _Rule = field.metadata["rule"]
    problem = f"{source}: expected {rule.expect}, got {_shown(name, raw)}"
    if name == "workers" and isinstance(raw, str) and raw.strip().lower() == "auto":
        raw = cpu_count()
    try:
        value = _converter.structure(raw, field.type or object)
    except _Invalid as exc:
        raise ConfigError(problem + (f" ({exc.reason})" if exc.reason else "")) from None
    if not rule.check(value):
        raise ConfigError(problem)
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_settings(
    flags: Mapping[str, object] | argparse.Namespace,
    env: Mapping[str, str],
    config_file: Path | None,
) -> Settings:
    """Build the effective :class:`Settings`; raise :class:`ConfigError` if invalid.

    ``flags`` maps field names to values, ``None`` meaning "not given" (an
    ``argparse.Namespace`` from :func:`add_setting_flags` works as is;
    other keys are ignored).  ``env`` is searched for ``PORTFOLIO_<FIELD>``;
    other variables, even with the prefix, are ignored.  ``config_file``
    names a TOML file whose keys are field names (an unknown key is an
    error); when ``None``, the ``config`` flag and then ``PORTFOLIO_CONFIG``
    are consulted.  Relative paths are relative to the working directory.
    """
    given = dict(vars(flags)) if isinstance(flags, argparse.Namespace) else dict(flags)
    if config_file is None:
        named = given.get("config") or env.get(CONFIG_ENV) or None
        config_file = Path(str(named)) if named is not None else None

    layers: list[tuple[Callable[[str], str], Mapping[str, object]]] = []
    if config_file is not None:
        table = _read_toml(config_file)
        unknown = sorted(set(table) - set(_FIELDS))
        if unknown:
            raise ConfigError(
                f"{config_file}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(_FIELDS)}"
            )
        layers.append((lambda name: f"{config_file}: {name}", table))
    env_layer = {n: env[env_name(n)] for n in _FIELDS if env_name(n) in env}
    layers.append((env_name, env_layer))
    flag_layer = {n: v for n, v in given.items() if n in _FIELDS and v is not None}
    layers.append((flag_name, flag_layer))

    values: dict[str, Any] = {}
    for source, layer in layers:
        for name, raw in layer.items():
            values[name] = _convert(name, raw, source(name))
    settings = Settings(**values)
    settings.auth_key()  # an unreadable secret file is a configuration error, now
    check_analyses_finish(settings)
    return settings


def check_analyses_finish(settings: Settings) -> None:
    """Refuse settings under which market ticks could restart analyses forever.

    Guarantee 8; the rule and the bound it gives are in
    :mod:`trio_portfolio.staleness`.  :func:`load_settings` (every start-up
    from flags, environment or file) runs it; a :class:`Settings` built in
    code is checked field by field only, so tests may compress time below
    the overhead margin, and code that embeds the server may call this.

    Raises:
      ConfigError: naming the settings and a value of either that works.
    """
    problem = analyses_finish_problem(
        settings.market_update_interval_seconds,
        settings.metric_delay_seconds[1],
        settings.max_staleness_seconds,
    )
    if problem is not None:
        raise ConfigError(problem)


def analysis_deadline_seconds(settings: Settings) -> float:
    """The documented bound on one analysis's duration under ``settings`` (guarantee 8).

    Raises:
      ConfigError: for settings :func:`check_analyses_finish` refuses.
    """
    try:
        return analysis_duration_bound(
            settings.market_update_interval_seconds,
            settings.metric_delay_seconds[1],
            settings.max_staleness_seconds,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per setting, each defaulting to ``None``."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"TOML file of settings, keyed like redis_url = ... (env {CONFIG_ENV})",
    )
    defaults = Settings()
    for name, field in _FIELDS.items():
        rule: _Rule = field.metadata["rule"]
        shown = _flag_text(getattr(defaults, name))
        parser.add_argument(
            flag_name(name),
            dest=name,
            metavar=rule.metavar,
            default=None,
            help=f"{rule.help} (env {env_name(name)}; default: {shown})".replace("%", "%%"),
        )


# -- rendering ---------------------------------------------------------------


def _flag_text(value: object) -> str:
    """A value as one would type it after its flag (``2,5``, ``AAPL:100``)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return ",".join(value) if value else "none"
    if isinstance(value, tuple):
        return ",".join(_short_number(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}:{_short_number(v)}" for k, v in value.items())
    return str(value)


def _short_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def settings_as_dict(settings: Settings, *, mask_secrets: bool = True) -> dict[str, Any]:
    """Plain JSON/TOML-ready values (paths and enums as strings, tuples as lists)."""
    out: dict[str, Any] = _converter.unstructure(settings)
    if mask_secrets and settings.redis_url is not None:
        out["redis_url"] = mask_url(settings.redis_url)
    if mask_secrets:
        for name in _SECRETS:
            if out[name] is not None:
                out[name] = _MASK
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_char(char: str) -> str:
    """One character of a TOML basic string, escaped if it must be."""
    if char in '"\\':
        return "\\" + char
    if ord(char) < 0x20 or char == "\x7f":
        return f"\\u{ord(char):04x}"
    return char


def settings_as_text(settings: Settings) -> str:
    """The effective configuration as TOML lines, secrets masked.

    Fed back as a config file it reproduces ``settings`` (except a masked
    password); an unset ``redis_url`` becomes a comment.
    """
    lines = []
    for name, value in settings_as_dict(settings).items():
        if value is None:
            lines.append(f"# {name} is unset")
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
