"""The :class:`SessionStore` interface, key names, and the operations both layouts share.

Theory of operation
===================

Redis is the only record of a session; every server process reads and
writes it there, so every decision that depends on the stored state is taken
*in Redis*, by one Lua script per operation (see
``docs/adr/002-session-store-layouts.md``).  Nothing here trusts Python
state across an await: the fence of :meth:`SessionStore.append_result`
(current analysis and portfolio version) is re-checked by the script.

Two layouts implement the same behaviour, each in its own module with its
scripts in ``store/lua/``:

* ``json`` (:mod:`trio_portfolio.store.json_layout`) - one RedisJSON
  document per session, the design of ADR-001; needs the JSON module
  (Redis 8).
* ``hash`` (:mod:`trio_portfolio.store.hash_layout`) - core types only
  (hashes and a list), for Redis 6.2 / 7.x.

The two layouts' scripts (``lua/<layout>_<operation>.lua``, with
``lua/store_lib.lua`` and ``lua/store_lib_<layout>.lua`` prepended) take the
same ARGV and answer in the same shape, decoded by
:mod:`trio_portfolio.store.codec`; so every operation is written once, in
this class, and a layout subclass says only which keys a session has and
how a plain read is done.

Cancellation: each mutation is one EVALSHA, so a cancelled call either ran
entirely or not at all; the adapter guarantees no stray replies.  The index
of session ids is maintained with separate commands (never inside a
session's script, which on Redis Cluster may only touch that session's
slot); see :meth:`SessionStore.create_if_missing` and
:meth:`SessionStore.forget` for why its races are harmless.

The index is :data:`INDEX_BUCKETS` bucket sets ``<prefix>:sessions:{<tag n>}``
with ``n = crc32(id) % INDEX_BUCKETS``, whose hash tags (:data:`INDEX_BUCKET_TAGS`)
put bucket ``n`` in the middle of the ``n``-th 64th of the 16384 slots, so on a
Redis Cluster the buckets spread over the masters as evenly as whole buckets
can (21/21/22 over 3 masters): no slot grows with the number of sessions
beyond a 64th of them.  A bucket is the unit of work several processes share
in one market tick (see :mod:`trio_portfolio.market`).  Counting sessions is
one pipeline of 64 ``SCARD`` (:meth:`SessionStore.session_census`; a cluster
client splits it per node), listing them a walk of the buckets.

Migration: versions before this one also kept the whole set
``<prefix>:sessions`` (:attr:`SessionKeys.legacy_index`), one key in one slot;
the oldest ones kept only that.  Nothing writes it any more; the market
updater folds whatever it holds into the buckets and removes it there
(:meth:`SessionStore.fold_legacy_index`, one ``SCARD`` per tick when it is
gone), so a store written by an earlier version, or by one still running
beside this one during a rolling upgrade, ends up bucketed.

Revaluation (:meth:`SessionStore.revalue_many`) carries its market tick and
is *fenced* by it: each session records ``valued_tick`` (and ``as_of``), and
a revaluation at a tick not newer than that does nothing, so late or
duplicate work (a paused leader, a bucket taken over from a slow process)
can never move a session back in time.  Each session's call carries the
prices of its own holdings only: a first pipeline reads every session's
held tickers (``HKEYS`` / ``JSON.GET $.holdings``, cheap single commands),
a second sends each session the prices of those; if the holdings changed
in between, the script answers ``need`` and writes nothing, and just those
sessions are sent again.  Reading the market inside the session's script
would be one round trip, but the market's keys live in the ``{market}``
hash slot and a script may touch one slot only (Redis Cluster), so the
prices have to travel as arguments.

Writes of holdings (create, set_holdings) accept a :class:`ClaimedPrices`:
the prices the market answered, with the time (Redis's clock) at which it
claimed those tickers for this write.  The script refuses a write that
arrives more than :data:`CLAIM_GRACE_MS` after the claim
(:class:`ClaimExpired`), which is what lets the market drop unheld tickers
without ever leaving a session holding an unpriced one.

Errors, the same for every operation unless its docstring says otherwise:

* :class:`~trio_portfolio.redis_io.StoreUnavailable` - Redis cannot be
  used now (down, refusing, not answering within the adapter's timeout, or
  the connection was lost with the call in flight, in which case a mutation
  may or may not have run); retrying later is the caller's choice;
* :data:`~trio_portfolio.redis_io.CommandError` - an error reply: a bug, or a
  session key clobbered by something else (``WRONGTYPE``);
* :class:`~trio_portfolio.store.codec.StoreDataError` - a reply that cannot
  be read as a session;
* :class:`ValueError` - arguments the store cannot represent (bad session
  id, non-finite or non-positive numbers, a held ticker without a price),
  raised before anything is sent.
"""

from __future__ import annotations

import abc
import logging
import zlib
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from typing import Any, ClassVar, Literal

import attrs
import trio

from trio_portfolio.lua_scripts import load_script, lua_directory
from trio_portfolio.models import (
    METRICS,
    AnalysisResult,
    AppendStatus,
    Portfolio,
    RevalueOutcome,
    Snapshot,
    StartRefused,
)
from trio_portfolio.redis_io import (
    CommandError,
    RedisClient,
    Script,
    StoreUnavailable,
    Unavailable,
)
from trio_portfolio.store.codec import (
    StoreDataError,
    append_status,
    check_number,
    check_session_id,
    holdings_and_prices_json,
    payload_document,
    portfolio_from_document,
    result_json,
    snapshot_from_payload,
    split_reply,
)
from trio_portfolio.store.replication import ReplicaWait

