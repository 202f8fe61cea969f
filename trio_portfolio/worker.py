"""One worker process of ``serve --workers N``: what it is given, and its tie to the parent.

The supervisor (:mod:`trio_portfolio.supervisor`) starts each worker as
``python -m trio_portfolio worker`` with a :class:`WorkerSpec` in the
environment variable :data:`SPEC_ENV` (JSON: the effective settings, with
the Redis URL the supervisor chose, the group, and the numbers of the
inherited listening sockets).  The environment rather than the command line,
because a Redis password must not show in ``ps``.

A worker must not outlive its supervisor, even one killed with SIGKILL:

* :func:`die_with_parent` asks Linux (``prctl(PR_SET_PDEATHSIG, SIGTERM)``)
  to send SIGTERM when the supervisor dies, then checks the parent is still
  the one named in the spec (it may have died before the ``prctl``);
* :func:`watch_parent` polls ``os.getppid()`` every :data:`PARENT_POLL`
  seconds, for systems without the death signal.

Either way the worker shuts down as on a SIGTERM: it stops accepting, closes
its connections with 1001 within ``shutdown_timeout_seconds`` and exits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence

import attrs
import orjson
import trio

from trio_portfolio.config import ConfigError, Settings, load_settings, settings_as_dict
from trio_portfolio.group import GroupSpec
from trio_portfolio.server import ServerInfo, serve

__all__ = [
    "PARENT_POLL",
    "SPEC_ENV",
    "WorkerSpec",
    "WorkerSpecError",
    "die_with_parent",
    "run_worker",
    "watch_parent",
]

log = logging.getLogger(__name__)

SPEC_ENV = "_TRIO_PORTFOLIO_WORKER"
"""The environment variable carrying a worker's :class:`WorkerSpec` (JSON)."""
PARENT_POLL = 0.5
"""Seconds between two checks that the supervisor is still our parent."""
_PR_SET_PDEATHSIG = 1


class WorkerSpecError(ValueError):
    """The worker spec is missing or malformed (the worker was not started by a supervisor)."""


@attrs.frozen
class WorkerSpec:
    """Everything a worker is given by its supervisor."""

    settings: Settings
    group: GroupSpec
    listen_fds: tuple[int, ...]

    def encode(self) -> str:
        """The JSON text :meth:`decode` reads back (the Redis URL unmasked: it is needed)."""
        return orjson.dumps(
            {
                "settings": settings_as_dict(self.settings, mask_secrets=False),
                "group": attrs.asdict(self.group),
                "listen_fds": list(self.listen_fds),
            }
        ).decode()

    @classmethod
    def decode(cls, text: str) -> WorkerSpec:
        """Raise :class:`WorkerSpecError` if ``text`` is not what :meth:`encode` wrote."""
        try:
            raw = orjson.loads(text)
            settings = load_settings(dict(raw["settings"]), {}, None)
            group = GroupSpec(**raw["group"])
            fds = tuple(int(fd) for fd in raw["listen_fds"])
        except (orjson.JSONDecodeError, ConfigError, KeyError, TypeError, ValueError) as exc:
            raise WorkerSpecError(f"bad worker spec in {SPEC_ENV}: {exc}") from None
        if not fds or not 0 <= group.slot < group.size:
            raise WorkerSpecError(f"bad worker spec in {SPEC_ENV}: {text[:200]}")
        return cls(settings=settings, group=group, listen_fds=fds)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerSpec:
        """The spec the supervisor left in :data:`SPEC_ENV`; :class:`WorkerSpecError` if none."""
        text = environ.get(SPEC_ENV)
        if text is None:
            raise WorkerSpecError(
                f"{SPEC_ENV} is not set: workers are started by `trio-portfolio serve --workers N`"
            )
        return cls.decode(text)


def die_with_parent(parent_pid: int) -> None:
    """Have SIGTERM sent to this process when ``parent_pid`` (our parent) dies.

    Linux only (elsewhere :func:`watch_parent` is the only tie).  If the
    parent is already gone, exits at once with status 1: nobody would
    supervise or stop this worker.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:
        sys.exit(f"trio-portfolio worker: supervisor (pid {parent_pid}) is gone")


async def watch_parent(parent_pid: int, on_gone: Callable[[], None]) -> None:
    """Call ``on_gone()`` once our parent is no longer ``parent_pid``, then return."""
    while os.getppid() == parent_pid:  # noqa: ASYNC110  # no event to wait on for this
        await trio.sleep(PARENT_POLL)
    log.warning("supervisor (pid %d) is gone: shutting down", parent_pid)
    on_gone()


def _listen_sockets(fds: Sequence[int]) -> list[socket.socket]:
    """The inherited listening sockets, as Python sockets owning their fds."""
    return [socket.socket(fileno=fd) for fd in fds]


async def run_worker(spec: WorkerSpec) -> None:
    """Serve on the inherited sockets as one worker of the group, until told to stop.

    Stops gracefully on SIGTERM/SIGINT (what the supervisor sends) and when
    the supervisor dies.
    """
    sockets = _listen_sockets(spec.listen_fds)
    parent = spec.group.parent_pid
    async with trio.open_nursery() as nursery:
        info: list[ServerInfo] = []

        def on_parent_gone() -> None:
            if info:
                info[0].server.stop()
            else:  # still starting: nothing to drain
                nursery.cancel_scope.cancel()

        async def serve_then_stop(task_status: trio.TaskStatus[ServerInfo]) -> None:
            await serve(
                spec.settings, listen_sockets=sockets, group=spec.group, task_status=task_status
            )
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_parent, parent, on_parent_gone)
        info.append(await nursery.start(serve_then_stop))
        log.info("worker %d/%d ready", spec.group.slot + 1, spec.group.size)
