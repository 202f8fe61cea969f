"""Adapter clients opened the way the Redis suites open them.

:func:`subscribed` is the prelude of every publish-and-receive test: a
command client and a pub/sub client on one server, the channel subscribed
(under a deadline) before the test publishes anything.
:func:`store_and_market` is the prelude of the market suites: a session
store and market data on one client, their scripts loaded.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from trio_portfolio.market_data import MarketData
from trio_portfolio.redis_io import RedisClient, open_redis
from trio_portfolio.redis_pubsub import PubSub, open_pubsub
from trio_portfolio.simulation import GbmSimulator
from trio_portfolio.store import SessionStore, open_store
from trio_portfolio.testing.redis_servers import StoreTarget


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


@asynccontextmanager
async def store_and_market(
    target: StoreTarget, key_prefix: str, *, seed: int = 3, **market: Any
) -> AsyncIterator[tuple[SessionStore, MarketData, RedisClient]]:
    """``(store, market, client)`` on ``target`` under ``key_prefix``, scripts loaded.

    The market is simulated (:class:`GbmSimulator` with ``seed``); ``market``
    are further :class:`MarketData` options (``max_tickers``, ``symbols``).

    Raises:
        trio.TooSlowError: opening took more than 10 s.
        trio_portfolio.redis_io.StoreUnavailable: the server cannot be reached.
    """
    async with open_redis(target.server.url) as redis:
        with trio.fail_after(10):
            store = await open_store(redis, layout=target.layout, key_prefix=key_prefix)
            data = MarketData(redis, GbmSimulator(seed=seed), key_prefix=key_prefix, **market)
            await data.load_scripts()
        yield store, data, redis


async def stored_histories(
    redis: RedisClient, key_prefix: str, tickers: list[str]
) -> dict[str, tuple[float, ...]]:
    """Each ticker's price history as the market stores it, decoded from the documented layout.

    Written from the layout in :mod:`trio_portfolio.market_data`'s docstring,
    not with its code: ``<prefix>:{market}:history:<ticker>`` is a ring of
    16-hex-character little-endian float64 slots, tick ``t``'s price at slot
    ``t mod length``, read in one ``MULTI`` with the tick counter.  A ticker
    without a ring gets ``()``.
    """
    base = f"{key_prefix}:{{market}}"
    reply = await redis.pipeline(
        [
            ("MULTI",),
            ("GET", f"{base}:tick"),
            *(("GET", f"{base}:history:{t}") for t in tickers),
            ("EXEC",),
        ]
    )
    tick_text, *rings = reply[-1]
    tick = int(tick_text or 0)
    out: dict[str, tuple[float, ...]] = {}
    for ticker, ring in zip(tickers, rings, strict=True):
        slots = [ring[i : i + 16] for i in range(0, len(ring or ""), 16)]
        if not slots:
            out[ticker] = ()
            continue
        newest = tick % len(slots)
        ordered = slots[newest + 1 :] + slots[: newest + 1]
        out[ticker] = tuple(struct.unpack("<d", bytes.fromhex(s))[0] for s in ordered)
    return out
