"""Logging: JSON lines for machines, readable text for terminals.

:func:`configure_logging` routes the project's logs to stderr, as JSON lines
(the default when stderr is not a terminal) or readable text.  Each JSON
line carries the ids a log call passes in ``extra`` (connection, session,
analysis, remote address), so one connection's story can be filtered out of
a busy server's log.  Every line, JSON or text, names the process (``pid``):
with ``serve --workers N`` the supervisor and its workers share one stderr,
and the pid tells them apart.  Metrics are :mod:`trio_portfolio.metrics`.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any ``extra`` ids (connection, session, analysis)."""

    FIELDS = ("connection_id", "session_id", "analysis_id", "remote")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for field in self.FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
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
        formatter = logging.Formatter(
            "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"
        )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
