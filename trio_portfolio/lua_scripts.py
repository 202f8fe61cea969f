"""The one loader of the Lua scripts that ship inside the package.

Lua lives beside the code that runs it: the session store's scripts in
``trio_portfolio/store/lua/``, the market's in ``trio_portfolio/lua/``.
Both read them with :func:`load_script`, through :mod:`importlib.resources`,
so they are found in a source checkout, an editable install and a wheel
alike (``pyproject.toml`` ships ``*.lua`` as package data).

This module depends only on :class:`~trio_portfolio.redis_io.Script`, so
any module may import it without creating an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from importlib.resources.abc import Traversable

from trio_portfolio.redis_io import Script

__all__ = ["load_script", "lua_directory"]


def lua_directory(package: str, subdirectory: str = "lua") -> Traversable:
    """The directory ``subdirectory`` of the (regular) package ``package``, as a resource.

    Going through the package rather than naming ``<package>.lua`` keeps the
    Lua directories plain data directories (no ``__init__.py``, not
    importable).
    """
    return resources.files(package).joinpath(subdirectory)


def load_script(directory: Traversable, name: str, *, libraries: Sequence[str] = ()) -> Script:
    """``<directory>/<name>.lua`` with each ``<directory>/<library>.lua`` prepended, as a Script.

    The libraries are plain Lua chunks of ``local function`` definitions, so
    the concatenation (joined by newlines) is one script; its SHA1 changes
    whenever any part does.  Without libraries the script is the file's text
    exactly.

    Raises:
      FileNotFoundError: if a file is missing (a packaging bug: the scripts
        are read at import or construction time, so it shows at startup).
      UnicodeDecodeError: if a file is not UTF-8.
    """
    parts = [directory.joinpath(f"{lib}.lua").read_text(encoding="utf-8") for lib in libraries]
    parts.append(directory.joinpath(f"{name}.lua").read_text(encoding="utf-8"))
    return Script("\n".join(parts))
