"""The workers of one ``serve --workers N``, as they see each other through Redis.

Theory of operation
===================

The supervisor (:mod:`trio_portfolio.supervisor`) gives every worker a
:class:`GroupSpec`: the group id (fresh per supervisor run), the group size
``N`` and the worker's slot ``0..N-1`` (a restarted worker takes the slot of
the one it replaces).  Each worker runs :meth:`WorkerGroup.run`, which every
:data:`HEARTBEAT_INTERVAL` seconds (and at once when its readiness changes,
:meth:`WorkerGroup.nudge`), in one pipeline:

* writes its *heartbeat* ``<prefix>:workers:<group>:<slot>:ready`` (its pid,
  whether it is ready and why not) and its *snapshot*
  ``<prefix>:workers:<group>:<slot>:metrics`` (every sample of its private
  metrics registry, as JSON), both with a TTL of :data:`HEARTBEAT_TTL`, so a
  dead worker's keys vanish on their own;
* reads the other slots' snapshots into a local cache.

``GET /metrics`` on any worker (:meth:`WorkerGroup.exposition`) renders this
worker's registry fresh plus the cached snapshots of the others, every
sample labelled ``worker="<pid>"``: one view of the whole server, the other
workers' figures at most about two heartbeats old.  ``GET /ready``
(:meth:`WorkerGroup.check_ready`) reads the ``N`` heartbeats (one ``MGET``)
and is ready only when every slot has a live heartbeat saying ready.

Bounds: ``N`` is at most :data:`~trio_portfolio.config.MAX_WORKERS`; a
snapshot larger than :data:`MAX_SNAPSHOT_BYTES` is not published (logged
once), and one read larger than that is ignored, so a scrape holds at most
``N`` snapshots.  Heartbeat failures (Redis down) are logged and retried at
the next beat; they never end the loop: the keys then expire and the other
workers report this one as not ready, which is the truth.

With ``--workers 1`` there is no group and none of this runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import orjson
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from trio_portfolio.redis_io import RedisClient, StoreUnavailable

__all__ = [
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TTL",
    "MAX_SNAPSHOT_BYTES",
    "WORKER_LABEL",
    "GroupSpec",
    "WorkerGroup",
    "merge_families",
]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
"""Seconds between two heartbeats (and snapshot reads) of one worker."""
HEARTBEAT_TTL = 3.0
"""Seconds a heartbeat or snapshot lives: a worker silent this long counts as gone."""
MAX_SNAPSHOT_BYTES = 1 << 20
"""Largest metrics snapshot a worker publishes or reads (about 100x today's size)."""
WORKER_LABEL = "worker"
"""The label (value: the worker's pid) every sample of a merged exposition carries."""

ReadyHint = Callable[[], tuple[bool, str]]


@attrs.frozen
class GroupSpec:
    """Who a worker is within its group; given by the supervisor."""

    group_id: str
    size: int
    slot: int
    parent_pid: int

    def key(self, key_prefix: str, slot: int, kind: str) -> str:
        """``<prefix>:workers:<group>:<slot>:<kind>`` (``kind``: ``ready`` or ``metrics``)."""
        return f"{key_prefix}:workers:{self.group_id}:{slot}:{kind}"


# -- merging ----------------------------------------------------------------------------------

Family = dict[str, Any]
"""One metric family as JSON: ``{"name", "type", "help", "samples": [[name, labels, value]]}``."""


def families_of(registry: CollectorRegistry) -> list[Family]:
    """Every family of ``registry`` (pulled collectors read now), as plain JSON values."""
    return [
        {
            "name": metric.name,
            "type": metric.type,
            "help": metric.documentation,
            "samples": [[s.name, dict(s.labels), s.value] for s in metric.samples],
        }
        for metric in registry.collect()
    ]


def merge_families(snapshots: list[tuple[int, list[Family]]]) -> list[Metric]:
    """One family per name, each sample labelled ``worker="<pid>"``, in first-seen order.

    Families whose type disagrees between workers (a mixed-version group)
    keep the first worker's type; a sample that already has a ``worker``
    label is left as it is.
    """
    merged: dict[str, Metric] = {}
    for pid, families in snapshots:
        for family in families:
            metric = merged.get(family["name"])
            if metric is None:
                metric = Metric(family["name"], family["help"], family["type"])
                merged[family["name"]] = metric
            for name, labels, value in family["samples"]:
                metric.add_sample(name, {WORKER_LABEL: str(pid), **labels}, value)
    return list(merged.values())


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def render(metrics: list[Metric]) -> str:
    """Prometheus text format 0.0.4 of ``metrics``, by ``prometheus_client``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(metrics))
    return generate_latest(registry).decode()


def _parse_snapshot(raw: bytes | str | None) -> tuple[int, list[Family]] | None:
    """``(pid, families)`` of a stored snapshot, or ``None`` if absent or unreadable."""
    if raw is None or len(raw) > MAX_SNAPSHOT_BYTES:
        return None
    try:
        value = orjson.loads(raw)
        return int(value["pid"]), list(value["families"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


# -- the group ---------------------------------------------------------------------------------


class WorkerGroup:
    """This worker's side of the group: heartbeat, snapshot, merged view, group readiness."""

    def __init__(
        self,
        spec: GroupSpec,
        redis: RedisClient,
        key_prefix: str,
        registry: CollectorRegistry,
        ready_hint: ReadyHint,
    ) -> None:
        """``registry`` is this worker's metrics; ``ready_hint()`` its local readiness."""
        self.spec = spec
        self.redis = redis
        self.key_prefix = key_prefix
        self.registry = registry
        self.ready_hint = ready_hint
        self.pid = os.getpid()
        self._others: dict[int, tuple[int, list[Family]]] = {}
        self._wake = trio.Event()
        self._too_big_logged = False

    def nudge(self) -> None:
        """Beat now rather than at the next interval (this worker's readiness changed)."""
        self._wake.set()

    def _key(self, slot: int, kind: str) -> str:
        return self.spec.key(self.key_prefix, slot, kind)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat every :data:`HEARTBEAT_INTERVAL` until cancelled; never raises on faults.

        On cancellation (shutdown) the heartbeat is removed, shielded for
        at most a second, so the others see this worker leave at once.
        """
        task_status.started()
        try:
            while True:
                try:
                    await self.beat()
                except StoreUnavailable as exc:
                    log.debug("worker heartbeat failed (retrying): %s", exc)
                with trio.move_on_after(HEARTBEAT_INTERVAL):
                    await self._wake.wait()
                self._wake = trio.Event()
        finally:
            with trio.move_on_after(1.0, shield=True):
                with contextlib.suppress(StoreUnavailable):
                    key = self._key(self.spec.slot, "ready")
                    await self.redis.execute("DEL", key, timeout=1.0)

    async def beat(self) -> None:
        """Publish this worker's heartbeat and snapshot; refresh the others' snapshots.

        Raises :class:`StoreUnavailable` when Redis does not answer.
        """
        ttl = str(int(HEARTBEAT_TTL * 1000))
        ok, reason = self.ready_hint()
        heartbeat = orjson.dumps({"pid": self.pid, "ready": ok, "reason": reason})
        snapshot = orjson.dumps({"pid": self.pid, "families": families_of(self.registry)})
        commands: list[tuple[str, ...]] = []
        commands.append(("SET", self._key(self.spec.slot, "ready"), heartbeat.decode(), "PX", ttl))
        if len(snapshot) <= MAX_SNAPSHOT_BYTES:
            commands.append(
                ("SET", self._key(self.spec.slot, "metrics"), snapshot.decode(), "PX", ttl)
            )
        elif not self._too_big_logged:
            self._too_big_logged = True
            log.warning(
                "metrics snapshot of %d bytes exceeds %d: not shared with the other workers",
                len(snapshot),
                MAX_SNAPSHOT_BYTES,
            )
        others = [slot for slot in range(self.spec.size) if slot != self.spec.slot]
        if others:
            commands.append(("MGET", *(self._key(slot, "metrics") for slot in others)))
        replies = await self.redis.pipeline(commands, timeout=HEARTBEAT_INTERVAL * 2)
        for reply in replies:
            if isinstance(reply, Exception):
                raise StoreUnavailable(f"heartbeat refused: {reply}")
        if others:
            fresh: dict[int, tuple[int, list[Family]]] = {}
            for slot, raw in zip(others, replies[-1], strict=True):
                parsed = _parse_snapshot(raw)
                if parsed is not None:
                    fresh[slot] = parsed
            self._others = fresh

    def exposition(self) -> str:
        """Every worker's series, labelled by pid: this one's fresh, the others' as cached."""
        snapshots = [(self.pid, families_of(self.registry))]
        snapshots += [self._others[slot] for slot in sorted(self._others)]
        return render(merge_families(snapshots))

    async def check_ready(self) -> tuple[bool, str]:
        """``(True, "ok")`` when every slot has a live heartbeat saying ready.

        Raises :class:`StoreUnavailable` when Redis does not answer.
        """
        slots = range(self.spec.size)
        replies = await self.redis.execute(
            "MGET", *(self._key(slot, "ready") for slot in slots), timeout=1.0
        )
        problems = []
        for slot, raw in zip(slots, replies, strict=True):
            name = f"worker {slot + 1}/{self.spec.size}"
            if slot == self.spec.slot:
                continue  # this worker: the caller checked it just now
            if raw is None:
                problems.append(f"{name} has not reported within {HEARTBEAT_TTL:g} s")
                continue
            try:
                beat = orjson.loads(raw)
                ok, reason, pid = bool(beat["ready"]), str(beat["reason"]), int(beat["pid"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                problems.append(f"{name} reported an unreadable heartbeat")
                continue
            if not ok:
                problems.append(f"{name} (pid {pid}) is not ready: {reason}")
        if problems:
            return False, "; ".join(problems)
        return True, "ok"
