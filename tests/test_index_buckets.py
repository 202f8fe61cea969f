"""The sessions index buckets spread evenly over a cluster's masters (issue 12, item 3).

The bucket sets' hash tags (``INDEX_BUCKET_TAGS``) are chosen so bucket ``n``
sits in the middle of the ``n``-th 64th of the slots.  Checked three ways:
the tags are what the documented search finds, their slots split evenly over
any 1 to 8 masters cut as ``redis-cli --cluster create`` cuts, and on the
real 3-master cluster the keys a store writes for sessions in every bucket
live 21/21/22 on the three masters.
"""

from __future__ import annotations

from collections import Counter

import trio
from redis.crc import key_slot

from trio_portfolio.redis_connect import open_redis
from trio_portfolio.store import INDEX_BUCKET_TAGS, INDEX_BUCKETS, SessionKeys, open_store
from trio_portfolio.testing import CLUSTER_SLOTS, RedisCluster

WIDTH = CLUSTER_SLOTS // INDEX_BUCKETS


def _search(bucket: int) -> str:
    """The documented search: the smallest salt whose slot is within 8 of the 64th's middle."""
    middle = bucket * WIDTH + WIDTH // 2
    salt = 0
    while not middle - 8 <= key_slot(f"b{bucket}-{salt}".encode()) <= middle + 7:
        salt += 1
    return f"b{bucket}-{salt}"


def _even_ranges(masters: int) -> list[tuple[int, int]]:
    per = CLUSTER_SLOTS / masters
    return [(round(i * per), round((i + 1) * per) - 1) for i in range(masters)]


def _owner(slot: int, ranges: list[tuple[int, int]]) -> int:
    return next(i for i, (start, end) in enumerate(ranges) if start <= slot <= end)


def test_tags_are_the_documented_search() -> None:
    assert len(INDEX_BUCKET_TAGS) == INDEX_BUCKETS
    assert list(INDEX_BUCKET_TAGS) == [_search(b) for b in range(INDEX_BUCKETS)]


def test_bucket_keys_carry_the_tags() -> None:
    keys = SessionKeys("portfolio")
    slots = [key_slot(keys.index_bucket(b).encode()) for b in range(INDEX_BUCKETS)]
    assert slots == [key_slot(tag.encode()) for tag in INDEX_BUCKET_TAGS]
    assert slots == sorted(slots)
    assert len(set(slots)) == INDEX_BUCKETS
    # a prefix does not move them: the tag alone decides the slot
    assert slots == [
        key_slot(SessionKeys("other:prefix").index_bucket(b).encode()) for b in range(64)
    ]


def test_buckets_split_evenly_for_up_to_eight_masters() -> None:
    slots = [key_slot(tag.encode()) for tag in INDEX_BUCKET_TAGS]
    for masters in range(1, 9):
        counts = Counter(_owner(slot, _even_ranges(masters)) for slot in slots)
        assert len(counts) == masters
        assert max(counts.values()) - min(counts.values()) <= 1, (masters, counts)
    three = Counter(_owner(slot, _even_ranges(3)) for slot in slots)
    assert sorted(three.values()) == [21, 21, 22]
    # consecutive small integers, as the names were before, do not spread this way
    plain = Counter(
        _owner(key_slot(f"portfolio:sessions:{b}".encode()), _even_ranges(3)) for b in range(64)
    )
    assert max(plain.values()) - min(plain.values()) > 1


async def test_bucket_keys_land_21_21_22_on_the_cluster_masters(
    redis_cluster: RedisCluster, key_prefix: str
) -> None:
    """Sessions in every bucket: each master holds exactly the bucket sets of its slots."""
    with trio.fail_after(60):
        await trio.to_thread.run_sync(redis_cluster.wait_until_ok)
        async with open_redis(redis_cluster.url) as redis:
            store = await open_store(redis, layout="hash", key_prefix=key_prefix)
            keys = store.keys
            ids: dict[int, str] = {}
            n = 0
            while len(ids) < INDEX_BUCKETS:
                ids.setdefault(keys.bucket_of(f"s{n}"), f"s{n}")
                n += 1
            for session_id in ids.values():
                await store.create_if_missing(session_id, {"AAPL": 1.0}, {"AAPL": 10.0}, T0)
        per_master = await trio.to_thread.run_sync(_buckets_per_master, redis_cluster, keys)
    assert sorted(per_master.values()) == [21, 21, 22], per_master


T0 = "2026-11-21T10:00:00.000Z"


def _buckets_per_master(cluster: RedisCluster, keys: SessionKeys) -> dict[int, int]:
    """Bucket sets stored on each master (asked of that master alone), by port."""
    counts: dict[int, int] = {}
    for master in cluster.masters():
        me = next(v for v in cluster.view(master) if "myself" in v.flags)
        mine = [
            keys.index_bucket(b)
            for b in range(INDEX_BUCKETS)
            if any(lo <= key_slot(keys.index_bucket(b).encode()) <= hi for lo, hi in me.slots)
        ]
        with master.client() as client:
            counts[master.port] = sum(int(client.exists(key)) for key in mine)
        assert counts[master.port] == len(mine), (master.port, mine)
    assert sum(counts.values()) == INDEX_BUCKETS
    return counts
