"""The json layout: one RedisJSON document per session (ADR-001's design).

Key ``<prefix>:session:{<id>}`` holds the document::

    {"session_id": "abc", "holdings": {"AAPL": 100}, "prices": {"AAPL": 187.5},
     "total_value": 18750, "portfolio_version": 3, "current_analysis": null,
     "analysis_results": [...], "last_activity": "...Z", "created_at": "...Z"}

and, after the first market revaluation, ``valued_tick`` and ``as_of`` (the
tick and time of the prices of ``total_value``) and ``superseded_at``
(Redis ms, a number, of the first revaluation that moved the valuation;
cleared by an analysis start).

As ADR-001 decided, a plain read is a direct ``JSON.GET`` and every
multi-step operation is a Lua script calling JSON path commands
(``store/lua/json_*.lua``): appends are ``JSON.ARRAPPEND`` (O(1)), the market
update reads only the paths it needs.  One key per session means one TTL
and no partial expiry.  Needs the JSON module (built into Redis 8).

Paths are always JSONPath (``$...``): the legacy path syntax differs between
RedisJSON versions and emulators (fakeredis answers ``JSON.GET key`` with
``{}``).  Scripts write sub-paths only; ``JSON.SET key $ ...`` on an
existing key would drop its TTL.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from trio_portfolio.store.base import Layout, SessionStore
from trio_portfolio.store.codec import StoreDataError

__all__ = ["JsonSessionStore"]


class JsonSessionStore(SessionStore):
    """:class:`~trio_portfolio.store.base.SessionStore` over one RedisJSON document per session."""

    layout: ClassVar[Layout] = "json"

    def session_keys(self, session_id: str) -> list[str]:
        return [self.keys.session(session_id)]

    async def _read_document(self, session_id: str) -> dict[str, Any] | None:
        """One ``JSON.GET key $``: a single command is atomic, no script needed."""
        raw = await self.redis.execute("JSON.GET", self.keys.session(session_id), "$")
        if raw is None:
            return None
        try:
            (document,) = orjson.loads(raw)
        except (ValueError, TypeError) as exc:
            raise StoreDataError(f"unreadable document of {session_id}: {raw!r:.200}") from exc
        if not isinstance(document, dict):
            raise StoreDataError(f"document of {session_id} is not an object: {raw!r:.200}")
        return document

    def held_tickers_command(self, session_id: str) -> tuple[str, ...]:
        """``JSON.GET key $.holdings`` (nil for a missing key, where OBJKEYS would be an error)."""
        return ("JSON.GET", self.keys.session(session_id), "$.holdings")

    def held_tickers(self, reply: Any) -> list[str]:
        if reply is None:
            return []
        try:
            (holdings,) = orjson.loads(reply)
            return [str(t) for t in holdings]
        except (ValueError, TypeError) as exc:
            raise StoreDataError(f"unexpected holdings reply {reply!r:.200}") from exc
