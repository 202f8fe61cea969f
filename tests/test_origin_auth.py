"""Guarantee 9 and protocol hygiene, from outside: Origin, Host, credentials, errors, 1007.

Rules of this suite: a whole server in-process on 127.0.0.1, port 0,
against the harness's real redis-server, spoken to over real sockets (raw
wsproto handshakes so that every status and header can be checked).  "Nothing
was created" is checked in Redis itself.  Log lines are checked as the JSON
formatter writes them.  Every wait is bounded.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from frontdoor_client import IO, handshake, http, new_session_id, raw_websocket

from trio_portfolio.auth import mint_credential
from trio_portfolio.logs import JsonFormatter, session_log_id
from trio_portfolio.origins import OriginPolicy
from trio_portfolio.redis_io import open_redis
from trio_portfolio.store import SessionKeys
from trio_portfolio.testing import RedisServerInfo, open_tcp_proxy
from trio_portfolio.testing.live_server import LiveServer, open_live_server
from trio_portfolio.testing.live_server import test_settings as server_settings

SECRET = "a-test-secret-of-enough-length"
V2 = "portfolio.v2"


@asynccontextmanager
async def live(redis: RedisServerInfo, **overrides: Any) -> AsyncIterator[LiveServer]:
    overrides.setdefault("metric_delay_seconds", (0.01, 0.05))
    async with open_live_server(server_settings(redis.url, **overrides)) as server:
        yield server


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait (bounded) until ``predicate()`` holds, polling."""
    with trio.fail_after(IO):
        for _ in itertools.count():
            if predicate():
                return
            await trio.sleep(0.02)


async def session_keys(redis_url: str, prefix: str) -> tuple[int, list[str]]:
    """(size of the session index, every key of a session) under ``prefix``."""
    async with open_redis(redis_url) as redis:
        sizes = await redis.pipeline([("SCARD", k) for k in SessionKeys(prefix).index_keys()])
        index = sum(sizes)
        keys = await redis.execute("KEYS", f"{prefix}:session:*")
    return index, sorted(k.decode() if isinstance(k, bytes) else k for k in keys)


# -- Origin ----------------------------------------------------------------------------------


def test_origin_policy_rules() -> None:
    default = OriginPolicy.from_settings([])
    assert default.allows(None, "example.com")  # not a browser
    assert default.allows("http://example.com:8000", "example.com:8000")  # same origin
    assert default.allows("https://example.com", "EXAMPLE.com")  # default port 443
    assert not default.allows("http://example.com:8001", "example.com:8000")
    assert not default.allows("https://example.com:8000", "example.com")
    assert default.allows("http://localhost:3000", "example.com")  # loopback pages
    assert default.allows("http://127.0.0.5:1", "example.com")
    assert default.allows("http://[::1]:8080", "example.com")
    assert default.allows("http://app.localhost", "example.com")
    assert not default.allows("http://evil.example", "127.0.0.1:8000")
    assert not default.allows("null", "127.0.0.1:8000")
    assert not default.allows("garbage", "127.0.0.1:8000")
    configured = OriginPolicy.from_settings(["https://app.example.com"])
    assert configured.allows("https://app.example.com", "api.example.com")
    assert configured.allows("https://app.example.com:443", "api.example.com")
    assert not configured.allows("http://localhost:3000", "api.example.com")  # replaced
    assert configured.allows("http://api.example.com", "api.example.com")  # own origin
    assert OriginPolicy.from_settings(["*"]).allows("http://evil.example", "x")
    assert OriginPolicy.from_settings(["null"]).allows("null", "x")


async def test_handshake_origins(real_redis: RedisServerInfo) -> None:
    async with live(real_redis) as server:
        port, path = server.port, f"/ws/{new_session_id()}"
        evil = await handshake(port, path, headers=[("Origin", "http://evil.example")])
        assert evil.status == 403
        assert evil.json()["error"] == "origin_not_allowed"
        own = f"http://127.0.0.1:{port}"
        assert (await handshake(port, path, headers=[("Origin", own)])).status == 101
        assert (await handshake(port, path)).status == 101  # no Origin
        other_port = [("Origin", "http://localhost:5173")]
        assert (await handshake(port, path, headers=other_port)).status == 101
        # POST /session: same rule, and no permissive CORS headers either way.
        cross = await http(port, "POST", "/session", headers=[("Origin", "http://evil.example")])
        assert cross.status == 403
        same = await http(port, "POST", "/session", headers=[("Origin", own)])
        assert same.status == 201
        for reply in (cross, same):
            assert not [h for h in reply.headers if h.startswith("access-control-")]