__all__ = [
    "CLAIM_GRACE_MS",
    "CLOCK_SKEW_MS",
    "INDEX_BUCKETS",
    "INDEX_BUCKET_TAGS",
    "LUA",
    "OPERATIONS",
    "RESULT_IDS_LIMIT",
    "ClaimExpired",
    "ClaimedPrices",
    "HoldingsReplaced",
    "Layout",
    "LayoutChoice",
    "MarketPrices",
    "RevalueTally",
    "SessionCensus",
    "SessionKeys",
    "SessionStore",
]

log = logging.getLogger("trio_portfolio.store")

Layout = Literal["json", "hash"]
LayoutChoice = Literal["auto", "json", "hash"]

LUA = lua_directory("trio_portfolio.store")
"""``trio_portfolio/store/lua/``: every script of both layouts and their shared libraries."""

OPERATIONS: tuple[str, ...] = (
    "create",
    "touch",
    "start_analysis",
    "append_result",
    "finish_analysis",
    "set_holdings",
    "revalue",
)
"""The scripts every layout has, as ``lua/<layout>_<operation>.lua``."""

RESULT_IDS_LIMIT = len(METRICS)
"""Result ids the session records for its current analysis (one per metric)."""

INDEX_BUCKETS = 64
"""How many sets the session index is split into (the unit of shared market work)."""

INDEX_BUCKET_TAGS: tuple[str, ...] = (
    "b0-383",
    "b1-506",
    "b2-73",
    "b3-161",
    "b4-1933",
    "b5-2627",
    "b6-1399",
    "b7-882",
    "b8-1772",
    "b9-1227",
    "b10-277",
    "b11-332",
    "b12-700",
    "b13-185",
    "b14-1560",
    "b15-6",
    "b16-883",
    "b17-5",
    "b18-913",
    "b19-80",
    "b20-16",
    "b21-783",
    "b22-561",
    "b23-424",
    "b24-1327",
    "b25-1672",
    "b26-962",
    "b27-827",
    "b28-1886",
    "b29-2052",
    "b30-1281",
    "b31-896",
    "b32-2081",
    "b33-1855",
    "b34-526",
    "b35-463",
    "b36-791",
    "b37-81",
    "b38-601",
    "b39-72",
    "b40-2392",
    "b41-2107",
    "b42-875",
    "b43-930",
    "b44-42",
    "b45-259",
    "b46-196",
    "b47-713",
    "b48-776",
    "b49-633",
    "b50-747",
    "b51-602",
    "b52-87",
    "b53-258",
    "b54-849",
    "b55-821",
    "b56-1162",
    "b57-1437",
    "b58-863",
    "b59-926",
    "b60-2285",
    "b61-133",
    "b62-411",
    "b63-294",
)
"""The hash tag of each index bucket: ``redis.crc.key_slot`` of tag ``n`` is within 8 of
``n * 256 + 128``, the middle of the ``n``-th of 64 equal slot ranges.

Why: a Redis Cluster splits the 16384 slots into contiguous ranges, one per
master (evenly, as ``redis-cli --cluster create`` does); CRC16 of small
consecutive names (``sessions:0``, ``sessions:1`` ...) lands anywhere, so some
masters would hold many more buckets, and every bucket's market work, than
others.  A slot in the middle of each 64th gives every master count up to 8 the
most even split whole buckets allow (3 masters: 21/21/22; 2, 4, 8: equal), and
an uneven resharding still moves a bucket only with a whole 64th.  Found once
by trying salts ``b<n>-0``, ``b<n>-1``, ... in order (the smallest that fits);
``tests/test_index_buckets.py`` recomputes and checks them.  Fixed forever: a
new tag would orphan the ids in the old bucket set (the market would re-copy
them only if they were still in the legacy whole index, :meth:`SessionStore.fold_legacy_index`).
"""

CLAIM_GRACE_MS = 1000
"""How long (ms of Redis's clock) a market claim of tickers stays good for a write of holdings.

The market keeps every ticker claimed within this long (plus
:data:`CLOCK_SKEW_MS`) before a walk of the sessions started, held or not,
unless its claimant let it go since; a holdings write later than this after its
claim is refused with :class:`ClaimExpired`.  Between two round trips of one
connection a second is an eternity; only a stalled process reaches it.
"""

_FORGET_SECONDS = 2.0
"""Longest :meth:`SessionStore.forget` spends shielded between its removal and its re-check."""

_REVALUE_ROUNDS = 3
"""Sends of one session in one :meth:`SessionStore.revalue_many` (holdings moving meanwhile)."""


CLOCK_SKEW_MS = 250
"""How far apart (ms) the clocks of Redis nodes may be for claims to stay safe.

On Cluster a claim is timed by the market's node and checked against
:data:`CLAIM_GRACE_MS` by the session's node, so a write may land up to the
skew later on the market's clock: the market keeps claims this much longer
than the grace (a pass's cutoff is ``start - CLAIM_GRACE_MS - CLOCK_SKEW_MS``).
On one Redis there is one clock and this is only a margin.
"""


class ClaimExpired(StoreUnavailable):
    """A holdings write came later than :data:`CLAIM_GRACE_MS` after its market claim.

    Nothing was written.  It means the process stalled between two round
    trips, so it is a kind of "the store cannot serve now": claim again
    (ask the market for prices) and retry.
    """


