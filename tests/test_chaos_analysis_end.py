"""When the chaos suite's load client counts an ``analyze`` as answered.

The ``debug_sleep`` row failed 1 run in 3 under CPU load with "analyze
unanswered for 10 s" (10 s is the client's own I/O timeout).  The server
had answered within about 2 s: the analysis was cancelled
``portfolio_changed`` by a market tick, its restart could not start while
Redis stalled (``start_analysis`` timed out), and the server said so with
an ``error`` ``store_unavailable``.  The client took every ``error`` after
an ``analysis_started`` for a result not stored (which does not end an
analysis) and so waited for a restart that was never coming.  These are
the frame sequences the server sends (see ``AnalysisRunner._start_attempt``),
one test per way an analysis ends or goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio

from trio_portfolio.embedded import list_redis_binaries
from trio_portfolio.redis_io import open_redis
from trio_portfolio.testing import (
    RedisServerInfo,
    greet,
    hold_before,
    is_type,
    live,
    new_session_id,
    open_client,
    run_redis_binary,
    start_analysis,
    store_of,
)
from trio_portfolio.testing.chaos import _AnalysisEnd


def _started(analysis_id: str) -> dict[str, Any]:
    return {"type": "analysis_started", "analysis_id": analysis_id}


def _cancelled(analysis_id: str, reason: str) -> dict[str, Any]:
    return {"type": "analysis_cancelled", "analysis_id": analysis_id, "reason": reason}


def _result(analysis_id: str) -> dict[str, Any]:
    return {"type": "analysis_result", "analysis_id": analysis_id, "metric": "momentum"}


ERROR = {"type": "error", "code": "store_unavailable", "detail": "cannot start: timeout"}
MARKET = {"type": "market_update", "portfolio_version": 9}


def _ends_at(frames: list[dict[str, Any]]) -> int | None:
    """The index of the frame that ends the request, or ``None`` if none does."""
    done = _AnalysisEnd()
    return next((i for i, frame in enumerate(frames) if done(frame)), None)


def test_a_restart_refused_by_the_store_ends_the_request() -> None:
    frames = [_started("a1"), _result("a1"), MARKET, _cancelled("a1", "portfolio_changed"), ERROR]
    assert _ends_at(frames) == 4


def test_an_error_before_any_start_is_the_refusal() -> None:
    assert _ends_at([MARKET, ERROR]) == 1


def test_an_error_while_an_attempt_runs_does_not_end_it() -> None:
    frames = [
        _started("a1"),
        ERROR,
        _result("a1"),
        {"type": "analysis_complete", "analysis_id": "a1"},
    ]
    assert _ends_at(frames) == 3


def test_a_restart_that_starts_goes_on_to_its_own_end() -> None:
    frames = [
        _started("a1"),
        _cancelled("a1", "portfolio_changed"),
        _started("a2"),
        ERROR,  # a result of a2 not stored: a2 goes on
        _cancelled("a2", "cancelled"),
    ]
    assert _ends_at(frames) == 4


def test_frames_of_an_older_analysis_do_not_end_the_current_one() -> None:
    frames = [
        _started("a1"),
        _cancelled("a0", "switched"),
        {"type": "analysis_complete", "analysis_id": "a0"},
        _cancelled("a1", "switched"),
    ]
    assert _ends_at(frames) == 3


# -- the sequence as the server sends it ----------------------------------------------


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServerInfo]:
    """A redis-server of this module's own: the test makes it refuse writes (OOM)."""
    binaries = list_redis_binaries()
    if not binaries:
        pytest.skip("no redis-server binary")
    with run_redis_binary(binaries[0].path) as info:
        yield info


async def test_the_server_ends_a_restart_the_store_refuses_with_cancelled_then_error(
    private_redis: RedisServerInfo,
) -> None:
    """What the load client must understand, from a real server over a real Redis.

    A holdings change restarts the running analysis; the restart's
    ``start_analysis`` is held at its door while Redis is made to refuse
    writes (``maxmemory 1``), then let go: the server reports the old
    attempt ``portfolio_changed``, then ``error`` ``store_unavailable``, and
    starts nothing more.
    """
    session_id = new_session_id("restart-refused")
    async with (
        live(private_redis, metric_delay_seconds=(2.0, 3.0)) as server,
        open_redis(private_redis.url, timeout=5) as admin,
        open_client(server, session_id) as client,
    ):
        await greet(client)
        first = await start_analysis(client, "AAPL")
        reached, release = trio.Event(), trio.Event()
        hold_before(store_of(server), "start_analysis", reached, release)
        await client.send("set_holdings", holdings={"AAPL": 3.0, "MSFT": 1.0})
        with trio.fail_after(10):
            await reached.wait()  # the restart is at its door
        await admin.execute("CONFIG", "SET", "maxmemory", 1)
        try:
            release.set()
            frames = await client.recv_until(is_type("error"), timeout=10)
        finally:
            await admin.execute("CONFIG", "SET", "maxmemory", 0)
        with trio.move_on_after(1.0):  # nothing else of this analysis follows
            frames.append(await client.recv(timeout=2.0))
        events = [
            (f["type"], f.get("analysis_id"), f.get("reason") or f.get("code"))
            for f in frames
            if f["type"] != "market_update"
        ]
        assert events == [
            ("portfolio", None, None),
            ("analysis_cancelled", first["analysis_id"], "portfolio_changed"),
            ("error", None, "store_unavailable"),
        ], events
        seen = [first, *frames]
        end = _ends_at(seen)
        assert end is not None, "the load client would wait for a restart never coming"
        assert seen[end]["type"] == "error", seen[end]
        # The connection stays usable once the store accepts writes again.
        second = await start_analysis(client, "MSFT")
        assert second["analysis_id"] != first["analysis_id"]
