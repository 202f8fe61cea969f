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

``store_target`` in the suites named in :data:`TOPOLOGY_SUITES` (the store
contract and concurrency suites) also has the targets ``hash-cluster`` and
``hash-sentinel`` (when a topology binary is found and no
``PORTFOLIO_TEST_REDIS_URL`` pins one server): the hash layout on that same
cluster (``redis+cluster://`` with every node as a seed) and through that same
Sentinel setup, started once for both uses and listed as the rows ``cluster``
and ``sentinel`` of the closing table.

Discovery runs once, at collection, and starts nothing; each server starts
when a test first needs it and stops when the session ends.  The run ends
with a summary of the servers and layouts tests actually used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from trio_portfolio.testing import (
    ENV_URL,
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

TOPOLOGY_SUITES = frozenset({"test_store_contract", "test_store_concurrency"})
"""Modules whose ``store_target`` also covers ``cluster`` and ``sentinel``.

They open Redis through :func:`trio_portfolio.redis_connect.open_redis` (the
URL dispatch); a suite that opens with the single-node
:func:`trio_portfolio.redis_io.open_redis` cannot use a ``redis+cluster://``
or ``redis+sentinel://`` URL, so it joins here once it switches.
"""

_POOL = pytest.StashKey[RedisServerPool]()
_TOPOLOGIES = pytest.StashKey["_Topologies"]()
_TARGETS = pytest.StashKey[list[ServerSpec]]()


class _Topologies:
    """The one cluster and the one Sentinel setup of a run, started on first use.

    Shared by the ``redis_cluster``/``redis_sentinel`` fixtures and the
    ``cluster``/``sentinel`` store targets, so a run starts at most one of each.
    A topology that failed to start is not retried (its error is re-raised).
    """

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._cluster: RedisCluster | None = None
        self._sentinel: RedisSentinelSetup | None = None
        self._failed: dict[str, BaseException] = {}

    def _start(self, what: str, start: contextlib.AbstractContextManager[object]) -> object:
        if what in self._failed:
            raise RuntimeError(f"the {what} failed to start earlier") from self._failed[what]
        try:
            return self._stack.enter_context(start)
        except BaseException as exc:
            self._failed[what] = exc
            raise

    def cluster(self) -> RedisCluster:
        if self._cluster is None:
            cluster = self._start("cluster", run_redis_cluster(_topology_binary()))
            assert isinstance(cluster, RedisCluster)
            self._cluster = cluster
        return self._cluster

    def sentinel(self) -> RedisSentinelSetup:
        if self._sentinel is None:
            setup = self._start("sentinel setup", run_redis_sentinel(_topology_binary()))
            assert isinstance(setup, RedisSentinelSetup)
            self._sentinel = setup
        return self._sentinel

    @contextlib.contextmanager
    def cluster_info(self) -> Iterator[RedisServerInfo]:
        cluster = self.cluster()
        yield RedisServerInfo("cluster", cluster.url, cluster.version, False, False)

    @contextlib.contextmanager
    def sentinel_info(self) -> Iterator[RedisServerInfo]:
        setup = self.sentinel()
        yield RedisServerInfo("sentinel", setup.url, setup.version, False, False)

    def close(self) -> None:
        self._cluster = self._sentinel = None
        self._stack.close()


def _topologies(config: pytest.Config) -> _Topologies:
    if _TOPOLOGIES not in config.stash:
        config.stash[_TOPOLOGIES] = _Topologies()
    return config.stash[_TOPOLOGIES]


def _pool(config: pytest.Config) -> RedisServerPool:
    if _POOL not in config.stash:
        config.stash[_POOL] = RedisServerPool(discover_servers())
    return config.stash[_POOL]


def _store_specs(config: pytest.Config) -> list[ServerSpec]:
    """The servers the store is tested on: the pool's, then ``cluster`` and ``sentinel``."""
    if _TARGETS not in config.stash:
        specs = list(_pool(config).specs)
        binary = find_topology_binary()
        if binary is not None and not os.environ.get(ENV_URL):
            topologies = _topologies(config)
            for name, start in (
                ("cluster", topologies.cluster_info),
                ("sentinel", topologies.sentinel_info),
            ):
                specs.append(ServerSpec(name, start, has_json=False, source=os.fspath(binary)))
        config.stash[_TARGETS] = specs
    return config.stash[_TARGETS]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_server" in metafunc.fixturenames:
        specs = _pool(metafunc.config).specs
        metafunc.parametrize(
            "redis_server", specs, ids=[s.name for s in specs], indirect=True, scope="session"
        )
    if "store_target" in metafunc.fixturenames:
        topologies = metafunc.module.__name__.rpartition(".")[2] in TOPOLOGY_SUITES
        specs = _store_specs(metafunc.config) if topologies else _pool(metafunc.config).specs
        pairs = store_target_params(specs)
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
    if _TOPOLOGIES in config.stash:
        config.stash[_TOPOLOGIES].close()


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
def redis_cluster(request: pytest.FixtureRequest, _redis_pool: RedisServerPool) -> RedisCluster:
    cluster = _topologies(request.config).cluster()
    info = RedisServerInfo("cluster", cluster.url, cluster.version, has_json=False, emulated=False)
    _redis_pool.record_use("-", info)
    return cluster


@pytest.fixture(scope="session")
def redis_sentinel(
    request: pytest.FixtureRequest, _redis_pool: RedisServerPool
) -> RedisSentinelSetup:
    setup = _topologies(request.config).sentinel()
    info = RedisServerInfo("sentinel", setup.url, setup.version, has_json=False, emulated=False)
    _redis_pool.record_use("-", info)
    return setup
