"""Command line: ``trio-portfolio serve | demo | config`` (and the hidden ``worker``).

``serve`` with ``--workers 1`` (the default) is one process; with more it is
the supervisor of :mod:`trio_portfolio.supervisor`, which runs itself again
as ``python -m trio_portfolio worker`` once per worker.  ``worker`` is not
for people: it reads what to do from the supervisor (see
:mod:`trio_portfolio.worker`) and is left out of ``--help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import trio

from trio_portfolio.config import (
    ConfigError,
    Settings,
    add_setting_flags,
    load_settings,
    settings_as_text,
)
from trio_portfolio.logs import configure_logging

SWITCH_INTERVAL = 0.0005
"""Seconds a thread may hold the GIL before the interpreter hands it over."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-portfolio",
        description="Real-time portfolio analysis over WebSockets, on Trio and Redis.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the WebSocket server on ws://HOST:PORT/ws/{session_id}. Without "
        "--redis-url it starts its own redis-server, keeping data in --data-dir. "
        "With --workers N, N processes share the port and the Redis. "
        "SIGINT/SIGTERM shut it down gracefully.",
    )
    add_setting_flags(serve)
    demo = commands.add_parser(
        "demo",
        help="replay the original demo against a running server",
        description="Connect (v2), analyze AAPL, switch to GOOGL after two results, and print "
        "every frame. Exits 1 if an AAPL result arrives after the first GOOGL frame.",
    )
    demo.add_argument(
        "url", nargs="?", help="ws://HOST:PORT/ws/SESSION (default: a new session on :8000)"
    )
    demo.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    config = commands.add_parser(
        "config",
        help="print the effective configuration",
        description="Print the configuration serve would use (defaults < file < env < flags), "
        "secrets masked.",
    )
    add_setting_flags(config)
    commands.add_parser("worker")  # no help=: not listed; see the module docstring
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args, os.environ, None)
    except ConfigError as exc:
        sys.exit(f"trio-portfolio: configuration error: {exc}")


def _first_leaf(error: BaseException) -> BaseException:
    """The first exception inside (possibly nested) exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        print(settings_as_text(_settings(args)), end="")
    elif args.command == "demo":
        from trio_portfolio.demo import run_demo

        try:
            sys.exit(trio.run(lambda: run_demo(args.url, timeout=args.timeout)))
        except (OSError, trio.TooSlowError) as exc:
            sys.exit(f"trio-portfolio demo: {exc or 'timed out'}")
    elif args.command == "worker":
        _worker()
    else:
        settings = _settings(args)
        configure_logging(settings.log_level.value, settings.log_format.value)
        if settings.workers > 1:
            _supervise(settings)
            return
        from trio_portfolio.server import serve

        # A worker thread computing metrics holds the GIL for up to the switch
        # interval (5 ms by default) before the Trio loop gets it back; 0.5 ms
        # keeps the loop responsive (see bench/bench_loop_latency.py).
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            trio.run(serve, settings)
        except* ConfigError as group:  # found at start-up, e.g. a bad --replay-file
            sys.exit(f"trio-portfolio: configuration error: {_first_leaf(group)}")


def _supervise(settings: Settings) -> None:
    """``serve --workers N``: exit 1 with a message on a crash loop or a start-up failure."""
    from trio_portfolio.embedded import EmbeddedRedisError
    from trio_portfolio.supervisor import CrashLoop, run_supervisor

    try:
        trio.run(run_supervisor, settings)
    except (CrashLoop, EmbeddedRedisError) as exc:
        sys.exit(f"trio-portfolio: {exc}")
    except OSError as exc:
        sys.exit(f"trio-portfolio: cannot listen on {settings.host}:{settings.port}: {exc}")


def _worker() -> None:
    from trio_portfolio.worker import WorkerSpec, WorkerSpecError, die_with_parent, run_worker

    try:
        spec = WorkerSpec.from_environ(os.environ)
    except WorkerSpecError as exc:
        sys.exit(f"trio-portfolio worker: {exc}")
    die_with_parent(spec.group.parent_pid)
    settings = spec.settings
    configure_logging(settings.log_level.value, settings.log_format.value)
    sys.setswitchinterval(SWITCH_INTERVAL)
    trio.run(run_worker, spec)


if __name__ == "__main__":
    main()
