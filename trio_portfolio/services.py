"""Nurseries for background services that live behind an async context manager.

``open_redis``, the pub/sub hub and the server each own background tasks and
hand their caller an object to use inside ``async with``.  With Trio's strict
exception groups, an exception raised by the *caller's* code in that block
would come out wrapped in an ``ExceptionGroup``, which is surprising: the
caller wrote ``except StoreUnavailable`` and gets a group instead.

The rule that makes unwrapping sound: the background tasks started in these
nurseries never raise (they turn their failures into state, such as a broken
connection, and log).  So a group with exactly one exception holds the body's
own exception, which is re-raised as itself.  A group of several (a bug in a
background task *and* a body error) is left intact so nothing is hidden.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def open_service_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose body's single exception propagates unwrapped; cancelled on exit."""
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise
