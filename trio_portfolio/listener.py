"""The accept loop: file-descriptor limits, and backing off when they are reached.

Theory of operation
===================

Every connection costs a file descriptor, and the default soft limit
(often 1,024) is far below ``max_connections``.  :func:`raise_open_file_limit`
raises the soft ``RLIMIT_NOFILE`` to the hard limit once at start (the hard
limit is the administrator's to set), and says so when even that is below
what the settings may need.

When the process runs out anyway, ``accept`` fails with ``EMFILE`` (or
``ENFILE``, ``ENOBUFS``, ``ENOMEM``) and the pending connection stays in
the kernel's backlog.  Retrying at once would spin, and crashing would drop
every client, so :func:`serve_listener` backs off: it sleeps
``BACKOFF_MIN`` doubling to ``BACKOFF_MAX`` between attempts, logs one
warning when a burst of failures begins and one line when accepting works
again (with the number of failed attempts), never a line per attempt.
Any other error propagates (a closed listener ends the loop quietly).
``trio.serve_listeners`` does the sleeping part, but with a fixed 0.1 s and
an error log with a traceback on every failed attempt.

Each accepted connection runs ``handler(stream)`` in ``handler_nursery``;
the handler owns the stream (closing it is its job).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0
FDS_PER_CONNECTION_HEADROOM = 64
"""Descriptors kept for Redis connections, the event loop and logging."""


def raise_open_file_limit(needed: int) -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; ``(before, after)``.

    ``needed`` is how many descriptors the settings may use (connections
    plus headroom); a warning says so when the hard limit is below it.  On a
    platform without ``resource`` (Windows) nothing changes: ``(-1, -1)``.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if target > soft or soft == resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:  # e.g. macOS caps at OPEN_MAX
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
            target = soft
        else:
            log.info("open-file limit raised from %d to %d", soft, target)
    else:
        target = soft
    if target != resource.RLIM_INFINITY and target < needed:
        log.warning(
            "open-file limit %d is below the %d the connection limits may need; "
            "accepting will pause when it is reached (raise the hard limit, e.g. ulimit -Hn)",
            target,
            needed,
        )
    return soft, target


async def serve_listener(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    handler_nursery: trio.Nursery,
) -> None:
    """Accept until cancelled or the listener is closed; see the module docstring."""
    failures = 0
    delay = BACKOFF_MIN
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                if failures == 0:
                    log.warning(
                        "cannot accept connections: %s (%s); backing off until descriptors free up",
                        errno.errorcode.get(exc.errno or 0, "?"),
                        os.strerror(exc.errno or 0),
                    )
                failures += 1
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if failures:
                log.warning("accepting connections again after %d failed attempts", failures)
                failures, delay = 0, BACKOFF_MIN
            handler_nursery.start_soon(handler, stream)