async def test_configured_origins(real_redis: RedisServerInfo) -> None:
    async with live(real_redis, allowed_origins=("https://app.example.com",)) as server:
        port, path = server.port, f"/ws/{new_session_id()}"
        app = [("Origin", "https://app.example.com")]
        assert (await handshake(port, path, headers=app)).status == 101
        local = [("Origin", "http://localhost:5173")]
        assert (await handshake(port, path, headers=local)).status == 403


async def test_allowed_hosts_guard_dns_rebinding(real_redis: RedisServerInfo) -> None:
    async with live(real_redis, allowed_hosts=("127.0.0.1",)) as server:
        port, path = server.port, f"/ws/{new_session_id()}"
        rebound = [("Origin", f"http://evil.example:{port}")]
        refused = await handshake(port, path, headers=rebound, host=f"evil.example:{port}")
        assert refused.status == 421
        assert (await http(port, "GET", "/health", host="evil.example")).status == 421
        assert (await http(port, "POST", "/session", host="evil.example")).status == 421
        assert (await http(port, "GET", "/health", host=f"127.0.0.1:{port}")).status == 200
        assert (await handshake(port, path)).status == 101


# -- authentication --------------------------------------------------------------------------


async def test_auth_refuses_before_touching_the_store(real_redis: RedisServerInfo) -> None:
    async with live(real_redis, auth_secret=SECRET) as server:
        port, prefix = server.port, server.settings.key_prefix
        created = await http(port, "POST", "/session")
        assert created.status == 201
        mine = created.json()["session_id"]
        credential = created.json()["credential"]
        assert credential == mint_credential(SECRET.encode(), mine)
        before = await session_keys(real_redis.url, prefix)
        assert before[0] == 1

        stranger = new_session_id()
        cases = {
            "none": (401, {}),
            "wrong": (403, {"query": "?credential=AAAA"}),
            "another session's": (403, {"query": f"?credential={credential}"}),
            "bearer of another": (403, {"bearer": credential}),
            "subprotocol of another": (403, {"subprotocol": f"portfolio.auth.{credential}"}),
        }
        for name, (status, how) in cases.items():
            headers = [("Authorization", f"Bearer {how['bearer']}")] if "bearer" in how else []
            subprotocols = [V2] + ([how["subprotocol"]] if "subprotocol" in how else [])
            reply = await handshake(
                port,
                f"/ws/{stranger}{how.get('query', '')}",
                subprotocols=subprotocols,
                headers=headers,
            )
            assert reply.status == status, name
            if status == 401:
                assert reply.headers["www-authenticate"].startswith("Bearer")
        assert (await handshake(port, f"/ws/{mine}", subprotocols=[V2])).status == 401
        assert await session_keys(real_redis.url, prefix) == before  # nothing created or read


async def test_auth_accepts_the_credential_three_ways(real_redis: RedisServerInfo) -> None:
    async with live(real_redis, auth_secret=SECRET) as server:
        port = server.port
        created = (await http(port, "POST", "/session")).json()
        session_id, credential = created["session_id"], created["credential"]
        ways: list[dict[str, Any]] = [
            {"path": f"/ws/{session_id}?credential={credential}", "subprotocols": [V2]},
            {"path": f"/ws/{session_id}", "subprotocols": [V2, f"portfolio.auth.{credential}"]},
            {
                "path": f"/ws/{session_id}",
                "subprotocols": [V2],
                "headers": [("Authorization", f"Bearer {credential}")],
            },
        ]
        for way in ways:
            async with raw_websocket(port, **way) as ws:
                assert ws.subprotocol == V2  # never the auth entry when v2 is offered
                frame = await ws.recv_json()
                assert (frame["type"], frame["session_id"]) == ("session", session_id)
        # A v1 browser page can only offer the auth entry: it is echoed, dialect v1.
        async with raw_websocket(
            port, f"/ws/{session_id}", subprotocols=[f"portfolio.auth.{credential}"]
        ) as ws:
            assert ws.subprotocol == f"portfolio.auth.{credential}"
            await ws.send_text('{"action": "analyze", "ticker": "AAPL"}')
            first = await ws.recv_json()
            assert first["type"] == "analysis_result"  # v1: results only
            assert "analysis_id" not in first


async def test_auth_off_by_default_has_no_credential(real_redis: RedisServerInfo) -> None:
    async with live(real_redis) as server:
        created = (await http(server.port, "POST", "/session")).json()
        assert "credential" not in created
        assert (await handshake(server.port, f"/ws/{new_session_id()}")).status == 101


