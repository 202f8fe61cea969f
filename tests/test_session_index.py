"""The session index lives in its buckets only: no key in one slot grows with the sessions.

Issue 12, item 3.  Earlier versions also kept the whole set ``<prefix>:sessions``
(one key, one slot); nothing writes it now, counting is the sum of the
buckets' ``SCARD`` and a store an earlier version wrote is folded into the
buckets by the market updater.  Checked on a single node (every key a store
writes is a session's or a bucket's), through a migration from the old
layout, and on the real 3-master cluster (the census spans every master).
"""

from __future__ import annotations

import trio
from redis.crc import key_slot

from trio_portfolio.market import MarketData, tick_once
from trio_portfolio.redis_connect import open_redis
from trio_portfolio.simulation import GbmSimulator
from trio_portfolio.store import INDEX_BUCKETS, detect_layout, open_store
from trio_portfolio.testing import RedisCluster, RedisServerInfo

T0 = "2026-11-21T10:00:00.000Z"
HOLDINGS = {"AAPL": 1.0}
PRICES = {"AAPL": 10.0}


async def test_no_whole_index_is_written_and_the_census_counts_the_buckets(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    async with open_redis(real_redis.url) as redis:
        store = await open_store(redis, layout="hash", key_prefix=key_prefix)
        with trio.fail_after(20):
            ids = [f"s{i}" for i in range(40)]
            for session_id in ids:
                await store.create_if_missing(session_id, HOLDINGS, PRICES, T0)
            assert await redis.execute("EXISTS", store.keys.legacy_index) == 0
            census = await store.session_census()
            assert (census.live, census.exists) == (40, False)
            assert (await store.session_census("s3")).exists
            assert not (await store.session_census("nobody")).exists
            keys = await redis.execute("KEYS", f"{key_prefix}:*")
            index_keys = set(store.keys.index_keys())
            for key in keys:
                assert key.startswith(f"{key_prefix}:session:{{") or key in index_keys, key
            await redis.execute("DEL", *store.session_keys("s3"))
            assert await store.forget(["s3"]) == 1
            assert (await store.session_census()).live == 39
            seen = [i async for page in store.iter_session_ids(7) for i in page]
            assert sorted(seen) == sorted(i for i in ids if i != "s3")
            assert all(0 < len(page) <= 7 for page in [p async for p in store.iter_session_ids(7)])


async def test_a_store_written_by_an_earlier_version_is_folded_into_the_buckets(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    async with open_redis(real_redis.url) as redis:
        store = await open_store(redis, layout="hash", key_prefix=key_prefix)
        market = MarketData(redis, GbmSimulator(seed=1), key_prefix=key_prefix)
        await market.load_scripts()
        with trio.fail_after(30):
            prices = dict(await market.ensure_prices(["AAPL"], holder="tests"))
            ids = [f"old{i}" for i in range(30)]
            for session_id in ids:
                await store.create_if_missing(session_id, HOLDINGS, prices, T0)
            # As the oldest version left them: in the whole index only, plus a ghost.
            for session_id in ids:
                bucket = store.keys.index_bucket(store.keys.bucket_of(session_id))
                await redis.execute("SREM", bucket, session_id)
            await redis.execute("SADD", store.keys.legacy_index, *ids, "ghost")
            assert (await store.session_census()).live == 0
            # Layout detection still finds them through the whole index.
            assert await detect_layout(redis, key_prefix=key_prefix) == "hash"

            report = await tick_once(market, store)

            assert await redis.execute("EXISTS", store.keys.legacy_index) == 0
            assert report.sessions_revalued == 30
            assert report.sessions_pruned == 1  # the ghost, moved and then forgotten
            assert (await store.session_census()).live == 30
            # Nothing left to fold: the next tick only asks SCARD of a missing key.
            assert await store.legacy_index_size() == 0
            assert await store.fold_legacy_index() == 0


async def test_an_interrupted_fold_is_finished_by_the_next(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    async with open_redis(real_redis.url) as redis:
        store = await open_store(redis, layout="hash", key_prefix=key_prefix)
        with trio.fail_after(20):
            ids = [f"x{i}" for i in range(50)]
            await redis.execute("SADD", store.keys.legacy_index, *ids)
            with trio.CancelScope() as scope:
                original = redis.execute

                async def cancel_at_first_srem(*args: object, **kwargs: object) -> object:
                    if args[0] == "SREM":
                        scope.cancel()
                        await trio.sleep_forever()
                    return await original(*args, **kwargs)  # type: ignore[arg-type]

                redis.execute = cancel_at_first_srem  # type: ignore[method-assign]
                try:
                    await store.fold_legacy_index(batch=10)
                finally:
                    redis.execute = original  # type: ignore[method-assign]
            assert await store.legacy_index_size() == 50  # nothing removed yet
            assert await store.fold_legacy_index(batch=10) == 50
            assert await store.legacy_index_size() == 0
            assert (await store.session_census()).live == 50


async def test_the_census_spans_every_master_of_a_cluster(
    redis_cluster: RedisCluster, key_prefix: str
) -> None:
    await trio.to_thread.run_sync(redis_cluster.wait_until_ok)
    async with open_redis(redis_cluster.url) as redis:
        store = await open_store(redis, layout="hash", key_prefix=key_prefix)
        keys = store.keys
        with trio.fail_after(30):
            ids: dict[int, str] = {}
            n = 0
            while len(ids) < INDEX_BUCKETS:
                ids.setdefault(keys.bucket_of(f"c{n}"), f"c{n}")
                n += 1
            for session_id in ids.values():
                await store.create_if_missing(session_id, HOLDINGS, PRICES, T0)
            census = await store.session_census(ids[0])
            assert (census.live, census.exists) == (INDEX_BUCKETS, True)
            whole_slot = key_slot(keys.legacy_index.encode())
            owner = redis.node_for_slot(whole_slot)  # type: ignore[attr-defined]
            node = redis.node_client(owner)  # type: ignore[attr-defined]
            assert await node.execute("EXISTS", keys.legacy_index) == 0
            seen = [i async for page in store.iter_session_ids() for i in page]
            assert sorted(seen) == sorted(ids.values())
