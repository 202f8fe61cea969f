"""The contract between a connection and its analysis: ids, outcomes, an observer.

A :class:`~trio_portfolio.connection.Connection` starts an
:class:`~trio_portfolio.analysis.AnalysisRunner` and the two cooperate only
through the types of this module, so that neither formats a string that the
other parses back:

* :class:`AnalysisId` mints the id of one attempt and answers "did this
  connection mint it?".  The id is an opaque string on the wire and in
  Redis; its shape is known here and nowhere else.
* :data:`AnalysisOutcome` is how a runner ended: :class:`Completed`,
  :class:`Cancelled` (with the wire reason), :class:`SessionGone` (the session
  expired or was deleted: refused at the start or mid-analysis) or
  :class:`Failed` (an ``error`` frame was queued).
* :class:`AnalysisObserver` is what a runner tells its connection: frames to
  queue, errors to answer, and the events the connection counts.

Pure: no I/O, no trio.
"""

from __future__ import annotations

import secrets
from typing import Protocol

import attrs

from trio_portfolio.models import AnalysisResult, AppendStatus
from trio_portfolio.protocol import CancelReason, ErrorCode

__all__ = [
    "AnalysisId",
    "AnalysisObserver",
    "AnalysisOutcome",
    "Cancelled",
    "Completed",
    "Failed",
    "SessionGone",
]

_SEPARATOR = "-"


class AnalysisId(str):
    """The id of one analysis attempt: ``<connection id>-<8 hex digits>``.

    A ``str`` (it travels as one: in ``analysis_started``, in results, in
    Redis), but only this class knows its shape.  Clients must treat it as
    opaque; the server uses the prefix to recognise, in the session's
    ``analysis_started`` events, the attempts its own connection started.
    """

    __slots__ = ()

    @classmethod
    def mint(cls, connection_id: str) -> AnalysisId:
        """A fresh id, unique per attempt, that :meth:`belongs_to` ``connection_id``.

        Raises :class:`ValueError` for a connection id that is empty or holds
        the separator, since the prefix could then be ambiguous.
        """
        if not connection_id or _SEPARATOR in connection_id:
            raise ValueError(f"connection id must be non-empty without {_SEPARATOR!r}")
        return cls(f"{connection_id}{_SEPARATOR}{secrets.token_hex(4)}")

    @classmethod
    def of(cls, text: str) -> AnalysisId:
        """Wrap an id heard from elsewhere (a session event, the store); never raises."""
        return text if isinstance(text, AnalysisId) else cls(text)

    def belongs_to(self, connection_id: str) -> bool:
        """Whether the connection ``connection_id`` minted this id."""
        owner, separator, _ = self.partition(_SEPARATOR)
        return bool(separator) and owner == connection_id


@attrs.frozen
class Completed:
    """All five results were stored and sent, then ``analysis_complete``."""

    analysis_id: AnalysisId


@attrs.frozen
class Cancelled:
    """The analysis stopped early; v2 clients got ``analysis_cancelled`` with ``reason``
    (unless the connection asked not to notify, as on a client's departure)."""

    reason: CancelReason


@attrs.frozen
class SessionGone:
    """The session expired or was deleted, at the start or mid-analysis.

    Nothing about it has been said to the client by the runner except, when an
    attempt was running, its ``analysis_cancelled`` / ``cancelled``; the
    connection answers ``session_expired`` (once) and starts a fresh session.
    """


@attrs.frozen
class Failed:
    """The analysis could not run or finish; this ``error`` frame has been queued."""

    code: ErrorCode
    detail: str


AnalysisOutcome = Completed | Cancelled | SessionGone | Failed
"""How one :class:`~trio_portfolio.analysis.AnalysisRunner` ended, across its restarts."""


class AnalysisObserver(Protocol):
    """What a runner tells its connection.  The connection implements it.

    The two ``async`` methods may block (the outbox is bounded: backpressure)
    and are cancellable; the others only count and must not block.
    """

    async def send(self, frame: str | None) -> None:
        """Queue ``frame`` on the connection's outbox (``None``: not for this dialect)."""

    async def send_error(self, code: ErrorCode, detail: str) -> None:
        """Queue an ``error`` frame (and count it)."""

    def analysis_started(self, analysis_id: AnalysisId) -> None:
        """An attempt took its snapshot (once per attempt, restarts included)."""

    def result_committed(self, result: AnalysisResult) -> None:
        """``result`` was stored by the fenced append (and is being sent)."""

    def write_fenced(self, status: AppendStatus) -> None:
        """The fenced append refused a result with ``status`` (never ``STORED``;
        ``ALREADY_STORED``: refused to store it twice, and it is streamed)."""

    def analysis_completed(self, analysis_id: AnalysisId) -> None:
        """An attempt delivered all five results."""

    def analysis_cancelled(self, analysis_id: AnalysisId, reason: CancelReason) -> None:
        """An attempt stopped early with ``reason`` (reported to the client or not)."""