def test_auth_secret_file(tmp_path: Any) -> None:
    from trio_portfolio.config import ConfigError, load_settings

    path = tmp_path / "secret"
    path.write_text(f"  {SECRET}\n")
    settings = load_settings({"auth_secret_file": str(path)}, {}, None)
    assert settings.auth_key() == SECRET.encode()
    path.write_text("short")
    with pytest.raises(ConfigError, match="fewer than 16"):
        load_settings({"auth_secret_file": str(path)}, {}, None)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings({"auth_secret_file": str(tmp_path / "missing")}, {}, None)
    with pytest.raises(ConfigError, match="not both"):
        load_settings({"auth_secret_file": str(path), "auth_secret": SECRET}, {}, None)
    with pytest.raises(ConfigError, match="at least 16"):
        load_settings({}, {"PORTFOLIO_AUTH_SECRET": "short"}, None)
    with pytest.raises(ConfigError) as info:
        load_settings({}, {"PORTFOLIO_AUTH_SECRET": "short-secret"}, None)
    assert "short-secret" not in str(info.value)


async def test_logs_carry_no_credentials_and_no_session_ids(
    real_redis: RedisServerInfo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with live(real_redis, auth_secret=SECRET) as server:
        created = (await http(server.port, "POST", "/session")).json()
        session_id, credential = created["session_id"], created["credential"]
        async with raw_websocket(
            server.port, f"/ws/{session_id}?credential={credential}", subprotocols=[V2]
        ) as ws:
            assert (await ws.recv_json())["type"] == "session"
        await handshake(server.port, f"/ws/{session_id}?credential=wrong{credential}")
        await http(server.port, "GET", f"/ws/{session_id}?credential={credential}")  # 426
        await http(server.port, "GET", f"/nothing?credential={credential}")  # 404
        await eventually(lambda: any(r.getMessage() == "connection closed" for r in caplog.records))
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    text = "\n".join(lines)
    assert credential not in text
    assert session_id not in text
    assert session_log_id(session_id) in text  # correlatable, though


# -- hygiene -------------------------------------------------------------------------------


async def test_errors_carry_no_internal_addresses(
    real_redis: RedisServerInfo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with open_tcp_proxy(*real_redis.address) as proxy:
        settings = server_settings(
            proxy.url, metric_delay_seconds=(0.0, 0.05), redis_timeout_seconds=0.5
        )
        async with open_live_server(settings) as server:
            proxy.refuse(True)
            await proxy.cut()
            internal = proxy.url.removeprefix("redis://").rstrip("/")
            port = internal.rpartition(":")[2]
            with trio.fail_after(IO):
                for _ in itertools.count():
                    ready = await http(server.port, "GET", "/ready")
                    if ready.status == 503:
                        break
                    await trio.sleep(0.05)
            created = await http(server.port, "POST", "/session")
            assert created.status == 503
            for reply in (ready, created):
                body = reply.body.decode()
                assert port not in body, body
                assert "rrno" not in body, body
                assert "closed the connection" not in body, body
                error_id = reply.json()["error_id"]
                assert error_id.startswith("e-")
                logged = [r.getMessage() for r in caplog.records if error_id in r.getMessage()]
                assert logged, f"no log line carries {error_id}"
            assert "redis" in ready.json()["reason"].lower()
            proxy.refuse(False)


def _masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


async def test_invalid_utf8_closes_with_1007(real_redis: RedisServerInfo) -> None:
    async with live(real_redis) as server:
        session_id = new_session_id()
        async with raw_websocket(server.port, f"/ws/{session_id}", subprotocols=[V2]) as ws:
            assert (await ws.recv_json())["type"] == "session"
            await ws.stream.send_all(_masked_text_frame(b'{"action": "\xff\xfe"}'))
            assert await ws.close_code() == 1007
        # The server carries on, and the session is intact.
        async with raw_websocket(server.port, f"/ws/{session_id}", subprotocols=[V2]) as ws:
            assert (await ws.recv_json())["type"] == "session"
            await ws.send_text('{"action": "get_portfolio"}')
            assert (await ws.recv_json())["type"] == "portfolio"


async def test_an_ordinary_close_is_not_doubled(real_redis: RedisServerInfo) -> None:
    """A client's own 1007 close gets the echo, once, and nothing after it."""
    from wsproto.events import CloseConnection

    async with (
        live(real_redis) as server,
        raw_websocket(server.port, f"/ws/{new_session_id()}", subprotocols=[V2]) as ws,
    ):
        assert (await ws.recv_json())["type"] == "session"
        await ws.stream.send_all(ws.ws.send(CloseConnection(code=1007, reason="bye")))
        assert await ws.close_code() == 1007
        assert await ws.next_event() is None  # EOF: no second close frame
