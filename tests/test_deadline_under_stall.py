"""No call outlives its deadline while Redis stalls, through stall drops and reconnects.

The chaos table's ``debug_sleep`` row in miniature, at the adapter: many
callers on two shared connections ask in a loop (as the analysis runner's
commit does: a call, a :class:`StoreUnavailable`, a short backoff, again)
while Redis is stalled for longer than both the call timeout and the stall
timeout (equal, as the server configures them).  So every path of a
deadline is taken at once: the fast path's deadline on a connection's
watchdog heap, the stall watchdog dropping a connection and failing its
requests, the slow path connecting a fresh connection *during* the stall
(its watchdog starting with requests already on its heap), and calls that
wait for room or a connect.  Each call must end (a reply, or
:class:`StoreUnavailable`) within its own deadline plus :data:`SLACK`; and
when the stall ends, every caller is answered again.

The stall is :data:`~trio_portfolio.testing.faults.BUSY_SCRIPT` (Redis
answers nobody while it runs, like ``DEBUG SLEEP``, on every server version
and over TCP) on a private redis-server per binary found, so it cannot slow
another suite's server.  Every wait is under ``fail_after``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import trio

from trio_portfolio.embedded import RedisBinary, list_redis_binaries
from trio_portfolio.redis_io import Script, StoreUnavailable, Unavailable, open_redis
from trio_portfolio.testing.faults import BUSY_SCRIPT
from trio_portfolio.testing.redis_servers import RedisServerInfo, run_redis_binary

BINARIES = list_redis_binaries()

TIMEOUT = 0.5
"""The calls' timeout and the connections' stall timeout (the server sets them equal)."""
STALL_MS = 2500
"""How long Redis answers nobody: five call deadlines, and past the stall timeout."""
SLACK = 0.5
"""How late past its deadline a call may end (scheduling on a loaded 2-core machine)."""
CALLERS = 60

INCR = Script("return redis.call('INCR', KEYS[1])")
"""What the callers run: a script, as the runner's appends are (EVALSHA, NOSCRIPT-safe)."""


@pytest.fixture(scope="module", params=BINARIES, ids=[b.name for b in BINARIES])
def private_redis(request: pytest.FixtureRequest) -> Iterator[RedisServerInfo]:
    binary: RedisBinary = request.param
    with run_redis_binary(binary.path) as server:
        yield server


async def test_every_call_ends_within_its_deadline_while_redis_stalls(
    private_redis: RedisServerInfo,
) -> None:
    url = private_redis.url
    lateness: list[float] = []  # how long past its deadline each call ended (negative: before)
    failures: dict[Unavailable, int] = {}
    answered_after_stall: set[int] = set()
    stall_over = trio.Event()
    key = f"stall-counter-{random.random()}"

    async with (
        open_redis(url, timeout=10) as admin,
        open_redis(url, timeout=TIMEOUT, stall_timeout=TIMEOUT, connections=2) as redis,
    ):
        await redis.load_scripts([INCR])
        await admin.ping()

        async def caller(number: int) -> None:
            backoff = 0.05
            while number not in answered_after_stall:
                started = trio.current_time()
                try:
                    await redis.evalsha(INCR, [key])
                except StoreUnavailable as exc:
                    failures[exc.reason] = failures.get(exc.reason, 0) + 1
                    lateness.append(trio.current_time() - (started + TIMEOUT))
                    await trio.sleep(backoff)
                    backoff = min(0.2, backoff * 2)
                    continue
                lateness.append(trio.current_time() - (started + TIMEOUT))
                if stall_over.is_set():
                    answered_after_stall.add(number)
                await trio.sleep(random.uniform(0, 0.05))

        async def stall() -> None:
            await admin.evalsha(Script(BUSY_SCRIPT), [], [STALL_MS, "done"], timeout=10)
            stall_over.set()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for number in range(CALLERS):
                    nursery.start_soon(caller, number)
                await trio.sleep(0.3)  # the callers are in their loops
                nursery.start_soon(stall)

        stats = redis.statistics()

    worst = max(lateness)
    assert worst <= SLACK, (
        f"a call ended {worst:.2f} s after its deadline (allowed {SLACK} s); "
        f"{sum(1 for late in lateness if late > SLACK)} of {len(lateness)} calls were late"
    )
    # The stall was felt on every path it can take.
    assert failures.get(Unavailable.TIMEOUT, 0) > 0, failures
    assert stats.connections_stalled >= 1, stats
    assert stats.reconnects >= 1, stats
    assert answered_after_stall == set(range(CALLERS))
