"""The integration harness, importable by any Trio project's tests.

* :mod:`~trio_portfolio.testing.redis_servers` - real Redis servers (binaries,
  a Docker container, or the fakeredis JSON emulator, visibly marked), found
  and started for a test session.
* :mod:`~trio_portfolio.testing.faults` - a TCP proxy that cuts, refuses or
  black-holes connections, for outage tests.
* :mod:`~trio_portfolio.testing.live_server` - a whole server in-process and a
  WebSocket client that decodes and records every frame.

None of it imports pytest; ``tests/conftest.py`` is the thin pytest layer.
"""

from trio_portfolio.testing.faults import ProxyStatistics, TcpProxy, open_tcp_proxy
from trio_portfolio.testing.redis_servers import (
    DEFAULT_IMAGE,
    EMULATED_NOTE,
    ENV_URL,
    Layout,
    LayoutUnavailable,
    RedisBinary,
    RedisServerInfo,
    RedisServerPool,
    RedisStartError,
    ServerSpec,
    StoreTarget,
    container_server_name,
    discover_servers,
    docker_engine_available,
    find_redis_binaries,
    list_redis_binaries,
    probe_server,
    run_fakeredis_json,
    run_redis_binary,
    run_redis_container,
    store_target_id,
    store_target_params,
    unique_key_prefix,
    use_redis_url,
)

__all__ = [
    "DEFAULT_IMAGE",
    "EMULATED_NOTE",
    "ENV_URL",
    "Layout",
    "LayoutUnavailable",
    "ProxyStatistics",
    "RedisBinary",
    "RedisServerInfo",
    "RedisServerPool",
    "RedisStartError",
    "ServerSpec",
    "StoreTarget",
    "TcpProxy",
    "container_server_name",
    "discover_servers",
    "docker_engine_available",
    "find_redis_binaries",
    "list_redis_binaries",
    "open_tcp_proxy",
    "probe_server",
    "run_fakeredis_json",
    "run_redis_binary",
    "run_redis_container",
    "store_target_id",
    "store_target_params",
    "unique_key_prefix",
    "use_redis_url",
]
