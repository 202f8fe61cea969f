"""Opening Redis from a URL, whatever stands behind it: one node, a cluster, or Sentinel.

The one place that picks the client for a URL (the package forbids import
cycles, so this sits above :mod:`~trio_portfolio.redis_io`,
:mod:`~trio_portfolio.redis_cluster`, :mod:`~trio_portfolio.redis_sentinel`
and the pub/sub modules rather than inside them):

* ``redis[s]+cluster://host:port[,host:port...]`` - a
  :class:`~trio_portfolio.redis_cluster.ClusterClient`, and sharded pub/sub
  (:class:`~trio_portfolio.redis_sharded_pubsub.ShardedPubSub`) on Redis >= 7;
* ``redis[s]+sentinel://host:port[,host:port...]/<master-name>[/db]`` - a
  :class:`~trio_portfolio.redis_sentinel.SentinelClient`; its pub/sub is a
  classic subscriber on the master named at open;
* ``redis://``, ``rediss://``, ``unix://`` - a single node, unless ``INFO
  cluster`` on that TCP node says ``cluster_enabled:1`` (checked once, on a
  connection of its own, within ``min(timeout, 1 s)``; anything else means
  single node), which opens the cluster client seeded there.

Every client is a :class:`~trio_portfolio.redis_io.RedisClient` and every
subscriber a :class:`~trio_portfolio.redis_pubsub.PubSub` to its callers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from trio_portfolio.redis_cluster import detect_cluster, is_cluster_url, open_cluster
from trio_portfolio.redis_io import RedisClient
from trio_portfolio.redis_io import open_redis as open_single_node
from trio_portfolio.redis_pubsub import PubSub
from trio_portfolio.redis_pubsub import open_pubsub as open_single_node_pubsub
from trio_portfolio.redis_sentinel import is_sentinel_url, open_sentinel
from trio_portfolio.redis_sharded_pubsub import open_sharded_pubsub
from trio_portfolio.redis_wire import ConnectionParams

__all__ = ["open_pubsub", "open_redis"]

_DETECT_TIMEOUT = 1.0  # seconds, at most, to ask a plain URL's node whether it is a cluster


@asynccontextmanager
async def open_redis(
    url: str,
    *,
    timeout: float = 5.0,
    connections: int = 2,
    reconnect_backoff: float = 0.5,
    stall_timeout: float | None = None,
    on_latency: Callable[[float], None] | None = None,
) -> AsyncIterator[RedisClient]:
    """The client for ``url`` (see the module docstring), living in this block.

    Options as for :func:`trio_portfolio.redis_io.open_redis` (``connections``
    is per node on a cluster).  Succeeds while Redis is down (the first call
    reports it): a node that does not answer the cluster probe is taken for
    a single node.

    Raises:
      ValueError: for a bad URL or setting.
      StoreUnavailable: never from opening; from calls, as
        :func:`trio_portfolio.redis_io.open_redis` says.
    """
    options = {
        "timeout": timeout,
        "connections": connections,
        "reconnect_backoff": reconnect_backoff,
        "stall_timeout": stall_timeout,
        "on_latency": on_latency,
    }
    client: RedisClient
    if is_sentinel_url(url):
        async with open_sentinel(url, **options) as client:  # type: ignore[arg-type]
            yield client
        return
    if is_cluster_url(url):
        async with open_cluster(url, **options) as client:  # type: ignore[arg-type]
            yield client
        return
    params = ConnectionParams.from_url(url)
    if params.path is None and await detect_cluster(params, timeout=min(timeout, _DETECT_TIMEOUT)):
        async with open_cluster([params], **options) as client:  # type: ignore[arg-type]
            yield client
        return
    async with open_single_node(url, **options) as client:  # type: ignore[arg-type]
        yield client


@asynccontextmanager
async def open_pubsub(
    url: str, *, buffer: int = 1024, heartbeat: float = 5.0
) -> AsyncIterator[PubSub]:
    """The subscriber for ``url``: sharded on a Redis >= 7 cluster, classic otherwise.

    A Sentinel URL subscribes on the master the sentinels name at open.
    Like :func:`open_redis` it succeeds while Redis is down: the subscriber
    reconnects and resubscribes on its own (counted in its statistics).

    Raises:
      ValueError: for a bad URL.
    """
    if is_sentinel_url(url):
        async with open_sentinel(url, connections=1) as sentinel:
            master = sentinel.params
        async with open_single_node_pubsub(
            _url_of(master), buffer=buffer, heartbeat=heartbeat
        ) as pubsub:
            yield pubsub
        return
    params = None if is_cluster_url(url) else ConnectionParams.from_url(url)
    if params is None or (
        params.path is None and await detect_cluster(params, timeout=_DETECT_TIMEOUT)
    ):
        async with open_sharded_pubsub(
            url if params is None else [params], buffer=buffer, heartbeat=heartbeat
        ) as sharded:
            yield sharded
        return
    async with open_single_node_pubsub(url, buffer=buffer, heartbeat=heartbeat) as pubsub:
        yield pubsub


def _url_of(params: ConnectionParams) -> str:
    """A ``redis://`` URL for ``params`` (credentials included: never log it)."""
    scheme = "rediss" if params.tls else "redis"
    auth = ""
    if params.password is not None:
        auth = f"{params.username or ''}:{params.password}@"
    return f"{scheme}://{auth}{params.host}:{params.port}/{params.db}"
