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

import hashlib
import json
import logging
import secrets
import sys
import time


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
            "pid": record.process,
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
        formatter = logging.Formatter(
            "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"
        )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
