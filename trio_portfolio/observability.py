"""Metrics and logging.

:class:`Metrics` is a small registry of labelled counters, gauges and
histograms owned by one server (never module-global), cheap enough to bump
on every frame; :meth:`Metrics.render_prometheus` writes the Prometheus text
exposition format.  :func:`configure_logging` sets up JSON lines (the
default when stderr is not a terminal) or readable text.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import secrets
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

Labels = tuple[tuple[str, str], ...]

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus expects."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


class Metrics:
    """Labelled counters, gauges (set or computed on read) and histograms."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self.gauges: dict[str, dict[Labels, float]] = defaultdict(dict)
        self.gauge_functions: dict[str, Callable[[], float]] = {}
        self.histograms: dict[str, dict[Labels, Histogram]] = defaultdict(dict)
        self.help: dict[str, str] = {}

    @staticmethod
    def _labels(labels: dict[str, str]) -> Labels:
        return tuple(sorted(labels.items()))

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` to counter ``name`` with ``labels``."""
        self.counters[name][self._labels(labels)] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set gauge ``name`` with ``labels``."""
        self.gauges[name][self._labels(labels)] = value

    def gauge_function(self, name: str, read: Callable[[], float], help_text: str = "") -> None:
        """A gauge computed when metrics are read (e.g. open connections)."""
        self.gauge_functions[name] = read
        if help_text:
            self.help[name] = help_text

    def observe(
        self,
        name: str,
        value: float,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        **labels: str,
    ) -> None:
        """Record ``value`` in histogram ``name``."""
        key = self._labels(labels)
        histogram = self.histograms[name].get(key)
        if histogram is None:
            histogram = self.histograms[name][key] = Histogram(buckets)
        histogram.observe(value)

    def counter(self, name: str, **labels: str) -> float:
        """The current value of one counter (0 if never bumped)."""
        return self.counters.get(name, {}).get(self._labels(labels), 0.0)

    def render_prometheus(self, prefix: str = "trio_portfolio_") -> str:
        """Everything, in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []

        def head(name: str, kind: str) -> None:
            if name in self.help:
                lines.append(f"# HELP {prefix}{name} {self.help[name]}")
            lines.append(f"# TYPE {prefix}{name} {kind}")

        for name in sorted(self.counters):
            head(name, "counter")
            for labels, value in sorted(self.counters[name].items()):
                lines.append(f"{prefix}{name}_total{_fmt_labels(labels)} {_num(value)}")
        for name in sorted(set(self.gauges) | set(self.gauge_functions)):
            head(name, "gauge")
            if name in self.gauge_functions:
                lines.append(f"{prefix}{name} {_num(self.gauge_functions[name]())}")
            for labels, value in sorted(self.gauges.get(name, {}).items()):
                lines.append(f"{prefix}{name}{_fmt_labels(labels)} {_num(value)}")
        for name in sorted(self.histograms):
            head(name, "histogram")
            for labels, h in sorted(self.histograms[name].items()):
                cumulative = 0
                for bound, count in zip((*h.bounds, math.inf), h.counts, strict=True):
                    cumulative += count
                    le = "+Inf" if bound == math.inf else _num(bound)
                    lines.append(
                        f"{prefix}{name}_bucket{_fmt_labels((*labels, ('le', le)))} {cumulative}"
                    )
                lines.append(f"{prefix}{name}_sum{_fmt_labels(labels)} {_num(h.total)}")
                lines.append(f"{prefix}{name}_count{_fmt_labels(labels)} {h.count}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _num(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def new_error_id() -> str:
    """A correlation id for an error: the client gets it in the answer, the log line carries it."""
    return "e-" + secrets.token_hex(5)


def session_log_id(session_id: str) -> str:
    """How a session id appears in logs: ``s-`` and 12 hex digits of its SHA-256.

    Ids are bearer names (with authentication off, knowing one is owning it),
    so logs carry a stable pseudonym that correlates lines, never the id.
    """
    return "s-" + hashlib.sha256(session_id.encode()).hexdigest()[:12]


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any ``extra`` ids (connection, session, analysis).

    ``session_id`` is written as :func:`session_log_id`, never as given.
    """

    FIELDS = ("connection_id", "session_id", "analysis_id", "remote")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in self.FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = session_log_id(str(value)) if field == "session_id" else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "auto") -> None:
    """Route the project's logs to stderr as JSON lines or text (``auto``: JSON unless a TTY)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    if use_json:
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
