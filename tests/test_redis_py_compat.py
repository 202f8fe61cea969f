"""What the adapter borrows from redis-py and hiredis is still there and still behaves.

:mod:`trio_portfolio.redis_wire` reuses redis-py's command encoder (one
*private* name, ``redis._parsers.encoders.Encoder``, plus
``redis.connection.PythonRespSerializer`` and ``parse_url``) and hiredis'
reader with our own reply-error factory.  A redis-py or hiredis release that
moves or changes them must fail here, loudly and with instructions, not
deep inside a store test.  ``pyproject.toml`` pins the redis-py range these
were checked against; the last test keeps the pin and the installed version
honest.  Pure: no server.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import random
import re
import tomllib
from pathlib import Path
from typing import Any

import hiredis
import pytest

from trio_portfolio.redis_io import (
    CommandError,
    ProtocolError,
    ReplyDecodeError,
    StoreUnavailable,
    encode_command,
    new_reply_reader,
    next_reply,
)

ROOT = Path(__file__).resolve().parent.parent
REDIS_PY = importlib.metadata.version("redis")

BORROWED = [
    ("redis._parsers.encoders", "Encoder"),  # the oracle of the encoder test below
    ("redis.connection", "PythonRespSerializer"),  # likewise
    ("redis.connection", "parse_url"),
    ("redis.exceptions", "DataError"),  # likewise
]


@pytest.mark.parametrize(("module", "name"), BORROWED, ids=[f"{m}.{n}" for m, n in BORROWED])
def test_redis_py_still_has_the_names_the_adapter_imports(module: str, name: str) -> None:
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(
            f"redis-py {REDIS_PY} no longer provides {module}.{name}, which "
            "trio_portfolio/redis_wire.py imports (it is private API). Find where this "
            "redis-py moved it, update the import in redis_wire.py, and adjust the redis "
            f"pin in pyproject.toml. ({type(exc).__name__}: {exc})",
            pytrace=False,
        )
    assert callable(found)


def test_the_encoder_still_writes_plain_resp2() -> None:
    assert encode_command(("SET", "k", "välue", 5, 1.5, b"\xff")) == (
        b"*6\r\n$3\r\nSET\r\n$1\r\nk\r\n$6\r\nv\xc3\xa4lue\r\n$1\r\n5\r\n$3\r\n1.5\r\n$1\r\n\xff\r\n"
    )
    big = "x" * 10_000  # past the serializer's buffer cutoff: a separate chunk
    assert (
        encode_command(("ECHO", big)) == b"*2\r\n$4\r\nECHO\r\n$10000\r\n" + big.encode() + b"\r\n"
    )
    with pytest.raises(TypeError):
        encode_command(("SET", "k", None))  # type: ignore[arg-type]


class _Name(str):
    """A ``str`` subclass (as an enum's value can be): takes the encoder's slow path."""


class _Count(int):
    """An ``int`` subclass: likewise."""


def test_the_encoder_writes_what_redis_py_writes_byte_for_byte() -> None:
    """``encode_command`` against redis-py's own serializer, the bytes redis-py would send."""
    from redis._parsers.encoders import Encoder
    from redis.connection import PythonRespSerializer
    from redis.exceptions import DataError

    encoder = Encoder(encoding="utf-8", encoding_errors="strict", decode_responses=False)  # type: ignore[no-untyped-call]
    serializer = PythonRespSerializer(6000, encoder.encode)
    rng = random.Random(5)
    samples: list[Any] = [
        "",
        "EVALSHA",
        "välue ✓",
        "x" * 7000,
        b"",
        b"\x00\xff" * 4000,
        memoryview(b"mv"),
        0,
        -1,
        2**70,
        1.5,
        -0.0,
        1e300,
        float("inf"),
        _Name("tag"),
        _Count(42),
    ]
    samples += [rng.random() * 10 ** rng.randint(-20, 20) for _ in range(200)]
    samples += [
        "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 40))) for _ in range(100)
    ]
    for _ in range(300):
        name = rng.choice(["EVALSHA", "SET", "HSET", "välue"])
        args = (name, *(rng.choice(samples) for _ in range(rng.randint(0, 12))))
        want = b"".join(serializer.pack(*args))  # type: ignore[no-untyped-call]
        assert encode_command(args) == want, args
    for bad in (None, True, False, object(), [1]):
        with pytest.raises(DataError):
            serializer.pack("SET", "k", bad)  # type: ignore[no-untyped-call]
        with pytest.raises(TypeError):
            encode_command(("SET", "k", bad))


def test_parse_url_still_returns_what_connection_params_reads() -> None:
    from redis.connection import parse_url

    opts = parse_url("redis://u:p@h:1/2?ssl_cert_reqs=none")  # type: ignore[no-untyped-call]
    assert {k: opts.get(k) for k in ("host", "port", "username", "password", "db")} == {
        "host": "h",
        "port": 1,
        "username": "u",
        "password": "p",
        "db": 2,
    }
    assert opts.get("ssl_cert_reqs") == "none"
    assert parse_url("unix:///tmp/s.sock?db=3")["path"] == "/tmp/s.sock"  # type: ignore[no-untyped-call]


def _feed(data: bytes) -> list[Any]:
    parser = new_reply_reader()
    parser.feed(data)
    replies = []
    while (reply := next_reply(parser)) is not False:
        replies.append(reply)
    return replies


def test_hiredis_returns_our_error_values_and_consumes_undecodable_replies_whole() -> None:
    """The two hiredis behaviours the readers rely on to stay in step with the stream."""
    replies = _feed(
        b"-WRONGTYPE no\r\n-OOM full\r\n"
        b"*3\r\n$1\r\na\r\n*1\r\n$2\r\n\xff\xfe\r\n:1\r\n"  # one nested reply, not UTF-8
        b"$2\r\nok\r\n"
    )
    assert [type(r) for r in replies] == [CommandError, StoreUnavailable, ReplyDecodeError, str], (
        f"hiredis {hiredis.__version__} changed how it reports error replies or "
        f"undecodable bulk strings: {replies!r}"
    )
    assert replies[-1] == "ok", "the reply after an undecodable one must come through intact"


def test_hiredis_raises_our_protocol_error_for_non_resp_bytes() -> None:
    with pytest.raises(ProtocolError) as info:
        _feed(b"?what\r\n")
    assert isinstance(info.value, StoreUnavailable)


def _pinned_range() -> tuple[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for requirement in project["project"]["dependencies"]:
        match = re.fullmatch(r"redis>=([\d.]+),<([\d.]+)", requirement.replace(" ", ""))
        if match:
            return match.group(1), match.group(2)
    pytest.fail("pyproject.toml must pin redis as 'redis>=X,<Y' (the adapter uses private API)")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_the_installed_redis_py_is_inside_the_pinned_range() -> None:
    low, high = _pinned_range()
    assert _version(low) <= _version(REDIS_PY) < _version(high), (
        f"redis-py {REDIS_PY} is outside the range pyproject.toml pins (>={low},<{high}); "
        "run this file against it, then move the pin"
    )
