"""The adapter's error vocabulary: every "not now" is StoreUnavailable, the rest CommandError.

First the pure mapping from error-reply text to the adapter's types (the
texts are the ones Redis 6.2 and 7.0 send, including the Redis 6 wrapping
of an error met inside a script).  Then each "not now" condition provoked
for real on a private redis-server per binary found (``CONFIG SET
maxmemory 1``, ``min-replicas-to-write``, ``REPLICAOF`` a master that does
not exist, a script past ``lua-time-limit``), through ``execute``,
``evalsha``, ``pipeline`` and ``evalsha_many``, and READONLY's effect on
the client's connections.  Localhost only; ``fail_after`` on every wait.
"""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial

import pytest
import trio

from trio_portfolio.embedded import list_redis_binaries
from trio_portfolio.redis_errors import NoScript, classify_error_reply
from trio_portfolio.redis_io import (
    CommandError,
    RedisClient,
    ReplyError,
    Script,
    StoreUnavailable,
    Unavailable,
    open_redis,
)
from trio_portfolio.testing import RedisServerInfo, run_redis_binary

SCRIPT_ERR_62 = "ERR Error running script (call to f_82cdd3d7ab6b96f9a5947917c9f163ca06cc907a): "

NOT_NOW = [
    ("READONLY You can't write against a read only replica.", Unavailable.READ_ONLY),
    ("LOADING Redis is loading the dataset in memory", Unavailable.LOADING),
    ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
     Unavailable.MASTER_DOWN),
    ("CLUSTERDOWN The cluster is down", Unavailable.CLUSTER_DOWN),
    ("TRYAGAIN Multiple keys request during rehashing of slot", Unavailable.TRY_AGAIN),
    ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
     Unavailable.BUSY),
    ("OOM command not allowed when used memory > 'maxmemory'.", Unavailable.OUT_OF_MEMORY),
    ("NOREPLICAS Not enough good replicas to write.", Unavailable.NO_REPLICAS),
    ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
     Unavailable.PERSISTENCE_FAILED),
    ("NOAUTH Authentication required.", Unavailable.AUTH_FAILED),
    ("WRONGPASS invalid username-password pair or user is disabled.", Unavailable.AUTH_FAILED),
    ("ERR max number of clients reached", Unavailable.TOO_MANY_CLIENTS),
    # Redis 7 keeps the inner code of an error met by redis.call() in a script ...
    ("OOM command not allowed when used memory > 'maxmemory'. script: 82cd, on @user_script:1.",
     Unavailable.OUT_OF_MEMORY),
    # ... Redis 6 wraps it.
    (SCRIPT_ERR_62 + "@user_script:1: @user_script: 1: -READONLY You can't write against a "
     "read only replica.", Unavailable.READ_ONLY),
    (SCRIPT_ERR_62 + "@user_script:1: @user_script: 1: -NOREPLICAS Not enough good replicas "
     "to write.", Unavailable.NO_REPLICAS),
]  # fmt: skip

REFUSED = [
    ("WRONGTYPE Operation against a key holding the wrong kind of value", "WRONGTYPE"),
    ("ERR wrong number of arguments for 'set' command", "ERR"),
    ("ERR unknown command 'FOO', with args beginning with: ", "ERR"),
    ("ERR user_script:1: oops script: ecbf, on @user_script:1.", "ERR"),
    (SCRIPT_ERR_62 + "@user_script:1: WRONGTYPE Operation against a key", "ERR"),
    (SCRIPT_ERR_62 + "@user_script:1: user_script:1: -OOMPH not a code we know ", "ERR"),
    ("BUSYKEY Target key name already exists.", "BUSYKEY"),
    ("NOPERM this user has no permissions to run the 'debug' command", "NOPERM"),
    ("EXECABORT Transaction discarded because of previous errors.", "EXECABORT"),
    ("BOOM raised by a script", "BOOM"),
    ("", ""),
]


@pytest.mark.parametrize(("message", "reason"), NOT_NOW)
def test_not_now_replies_are_store_unavailable(message: str, reason: Unavailable) -> None:
    error = classify_error_reply(message)
    assert isinstance(error, StoreUnavailable)
    assert error.reason is reason
    assert not error.maybe_executed, "Redis refused it: it did not run"
    assert message in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.reason, str(copy)) == (StoreUnavailable, reason, str(error))


@pytest.mark.parametrize(("message", "code"), REFUSED)
def test_genuine_command_errors_are_command_errors(message: str, code: str) -> None:
    error = classify_error_reply(message)
    assert type(error) is CommandError
    assert error.code == code
    assert str(error) == message
    assert pickle.loads(pickle.dumps(error)).code == code


