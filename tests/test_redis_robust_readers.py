"""No bytes from Redis, whatever they are, can end a reader task or the server.

Bulk strings are decoded as strict UTF-8, and anyone who can write to Redis
can store or publish arbitrary bytes.  The rules under test:

* a command reply that is not UTF-8 fails that one call (or that one
  pipeline entry) with ``ReplyDecodeError``, a ``CommandError``; the
  connection stays in step and the next call works;
* a pub/sub message that is not UTF-8 is dropped and counted
  (``messages_dropped_undecodable``) without a reconnect, and the next
  message arrives;
* a message that is UTF-8 but not one of our events is dropped and counted
  by the session-events hub (``malformed``);
* from outside: ``PUBLISH`` of ``\\xff\\xfe`` on a watched session's channel
  leaves the server up and the session working.

Real redis-server (``real_redis``), localhost, ``fail_after`` on every wait.
"""

from __future__ import annotations

import orjson
import pytest
import trio

from trio_portfolio.redis_io import CommandError, ReplyDecodeError, open_redis
from trio_portfolio.redis_pubsub import open_pubsub
from trio_portfolio.session_events import AnalysisStarted, SessionEvents, SessionEventsStatistics
from trio_portfolio.testing import RedisServerInfo
from trio_portfolio.testing.live_server import open_client, open_live_server, test_settings
from trio_portfolio.testing.redis_clients import subscribed

BAD = b"\xff\xfe"


async def test_an_undecodable_reply_fails_only_its_call(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    key = f"{key_prefix}:bad"
    async with open_redis(real_redis.url, connections=1) as redis:
        with trio.fail_after(5):
            assert await redis.execute("SET", key, BAD) == "OK"
            with pytest.raises(CommandError) as info:
                await redis.execute("GET", key)
            assert isinstance(info.value, ReplyDecodeError)
            assert info.value.code == "UNDECODABLE"
            assert await redis.execute("ECHO", "next") == "next"
            await redis.execute("RPUSH", f"{key}:list", "a", BAD, "c")
            replies = await redis.pipeline(
                [("ECHO", "1"), ("LRANGE", f"{key}:list", 0, -1), ("GET", key), ("ECHO", "2")]
            )
            assert replies[0] == "1"
            assert isinstance(replies[1], ReplyDecodeError), "a nested bad element: whole reply"
            assert isinstance(replies[2], ReplyDecodeError)
            assert replies[3] == "2"
            assert await redis.execute("LINDEX", f"{key}:list", 2) == "c"
        stats = redis.statistics()
        assert (stats.connects, stats.replies_undecodable) == (1, 3)


async def test_an_undecodable_message_is_dropped_and_the_next_arrives(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    channel = f"{key_prefix}:events"
    async with subscribed(real_redis.url, channel) as (redis, pubsub):
        with trio.fail_after(5):
            assert await redis.execute("PUBLISH", channel, BAD) == 1
            assert await redis.execute("PUBLISH", channel, "fine") == 1
            message = await pubsub.messages.receive()
            assert (message.channel, message.data) == (channel, "fine")
        stats = pubsub.statistics()
        assert stats.messages_dropped_undecodable == 1
        assert (stats.connects, stats.reconnects, stats.messages_received) == (1, 0, 1)
        assert stats.connected


async def test_the_events_hub_drops_and_counts_what_is_not_an_event(
    real_redis: RedisServerInfo, key_prefix: str
) -> None:
    async with (
        open_redis(real_redis.url) as redis,
        open_pubsub(real_redis.url) as pubsub,
        trio.open_nursery() as nursery,
    ):
        events = SessionEvents(pubsub, lambda session: f"{key_prefix}:{session}")
        await nursery.start(events.run)
        with trio.fail_after(5):
            async with events.watch("s1") as received:
                channel = f"{key_prefix}:s1"
                for junk in [BAD, b"not json", b"[1, 2]", b'{"kind": "portfolio"}', b"1e400"]:
                    await redis.execute("PUBLISH", channel, junk)
                good = orjson.dumps({"kind": "analysis_started", "analysis_id": "a-1"})
                await redis.execute("PUBLISH", channel, good)
                assert await received.receive() == AnalysisStarted(analysis_id="a-1")
        assert events.statistics() == SessionEventsStatistics(
            dropped=0, malformed=4, sessions_watched=0
        )
        assert pubsub.statistics().messages_dropped_undecodable == 1
        nursery.cancel_scope.cancel()


async def test_a_non_utf8_publish_on_a_watched_session_leaves_the_server_up(
    real_redis: RedisServerInfo,
) -> None:
    """The crash from issue 10: hiredis' UnicodeDecodeError used to end the process."""
    settings = test_settings(real_redis.url)
    async with (
        open_live_server(settings) as server,
        open_redis(real_redis.url) as redis,
        open_client(server, "robust") as client,
    ):
        with trio.fail_after(10):
            assert (await client.recv())["type"] == "session"
            channels = await redis.execute("PUBSUB", "CHANNELS", f"{settings.key_prefix}*")
            assert len(channels) == 1, channels
            assert await redis.execute("PUBLISH", channels[0], BAD) == 1
            assert await redis.execute("PUBLISH", channels[0], "{") == 1
            await client.send("get_portfolio")
            assert (await client.recv())["type"] == "portfolio"
            await client.send("analyze", ticker="AAPL")
            frames = await client.recv_until(lambda f: f["type"] == "analysis_complete")
            assert not [f for f in frames if f["type"] == "error"], frames
