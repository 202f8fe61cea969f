"""Sessions on Redis: one :class:`SessionStore` interface, two key layouts.

The package, from the bottom up (each module imports only those above it):

* :mod:`~trio_portfolio.store.codec` - ARGV encoding and reply decoding (pure);
* :mod:`~trio_portfolio.store.base` - :class:`SessionStore`, its key names
  and every operation, written once for both layouts;
* :mod:`~trio_portfolio.store.json_layout` and
  :mod:`~trio_portfolio.store.hash_layout` - the two layouts;
* :mod:`~trio_portfolio.store.replication` - a result's write followed by
  ``WAIT`` on a dedicated connection (``--wait-replicas``);
* ``lua/`` - their scripts and the shared Lua libraries;
* this module - choosing a layout and opening a store (:func:`open_store`).

Callers import from here; the submodules are the implementation.  The
theory of operation is in :mod:`trio_portfolio.store.base`, the decision
record in ``docs/adr/002-session-store-layouts.md``.
"""

from __future__ import annotations

import logging
import uuid

import orjson

from trio_portfolio.lua_scripts import load_script
from trio_portfolio.redis_io import CommandError, RedisClient, StoreUnavailable
from trio_portfolio.store.base import (
    CLAIM_GRACE_MS,
    CLOCK_SKEW_MS,
    INDEX_BUCKET_TAGS,
    INDEX_BUCKETS,
    LUA,
    OPERATIONS,
    RESULT_IDS_LIMIT,
    ClaimedPrices,
    ClaimExpired,
    HoldingsReplaced,
    Layout,
    LayoutChoice,
    MarketPrices,
    RevalueTally,
    SessionCensus,
    SessionKeys,
    SessionStore,
)
from trio_portfolio.store.codec import (
    StoreDataError,
    payload_document,
    portfolio_from_document,
    split_reply,
)
from trio_portfolio.store.hash_layout import HashSessionStore
from trio_portfolio.store.json_layout import JsonSessionStore
from trio_portfolio.store.replication import ReplicaWait, ReplicaWaitStatistics, open_replica_wait

__all__ = [
    "CLAIM_GRACE_MS",
    "CLOCK_SKEW_MS",
    "INDEX_BUCKETS",
    "INDEX_BUCKET_TAGS",
    "OPERATIONS",
    "RESULT_IDS_LIMIT",
    "ClaimExpired",
    "ClaimedPrices",
    "HashSessionStore",
    "HoldingsReplaced",
    "JsonSessionStore",
    "Layout",
    "LayoutChoice",
    "MarketPrices",
    "ReplicaWait",
    "ReplicaWaitStatistics",
    "RevalueTally",
    "SessionCensus",
    "SessionKeys",
    "SessionStore",
    "StoreDataError",
    "StoreLayoutUnavailable",
    "detect_layout",
    "json_module_available",
    "open_replica_wait",
    "open_store",
    "payload_document",
    "portfolio_from_document",
    "split_reply",
]

log = logging.getLogger(__name__)

_SAMPLE = 5
"""Indexed ids :func:`detect_layout` looks at."""

_LAYOUTS: dict[Layout, type[SessionStore]] = {"json": JsonSessionStore, "hash": HashSessionStore}


class StoreLayoutUnavailable(RuntimeError):
    """The requested layout cannot work on this server (``json`` without the JSON module)."""


async def json_module_available(redis: RedisClient, *, key_prefix: str = "portfolio") -> bool:
    """Whether Lua scripts can use RedisJSON on this server.

    One script writes, reads back and deletes a scratch document, so the
    probe leaves nothing behind even if cancelled.  An error reply (no
    JSON module, or not allowed) means no.

    Raises:
      StoreUnavailable: if Redis cannot be used now.
      CommandError: if Redis refuses to load the probe script.
    """
    probe = load_script(LUA, "json_probe")
    key = f"{key_prefix}:layout-probe:{uuid.uuid4().hex}"
    # Loaded first so EVALSHA never meets NOSCRIPT: some servers (fakeredis)
    # close the connection after any error reply.
    await redis.load_scripts([probe])
    try:
        answer = await redis.evalsha(probe, [key], ['{"probe":[1,"x"]}'])
    except CommandError:
        return False
    try:
        return bool(orjson.loads(answer) == [{"probe": [1, "x"]}])
    except (TypeError, orjson.JSONDecodeError):
        return False


