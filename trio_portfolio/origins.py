"""Which web pages may drive the server (``Origin``) and which names it answers to (``Host``).

Theory of operation
===================

A browser attaches ``Origin`` to every WebSocket handshake and to a
cross-site ``POST``; a page on ``http://evil.example`` that a user happens
to visit could otherwise drive a server on their machine or intranet.
:class:`OriginPolicy` allows:

* no ``Origin`` at all - a non-browser client, which no web page can be;
* the server's own origin, as the request reached it: an origin whose host
  and port are those of the ``Host`` header (the port defaulting to the
  origin scheme's), which is what the dashboard served by this server sends;
* the configured ``allowed_origins`` (``scheme://host[:port]``; ``*`` for
  any, ``null`` for pages without an origin such as ``file://``), or, when
  none is configured, every loopback origin (``localhost``, ``*.localhost``,
  ``127.0.0.0/8``, ``[::1]``, any port): pages a developer runs locally.

Same-origin trusts the ``Host`` header, which a DNS-rebinding attack
controls (its page is "same-origin" with a name it pointed at us); the
guard against that is :class:`HostPolicy`: with ``allowed_hosts`` set, a
request whose ``Host`` is not listed is refused before anything else.  An
entry without a port matches every port.

Pure: no I/O; everything is compared in lower case with default ports filled.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

import attrs

_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]
"""``(scheme, host, port)``, lower case, IPv6 hosts without brackets."""


def _host_and_port(netloc: str) -> tuple[str, int | None] | None:
    """``example.com:8000`` -> ``("example.com", 8000)``; ``None`` when malformed."""
    netloc = netloc.strip().lower()
    if not netloc or "@" in netloc or "/" in netloc:
        return None
    if netloc.startswith("["):
        host, bracket, rest = netloc[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_raw = netloc.partition(":")
        port_text = port_text_raw if colon else None
    host = host.rstrip(".")
    if not host:
        return None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)


def parse_origin(text: str) -> Origin | None:
    """An ``Origin`` header value (or configured origin) as :data:`Origin`; ``None`` if not one."""
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or parts.path not in ("", "/") or parts.query:
        return None
    hostport = _host_and_port(parts.netloc)
    if hostport is None:
        return None
    host, port = hostport
    return scheme, host, _DEFAULT_PORTS[scheme] if port is None else port


def parse_host(text: str) -> tuple[str, int | None] | None:
    """A ``Host`` header value as ``(host, port or None)``; ``None`` if malformed."""
    return _host_and_port(text)


def is_loopback_host(host: str) -> bool:
    """``localhost``, a name under ``.localhost``, or a loopback IP address."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen
class OriginPolicy:
    """Decides whether a handshake's ``Origin`` may reach the server (module docstring)."""

    allowed: frozenset[Origin] = frozenset()
    any_origin: bool = False
    null_origin: bool = False
    loopback: bool = True

    @classmethod
    def from_settings(cls, allowed_origins: Iterable[str]) -> OriginPolicy:
        """From the ``allowed_origins`` setting; raises :class:`ValueError` on a bad entry."""
        entries = list(allowed_origins)
        parsed = set()
        for entry in entries:
            if entry in ("*", "null"):
                continue
            origin = parse_origin(entry)
            if origin is None:
                raise ValueError(f"not an origin: {entry!r}")
            parsed.add(origin)
        return cls(
            allowed=frozenset(parsed),
            any_origin="*" in entries,
            null_origin="null" in entries,
            loopback=not entries,
        )

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether a request with these ``Origin`` and ``Host`` header values is allowed."""
        if origin is None or self.any_origin:
            return True
        if origin.strip().lower() == "null":
            return self.null_origin
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        scheme, origin_host, origin_port = parsed
        if parsed in self.allowed:
            return True
        if self.loopback and is_loopback_host(origin_host):
            return True
        reached = parse_host(host) if host is not None else None
        if reached is None:
            return False
        reached_host, reached_port = reached
        return origin_host == reached_host and origin_port == (
            _DEFAULT_PORTS[scheme] if reached_port is None else reached_port
        )


@attrs.frozen
class HostPolicy:
    """With entries, only requests whose ``Host`` is listed are served; without, all."""

    allowed: frozenset[tuple[str, int | None]] = frozenset()

    @classmethod
    def from_settings(cls, allowed_hosts: Iterable[str]) -> HostPolicy:
        """From the ``allowed_hosts`` setting; raises :class:`ValueError` on a bad entry."""
        parsed = set()
        for entry in allowed_hosts:
            host = parse_host(entry)
            if host is None:
                raise ValueError(f"not a host: {entry!r}")
            parsed.add(host)
        return cls(frozenset(parsed))

    @property
    def enabled(self) -> bool:
        return bool(self.allowed)

    def allows(self, host: str | None) -> bool:
        """Whether a request with this ``Host`` header value (``None``: absent) is served."""
        if not self.allowed:
            return True
        parsed = parse_host(host) if host is not None else None
        if parsed is None:
            return False
        return parsed in self.allowed or (parsed[0], None) in self.allowed
