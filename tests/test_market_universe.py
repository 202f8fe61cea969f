"""The bounded market universe, from outside: a v2 client floods set_holdings with fresh tickers.

Rules of this suite: a whole server in-process (``open_live_server``)
against a real redis-server (``real_redis``), driven over a real WebSocket;
the universe is read from Redis (``HLEN <prefix>:{market}:prices``, as
``trio_portfolio/market_data.py`` documents) and tick durations from the
server's own ``market_tick_seconds`` histogram.  The issue's flood is 60 s
at 5 sets/s with 1 s ticks; this is the same rate for a few seconds, with
faster ticks, and short session TTLs so that expiry happens within the test.
"""

from __future__ import annotations

import itertools
import statistics

import trio

from trio_portfolio.store import CLAIM_GRACE_MS
from trio_portfolio.testing import RedisServerInfo, record_market_ticks
from trio_portfolio.testing.live_server import Client, LiveServer, open_client, open_live_server
from trio_portfolio.testing.live_server import test_settings as server_settings

INTERVAL = 0.3
TTL = 3
SETS_PER_SECOND = 5
FLOOD_SECONDS = 4.0
FRESH = 100


async def median_tick(ticks: list[tuple[float, float]], seconds: float) -> float:
    """The median duration of the ticks taken in the next ``seconds``."""
    start = trio.current_time()
    await trio.sleep(seconds)
    window = [value for at, value in ticks if at >= start]
    assert window, "no tick in the window"
    return statistics.median(window)


async def universe(server: LiveServer) -> int:
    services = server.info.server.services
    assert services is not None
    return await services.market.universe_size()


async def drain(client: Client) -> None:
    """Read every frame the server sends, so the connection never counts as slow."""
    while True:
        await client.recv(timeout=60)


async def keep_alive(client: Client) -> None:
    """Client activity well within the TTL, so this session never expires."""
    while True:
        await client.send("get_portfolio")
        await trio.sleep(TTL / 4)


async def test_a_set_holdings_flood_never_grows_the_universe_past_what_is_held(
    real_redis: RedisServerInfo,
) -> None:
    settings = server_settings(
        real_redis.url, market_update_interval_seconds=INTERVAL, session_ttl_seconds=TTL
    )
    async with open_live_server(settings) as server:
        with trio.fail_after(60):
            # A well-behaved session holding the defaults, kept alive all along.
            async with open_client(server, "steady") as steady, trio.open_nursery() as keep:
                await steady.recv()  # its session frame
                keep.start_soon(keep_alive, steady)
                keep.start_soon(drain, steady)
                before = await universe(server)
                ticks = record_market_ticks(server)
                tick_before = await median_tick(ticks, 6 * INTERVAL)
                sent: list[float] = []
                samples: list[tuple[float, int, int]] = []
                fresh = (f"F{n:05d}" for n in itertools.count())
                async with open_client(server, "flooder") as flooder, trio.open_nursery() as n:
                    n.start_soon(drain, flooder)
                    deadline = trio.current_time() + FLOOD_SECONDS
                    while trio.current_time() < deadline:
                        holdings = {next(fresh): 1.0 for _ in range(FRESH)}
                        await flooder.send("set_holdings", holdings=holdings)
                        sent.append(trio.current_time())
                        for _ in range(4):
                            await trio.sleep(1 / SETS_PER_SECOND / 4)
                            now = trio.current_time()
                            samples.append((now, await universe(server), len(sent)))
                    n.cancel_scope.cancel()
                peak = max(size for _, size, _ in samples)
                # Held now: the defaults and one set of fresh tickers.  Beyond that the
                # market may keep what was let go within the last two ticks plus the
                # claim grace, and nothing older.
                window = 2 * INTERVAL + CLAIM_GRACE_MS / 1000 + 0.5
                for at, size, count in samples:
                    recent = sum(1 for t in sent[:count] if at - t <= window)
                    assert size <= before + FRESH * max(1, recent), (at, size, recent)
                print(
                    f"\nuniverse before {before}, peak {peak} during {len(sent)} sets of "
                    f"{FRESH} fresh tickers ({len(sent) * FRESH} in all)"
                )
                assert len(sent) * FRESH > 2 * peak, "the flood was not pruned as it went"
                # The flooder left: its session expires after TTL, then one tick drops it.
                with trio.fail_after(TTL + 6 * INTERVAL + CLAIM_GRACE_MS / 1000 + 5):
                    while True:
                        if await universe(server) <= before:
                            break
                        await trio.sleep(0.05)
                after = await universe(server)
                tick_after = await median_tick(ticks, 6 * INTERVAL)
                print(
                    f"universe after expiry {after}; median tick {tick_before * 1000:.1f} ms "
                    f"before, {tick_after * 1000:.1f} ms after"
                )
                assert after == before
                assert tick_after <= 2 * tick_before + 0.02  # (+20 ms: a loaded 2-core box)
                keep.cancel_scope.cancel()


async def test_past_the_ticker_cap_set_holdings_answers_ticker_limit_and_changes_nothing(
    real_redis: RedisServerInfo,
) -> None:
    """``--max-tickers`` seen by a client: an ``error`` ``ticker_limit``, holdings kept."""
    settings = server_settings(real_redis.url, max_tickers=4, metric_delay_seconds=(0.0, 0.0))
    async with (
        open_live_server(settings) as server,
        open_client(server, "cap-" + str(trio.current_time()).replace(".", "")) as client,
    ):
        session = await client.recv(10)
        assert session["type"] == "session", session
        before = session["portfolio"]["holdings"]
        await client.send("set_holdings", holdings={"ZZA": 1, "ZZB": 2})
        refused = await client.recv(10)
        assert (refused["type"], refused["code"]) == ("error", "ticker_limit"), refused
        await client.send("get_portfolio")
        portfolio = await client.recv(10)
        assert portfolio["type"] == "portfolio", portfolio
        assert portfolio["holdings"] == before