async def detect_layout(redis: RedisClient, *, key_prefix: str = "portfolio") -> Layout:
    """The layout ``auto`` means here: that of existing sessions, else json if possible.

    Existing sessions win so that upgrading Redis (say 7 to 8, gaining JSON)
    does not make the sessions already stored unreadable.  A few random ids
    from the index are looked at (one drawn from each bucket and a few from
    the whole index of earlier versions, in one pipeline): only the hash
    layout has a ``:holdings`` key.  (``TYPE`` would say it directly, but fakeredis cannot answer it
    for a JSON key.)  Without sessions: ``json`` where the JSON module works
    from scripts, else ``hash``.

    Raises:
      StoreUnavailable: if Redis cannot be used now.
      CommandError: if an index key is not a set (clobbered), or Redis
        refuses to load the probe script.
    """
    keys = SessionKeys(key_prefix)
    draws = await redis.pipeline(
        [("SRANDMEMBER", key, 1) for key in keys.index_keys()]
        + [("SRANDMEMBER", keys.legacy_index, _SAMPLE)]
    )
    sample: list[str] = []
    for drawn in draws:
        if isinstance(drawn, CommandError | StoreUnavailable):
            raise drawn
        sample += [s for s in drawn if s not in sample]
    del sample[_SAMPLE:]
    if sample:
        commands: list[tuple[str, str]] = []
        for session_id in sample:
            commands.append(("EXISTS", keys.session(session_id)))
            commands.append(("EXISTS", keys.holdings(session_id)))
        found = await redis.pipeline(commands)
        for session_exists, holdings_exist in zip(found[::2], found[1::2], strict=True):
            if session_exists == 1:
                return "hash" if holdings_exist == 1 else "json"
    return "json" if await json_module_available(redis, key_prefix=key_prefix) else "hash"


async def open_store(
    redis: RedisClient,
    *,
    layout: LayoutChoice = "auto",
    key_prefix: str = "portfolio",
    session_ttl_seconds: int = 86400,
    results_limit: int = 500,
    replica_wait: ReplicaWait | None = None,
) -> SessionStore:
    """A ready :class:`SessionStore`: layout chosen, scripts loaded.

    ``auto`` follows :func:`detect_layout`.  An explicit ``json`` is checked
    against the server; an explicit ``hash`` works everywhere.  Nothing is
    retried: the caller decides whether (and how long) to wait for Redis.
    Cancelling it is safe (the probe leaves nothing behind; loading scripts
    twice is harmless).  ``replica_wait``: results are written and waited
    for there (see :mod:`trio_portfolio.store.replication`).

    Raises:
      StoreLayoutUnavailable: if ``layout="json"`` and the server's scripts
        cannot use RedisJSON.
      ValueError: for an unknown ``layout``, an empty or brace-holding
        ``key_prefix``, or a TTL or results limit below 1 (``layout`` is
        checked before anything is sent, the rest before the store's
        scripts are loaded).
      StoreUnavailable: if Redis cannot be used now (down, refusing, not
        answering within the adapter's timeout).
      CommandError: if Redis refuses a script (scripting disabled, a broken
        script) or ``auto`` finds the session index clobbered.
    """
    chosen: Layout
    if layout == "auto":
        chosen = await detect_layout(redis, key_prefix=key_prefix)
    elif layout == "json":
        if not await json_module_available(redis, key_prefix=key_prefix):
            raise StoreLayoutUnavailable(
                f"layout 'json' needs the RedisJSON module at {redis.params.describe()}"
            )
        chosen = "json"
    elif layout == "hash":
        chosen = "hash"
    else:
        raise ValueError(f"unknown layout {layout!r}: expected auto, json or hash")
    store = _LAYOUTS[chosen](
        redis,
        key_prefix=key_prefix,
        session_ttl_seconds=session_ttl_seconds,
        results_limit=results_limit,
        replica_wait=replica_wait,
    )
    await store.load_scripts()
    log.info("session store: %s layout, key prefix %r", store.layout, key_prefix)
    return store
