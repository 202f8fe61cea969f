"""Admission: who is the client, and may it open one more connection or session.

Theory of operation
===================

Every limit that protects the server from one client is decided here, by
plain synchronous code over plain values (no trio, no redis, no I/O; time
is passed in), so the rules are unit-testable and the server only asks:

* :func:`client_address` - the address a request is charged to: the TCP
  peer, or, when the peer is a configured trusted proxy, the right-most
  address of ``X-Forwarded-For`` that is not itself a trusted proxy.  A
  client cannot forge its way past a proxy this way: the proxy appends the
  address it saw, and everything left of that is only believed while each
  hop is trusted.  IPv6 clients are charged per ``/64`` network (what one
  subscriber usually gets); see :func:`address_key`.
* :class:`SessionRateLimiter` - new sessions per client address, a token
  bucket per address (``burst`` then ``rate`` per second).  Its map of
  addresses is bounded (``max_addresses``) and pruned as it goes: an
  address whose bucket has refilled is indistinguishable from a new one,
  so such entries are dropped from the least-recently-seen end on every
  call (bounded work per call); when the map is full of busy addresses
  anyway, the least recently seen is forgotten.
* :class:`ConnectionCounts` - open WebSocket connections per client
  address; an entry exists only while its count is positive, so the map
  is bounded by the open connections, themselves bounded by
  ``max_connections``.
* :func:`session_cap_refusal` - the global cap on live sessions, given the
  live count, which every caller (the handshake, ``POST /session``, a
  connection re-creating its expired session) reads the one same way:
  :meth:`trio_portfolio.store.SessionStore.session_census`, the sum of the
  index buckets' sizes.

A refusal is a :class:`Refusal`: the HTTP status, a machine code (the same
vocabulary as the ``errors`` metric) and a human detail, plus
``Retry-After`` when waiting helps.  Nothing here logs or raises.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import attrs

from trio_portfolio.metrics import Refusal as RefusalCode

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

IPV6_PREFIX = 64
"""IPv6 clients are charged per network of this prefix length."""
PRUNE_PER_CALL = 2
"""Refilled entries a rate-limiter call drops from the least-recently-seen end."""


@attrs.frozen
class Refusal:
    """Why a request is refused: ``status`` (HTTP), ``code`` (machine), ``detail`` (human)."""

    status: int
    code: RefusalCode
    detail: str
    retry_after: float | None = None

    def headers(self) -> list[tuple[str, str]]:
        """``Retry-After`` (whole seconds, at least 1) when waiting helps."""
        if self.retry_after is None:
            return []
        return [("retry-after", str(max(1, math.ceil(self.retry_after))))]


def parse_networks(cidrs: Iterable[str]) -> tuple[IpNetwork, ...]:
    """``10.0.0.0/8``, ``127.0.0.1`` ... as networks; raises :class:`ValueError` if one is bad."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[::1]:1234", as some proxies write it
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "1.2.3.4:1234"
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: Sequence[IpNetwork]
) -> bool:
    return any(address in network for network in trusted)


def client_address(
    peer: str | None, forwarded_for: Sequence[bytes], trusted: Sequence[IpNetwork]
) -> str | None:
    """The client's IP address as text, ``None`` when there is no IP peer.

    ``forwarded_for`` holds the values of every ``X-Forwarded-For`` header
    in order; it is consulted only while the hop that delivered it (first
    the TCP peer) is in ``trusted``.  An unparseable entry ends the walk at
    the last trusted hop.
    """
    if peer is None:
        return None
    current = _ip(peer)
    if current is None:
        return None
    if not trusted or not _trusted(current, trusted):
        return str(current)
    hops = [h for value in forwarded_for for h in value.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        address = _ip(hop)
        if address is None:
            break
        current = address
        if not _trusted(current, trusted):
            break
    return str(current)


def address_key(address: str | None) -> str:
    """What limits are keyed by: the IPv4 address, or the IPv6 ``/64``; ``"-"`` for no address."""
    if address is None:
        return "-"
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


@attrs.define
class _Bucket:
    tokens: float
    stamp: float


class SessionRateLimiter:
    """New sessions per client address: bursts of ``burst``, then ``rate`` per second.

    Only granted sessions take a token: a client that keeps asking while
    refused is told the same ``Retry-After`` and is not pushed further back.
    """

    def __init__(self, rate: float, burst: int, max_addresses: int) -> None:
        if rate <= 0 or burst < 1 or max_addresses < 1:
            raise ValueError("rate, burst and max_addresses must be positive")
        self.rate = rate
        self.burst = float(burst)
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> Refusal | None:
        """Charge one new session to ``key`` at ``now``; a 429 :class:`Refusal` if over."""
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.stamp) * self.rate)
        bucket.stamp = now
        refusal = None
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
        else:
            wait = (1.0 - bucket.tokens) / self.rate
            refusal = Refusal(
                429,
                RefusalCode.SESSION_RATE_LIMITED,
                f"too many new sessions from your address (at most {self.rate:g}/s, "
                f"bursts of {self.burst:g}); retry in {wait:.1f} s",
                retry_after=wait,
            )
        self._buckets[key] = bucket
        self._prune(now)
        return refusal

    def _prune(self, now: float) -> None:
        for _ in range(PRUNE_PER_CALL):
            if len(self._buckets) <= 1:
                break
            oldest_key, oldest = next(iter(self._buckets.items()))
            if oldest.tokens + (now - oldest.stamp) * self.rate < self.burst:
                break
            del self._buckets[oldest_key]
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)


class ConnectionCounts:
    """Open connections per client address; :meth:`open` refuses past ``limit``."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be positive")
        self.limit = limit
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def open(self, key: str) -> Refusal | None:
        """Count one more connection for ``key``, or a 429 :class:`Refusal` (nothing counted)."""
        count = self._counts.get(key, 0)
        if count >= self.limit:
            return Refusal(
                429,
                RefusalCode.TOO_MANY_CONNECTIONS_PER_ADDRESS,
                f"too many connections from your address (at most {self.limit})",
                retry_after=1.0,
            )
        self._counts[key] = count + 1
        return None

    def close(self, key: str) -> None:
        """Forget one connection of ``key`` (opened with :meth:`open`)."""
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)


def session_cap_refusal(live_sessions: int, max_sessions: int) -> Refusal | None:
    """A 503 :class:`Refusal` when ``live_sessions`` already reached ``max_sessions``."""
    if live_sessions < max_sessions:
        return None
    return Refusal(
        503,
        RefusalCode.TOO_MANY_SESSIONS,
        "the server holds as many sessions as it may; try again later",
        retry_after=30.0,
    )


def connection_cap_refusal() -> Refusal:
    """The 503 for a connection beyond ``max_connections``."""
    return Refusal(
        503,
        RefusalCode.TOO_MANY_CONNECTIONS,
        "too many connections, try again later",
        retry_after=1.0,
    )
