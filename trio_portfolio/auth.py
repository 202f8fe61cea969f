"""Session credentials: only the holder reaches a session (guarantee 9).

Theory of operation
===================

Authentication is off unless a secret is configured (``--auth-secret``,
``PORTFOLIO_AUTH_SECRET`` or ``--auth-secret-file``), so the embedded local
start and the original service's v1 clients work unchanged.  With a secret:

* ``POST /session`` answers the new ``session_id`` and its ``credential``:
  ``base64url(HMAC-SHA256(secret, "trio-portfolio session v1\\0" + session_id))``
  without padding, 43 characters.  It is stateless (nothing is stored; any
  server process with the same secret can check it), does not expire by
  itself (the session does, after its TTL; re-connecting with the
  credential of an expired session re-creates that session for its
  holder), and is revoked for every session at once by changing the
  secret.  Only the server can mint one, so with authentication on a
  client can no longer pick its own session id: sessions come from
  ``POST /session``.
* a WebSocket handshake for ``/ws/{session_id}`` must present it, in the
  first of these places that has one (:func:`find_credential`):

  1. the query parameter ``?credential=...``;
  2. a ``Sec-WebSocket-Protocol`` entry ``portfolio.auth.<credential>``
     (browsers cannot set headers on a WebSocket, but they can offer
     subprotocols; the entry is never chosen when ``portfolio.v2`` is also
     offered, see :func:`choose_subprotocol`);
  3. ``Authorization: Bearer <credential>`` for other clients.

  None is 401, a wrong one or another session's is 403, both decided
  before any session state is read or created (:func:`check_credential`).

Comparisons are constant-time (:func:`hmac.compare_digest`).  Credentials
never reach a log: the server logs request paths without their query, and
nothing here logs.  Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from urllib.parse import parse_qs

from trio_portfolio.admission import Refusal
from trio_portfolio.metrics import Refusal as RefusalCode
from trio_portfolio.protocol import SUBPROTOCOL_V2

SUBPROTOCOL_PREFIX = "portfolio.auth."
"""A ``Sec-WebSocket-Protocol`` entry ``portfolio.auth.<credential>`` carries the credential."""
QUERY_PARAMETER = "credential"
_CONTEXT = b"trio-portfolio session v1\x00"
_MAX_CREDENTIAL_CHARS = 256


def mint_credential(key: bytes, session_id: str) -> str:
    """The credential of ``session_id`` under ``key`` (module docstring)."""
    digest = hmac.new(key, _CONTEXT + session_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def credential_matches(key: bytes, session_id: str, credential: str) -> bool:
    """Whether ``credential`` is ``session_id``'s, compared in constant time."""
    if len(credential) > _MAX_CREDENTIAL_CHARS or not credential.isascii():
        return False
    return hmac.compare_digest(mint_credential(key, session_id), credential)


def find_credential(
    query: str, subprotocols: Sequence[str], authorization: bytes | None
) -> str | None:
    """The credential a handshake presents (query, subprotocol entry, bearer), else ``None``."""
    values = parse_qs(query, keep_blank_values=True).get(QUERY_PARAMETER)
    if values:
        return values[0]
    for offered in subprotocols:
        if offered.startswith(SUBPROTOCOL_PREFIX):
            return offered[len(SUBPROTOCOL_PREFIX) :]
    if authorization is not None:
        scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def check_credential(
    key: bytes | None,
    session_id: str,
    query: str,
    subprotocols: Sequence[str],
    authorization: bytes | None,
) -> Refusal | None:
    """``None`` when authentication is off or the credential is right; else 401 / 403."""
    if key is None:
        return None
    credential = find_credential(query, subprotocols, authorization)
    if credential is None:
        return Refusal(
            401,
            RefusalCode.CREDENTIAL_MISSING,
            "this server requires the session's credential from POST /session, as "
            f"?{QUERY_PARAMETER}=..., a {SUBPROTOCOL_PREFIX}<credential> subprotocol "
            "or an Authorization Bearer header",
        )
    if not credential_matches(key, session_id, credential):
        return Refusal(403, RefusalCode.CREDENTIAL_INVALID, "the credential is not this session's")
    return None


def choose_subprotocol(subprotocols: Sequence[str]) -> str | None:
    """The subprotocol to accept: ``portfolio.v2`` if offered, else an offered auth entry.

    A browser fails a handshake whose answer selects no subprotocol when it
    offered some, so a v1 page that offers only ``portfolio.auth.<c>`` gets
    that entry echoed back (the dialect stays v1); with ``portfolio.v2``
    offered, the auth entry is never echoed.
    """
    if SUBPROTOCOL_V2 in subprotocols:
        return SUBPROTOCOL_V2
    for offered in subprotocols:
        if offered.startswith(SUBPROTOCOL_PREFIX):
            return offered
    return None
