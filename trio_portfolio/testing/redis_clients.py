"""Adapter clients opened the way the Redis suites open them.

:func:`subscribed` is the prelude of every publish-and-receive test: a
command client and a pub/sub client on one server, the channel subscribed
(under a deadline) before the test publishes anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from trio_portfolio.redis_io import RedisClient, open_redis
from trio_portfolio.redis_pubsub import PubSub, open_pubsub


@asynccontextmanager
async def subscribed(
    url: str, channel: str, timeout: float = 5.0
) -> AsyncIterator[tuple[RedisClient, PubSub]]:
    """``(client, pubsub)`` on ``url`` with ``channel`` subscribed; both closed on the way out.

    Raises:
        trio.TooSlowError: the subscription was not confirmed within ``timeout``.
        trio_portfolio.redis_io.StoreUnavailable: the server cannot be reached.
    """
    async with open_redis(url) as redis, open_pubsub(url) as pubsub:
        with trio.fail_after(timeout):
            await pubsub.subscribe(channel)
        yield redis, pubsub