class ClaimedPrices(dict[str, float]):
    """Prices from the market, with when (Redis ms) it claimed their tickers for a write.

    :meth:`trio_portfolio.market.MarketData.ensure_prices` returns one; the
    store passes ``claimed_at_ms`` to the create and set_holdings scripts,
    which refuse the write if it lands more than :data:`CLAIM_GRACE_MS`
    later.  A plain mapping (or a claim time of 0, no tickers claimed)
    carries no claim and is never refused (tests, tools).
    """

    def __init__(self, prices: Mapping[str, float], claimed_at_ms: int) -> None:
        super().__init__(prices)
        self.claimed_at_ms = claimed_at_ms


class MarketPrices:
    """Market prices validated once and rendered as script arguments.

    A tick revalues many pages of sessions at the same prices; building this
    once per tick keeps validation and float formatting out of the per-page
    work.  ``repr`` of a float is its shortest exact decimal, which the
    scripts store as they get it.

    Raises:
      ValueError: for a price that is not a finite number > 0.
    """

    __slots__ = ("texts", "values")

    def __init__(self, prices: Mapping[str, float]) -> None:
        self.values: dict[str, float] = {
            t: check_number(f"price of {t}", p) for t, p in prices.items()
        }
        self.texts: dict[str, str] = {t: repr(p) for t, p in self.values.items()}


@attrs.frozen
class HoldingsReplaced:
    """What :meth:`SessionStore.set_holdings` did: the session now, and the tickers it let go.

    ``let_go`` are the tickers the session held before the write and holds
    no more (sorted); the caller hands them to
    :meth:`trio_portfolio.market_data.MarketData.let_go`, so a ticker nobody
    holds leaves the market at once instead of at the next pass's prune.
    """

    portfolio: Portfolio
    let_go: tuple[str, ...]


@attrs.define
class RevalueTally:
    """What :meth:`SessionStore.revalue_many` saw beyond its outcomes (it adds to these).

    ``held`` is every ticker held by a session that was found live, which is
    what the market's universe is pruned against; ``fenced`` counts sessions
    already valued at the tick or later (nothing written); ``resent``
    counts sessions whose holdings moved between the two round trips.
    """

    held: set[str] = attrs.Factory(set)
    fenced: int = 0
    resent: int = 0


@attrs.frozen
class SessionCensus:
    """What :meth:`SessionStore.session_census` counted: live sessions, and one's existence."""

    live: int
    """Ids in the index buckets (sessions not yet pruned after expiry included)."""
    exists: bool = False
    """Whether the session asked about exists (``False`` when none was asked about)."""


@attrs.frozen
class SessionKeys:
    """Key and channel names.  Every key of a session carries the hash tag ``{session_id}``.

    Sessions live under ``<prefix>:session:``, apart from the market's
    ``<prefix>:{market}:...`` keys: a session may be called ``market``, and
    ``<prefix>:{market}:prices`` must not be both.
    """

    prefix: str

    @property
    def legacy_index(self) -> str:
        """The whole set of session ids earlier versions kept (one slot; only read to migrate)."""
        return f"{self.prefix}:sessions"

    def index_bucket(self, bucket: int) -> str:
        """One of the :data:`INDEX_BUCKETS` sets of session ids (the whole index, together)."""
        return f"{self.prefix}:sessions:{{{INDEX_BUCKET_TAGS[bucket]}}}"

    def index_keys(self) -> list[str]:
        """Every index bucket, in order."""
        return [self.index_bucket(b) for b in range(INDEX_BUCKETS)]

    def index_commands(self, verb: str, session_ids: Sequence[str]) -> list[tuple[str, ...]]:
        """``SADD`` or ``SREM`` of ``session_ids`` on their buckets (one command per bucket)."""
        by_bucket: dict[int, list[str]] = {}
        for session_id in session_ids:
            by_bucket.setdefault(self.bucket_of(session_id), []).append(session_id)
        return [(verb, self.index_bucket(b), *ids) for b, ids in sorted(by_bucket.items())]

    @staticmethod
    def bucket_of(session_id: str) -> int:
        """The index bucket of ``session_id`` (stable across processes and versions)."""
        return zlib.crc32(session_id.encode()) % INDEX_BUCKETS

    def session(self, session_id: str) -> str:
        """The json layout's document, or the hash layout's hash of scalars."""
        return f"{self.prefix}:session:{{{session_id}}}"

    def holdings(self, session_id: str) -> str:
        return f"{self.session(session_id)}:holdings"

    def prices(self, session_id: str) -> str:
        return f"{self.session(session_id)}:prices"

    def results(self, session_id: str) -> str:
        return f"{self.session(session_id)}:results"

    def events(self, session_id: str) -> str:
        """The pub/sub channel of the session's events (a channel, not a key)."""
        return f"{self.session(session_id)}:events"


