"""Sessions on Redis: one :class:`SessionStore` interface, two key layouts.

Theory of operation
===================

Redis is the only record of a session; every server process reads and
writes it there, so every decision that depends on the stored state is taken
*in Redis*, by one Lua script per operation (see
``docs/adr/002-session-store-layouts.md``).  Nothing here trusts Python
state across an await: the fence of :meth:`SessionStore.append_result`
(current analysis and portfolio version) is re-checked by the script.

Two layouts implement the same behaviour:

* ``json`` (:mod:`trio_portfolio.store_json`) - one RedisJSON document per
  session, the design of ADR-001; needs the JSON module (Redis 8).
* ``hash`` (:mod:`trio_portfolio.store_hash`) - core types only (hashes and
  a list), for Redis 6.2 / 7.x.

Everything that is not layout-specific lives in this module: key names,
argument encoding, validation, and the parsing of replies into
:mod:`trio_portfolio.models` values.  The two layouts' scripts (``lua/``)
take the same ARGV and answer in the same shape - a status string, then
JSON text in the json layout's document schema - so the Python side of both
layouts is this one class; a layout module says only which keys a session
has and how a plain read is done.

Cancellation: each mutation is one EVALSHA, so a cancelled call either ran
entirely or not at all; the adapter guarantees no stray replies.  The index
set of session ids is maintained with separate commands (never inside a
session's script, which on Redis Cluster may only touch that session's
slot); see :meth:`SessionStore.create_if_missing` and
:meth:`SessionStore.forget` for why its races are harmless.

Errors: :class:`~trio_portfolio.redis_io.StoreUnavailable` when Redis
cannot be used, :data:`~trio_portfolio.redis_io.ReplyError` for an error
reply (a bug, or a key clobbered by something else), :class:`StoreDataError`
for a reply that cannot be read as a session, :class:`ValueError` for
arguments the store cannot represent (bad session id, non-finite numbers,
a held ticker without a price).
"""

from __future__ import annotations

import abc
import logging
import math
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from importlib import resources
from typing import Any, ClassVar, Literal

import attrs
import orjson
from redis.exceptions import ConnectionError as RedisConnectionError

from trio_portfolio.models import (
    SESSION_ID_RE,
    AnalysisResult,
    AppendStatus,
    CurrentAnalysis,
    Portfolio,
    RevalueOutcome,
    Snapshot,
    StartRefused,
)
from trio_portfolio.redis_io import RedisClient, ReplyError, Script, StoreUnavailable

__all__ = [
    "Layout",
    "LayoutChoice",
    "SessionKeys",
    "SessionStore",
    "StoreDataError",
    "StoreLayoutUnavailable",
    "detect_layout",
    "load_script",
    "open_store",
    "payload_document",
    "portfolio_from_document",
    "split_reply",
]

log = logging.getLogger(__name__)

Layout = Literal["json", "hash"]
LayoutChoice = Literal["auto", "json", "hash"]

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

_JSON_PROBE = "json_probe"


class StoreDataError(Exception):
    """A reply could not be read as a session: the stored data or a script is broken."""


class StoreLayoutUnavailable(RuntimeError):
    """The requested layout cannot work on this server (``json`` without the JSON module)."""


def load_script(name: str, *, libraries: Sequence[str] = ()) -> Script:
    """``lua/<name>.lua`` with the ``lua/<library>.lua`` files prepended, as a :class:`Script`.

    The libraries are plain Lua chunks of ``local function`` definitions, so
    the concatenation is one script; its SHA1 changes whenever any part does.
    """
    package = resources.files("trio_portfolio.lua")
    parts = [package.joinpath(f"{lib}.lua").read_text(encoding="utf-8") for lib in libraries]
    parts.append(package.joinpath(f"{name}.lua").read_text(encoding="utf-8"))
    return Script("\n".join(parts))


@attrs.frozen
class SessionKeys:
    """Key and channel names.  Every key of a session carries the hash tag ``{session_id}``.

    Sessions live under ``<prefix>:session:``, apart from the market's
    ``<prefix>:{market}:...`` keys: a session may be called ``market``, and
    ``<prefix>:{market}:prices`` must not be both.
    """

    prefix: str

    @property
    def index(self) -> str:
        """The set of session ids the market updater walks (not hash-tagged: it spans slots)."""
        return f"{self.prefix}:sessions"

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


