"""``serve --workers N``: one port, one embedded Redis, N supervised worker processes.

Theory of operation
===================

The supervisor is the parent process.  It serves nothing itself; its task
tree is::

    run_supervisor()                    root nursery
    ├── embedded redis-server           only without --redis-url; stopped last
    └── Supervisor.run                  workers nursery
        ├── signal watcher              SIGINT/SIGTERM -> stop (a second one: kill)
        └── one slot task per worker    spawn, wait, restart with backoff

*One port.*  :func:`bind_listeners` binds ``host:port`` once (every address
the host resolves to, ``SO_REUSEADDR``, ``listen``), and every worker
inherits the listening sockets (``pass_fds``) and accepts on them: the
kernel hands each incoming connection to one of the workers waiting in
``accept``.  The supervisor keeps its copies open, so while a worker
restarts the port stays bound and connections queue for the others.

*One Redis.*  Without ``--redis-url`` the supervisor starts the embedded
Redis (:func:`~trio_portfolio.embedded.run_embedded_redis`) and gives its
URL to every worker; the workers never start one.

*Supervision.*  Each slot runs its worker (``python -m trio_portfolio
worker``, settings in the environment, see :mod:`trio_portfolio.worker`)
and, when it exits without being asked to, logs the exit status and starts
a new one in the same slot after a backoff doubling from
:attr:`RestartPolicy.initial_backoff` to :attr:`RestartPolicy.max_backoff`
(reset once a worker has run :attr:`RestartPolicy.stable_after` seconds).
:attr:`RestartPolicy.crash_loop_deaths` deaths within
:attr:`RestartPolicy.crash_loop_window` seconds, counted over all slots, is
a crash loop: the supervisor stops every worker and :func:`run_supervisor`
raises :class:`CrashLoop`, which the CLI turns into a message and exit 1.

Workers are forked on the Trio thread (``subprocess.Popen``, a
``vfork``+``exec``), not in :func:`trio.lowlevel.open_process`'s worker
thread: Linux's parent-death signal, which each worker asks for, fires when
the *forking thread* exits, and a thread cache retires idle threads.  A
worker is waited on through a pidfd.  Workers run in their own session, so a
terminal's Ctrl-C reaches only the supervisor, which decides.

*Shutdown.*  SIGINT or SIGTERM: the supervisor sends SIGTERM to every
worker; each drains (1001 to every client) within
``shutdown_timeout_seconds``; whatever is still running
:data:`STOP_GRACE` seconds after that is killed.  A second signal kills at
once.  Then the embedded Redis stops.  If the supervisor itself is killed,
the workers get SIGTERM from the kernel (or notice their new parent) and
shut down the same way.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

import attrs
import trio

from trio_portfolio.config import Settings
from trio_portfolio.embedded import run_embedded_redis
from trio_portfolio.group import GroupSpec
from trio_portfolio.services import open_service_nursery
from trio_portfolio.worker import SPEC_ENV, WorkerSpec

__all__ = [
    "BACKLOG",
    "STOP_GRACE",
    "CrashLoop",
    "RestartPolicy",
    "Supervisor",
    "bind_listeners",
    "run_supervisor",
]

log = logging.getLogger(__name__)

BACKLOG = 4096
"""Connections the kernel queues on the shared listening socket (capped by somaxconn)."""
STOP_GRACE = 3.0
"""Seconds past ``shutdown_timeout_seconds`` a worker gets to exit before it is killed."""
_POLL = 0.1


class CrashLoop(RuntimeError):
    """Workers kept dying; the message says how often and how the last one ended."""


@attrs.frozen
class RestartPolicy:
    """How dead workers are restarted, and what counts as a crash loop."""

    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    stable_after: float = 10.0
    crash_loop_deaths: int = 5
    crash_loop_window: float = 30.0


def bind_listeners(host: str, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening TCP sockets on every address of ``host``, all on one port.

    Like :func:`trio.open_tcp_listeners`: ``SO_REUSEADDR``, IPv6 sockets
    ``IPV6_V6ONLY``; with port 0 the first socket picks the port and the
    others use it.  Blocking (name resolution): call it from a thread in
    async code.  Raises :class:`OSError` if an address cannot be bound.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Worker:
    """A started worker: its ``Popen`` and a pidfd to wait on."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.started = trio.current_time()
        self._pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):  # kernel < 5.3: poll instead
                self._pidfd = os.pidfd_open(popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` unless the worker has been reaped already."""
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    async def wait(self) -> int:
        """Until the worker exits (reaped); its status (``-N`` for signal N)."""
        try:
            if self._pidfd is not None and self.popen.returncode is None:
                await trio.lowlevel.wait_readable(self._pidfd)
            while (code := self.popen.poll()) is None:  # noqa: ASYNC110  # no pidfd: poll
                await trio.sleep(_POLL)
            return code
        finally:
            if self._pidfd is not None and self.popen.returncode is not None:
                trio.lowlevel.notify_closing(self._pidfd)
                os.close(self._pidfd)
                self._pidfd = None


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """Runs ``settings.workers`` workers on ``sockets`` against ``redis_url``; see the module."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        sockets: Sequence[socket.socket],
        *,
        policy: RestartPolicy = RestartPolicy(),  # frozen, so sharing is safe
        handle_signals: bool = True,
    ) -> None:
        self.settings = attrs.evolve(settings, redis_url=redis_url)
        self.sockets = list(sockets)
        self.policy = policy
        self.handle_signals = handle_signals
        self.group_id = secrets.token_hex(6)
        self.workers: dict[int, _Worker] = {}
        """Live workers by slot."""
        self.stopping = trio.Event()
        self.failure: str | None = None
        self._deaths: collections.deque[float] = collections.deque(maxlen=policy.crash_loop_deaths)

    def stop(self, failure: str | None = None) -> None:
        """Stop every worker gracefully (what SIGINT/SIGTERM do); ``failure`` makes it an error."""
        if failure is not None and self.failure is None:
            self.failure = failure
        if not self.stopping.is_set():
            self.stopping.set()
            for worker in self.workers.values():
                worker.signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill every worker now."""
        for worker in self.workers.values():
            worker.signal(signal.SIGKILL)

    def _spawn(self, slot: int) -> _Worker:
        """Start the worker of ``slot``; synchronous, on the Trio thread (see the module)."""
        spec = WorkerSpec(
            settings=self.settings,
            group=GroupSpec(
                group_id=self.group_id,
                size=self.settings.workers,
                slot=slot,
                parent_pid=os.getpid(),
            ),
            listen_fds=tuple(sock.fileno() for sock in self.sockets),
        )
        env = dict(os.environ)
        env[SPEC_ENV] = spec.encode()
        popen = subprocess.Popen(
            [sys.executable, "-m", "trio_portfolio", "worker"],
            stdin=subprocess.DEVNULL,
            pass_fds=spec.listen_fds,
            env=env,
            start_new_session=True,
        )
        return _Worker(popen)

    async def run(self) -> None:
        """Run the workers until stopped; raise :class:`CrashLoop` if they keep dying.

        Cancelled (say, because the embedded Redis failed for good), it still
        stops its workers, shielded and within the same deadlines.
        """
        try:
            async with trio.open_nursery() as nursery:
                if self.handle_signals:
                    nursery.start_soon(self._watch_signals)
                for slot in range(self.settings.workers):
                    nursery.start_soon(self._run_slot, slot)
                await self.stopping.wait()
                await self._drain()
                nursery.cancel_scope.cancel()
        finally:
            if self._running():
                with trio.CancelScope(shield=True):
                    self.stop()
                    await self._drain()
        if self.failure is not None:
            raise CrashLoop(self.failure)

    def _running(self) -> list[_Worker]:
        return [worker for worker in self.workers.values() if worker.popen.poll() is None]

    async def _drain(self) -> None:
        """Wait for the stopping workers; kill those still running after the grace period."""
        grace = self.settings.shutdown_timeout_seconds + STOP_GRACE
        with trio.move_on_after(grace):
            while self._running():  # noqa: ASYNC110  # reaped by their slots or by poll()
                await trio.sleep(_POLL)
        left = self._running()
        if left:
            pids = ", ".join(str(worker.pid) for worker in left)
            log.warning("killing %d worker(s) still running after %gs: %s", len(left), grace, pids)
            self.kill()
        with trio.move_on_after(STOP_GRACE):
            while self._running():  # noqa: ASYNC110
                await trio.sleep(_POLL)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stopping.is_set():
                    log.warning("received %s again: killing the workers", name)
                    self.kill()
                else:
                    log.info("received %s: stopping %d workers", name, len(self.workers))
                    self.stop()

    async def _run_slot(self, slot: int) -> None:
        """Keep a worker running in ``slot`` until stopping; count its deaths."""
        policy = self.policy
        backoff = policy.initial_backoff
        name = f"worker {slot + 1}/{self.settings.workers}"
        while not self.stopping.is_set():
            try:
                worker = self._spawn(slot)
            except OSError as exc:
                code_text = f"could not start: {exc}"
                ran = 0.0
            else:
                self.workers[slot] = worker
                log.info("%s started (pid %d)", name, worker.pid)
                try:
                    code = await worker.wait()
                finally:
                    if self.workers.get(slot) is worker and worker.popen.returncode is not None:
                        del self.workers[slot]
                ran = trio.current_time() - worker.started
                code_text = f"(pid {worker.pid}) {_describe_exit(code)}"
                if self.stopping.is_set():
                    log.info("%s %s", name, code_text)
                    return
            now = trio.current_time()
            self._deaths.append(now)
            if (
                len(self._deaths) == policy.crash_loop_deaths
                and now - self._deaths[0] <= policy.crash_loop_window
            ):
                message = (
                    f"crash loop: workers died {policy.crash_loop_deaths} times within "
                    f"{policy.crash_loop_window:g}s (last: {name} {code_text}); stopping"
                )
                log.error("%s", message)
                self.stop(failure=message)
                return
            if ran >= policy.stable_after:
                backoff = policy.initial_backoff
            log.error("%s %s; restarting in %.1fs", name, code_text, backoff)
            with trio.move_on_after(backoff):
                await self.stopping.wait()
            backoff = min(backoff * 2, policy.max_backoff)


async def run_supervisor(
    settings: Settings,
    *,
    handle_signals: bool = True,
    policy: RestartPolicy = RestartPolicy(),
    task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind the port, start the embedded Redis if needed, run the workers until stopped.

    A worker that exits is restarted with backoff (``policy``); a graceful
    stop (signal or :meth:`Supervisor.stop`) returns normally once every
    worker has exited.  Errors come out unwrapped (not in an ``ExceptionGroup``).

    Raises:
      OSError: the port cannot be bound (in use, no permission), before
        any worker starts.
      trio_portfolio.embedded.EmbeddedRedisError: the embedded Redis cannot
        start or crash-loops (no ``redis_url`` only).
      CrashLoop: the workers keep dying faster than ``policy`` allows.
    """
    sockets = await trio.to_thread.run_sync(bind_listeners, settings.host, settings.port)
    try:
        port = sockets[0].getsockname()[1]
        async with open_service_nursery() as root:  # our errors come out unwrapped
            redis_url = settings.redis_url
            if redis_url is None:
                redis_url = await root.start(
                    functools.partial(
                        run_embedded_redis,
                        settings.data_dir,
                        maxmemory=settings.embedded_maxmemory,
                        maxmemory_policy=settings.embedded_maxmemory_policy.value,
                    )
                )
                log.info("embedded Redis at %s (data in %s)", redis_url, settings.data_dir)
            supervisor = Supervisor(
                settings, redis_url, sockets, policy=policy, handle_signals=handle_signals
            )
            log.info(
                "listening on %s:%d with %d workers (group %s)",
                settings.host,
                port,
                settings.workers,
                supervisor.group_id,
            )
            task_status.started(supervisor)
            await supervisor.run()
    finally:
        for sock in sockets:
            sock.close()