def test_noscript_is_a_command_error_and_reply_error_is_the_old_name() -> None:
    assert isinstance(classify_error_reply("NOSCRIPT No matching script."), NoScript)
    assert ReplyError is CommandError
    assert not issubclass(StoreUnavailable, CommandError)


def test_every_reason_has_an_explanation_without_details() -> None:
    for reason in Unavailable:
        text = StoreUnavailable("at redis://10.0.0.1:6379/0: [Errno 111]", reason=reason)
        assert text.explanation
        assert "10.0.0.1" not in text.explanation
        assert "Errno" not in text.explanation


# -- against real servers -------------------------------------------------------------

BINARIES = list_redis_binaries()
WRITE = Script("redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]")
READ = Script("return redis.call('GET', KEYS[1])")
SPIN = Script(
    """
local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) >= stop
return 1
"""
)


@pytest.fixture(scope="module", params=BINARIES, ids=[b.name for b in BINARIES])
def private_redis(request: pytest.FixtureRequest) -> Iterator[RedisServerInfo]:
    """A redis-server of our own: these tests reconfigure it (memory, replication)."""
    with run_redis_binary(request.param.path) as info:
        yield info


@pytest.fixture
async def redis(private_redis: RedisServerInfo) -> AsyncIterator[RedisClient]:
    async with open_redis(private_redis.url, connections=1, reconnect_backoff=0.2) as client:
        await client.load_scripts([WRITE, READ, SPIN])
        await client.execute("SET", "existing", "v")
        yield client


async def assert_unavailable(
    redis: RedisClient, reason: Unavailable, key: str = "k"
) -> list[StoreUnavailable]:
    """A write through every entry point fails with ``reason`` and nothing else."""
    errors: list[StoreUnavailable] = []
    with pytest.raises(StoreUnavailable) as info:
        await redis.execute("SET", key, "x")
    errors.append(info.value)
    with pytest.raises(StoreUnavailable) as info:
        await redis.evalsha(WRITE, [key], ["x"])
    errors.append(info.value)
    replies = await redis.pipeline([("GET", "existing"), ("SET", key, "x"), ("ECHO", "e")])
    assert (replies[0], replies[2]) == ("v", "e"), "only the refused entry is an error"
    many = await redis.evalsha_many(WRITE, [([key], ["1"]), ([key], ["2"])])
    for entry in [replies[1], *many]:
        assert isinstance(entry, StoreUnavailable), entry
        errors.append(entry)
    assert [e.reason for e in errors] == [reason] * 5, [str(e) for e in errors]
    assert await redis.execute("GET", "existing") == "v", "reads still work"
    assert await redis.evalsha(READ, ["existing"]) == "v"
    return errors


async def test_out_of_memory(redis: RedisClient) -> None:
    with trio.fail_after(10):
        await redis.execute("CONFIG", "SET", "maxmemory", 1)
        try:
            await assert_unavailable(redis, Unavailable.OUT_OF_MEMORY)
        finally:
            await redis.execute("CONFIG", "SET", "maxmemory", 0)
        assert await redis.execute("SET", "k", "x") == "OK"
        stats = redis.statistics()
        assert stats.connects == 1, "a refusal costs no connection"
        assert stats.errors_unavailable == 5


async def test_not_enough_replicas(redis: RedisClient) -> None:
    with trio.fail_after(10):
        await redis.execute("CONFIG", "SET", "min-replicas-to-write", 1)
        try:
            await assert_unavailable(redis, Unavailable.NO_REPLICAS)
        finally:
            await redis.execute("CONFIG", "SET", "min-replicas-to-write", 0)
        assert redis.statistics().connects == 1