# -- arguments -----------------------------------------------------------------------------


def _check_session_id(session_id: str) -> None:
    if not SESSION_ID_RE.fullmatch(session_id):
        raise ValueError(f"invalid session id {session_id!r}")


def _check_number(what: str, value: float) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return number


def _holdings_and_prices_json(
    holdings: Mapping[str, float], prices: Mapping[str, float]
) -> tuple[str, str]:
    """ARGV JSON for holdings and the prices of the held tickers (and only those)."""
    if not holdings:
        raise ValueError("holdings must not be empty")
    quantities = {t: _check_number(f"quantity of {t}", q) for t, q in holdings.items()}
    missing = sorted(t for t in quantities if t not in prices)
    if missing:
        raise ValueError(f"no price for held tickers {missing}")
    held = {t: _check_number(f"price of {t}", prices[t]) for t in quantities}
    return orjson.dumps(quantities).decode(), orjson.dumps(held).decode()


def _result_json(result: AnalysisResult) -> str:
    if not math.isfinite(result.value):
        raise ValueError(f"result value must be finite, got {result.value!r}")
    return orjson.dumps(attrs.asdict(result)).decode()


# -- replies -------------------------------------------------------------------------------


def split_reply(reply: Any) -> tuple[str, list[Any]]:
    """Split a script reply ``[status, *payload]`` (the shape every session script answers)."""
    if not (isinstance(reply, list) and reply and isinstance(reply[0], str)):
        raise StoreDataError(f"unexpected script reply {reply!r:.200}")
    return reply[0], reply[1:]


def payload_document(payload: list[Any]) -> dict[str, Any]:
    """The JSON object text a script sent after its status."""
    try:
        value = orjson.loads(payload[0])
    except (IndexError, TypeError, orjson.JSONDecodeError) as exc:
        raise StoreDataError(f"unreadable script payload {payload!r:.200}") from exc
    if not isinstance(value, dict):
        raise StoreDataError(f"script payload is not an object: {payload!r:.200}")
    return value


def _numbers(value: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in value.items()}


