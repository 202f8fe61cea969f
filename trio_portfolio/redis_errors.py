"""The Redis adapter's error vocabulary: what a failure means, not how redis-py names it.

Pure (no I/O, no redis-py): this module turns the text of a RESP error reply
into one of the adapter's exceptions, and defines those exceptions.
:mod:`trio_portfolio.redis_io` re-exports every public name; import them
from there.  The vocabulary is documented in full in that module's
docstring; in short:

* :class:`StoreUnavailable` - "the store cannot serve this now, try later",
  with a :class:`Unavailable` ``reason``;
* :class:`CommandError` - Redis refused the command itself (a bug, or a key
  clobbered by something else), with the reply's ``code``;
  :class:`ReplyDecodeError` is the one for a reply that is not UTF-8.
"""

from __future__ import annotations

import enum
import re

__all__ = [
    "CommandError",
    "NoScript",
    "RedisAdapterError",
    "ReplyDecodeError",
    "StoreUnavailable",
    "Unavailable",
    "classify_error_reply",
]


class Unavailable(enum.StrEnum):
    """Why the store cannot serve now (the ``reason`` of a :class:`StoreUnavailable`).

    The values are stable, lower-case identifiers, fit for a metrics label.
    """

    CONNECT_FAILED = "connect_failed"
    """No connection could be made (refused, unreachable, TLS failure)."""
    AUTH_FAILED = "auth_failed"
    """The handshake (AUTH, SELECT) was refused, or Redis said NOAUTH/WRONGPASS."""
    CONNECTION_LOST = "connection_lost"
    """An open connection broke (closed by Redis, reset, write or read error)."""
    TIMEOUT = "timeout"
    """This call's own deadline passed; other callers on the connection are unaffected."""
    STALLED = "stalled"
    """Redis sent nothing for the stall timeout while requests waited: connection dropped."""
    PROTOCOL = "protocol_error"
    """Redis (or something posing as it) sent bytes that are not RESP."""
    READ_ONLY = "read_only"
    """READONLY: the node is a replica now (after a failover); connections are renewed."""
    LOADING = "loading"
    """LOADING: Redis is loading its dataset into memory."""
    MASTER_DOWN = "master_down"
    """MASTERDOWN: a replica lost its master and is configured not to serve stale data."""
    CLUSTER_DOWN = "cluster_down"
    """CLUSTERDOWN: the cluster cannot serve this slot now."""
    TRY_AGAIN = "try_again"
    """TRYAGAIN: a multi-key command met a slot being resharded."""
    BUSY = "busy"
    """BUSY: a script or function is running past its time limit."""
    OUT_OF_MEMORY = "out_of_memory"
    """OOM: used memory is over ``maxmemory`` and the policy refuses writes."""
    NO_REPLICAS = "no_replicas"
    """NOREPLICAS: fewer good replicas than ``min-replicas-to-write``."""
    PERSISTENCE_FAILED = "persistence_failed"
    """MISCONF: the last RDB save failed and Redis refuses writes."""
    TOO_MANY_CLIENTS = "too_many_clients"
    """``ERR max number of clients reached``."""
    OTHER = "unavailable"
    """Anything else (the default for code outside the adapter)."""


_EXPLANATIONS = {
    Unavailable.CONNECT_FAILED: "cannot connect",
    Unavailable.AUTH_FAILED: "authentication or database selection refused",
    Unavailable.CONNECTION_LOST: "connection lost",
    Unavailable.TIMEOUT: "no answer in time",
    Unavailable.STALLED: "connection stalled",
    Unavailable.PROTOCOL: "unreadable reply",
    Unavailable.READ_ONLY: "read-only replica",
    Unavailable.LOADING: "loading its dataset",
    Unavailable.MASTER_DOWN: "replica without its master",
    Unavailable.CLUSTER_DOWN: "cluster down",
    Unavailable.TRY_AGAIN: "slot migrating, try again",
    Unavailable.BUSY: "busy running a script",
    Unavailable.OUT_OF_MEMORY: "out of memory",
    Unavailable.NO_REPLICAS: "not enough replicas",
    Unavailable.PERSISTENCE_FAILED: "persistence failing",
    Unavailable.TOO_MANY_CLIENTS: "too many clients",
    Unavailable.OTHER: "unavailable",
}


class RedisAdapterError(Exception):
    """Base of every error the adapter raises or returns about Redis.

    (Bad arguments are still :class:`TypeError`/:class:`ValueError`.)
    """