class SessionStore(abc.ABC):
    """Sessions in Redis, one script per operation; subclasses fix the key layout.

    Use :func:`~trio_portfolio.store.open_store`, which picks the layout and
    loads the scripts.  All methods are safe to call concurrently from many
    tasks and processes: atomicity comes from Redis, not from this object,
    which holds no per-session state.  What each operation raises is listed
    in the module docstring; a method's ``Raises`` names only what it adds
    or where it differs.
    """

    layout: ClassVar[Layout]
    """Which layout this store uses (``"json"`` or ``"hash"``)."""
    extra_operations: ClassVar[tuple[str, ...]] = ()
    """Scripts beyond :data:`OPERATIONS` that the layout needs."""
    script_libraries: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Operations whose script needs fewer libraries than both (defining them costs per call)."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        key_prefix: str = "portfolio",
        session_ttl_seconds: int = 86400,
        results_limit: int = 500,
        replica_wait: ReplicaWait | None = None,
    ) -> None:
        """Read this layout's scripts; nothing is sent to Redis (see :meth:`load_scripts`).

        With ``replica_wait`` every :meth:`append_result` runs on a dedicated
        connection followed by ``WAIT`` (:mod:`trio_portfolio.store.replication`).

        Raises:
          ValueError: if ``key_prefix`` is empty or holds a brace (it would
            break the hash tags), or a limit is below 1.
        """
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ValueError(f"key prefix must be non-empty and brace-free: {key_prefix!r}")
        if session_ttl_seconds < 1:
            raise ValueError("session_ttl_seconds must be at least 1")
        if results_limit < 1:
            raise ValueError("results_limit must be at least 1")
        self.redis = redis
        self.replica_wait = replica_wait
        """Where results are written and waited for (``None``: on the shared connections)."""
        self.keys = SessionKeys(key_prefix)
        self.session_ttl_seconds = session_ttl_seconds
        self.results_limit = results_limit
        self.trim_slack = max(1, results_limit // 4)
        """How far past ``results_limit`` a stored array may grow before it is trimmed."""
        libraries = ("store_lib", f"store_lib_{self.layout}")
        # The one place that picks the publish command (sharded on a cluster).
        publish = "SPUBLISH" if redis.sharded_pubsub else "PUBLISH"
        prelude = f"local PUBLISH_COMMAND = '{publish}'\n"
        self._scripts = {
            op: Script(
                prelude
                + load_script(
                    LUA, f"{self.layout}_{op}", libraries=self.script_libraries.get(op, libraries)
                ).source
            )
            for op in OPERATIONS + self.extra_operations
        }

    # -- layout hooks ----------------------------------------------------------------------

    @abc.abstractmethod
    def session_keys(self, session_id: str) -> list[str]:
        """The KEYS of every script call for this session (all in one hash slot)."""

    @abc.abstractmethod
    async def _read_document(self, session_id: str) -> dict[str, Any] | None:
        """The session in the document schema, read atomically; ``None`` if missing."""

    def revalue_keys(self, session_id: str) -> list[str]:
        """The KEYS of the revalue script (by default :meth:`session_keys`)."""
        return self.session_keys(session_id)

    @abc.abstractmethod
    def held_tickers_command(self, session_id: str) -> tuple[str, ...]:
        """One cheap read-only command whose reply names the session's held tickers."""

    @abc.abstractmethod
    def held_tickers(self, reply: Any) -> list[str]:
        """The tickers in a reply of :meth:`held_tickers_command` (``[]``: gone).

        Raises:
          StoreDataError: for a reply that names no tickers.
        """

    # -- plumbing --------------------------------------------------------------------------

    @property
    def scripts(self) -> tuple[Script, ...]:
        """Every script of this layout (what :meth:`load_scripts` loads)."""
        return tuple(self._scripts.values())

    async def load_scripts(self) -> None:
        """``SCRIPT LOAD`` every script up front (EVALSHA also recovers on NOSCRIPT).

        Raises:
          StoreUnavailable: if Redis cannot be used now.
          CommandError: if Redis refuses a script (a syntax error in the Lua,
            or scripting disabled) or hashes it differently.
        """
        await self.redis.load_scripts(self.scripts)

    def events_channel(self, session_id: str) -> str:
        """The pub/sub channel on which the session's scripts publish events."""
        return self.keys.events(session_id)

    async def _run(
        self, operation: str, session_id: str, *args: str | int
    ) -> tuple[str, list[Any]]:
        """Run ``operation``'s script on ``session_id``'s keys; its reply, split."""
        check_session_id(session_id)
        reply = await self.redis.evalsha(
            self._scripts[operation], self.session_keys(session_id), args
        )
        return split_reply(reply)

    async def _run_and_wait(
        self, operation: str, session_id: str, *args: str | int
    ) -> tuple[str, list[Any]]:
        """As :meth:`_run`, on :attr:`replica_wait`'s connection, ``WAIT`` after it."""
        check_session_id(session_id)
        assert self.replica_wait is not None
        reply = await self.replica_wait.evalsha(
            self._scripts[operation], self.session_keys(session_id), args
        )
        return split_reply(reply)

    # -- operations ------------------------------------------------------------------------

    async def create_if_missing(
        self,
        session_id: str,
        holdings: Mapping[str, float],
        prices: Mapping[str, float],
        now: str,
    ) -> Portfolio:
        """The session, created with ``holdings`` at ``prices`` (version 1) if it did not exist.

        Either way this is client activity (``last_activity`` and TTL).  The
        id is added to its index bucket *before* the script runs: if the call
        is cancelled in between, the index holds an id without a session,
        which the next revaluation reports missing and prunes; the other
        order could leave a session the market updater never sees.  It is
        added once more *after* the script, which closes the race with a
        concurrent :meth:`forget` of the same id (see there).

        Raises:
          ValueError: for an invalid session id, empty holdings, a quantity
            or price that is not a finite number > 0, or a held ticker
            missing from ``prices`` (checked even if the session exists).
          ClaimExpired: if ``prices`` is a :class:`ClaimedPrices` whose claim
            is older than :data:`CLAIM_GRACE_MS` and the session had to be
            created (nothing was written).
          StoreUnavailable, CommandError, StoreDataError: as every operation.
        """
        check_session_id(session_id)
        holdings_json, prices_json = holdings_and_prices_json(holdings, prices)
        await self._index([session_id])
        status, payload = await self._run(
            "create",
            session_id,
            session_id,
            holdings_json,
            prices_json,
            now,
            self.session_ttl_seconds,
            *_claim_arguments(prices),
        )
        if status == "claim_expired":
            raise ClaimExpired(_CLAIM_EXPIRED)
        await self._index([session_id])
        return portfolio_from_document(session_id, payload_document(payload), self.results_limit)

    async def get(self, session_id: str) -> Portfolio | None:
        """The session as stored, or ``None`` if it does not exist.  Not activity.

        Raises:
          ValueError: for an invalid session id.
          StoreUnavailable, CommandError, StoreDataError: as every operation.
        """
        check_session_id(session_id)
        document = await self._read_document(session_id)
        if document is None:
            return None
        return portfolio_from_document(session_id, document, self.results_limit)

    async def touch(self, session_id: str, now: str) -> bool:
        """Record client activity (``last_activity``, TTL); ``False`` if the session is gone.

        Raises:
          ValueError: for an invalid session id.
          StoreUnavailable, CommandError, StoreDataError: as every operation.
        """
        status, _ = await self._run("touch", session_id, now, self.session_ttl_seconds)
        return status == "touched"

    async def start_analysis(
        self,
        session_id: str,
        analysis_id: str,
        ticker: str,
        now: str,
        *,
        replacing: str | None = None,
    ) -> Snapshot | StartRefused:
        """Snapshot the portfolio and make ``analysis_id`` the current analysis, atomically.

        From this moment every append of an earlier analysis is refused
        ``SUPERSEDED``.  Publishes ``analysis_started``.  Clears the session's
        ``superseded_at`` and stored result ids, which belong to the analysis
        now current (:mod:`trio_portfolio.staleness`).  A ticker that is not
        held is refused (``NOT_HELD``); a missing session is refused
        ``MISSING``.  Refusals are answers, not exceptions.

        ``replacing`` is for an automatic restart: the id of the attempt it
        replaces.  The restart starts only if that attempt is still the
        session's current one, checked in the script, and is refused
        ``SWITCHED`` otherwise, so a restart can never take the session back
        from a newer analysis.  A restart is not client activity; a client's
        ``analyze`` (no ``replacing``) is, even when refused ``NOT_HELD``.

        Raises:
          ValueError: for an invalid session id.
          StoreUnavailable, CommandError, StoreDataError: as every operation.
        """
        status, payload = await self._run(
            "start_analysis",
            session_id,
            self.events_channel(session_id),
            analysis_id,
            ticker,
            now,
            self.session_ttl_seconds,
            replacing or "",
        )
        if status == "missing":
            return StartRefused.MISSING
        if status == "not_held":
            return StartRefused.NOT_HELD
        if status == "switched":
            return StartRefused.SWITCHED
        return snapshot_from_payload(session_id, analysis_id, ticker, now, payload)

    async def append_result(
        self,
        session_id: str,
        result: AnalysisResult,
        *,
        holdings_version: int | None = None,
        max_staleness_ms: int = 0,
        retry: bool = False,
    ) -> AppendStatus:
        """THE FENCE: store ``result`` only if its analysis is current and it is fresh.

        Fresh is the rule of :mod:`trio_portfolio.staleness`:
        ``holdings_version`` (the snapshot's) is still the session's, and the
        portfolio version is still ``result.portfolio_version`` or was first
        superseded at most ``max_staleness_ms`` ago (0: not at all).  Without
        a ``holdings_version`` only the strict rule can be applied (any new
        portfolio version, holdings changes included, is stale), so
        ``max_staleness_ms`` must then be 0.
        ``SUPERSEDED`` if another (or no) analysis is current, ``STALE`` if
        not fresh, ``MISSING`` if the session is gone: refusals are answers,
        not exceptions.  Keeps the newest ``results_limit`` results.  Not
        activity (the TTL is left alone).  With :attr:`replica_wait` it
        returns only once ``WAIT`` answered (or timed out): the write was
        acknowledged by that many replicas, or counted ``short``.

        Idempotent per :attr:`~trio_portfolio.models.AnalysisResult.result_id` (when set):
        a result already stored is not stored again and is answered
        ``ALREADY_STORED`` (the session records the ids stored for its
        current analysis, at most :data:`RESULT_IDS_LIMIT`, cleared by the
        next start).  ``retry=True`` says the caller lost the answer to an
        earlier call with this result (:class:`StoreUnavailable`): if its
        analysis is no longer current, the stored results themselves are
        searched for it, so the answer is still ``ALREADY_STORED`` if that
        earlier call stored it, and ``SUPERSEDED`` only if nothing did.  For
        a non-current analysis nothing can be stored, so a re-ask after the
        analysis stopped being current is a definite "was it stored?".

        Raises:
          ValueError: for an invalid session id, a non-finite value, or a
            staleness bound without a holdings version.
          StoreDataError: also for a status the fence does not know.
          StoreUnavailable, CommandError: as every operation.
        """
        if holdings_version is None and max_staleness_ms > 0:
            raise ValueError("a staleness bound needs the snapshot's holdings version")
        run = self._run if self.replica_wait is None else self._run_and_wait
        status, _ = await run(
            "append_result",
            session_id,
            *self._append_args(result, holdings_version, max_staleness_ms, retry),
        )
        return append_status(status)

    def _append_args(
        self,
        result: AnalysisResult,
        holdings_version: int | None,
        max_staleness_ms: int,
        retry: bool,
    ) -> tuple[str | int, ...]:
        """The append script's ARGV for ``result`` (see ``*_append_result.lua``)."""
        return (
            result.analysis_id,
            result.portfolio_version,
            result_json(result),
            self.results_limit,
            self.trim_slack,
            "" if holdings_version is None else holdings_version,
            max(0, max_staleness_ms),
            result.result_id,
            "1" if retry else "0",
            RESULT_IDS_LIMIT,
        )

    async def append_results(
        self,
        session_id: str,
        results: Sequence[AnalysisResult],
        *,
        holdings_version: int | None = None,
        max_staleness_ms: int = 0,
        retry: bool = False,
    ) -> list[AppendStatus]:
        """:meth:`append_result` for each of ``results``, sent as one pipeline; answers in order.

        Each append is its own fenced script, exactly as if called one by
        one at the same moment (another client's script may run between two
        of them, and each answer says what happened to its result); one
        round trip and one request instead of several.  With
        :attr:`replica_wait` they are written and waited for one by one.

        Raises:
          ValueError, StoreDataError, StoreUnavailable, CommandError: as
            :meth:`append_result` (the first error of any entry is raised;
            after a :class:`StoreUnavailable` the outcome of every entry is
            unknown, and asking again with ``retry=True`` is safe).
        """
        if len(results) == 1 or self.replica_wait is not None:
            return [
                await self.append_result(
                    session_id,
                    result,
                    holdings_version=holdings_version,
                    max_staleness_ms=max_staleness_ms,
                    retry=retry,
                )
                for result in results
            ]
        if holdings_version is None and max_staleness_ms > 0:
            raise ValueError("a staleness bound needs the snapshot's holdings version")
        check_session_id(session_id)
        keys = self.session_keys(session_id)
        calls = [
            (keys, self._append_args(result, holdings_version, max_staleness_ms, retry))
            for result in results
        ]
        replies = await self.redis.evalsha_many(self._scripts["append_result"], calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [append_status(split_reply(reply)[0]) for reply in replies]

    async def finish_analysis(self, session_id: str, analysis_id: str) -> bool:
        """Clear the current analysis if it is still ``analysis_id``; ``True`` if it was.

        Fenced, so finishing late (after another analysis started) changes
        nothing.  Not activity.

        Raises:
          ValueError: for an invalid session id.
          StoreUnavailable, CommandError, StoreDataError: as every operation.
        """
        status, _ = await self._run("finish_analysis", session_id, analysis_id)
        return status == "finished"

    async def set_holdings(
        self,
        session_id: str,
        holdings: Mapping[str, float],
        prices: Mapping[str, float],
        now: str,
    ) -> HoldingsReplaced | None:
        """Replace the holdings (and their prices), bump the version; ``None`` if missing.

        Any running analysis's later appends fail ``STALE``.  Activity;
        publishes a ``portfolio`` event with cause ``holdings``.  With a
        claim, the session records it, and a later write with an older claim
        is refused (writes of one session land in the order of their claims,
        which the market's :meth:`~trio_portfolio.market_data.MarketData.let_go`
        relies on).

        Raises:
          ValueError: for an invalid session id, empty holdings, a quantity
            or price that is not a finite number > 0, or a held ticker
            missing from ``prices``; nothing is written.
          ClaimExpired: if ``prices`` is a :class:`ClaimedPrices` whose claim
            is older than :data:`CLAIM_GRACE_MS`, or older than the claim of
            the session's last write (another write claimed after this one
            and landed first); nothing was written: claim again and retry.
          StoreUnavailable, CommandError, StoreDataError: as every operation.
        """
        check_session_id(session_id)
        holdings_json, prices_json = holdings_and_prices_json(holdings, prices)
        status, payload = await self._run(
            "set_holdings",
            session_id,
            self.events_channel(session_id),
            holdings_json,
            prices_json,
            now,
            self.session_ttl_seconds,
            *_claim_arguments(prices),
        )
        if status == "missing":
            return None
        if status == "claim_expired":
            raise ClaimExpired(_CLAIM_EXPIRED)
        portfolio = portfolio_from_document(
            session_id, payload_document(payload), self.results_limit
        )
        return HoldingsReplaced(portfolio, tuple(sorted(map(str, payload[1:]))))

    async def revalue_many(
        self,
        session_ids: Sequence[str],
        prices: Mapping[str, float] | MarketPrices,
        as_of: str,
        *,
        tick: int | None = None,
        tally: RevalueTally | None = None,
    ) -> list[RevalueOutcome]:
        """Revalue sessions at ``prices``, each sent only its own holdings' prices; in order.

        Two pipelined round trips (held tickers, then the scripts), plus one
        for the few sessions whose holdings moved in between.  Held tickers
        missing from ``prices`` keep their stored price (a ticker that
        entered the market after the tick was drawn).  With ``tick``, a
        session already valued at ``tick`` or later is left alone
        (``changed`` false, counted in ``tally.fenced``), and every other
        session records ``valued_tick = tick`` and ``as_of``; without it
        (tools, tests) nothing is fenced and ``valued_tick`` is not touched.
        A session whose total or a held price changed gets a new version, a
        ``portfolio`` event (cause ``market``) and, if it has none,
        ``superseded_at`` (Redis time, ms).  Never activity.  A session whose
        command failed with an error reply (e.g. a clobbered key) is logged
        and left out, so one bad key cannot stall the market update of the
        others; the rest were applied regardless.

        Raises:
          ValueError: for an invalid session id or a price that is not a
            finite number > 0; nothing is sent.
          StoreUnavailable: if Redis cannot be used now, including a reply
            that says so for one session of the batch (the others' scripts
            may have run).
          StoreDataError: for a reply that cannot be read.
          (An error reply for one session is logged, not raised.)
        """
        for session_id in session_ids:
            check_session_id(session_id)
        market = prices if isinstance(prices, MarketPrices) else MarketPrices(prices)
        if not session_ids:
            return []
        tally = RevalueTally() if tally is None else tally
        held_replies = await self.redis.pipeline(
            [self.held_tickers_command(s) for s in session_ids]
        )
        held: dict[str, list[str]] = {}
        for session_id, reply in zip(session_ids, held_replies, strict=True):
            if _failed(session_id, reply):
                continue
            held[session_id] = self.held_tickers(reply)
        outcomes: dict[str, RevalueOutcome] = {}
        texts, tick_text = market.texts, "" if tick is None else str(tick)
        pending = list(held)
        for _ in range(_REVALUE_ROUNDS):
            if not pending:
                break
            calls = [
                (
                    self.revalue_keys(session_id),
                    (
                        as_of,
                        tick_text,
                        ";".join(f"{t}={texts.get(t, '')}" for t in held[session_id]),
                    ),
                )
                for session_id in pending
            ]
            replies = await self.redis.evalsha_many(self._scripts["revalue"], calls)
            again: list[str] = []
            for session_id, reply in zip(pending, replies, strict=True):
                if _failed(session_id, reply):
                    continue
                status, payload = split_reply(reply)
                if status == "need":
                    held[session_id] = held[session_id] + [str(t) for t in payload]
                    again.append(session_id)
                    continue
                outcomes[session_id] = _revalue_outcome(session_id, status, payload, reply)
                if status == "fenced":
                    tally.fenced += 1
                if status != "missing":
                    tally.held.update(held[session_id])
            tally.resent += len(again)
            pending = again
        if pending:
            log.warning("revaluation of %d sessions skipped: holdings kept moving", len(pending))
        return [outcomes[s] for s in session_ids if s in outcomes]

    async def session_census(
        self, session_id: str | None = None, *, timeout: float | None = None
    ) -> SessionCensus:
        """How many sessions the index holds and, given ``session_id``, whether it exists.

        One pipeline (on a cluster the client splits it per node and sends
        the parts at once): ``EXISTS`` of the session, then ``SCARD`` of every
        bucket.  The count may briefly include sessions that expired and
        have not been pruned by the market updater yet, and (during an
        upgrade from a version with the whole index) miss ids it has not
        folded yet.  This is what the global session cap reads
        (:func:`trio_portfolio.admission.session_cap_refusal`).

        Raises:
          ValueError: for an invalid ``session_id``.
          StoreUnavailable: if Redis cannot answer now (within ``timeout``).
          CommandError: if a bucket key is not a set (clobbered).
        """
        commands: list[tuple[str, ...]] = []
        if session_id is not None:
            check_session_id(session_id)
            commands.append(("EXISTS", self.keys.session(session_id)))
        commands += [("SCARD", key) for key in self.keys.index_keys()]
        replies = await self.redis.pipeline(commands, timeout=timeout)
        for reply in replies:
            if isinstance(reply, StoreUnavailable | CommandError):
                raise reply
        exists = session_id is not None and int(replies[0]) > 0
        sizes = replies[1:] if session_id is not None else replies
        return SessionCensus(live=sum(int(n) for n in sizes), exists=exists)

    async def iter_session_ids(self, batch: int = 500) -> AsyncGenerator[list[str], None]:
        """Walk every index bucket with SSCAN, in lists of at most ``batch`` ids.

        SSCAN's guarantees apply: an id present for the whole walk is
        yielded at least once (rarely twice: revaluing twice at the same
        prices is a no-op); ids added or removed meanwhile may or may not be.

        Raises:
          ValueError: if ``batch`` is below 1.
          StoreUnavailable, CommandError: from any SSCAN round trip, so after
            some batches may already have been yielded.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        page: list[str] = []
        for key in self.keys.index_keys():
            async with aclosing(self._scan_set(key, batch)) as pages:
                async for ids in pages:
                    page += ids
                    while len(page) >= batch:
                        yield page[:batch]
                        page = page[batch:]
        if page:
            yield page

    async def iter_bucket(self, bucket: int, batch: int = 500) -> AsyncGenerator[list[str], None]:
        """Walk one index bucket in lists of at most ``batch`` ids (as :meth:`iter_session_ids`)."""
        async with aclosing(self._scan_set(self.keys.index_bucket(bucket), batch)) as pages:
            async for ids in pages:
                yield ids

    async def _scan_set(self, key: str, batch: int) -> AsyncGenerator[list[str], None]:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        cursor = "0"
        while True:
            cursor, members = await self.redis.execute("SSCAN", key, cursor, "COUNT", batch)
            unique = list(dict.fromkeys(members))
            for start in range(0, len(unique), batch):
                yield unique[start : start + batch]
            if cursor == "0":
                return

    async def legacy_index_size(self) -> int:
        """How many ids the whole index of earlier versions still holds (0 once folded).

        Raises:
          StoreUnavailable, CommandError: as every operation.
        """
        return int(await self.redis.execute("SCARD", self.keys.legacy_index))

    async def fold_legacy_index(self, batch: int = 1000) -> int:
        """Move every id of the legacy whole index into its bucket; how many were moved.

        Page by page: ``SADD`` to the buckets first, then ``SREM`` from the
        whole set, so an interrupted fold loses nothing (the ids still in the
        whole set are moved by the next one; ``SADD`` is idempotent).  An id
        whose session is gone is moved too: the next revaluation reports it
        missing and :meth:`forget` prunes it.  When the last id is removed
        Redis deletes the key, so the one slot it lived in stops growing.

        Raises:
          ValueError: if ``batch`` is below 1.
          StoreUnavailable, CommandError: from any round trip.
        """
        moved = 0
        async with aclosing(self._scan_set(self.keys.legacy_index, batch)) as pages:
            async for ids in pages:
                for reply in await self.redis.pipeline(self.keys.index_commands("SADD", ids)):
                    if isinstance(reply, StoreUnavailable | CommandError):
                        raise reply
                await self.redis.execute("SREM", self.keys.legacy_index, *ids)
                moved += len(ids)
        return moved

    async def _index(self, session_ids: Sequence[str]) -> None:
        for reply in await self.redis.pipeline(self.keys.index_commands("SADD", session_ids)):
            if isinstance(reply, CommandError):
                raise reply

    async def forget(self, session_ids: Sequence[str]) -> int:
        """Drop ids from the index, but only those whose session is (still) gone.

        The market updater calls this with the ids a revaluation reported
        missing.  Existence is checked before the removal and again after
        it, and an id whose session exists by then is added back: together
        with :meth:`create_if_missing` adding the id both before and after
        its script, a session created concurrently with its own forgetting
        always ends up indexed (either the re-check sees it, or the
        creation's second add comes after the removal).  Returns how many
        ids were removed (and stayed removed).

        Raises:
          StoreUnavailable: if Redis cannot be used now.
          CommandError: if ``SREM`` is refused (an id whose ``EXISTS`` was
            refused counts as present and is kept).
        """
        if not session_ids:
            return 0
        gone = await self._gone(session_ids)
        if not gone:
            return 0
        # From the removal to the re-check nothing may cancel us: a session
        # created meanwhile would be left out of the index (not revalued, its
        # tickers unseen by the walk).  Shielded, with a deadline.
        back: list[str] = []
        deadline = trio.current_time() + _FORGET_SECONDS
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            for reply in await self.redis.pipeline(self.keys.index_commands("SREM", gone)):
                if isinstance(reply, CommandError):
                    raise reply
            still_gone = set(await self._gone(gone))
            back = [s for s in gone if s not in still_gone]
            if back:
                await self._index(back)
        if scope.cancelled_caught:
            raise StoreUnavailable(
                f"forgetting {len(gone)} ids took longer than {_FORGET_SECONDS} s",
                reason=Unavailable.TIMEOUT,
                maybe_executed=True,
            )
        return len(gone) - len(back)

    async def _gone(self, session_ids: Sequence[str]) -> list[str]:
        """The ids among ``session_ids`` whose session key does not exist."""
        exists = await self.redis.pipeline(
            [("EXISTS", self.keys.session(session_id)) for session_id in session_ids]
        )
        return [s for s, n in zip(session_ids, exists, strict=True) if n == 0]


_CLAIM_EXPIRED = (
    "the market claim of these tickers expired, or a newer write of the session overtook it, "
    "before the write; try again"
)


def _claim_arguments(prices: Mapping[str, float]) -> tuple[str, str]:
    """ARGV of a holdings write: the claim time (or ``''``) and its grace."""
    if isinstance(prices, ClaimedPrices) and prices.claimed_at_ms > 0:
        return str(prices.claimed_at_ms), str(CLAIM_GRACE_MS)
    return "", str(CLAIM_GRACE_MS)


def _failed(session_id: str, reply: Any) -> bool:
    """Whether one reply of a pipeline is an error; "not now" ones are raised.

    Raises:
      StoreUnavailable: for a reply that says Redis cannot serve now.
    """
    if isinstance(reply, StoreUnavailable):
        raise reply
    if isinstance(reply, CommandError):
        log.error("revaluation of session %s failed: %s", session_id, reply)
        return True
    return False


def _revalue_outcome(
    session_id: str, status: str, payload: list[Any], reply: Any
) -> RevalueOutcome:
    """The outcome a revalue script answered (any status but ``need``)."""
    if status == "missing":
        return RevalueOutcome(session_id, True, False, 0, 0.0)
    try:
        version, total = int(payload[0]), float(payload[1])
    except (IndexError, TypeError, ValueError) as exc:
        raise StoreDataError(f"unexpected revalue reply {reply!r:.200}") from exc
    return RevalueOutcome(session_id, False, status == "changed", version, total)
