"""The hash layout: a session in core Redis types, for servers without RedisJSON.

Keys of session ``abc`` (all tagged ``{abc}``, so one slot on Cluster):

* ``<prefix>:session:{abc}`` - hash of scalars: ``session_id``,
  ``total_value``, ``portfolio_version``, ``last_activity``, ``created_at``,
  and ``current_analysis`` (JSON text; the field is absent when none); after
  the first market revaluation also ``valued_tick`` and ``as_of`` (the tick
  and time of the prices of ``total_value``) and ``superseded_at`` (Redis ms
  of the first revaluation that moved the valuation; cleared by an analysis
  start).  Its existence *is* the session's existence.
* ``<prefix>:session:{abc}:holdings`` - hash, ticker -> quantity;
* ``<prefix>:session:{abc}:prices`` - hash, ticker -> price (held tickers);
* ``<prefix>:session:{abc}:results`` - list of result JSON, oldest first,
  ``RPUSH`` + ``LTRIM`` to the newest ``results_limit``.

Every operation, reads included, is one script (``store/lua/hash_*.lua``), since
no single command reads four keys atomically.  The scripts answer in the
json layout's document schema, so parsing is shared.

Four keys mean four TTLs.  Activity sets the full TTL on all of them, the
session hash first, so no other key expires before it; the results list,
created by the first append, inherits the session hash's remaining TTL.
"""

from __future__ import annotations

from typing import Any, ClassVar

from trio_portfolio.store.base import Layout, SessionStore
from trio_portfolio.store.codec import StoreDataError, payload_document

__all__ = ["HashSessionStore"]


class HashSessionStore(SessionStore):
    """:class:`~trio_portfolio.store.base.SessionStore` over a hash, two hashes and a list."""

    layout: ClassVar[Layout] = "hash"
    extra_operations: ClassVar[tuple[str, ...]] = ("get",)
    script_libraries: ClassVar[dict[str, tuple[str, ...]]] = {"revalue": ("store_lib",)}

    def session_keys(self, session_id: str) -> list[str]:
        return [
            self.keys.session(session_id),
            self.keys.holdings(session_id),
            self.keys.prices(session_id),
            self.keys.results(session_id),
        ]

    async def _read_document(self, session_id: str) -> dict[str, Any] | None:
        """The ``get`` script: one atomic read of all four keys."""
        status, payload = await self._run("get", session_id)
        if status == "missing":
            return None
        return payload_document(payload)

    def revalue_keys(self, session_id: str) -> list[str]:
        """Session hash, holdings and prices: the results list plays no part."""
        return [
            self.keys.session(session_id),
            self.keys.holdings(session_id),
            self.keys.prices(session_id),
        ]

    def held_tickers_command(self, session_id: str) -> tuple[str, ...]:
        """``HKEYS`` of the holdings hash (never empty while the session lives)."""
        return ("HKEYS", self.keys.holdings(session_id))

    def held_tickers(self, reply: Any) -> list[str]:
        if not isinstance(reply, list):
            raise StoreDataError(f"unexpected HKEYS reply {reply!r:.200}")
        return reply