class StoreUnavailable(RedisAdapterError):
    """The store cannot serve this now; the same call may well succeed later.

    Raised for refused, failed or lost connections, TLS and authentication
    failures, timeouts, and the error replies that mean "not now"
    (READONLY, LOADING, MASTERDOWN, CLUSTERDOWN, TRYAGAIN, BUSY, OOM,
    NOREPLICAS, MISCONF, NOAUTH, WRONGPASS, too many clients).

    ``reason`` says which (:class:`Unavailable`); ``explanation`` is a short
    text for that reason with no address, credential or OS error in it (safe
    to show to clients and probes; ``str()`` has the details, for logs).
    ``maybe_executed`` is true when the request was written to Redis and its
    reply never came (a timeout or a lost connection): the command may or may
    not have run.  It is false when Redis refused the command (a "not now"
    reply) or the request was never sent.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: Unavailable = Unavailable.OTHER,
        maybe_executed: bool = False,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.maybe_executed = maybe_executed

    @property
    def explanation(self) -> str:
        """What ``reason`` means, in a few words without any detail of the deployment."""
        return _EXPLANATIONS[self.reason]

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_unavailable, (str(self), self.reason.value, self.maybe_executed))


def _rebuild_unavailable(message: str, reason: str, maybe_executed: bool) -> StoreUnavailable:
    return StoreUnavailable(message, reason=Unavailable(reason), maybe_executed=maybe_executed)


class CommandError(RedisAdapterError):
    """Redis refused the command itself: it will fail the same way if repeated.

    WRONGTYPE, ``ERR`` (syntax, unknown command, wrong arguments), NOPERM,
    EXECABORT, errors raised by a Lua script...: a bug in the caller, or a
    key clobbered by something other than this program.  ``code`` is the
    reply's first word (``"WRONGTYPE"``, ``"ERR"``...).
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code if code is not None else _first_word(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self),), {"code": self.code})


class ReplyDecodeError(CommandError):
    """A reply held bytes that are not UTF-8 (a value written by another program).

    The reply was read whole and dropped, so the connection stays in step:
    only the call it answered fails (or, in a pipeline, only its entry).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, code="UNDECODABLE")


class NoScript(CommandError):
    """NOSCRIPT: EVALSHA named a script Redis does not have.

    Internal to the adapter: :meth:`~trio_portfolio.redis_io.RedisClient.evalsha`
    and ``evalsha_many`` reload the script and run it again, so callers only
    meet this from a raw ``pipeline`` of EVALSHA commands.
    """


_UNAVAILABLE_CODES = {
    "READONLY": Unavailable.READ_ONLY,
    "LOADING": Unavailable.LOADING,
    "MASTERDOWN": Unavailable.MASTER_DOWN,
    "CLUSTERDOWN": Unavailable.CLUSTER_DOWN,
    "TRYAGAIN": Unavailable.TRY_AGAIN,
    "BUSY": Unavailable.BUSY,
    "OOM": Unavailable.OUT_OF_MEMORY,
    "NOREPLICAS": Unavailable.NO_REPLICAS,
    "MISCONF": Unavailable.PERSISTENCE_FAILED,
    "NOAUTH": Unavailable.AUTH_FAILED,
    "WRONGPASS": Unavailable.AUTH_FAILED,
}

# Redis < 7 wraps an error met by redis.call() inside a script as
# "ERR Error running script (call to f_<sha>): @user_script:1: @user_script: 1: -OOM ...";
# Redis 7 passes the inner error's code through ("OOM ... script: <sha>, on @user_script:1.").
_WRAPPED_SCRIPT_ERROR = re.compile(
    r"ERR Error running script \(call to f_[0-9a-f]+\): .*?: -([A-Z]+) "
)


def _first_word(message: str) -> str:
    return message.split(" ", 1)[0] if message else ""


def classify_error_reply(message: str) -> StoreUnavailable | CommandError:
    """The adapter's exception for one RESP error reply (``message`` without the ``-``).

    Used as hiredis' ``replyError`` factory, so it must never raise: every
    message maps to :class:`StoreUnavailable` (the "not now" codes, also
    when a script met them), :class:`NoScript`, or :class:`CommandError`.
    """
    code = _first_word(message)
    if code == "ERR":
        wrapped = _WRAPPED_SCRIPT_ERROR.match(message)
        if wrapped is not None and wrapped.group(1) in _UNAVAILABLE_CODES:
            code = wrapped.group(1)
        elif message.startswith("ERR max number of clients reached"):
            return StoreUnavailable(
                f"Redis cannot serve requests: {message}", reason=Unavailable.TOO_MANY_CLIENTS
            )
    reason = _UNAVAILABLE_CODES.get(code)
    if reason is not None:
        return StoreUnavailable(f"Redis cannot serve requests: {message}", reason=reason)
    if code == "NOSCRIPT":
        return NoScript(message)
    return CommandError(message)