def portfolio_from_document(
    session_id: str, document: Mapping[str, Any], results_limit: int
) -> Portfolio:
    """A :class:`Portfolio` from a session in the json layout's document schema.

    Both layouts answer reads in this schema.  Only the newest
    ``results_limit`` results are kept (the json layout trims lazily).
    """
    try:
        current = document["current_analysis"]
        results = document["analysis_results"][-results_limit:]
        return Portfolio(
            session_id=session_id,
            holdings=_numbers(document["holdings"]),
            prices=_numbers(document["prices"]),
            total_value=float(document["total_value"]),
            portfolio_version=int(document["portfolio_version"]),
            current_analysis=None
            if current is None
            else CurrentAnalysis(
                analysis_id=str(current["analysis_id"]),
                ticker=str(current["ticker"]),
                portfolio_version=int(current["portfolio_version"]),
                started_at=str(current["started_at"]),
            ),
            analysis_results=tuple(
                AnalysisResult(
                    analysis_id=str(r["analysis_id"]),
                    ticker=str(r["ticker"]),
                    metric=str(r["metric"]),
                    value=float(r["value"]),
                    timestamp=str(r["timestamp"]),
                    portfolio_version=int(r["portfolio_version"]),
                )
                for r in results
            ),
            last_activity=str(document["last_activity"]),
            created_at=str(document["created_at"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreDataError(f"session {session_id} is not a readable portfolio: {exc!r}") from exc


_APPEND_STATUS = {status.value: status for status in AppendStatus}


# -- the store -----------------------------------------------------------------------------


class SessionStore(abc.ABC):
    """Sessions in Redis, one script per operation; subclasses fix the key layout.

    Use :func:`open_store`, which picks the layout and loads the scripts.
    All methods are safe to call concurrently from many tasks and processes:
    atomicity comes from Redis, not from this object, which holds no
    per-session state.
    """

    layout: ClassVar[Layout]
    """Which layout this store uses (``"json"`` or ``"hash"``)."""
    extra_operations: ClassVar[tuple[str, ...]] = ()
    """Scripts beyond :data:`OPERATIONS` that the layout needs."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        key_prefix: str = "portfolio",
        session_ttl_seconds: int = 86400,
        results_limit: int = 500,
    ) -> None:
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ValueError(f"key prefix must be non-empty and brace-free: {key_prefix!r}")
        if session_ttl_seconds < 1:
            raise ValueError("session_ttl_seconds must be at least 1")
        if results_limit < 1:
            raise ValueError("results_limit must be at least 1")
        self.redis = redis
        self.keys = SessionKeys(key_prefix)
        self.session_ttl_seconds = session_ttl_seconds
        self.results_limit = results_limit
        self.trim_slack = max(1, results_limit // 4)
        """How far past ``results_limit`` a stored array may grow before it is trimmed."""
        libraries = ("store_lib", f"store_lib_{self.layout}")
        self._scripts = {
            op: load_script(f"{self.layout}_{op}", libraries=libraries)
            for op in OPERATIONS + self.extra_operations
        }

    # -- layout hooks ----------------------------------------------------------------------

    @abc.abstractmethod
    def session_keys(self, session_id: str) -> list[str]:
        """The KEYS of every script call for this session (all in one hash slot)."""

    @abc.abstractmethod
    async def _read_document(self, session_id: str) -> dict[str, Any] | None:
        """The session in the document schema, read atomically; ``None`` if missing."""

    # -- plumbing --------------------------------------------------------------------------

    @property
    def scripts(self) -> tuple[Script, ...]:
        """Every script of this layout (what :meth:`load_scripts` loads)."""
        return tuple(self._scripts.values())

    async def load_scripts(self) -> None:
        """``SCRIPT LOAD`` every script up front (EVALSHA also recovers on NOSCRIPT)."""
        await self.redis.load_scripts(self.scripts)

    def events_channel(self, session_id: str) -> str:
        """The pub/sub channel on which the session's scripts publish events."""
        return self.keys.events(session_id)

    async def _run(
        self, operation: str, session_id: str, *args: str | int
    ) -> tuple[str, list[Any]]:
        """Run ``operation``'s script on ``session_id``'s keys; its reply, split."""
        _check_session_id(session_id)
        reply = await self.redis.evalsha(
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
        id is added to the index *before* the script runs: if the call is
        cancelled in between, the index holds an id without a session, which
        the next revaluation reports missing and prunes; the other order
        could leave a session the market updater never sees.
        """
        _check_session_id(session_id)
        holdings_json, prices_json = _holdings_and_prices_json(holdings, prices)
        await self.redis.execute("SADD", self.keys.index, session_id)
        _, payload = await self._run(
            "create",
            session_id,
            session_id,
            holdings_json,
            prices_json,
            now,
            self.session_ttl_seconds,
        )
        return portfolio_from_document(session_id, payload_document(payload), self.results_limit)

    async def get(self, session_id: str) -> Portfolio | None:
        """The session as stored, or ``None`` if it does not exist.  Not activity."""
        _check_session_id(session_id)
        document = await self._read_document(session_id)
        if document is None:
            return None
        return portfolio_from_document(session_id, document, self.results_limit)

    async def touch(self, session_id: str, now: str) -> bool:
        """Record client activity (``last_activity``, TTL); ``False`` if the session is gone."""
        status, _ = await self._run("touch", session_id, now, self.session_ttl_seconds)
        return status == "touched"

    async def start_analysis(
        self, session_id: str, analysis_id: str, ticker: str, now: str
    ) -> Snapshot | StartRefused:
        """Snapshot the portfolio and make ``analysis_id`` the current analysis, atomically.

        From this moment every append of an earlier analysis is refused
        ``SUPERSEDED``.  Publishes ``analysis_started``.  A ticker that is not
        held is refused (``NOT_HELD``) but still counts as activity.
        """
        status, payload = await self._run(
            "start_analysis",
            session_id,
            self.events_channel(session_id),
            analysis_id,
            ticker,
            now,
            self.session_ttl_seconds,
        )
        if status == "missing":
            return StartRefused.MISSING
        if status == "not_held":
            return StartRefused.NOT_HELD
        snapshot = payload_document(payload)
        try:
            return Snapshot(
                session_id=session_id,
                analysis_id=analysis_id,
                ticker=ticker,
                holdings=_numbers(snapshot["holdings"]),
                prices=_numbers(snapshot["prices"]),
                total_value=float(snapshot["total_value"]),
                portfolio_version=int(snapshot["portfolio_version"]),
                started_at=now,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreDataError(f"unreadable snapshot of {session_id}: {exc!r}") from exc

    async def append_result(self, session_id: str, result: AnalysisResult) -> AppendStatus:
        """THE FENCE: store ``result`` only if its analysis is current and its version is.

        ``SUPERSEDED`` if another (or no) analysis is current, ``STALE`` if
        the portfolio version moved since the snapshot, ``MISSING`` if the
        session is gone.  Keeps the newest ``results_limit`` results.  Not
        activity (the TTL is left alone).
        """
        status, _ = await self._run(
            "append_result",
            session_id,
            result.analysis_id,
            result.portfolio_version,
            _result_json(result),
            self.results_limit,
            self.trim_slack,
        )
        try:
            return _APPEND_STATUS[status]
        except KeyError:
            raise StoreDataError(f"unexpected append status {status!r}") from None

    async def finish_analysis(self, session_id: str, analysis_id: str) -> bool:
        """Clear the current analysis if it is still ``analysis_id``; ``True`` if it was.

        Fenced, so finishing late (after another analysis started) changes
        nothing.  Not activity.
        """
        status, _ = await self._run("finish_analysis", session_id, analysis_id)
        return status == "finished"

    async def set_holdings(
        self,
        session_id: str,
        holdings: Mapping[str, float],
        prices: Mapping[str, float],
        now: str,
    ) -> Portfolio | None:
        """Replace the holdings (and their prices), bump the version; ``None`` if missing.

        Any running analysis's later appends fail ``STALE``.  Activity;
        publishes a ``portfolio`` event with cause ``holdings``.
        """
        _check_session_id(session_id)
        holdings_json, prices_json = _holdings_and_prices_json(holdings, prices)
        status, payload = await self._run(
            "set_holdings",
            session_id,
            self.events_channel(session_id),
            holdings_json,
            prices_json,
            now,
            self.session_ttl_seconds,
        )
        if status == "missing":
            return None
        return portfolio_from_document(session_id, payload_document(payload), self.results_limit)

    async def revalue_many(
        self, session_ids: Sequence[str], prices: Mapping[str, float], as_of: str
    ) -> list[RevalueOutcome]:
        """Revalue sessions at ``prices`` in one pipelined round trip; outcomes in order.

        Held tickers missing from ``prices`` keep their stored price.  A
        session whose total or a held price changed gets a new version and a
        ``portfolio`` event (cause ``market``).  Never activity.  A session
        whose script failed with an error reply (e.g. a clobbered key) is
        logged and left out, so one bad key cannot stall the market update
        of the others; the rest were applied regardless.
        """
        for session_id in session_ids:
            _check_session_id(session_id)
        if not session_ids:
            return []
        market = {t: _check_number(f"price of {t}", p) for t, p in prices.items()}
        prices_json = orjson.dumps(market).decode()
        replies = await self.redis.evalsha_many(
            self._scripts["revalue"],
            [
                (self.session_keys(s), (self.events_channel(s), prices_json, as_of))
                for s in session_ids
            ],
        )
        outcomes: list[RevalueOutcome] = []
        for session_id, reply in zip(session_ids, replies, strict=True):
            if isinstance(reply, RedisConnectionError):
                raise StoreUnavailable(f"Redis cannot serve requests: {reply}")
            if isinstance(reply, ReplyError):
                log.error("revaluation of session %s failed: %s", session_id, reply)
                continue
            status, payload = split_reply(reply)
            if status == "missing":
                outcomes.append(RevalueOutcome(session_id, True, False, 0, 0.0))
                continue
            try:
                version, total = int(payload[0]), float(payload[1])
            except (IndexError, TypeError, ValueError) as exc:
                raise StoreDataError(f"unexpected revalue reply {reply!r:.200}") from exc
            outcomes.append(RevalueOutcome(session_id, False, status == "changed", version, total))
        return outcomes

    async def iter_session_ids(self, batch: int = 500) -> AsyncIterator[list[str]]:
        """Walk the session index with SSCAN, in lists of at most ``batch`` ids.

        SSCAN's guarantees apply: an id present for the whole walk is
        yielded at least once (rarely twice: revaluing twice at the same
        prices is a no-op); ids added or removed meanwhile may or may not be.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        cursor = "0"
        while True:
            cursor, members = await self.redis.execute(
                "SSCAN", self.keys.index, cursor, "COUNT", batch
            )
            unique = list(dict.fromkeys(members))
            for start in range(0, len(unique), batch):
                yield unique[start : start + batch]
            if cursor == "0":
                return

    async def forget(self, session_ids: Sequence[str]) -> int:
        """Drop ids from the index, but only those whose session is (still) gone.

        The market updater calls this with the ids a revaluation reported
        missing; re-checking existence keeps a session that was re-created
        in the meantime.  (What remains is a window of one round trip in
        which a re-created session can lose its index entry; its next
        ``create_if_missing``, on the next connection, adds it back.)
        Returns how many ids were removed.
        """
        if not session_ids:
            return 0
        exists = await self.redis.pipeline(
            [("EXISTS", self.keys.session(session_id)) for session_id in session_ids]
        )
        gone = [s for s, n in zip(session_ids, exists, strict=True) if n == 0]
        if not gone:
            return 0
        removed: int = await self.redis.execute("SREM", self.keys.index, *gone)
        return removed


# -- choosing a layout ---------------------------------------------------------------------


async def json_module_available(redis: RedisClient, *, key_prefix: str = "portfolio") -> bool:
    """Whether Lua scripts can use RedisJSON on this server.

    One script writes, reads back and deletes a scratch document, so the
    probe leaves nothing behind even if cancelled.  An error reply (no
    JSON module, or not allowed) means no.
    """
    probe = load_script(_JSON_PROBE)
    key = f"{key_prefix}:layout-probe:{uuid.uuid4().hex}"
    # Loaded first so EVALSHA never meets NOSCRIPT: some servers (fakeredis)
    # close the connection after any error reply.
    await redis.load_scripts([probe])
    try:
        answer = await redis.evalsha(probe, [key], ['{"probe":[1,"x"]}'])
    except ReplyError:
        return False
    try:
        return bool(orjson.loads(answer) == [{"probe": [1, "x"]}])
    except (TypeError, orjson.JSONDecodeError):
        return False


async def detect_layout(redis: RedisClient, *, key_prefix: str = "portfolio") -> Layout:
    """The layout ``auto`` means here: that of existing sessions, else json if possible.

    Existing sessions win so that upgrading Redis (say 7 to 8, gaining JSON)
    does not make the sessions already stored unreadable.  A few random ids
    from the index are looked at: only the hash layout has a ``:holdings``
    key.  (``TYPE`` would say it directly, but fakeredis cannot answer it
    for a JSON key.)  Without sessions: ``json`` where the JSON module works
    from scripts, else ``hash``.
    """
    keys = SessionKeys(key_prefix)
    sample = await redis.execute("SRANDMEMBER", keys.index, 5)
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
) -> SessionStore:
    """A ready :class:`SessionStore`: layout chosen, scripts loaded.

    ``auto`` follows :func:`detect_layout`.  An explicit ``json`` is checked
    (:class:`StoreLayoutUnavailable` if the server cannot run it); an
    explicit ``hash`` works everywhere.  Talks to Redis, so it raises
    :class:`~trio_portfolio.redis_io.StoreUnavailable` while Redis is down;
    the caller decides whether to retry.
    """
    # The layout modules subclass SessionStore, so they import this module:
    # importing them here, at call time, keeps the import graph acyclic.
    from trio_portfolio.store_hash import HashSessionStore
    from trio_portfolio.store_json import JsonSessionStore

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
    cls: type[SessionStore] = JsonSessionStore if chosen == "json" else HashSessionStore
    store = cls(
        redis,
        key_prefix=key_prefix,
        session_ttl_seconds=session_ttl_seconds,
        results_limit=results_limit,
    )
    await store.load_scripts()
    log.info("session store: %s layout, key prefix %r", store.layout, key_prefix)
    return store