async def test_busy_script(redis: RedisClient, private_redis: RedisServerInfo) -> None:
    with trio.fail_after(10):
        await redis.execute("CONFIG", "SET", "lua-time-limit", 50)
        try:
            async with (
                open_redis(private_redis.url) as spinner,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(spinner.evalsha, SPIN, [], [600])
                await trio.sleep(0.25)  # past the time limit: Redis answers BUSY
                with pytest.raises(StoreUnavailable) as info:
                    await redis.execute("GET", "existing")
                assert info.value.reason is Unavailable.BUSY
        finally:
            await redis.execute("CONFIG", "SET", "lua-time-limit", 5000)
        assert await redis.execute("GET", "existing") == "v"
        assert redis.statistics().connects == 1


async def test_read_only_replica_retires_the_connections(
    redis: RedisClient, private_redis: RedisServerInfo
) -> None:
    """After a failover the old master is a replica: renew connections, report not-now."""
    with trio.fail_after(15):
        first_id = await redis.execute("CLIENT", "ID")
        # A master that does not exist: the server becomes a replica, keeps
        # its data, serves reads, refuses writes with READONLY.
        await redis.execute("REPLICAOF", "127.0.0.1", 1)
        try:
            with pytest.raises(StoreUnavailable) as info:
                await redis.execute("SET", "k", "x")
            assert info.value.reason is Unavailable.READ_ONLY
            assert info.value.explanation == "read-only replica"
            assert redis.statistics().read_only_resets == 1
            assert await redis.execute("CLIENT", "ID") != first_id, "a fresh connection"
            await trio.sleep(0.25)  # past reconnect_backoff
            await assert_unavailable(redis, Unavailable.READ_ONLY)
            with pytest.raises(StoreUnavailable) as info:
                await redis.probe_write("probe")
            assert info.value.reason is Unavailable.READ_ONLY
        finally:
            await redis.execute("REPLICAOF", "NO", "ONE")
        assert await redis.execute("SET", "k", "after") == "OK"
        await redis.probe_write("probe")
        stats = redis.statistics()
        assert 2 <= stats.read_only_resets <= 4, "rate-limited to one per reconnect_backoff"
        assert stats.reconnects >= 2
        assert stats.connections_open == 1, "retired connections closed once drained"


async def test_a_retired_connection_finishes_what_it_was_sent(
    redis: RedisClient, private_redis: RedisServerInfo
) -> None:
    """Requests already written when READONLY retires a connection still get their replies.

    (Dropping the connection at once would fail them, though Redis may have
    run them: for a write that is a result stored and never reported.)
    """
    with trio.fail_after(15):
        await redis.execute("REPLICAOF", "127.0.0.1", 1)
        try:
            finished: list[int] = []
            refused: list[Unavailable] = []

            async def write() -> None:
                try:
                    await redis.execute("SET", "k", "x")
                except StoreUnavailable as exc:
                    refused.append(exc.reason)

            async def read(i: int) -> None:
                assert await redis.execute("ECHO", str(i)) == str(i)
                finished.append(i)

            async def block(ms: int) -> None:
                assert await redis.execute("XREAD", "BLOCK", ms, "STREAMS", "none", "$") is None

            async def written(count: int) -> None:
                while redis.statistics().commands < count:
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                # Written in this order on the one connection while the first
                # XREAD blocks it: the SET, a second XREAD that blocks again, 30
                # reads.  Redis replies READONLY to the SET and then holds the
                # reads for 300 ms, so they are in flight when the caller of
                # the SET retires the connection.
                steps: list[Callable[[], Awaitable[None]]] = [
                    partial(block, 150),
                    write,
                    partial(block, 300),
                ]
                steps += [partial(read, i) for i in range(30)]
                sent = redis.statistics().commands
                for n, step in enumerate(steps, 1):
                    nursery.start_soon(step)
                    await written(sent + n)
                assert not refused, "written while Redis was blocked"
                while not refused:  # noqa: ASYNC110 - waits for the READONLY
                    await trio.sleep(0.01)
                assert redis.statistics().read_only_resets == 1
                assert not finished, "the reads are still in flight, behind the second XREAD"
            assert refused == [Unavailable.READ_ONLY]
            assert sorted(finished) == list(range(30)), "no read failed after the retirement"
            stats = redis.statistics()
            assert (stats.read_only_resets, stats.connects) == (1, 1)
            assert await redis.execute("ECHO", "next") == "next"
            assert redis.statistics().connects == 2, "the next call got a fresh connection"
        finally:
            await redis.execute("REPLICAOF", "NO", "ONE")


async def test_genuine_command_errors_cost_nothing(redis: RedisClient) -> None:
    with trio.fail_after(10):
        await redis.execute("SET", "str", "v")
        with pytest.raises(CommandError) as info:
            await redis.evalsha(Script("return redis.call('HGET', KEYS[1], 'f')"), ["str"])
        assert "WRONGTYPE" in str(info.value)
        with pytest.raises(CommandError, match="oops"):
            await redis.evalsha(Script("error('oops')"))
        with pytest.raises(CommandError) as info:
            await redis.load_scripts([Script("this is not lua")])
        replies = await redis.pipeline([("MULTI",), ("INCR", "str"), ("EXEC",)])
        assert replies[:2] == ["OK", "QUEUED"]
        assert isinstance(replies[2][0], CommandError), "errors nested in EXEC are ours too"
        stats = redis.statistics()
        assert (stats.connects, stats.errors_unavailable) == (1, 0)
