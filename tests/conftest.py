"""pytest wiring for :mod:`trio_portfolio.testing`; the logic lives there.

Fixtures:

* ``redis_server`` (session): a :class:`RedisServerInfo`, parametrised over
  every server :func:`discover_servers` finds (ids are server names).
* ``real_redis`` (session): one non-emulated server, JSON-capable first,
  else the newest.
* ``store_target`` (session): a :class:`StoreTarget`, parametrised over
  every (server, layout) pair: ``hash`` everywhere, ``json`` where the
  server has the JSON module (ids like ``hash-redis-7.0.15`` or
  ``json-fakeredis-8.0(emulated)``).
* ``key_prefix`` (function): a unique key prefix, so tests can share servers.
* ``redis_cluster`` (session): a :class:`RedisCluster` of 3 masters with 1
  replica each; ``redis_sentinel`` (session): a :class:`RedisSentinelSetup`
  of 1 master, 1 replica, 3 sentinels.  Started on first use (about 2 s
  each), from :func:`find_topology_binary`.  Tests that fail over must leave
  the same shape behind (fail back, or wait until ready again).

Discovery runs once, at collection, and starts nothing; each server starts
when a test first needs it and stops when the session ends.  The run ends
with a summary of the servers and layouts tests actually used.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from trio_portfolio.testing import (
    LayoutUnavailable,
    RedisCluster,
    RedisSentinelSetup,
    RedisServerInfo,
    RedisServerPool,
    ServerSpec,
    StoreTarget,
    discover_servers,
    find_topology_binary,
    run_redis_cluster,
    run_redis_sentinel,
    store_target_id,
    store_target_params,
    unique_key_prefix,
)

_POOL = pytest.StashKey[RedisServerPool]()


def _pool(config: pytest.Config) -> RedisServerPool:
    if _POOL not in config.stash:
        config.stash[_POOL] = RedisServerPool(discover_servers())
    return config.stash[_POOL]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_server" in metafunc.fixturenames:
        specs = _pool(metafunc.config).specs
        metafunc.parametrize(
            "redis_server", specs, ids=[s.name for s in specs], indirect=True, scope="session"
        )
    if "store_target" in metafunc.fixturenames:
        pairs = store_target_params(_pool(metafunc.config).specs)
        metafunc.parametrize(
            "store_target",
            pairs,
            ids=[store_target_id(*pair) for pair in pairs],
            indirect=True,
            scope="session",
        )


def pytest_report_header(config: pytest.Config) -> list[str]:
    """What discovery found, and where from, before any test runs."""
    lines = ["redis servers found:"]
    for spec in _pool(config).specs:
        known = spec.version or "version unknown"
        lines.append(f"  {spec.name} ({known}; {spec.source or 'emulated'})")
    lines.append(f"cluster and sentinel topologies from: {find_topology_binary() or 'none'}")
    return lines


def pytest_unconfigure(config: pytest.Config) -> None:
    if _POOL in config.stash:
        config.stash[_POOL].close()


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    lines = config.stash[_POOL].summary_lines() if _POOL in config.stash else []
    if lines:
        terminalreporter.section("Redis servers and store layouts exercised")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def _redis_pool(request: pytest.FixtureRequest) -> Iterator[RedisServerPool]:
    pool = _pool(request.config)
    yield pool
    pool.close()


def _spec_param(request: pytest.FixtureRequest) -> ServerSpec:
    spec = getattr(request, "param", None)
    if isinstance(spec, tuple):  # store_target's (spec, layout)
        spec = spec[0]
    if not isinstance(spec, ServerSpec):
        pytest.fail(f"{request.fixturename} must be a test argument, so it can be parametrised")
    return spec


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest, _redis_pool: RedisServerPool) -> RedisServerInfo:
    info = _redis_pool.server(_spec_param(request))
    _redis_pool.record_use("-", info)
    return info


@pytest.fixture(scope="session")
def real_redis(_redis_pool: RedisServerPool) -> RedisServerInfo:
    spec = _redis_pool.real_server_spec()
    if spec is None:
        pytest.skip("no real Redis: install redis-server or set PORTFOLIO_TEST_REDIS_URL")
    info = _redis_pool.server(spec)
    _redis_pool.record_use("-", info)
    return info


@pytest.fixture(scope="session")
def store_target(request: pytest.FixtureRequest, _redis_pool: RedisServerPool) -> StoreTarget:
    spec, layout = _spec_param(request), request.param[1]
    try:
        return _redis_pool.store_target(spec, layout)
    except LayoutUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def key_prefix() -> str:
    return unique_key_prefix()


def _topology_binary() -> str:
    binary = find_topology_binary()
    if binary is None:
        pytest.skip("no redis-server >= 7.0 for a cluster: apt-get install redis-server")
    return str(binary)


@pytest.fixture(scope="session")
def redis_cluster(_redis_pool: RedisServerPool) -> Iterator[RedisCluster]:
    with run_redis_cluster(_topology_binary()) as cluster:
        name = f"cluster-{len(cluster.nodes)}-nodes-{cluster.version}"
        info = RedisServerInfo(name, cluster.url, cluster.version, has_json=False, emulated=False)
        _redis_pool.record_use("-", info)
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel(_redis_pool: RedisServerPool) -> Iterator[RedisSentinelSetup]:
    with run_redis_sentinel(_topology_binary()) as setup:
        name = f"sentinel-{len(setup.sentinels)}-sentinels-{setup.version}"
        info = RedisServerInfo(name, setup.url, setup.version, has_json=False, emulated=False)
        _redis_pool.record_use("-", info)
        yield setup
